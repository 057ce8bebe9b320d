"""Tensor parallel inside a node with FSDP2 across nodes, and pipeline parallel with one stage per node, on a
real 2-node Slurm cluster on this machine (tests/slurm_cluster.py): the Falcon-40B layout's shape (TP within the
fast links of a node, pipeline stages and data parallel over the network) at the smallest size. Losses must equal one node's: launch/torchrun.sh's DDP run of
the same config and global batch (the session's ddp_reference; the same 4-rank tp x dp_shard layout on one node
gave those losses within 1e-6, measured), within 1e-5."""

from __future__ import annotations

import json

import pytest
from slurm_cluster import (
    JOB_CFG,
    LAUNCH,
    assert_same_losses,
    ddp_reference,
    latest_checkpoint,
    launch_env,
    losses_by_step,
    slurm_cluster_2n,
)

pytestmark = pytest.mark.slow
__all__ = ["ddp_reference", "slurm_cluster_2n"]  # fixtures used below

# (overrides, ranks per node, the layout meta.json must record)
LAYOUTS = {
    # ranks 0,1 (node1) and 2,3 (node2) are the TP groups (tp is the mesh's innermost dim); the FSDP2 shard
    # groups {0,2} and {1,3} cross the nodes
    "tp_within_fsdp_across": (("parallel.tp=2", "parallel.dp_shard=2"), 2,
                              {"pp": 1, "dp_replicate": 1, "dp_shard": 2, "tp": 2}),
    # stage 0 on node1, stage 1 on node2 (pp is the mesh's outermost dim): activations and their gradients
    # cross the nodes point to point; 4 sequences per step cut into 2 pipeline microbatches
    "pp_across": (("parallel.pp=2", "train.micro_batch_size=4"), 1, {"pp": 2, "dp_replicate": 1, "dp_shard": 1, "tp": 1}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_across_two_nodes_matches_one_node(slurm_cluster_2n, ddp_reference, tmp_path, layout):
    """sbatch -N 2 launch/slurm/torchrun.sbatch with the layout's dims: the losses equal one node's (DDP, 2 ranks
    x micro-batch 2, the same global batch)."""
    overrides, per_node, parallel = LAYOUTS[layout]
    cluster = slurm_cluster_2n
    job = cluster.sbatch(LAUNCH / "slurm" / "torchrun.sbatch", *JOB_CFG, *overrides, sbatch_args=("-N", "2"),
                         cwd=tmp_path, env=launch_env(per_node))
    state = cluster.wait_done(job, 400)
    out_file = tmp_path / f"slurm-{job}.out"
    out = out_file.read_text(errors="replace") if out_file.exists() else ""
    assert state == "COMPLETED", f"job {job} {state}:\n{out[-5000:]}"
    info = cluster.job_info(job)
    assert info["NumNodes"] == "2" and info["NodeList"] == "node[1-2]", info
    assert f"on 2 node(s) [node1 node2] x {per_node} rank(s)" in out, out[-3000:]
    run_dir = tmp_path / "runs" / f"slurm-{job}"
    meta = json.loads((latest_checkpoint(run_dir) / "meta.json").read_text())
    assert meta["world_size"] == 2 * per_node and meta["step"] == 8, meta
    assert meta["parallel"] == parallel, meta
    assert_same_losses(losses_by_step(run_dir), ddp_reference, 1e-5)
