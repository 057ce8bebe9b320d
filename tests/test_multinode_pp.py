"""Pipeline parallel across nodes on a real 2-node Slurm cluster on this machine (tests/slurm_cluster.py):
one stage per node, activations and their gradients sent between the nodes point to point -- how a
pipeline crosses node boundaries in Falcon's layouts. Losses must equal one node's: launch/torchrun.sh's DDP
run of the same config and global batch (the session's ddp_reference), within 1e-5."""

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


def test_pp_across_nodes_matches_one_node(slurm_cluster_2n, ddp_reference, tmp_path):
    """sbatch -N 2 launch/slurm/torchrun.sbatch parallel.pp=2 with 1 rank per node: stage 0 on node1, stage 1
    on node2 (pp is the mesh's outermost dim), 4 sequences per step cut into 2 microbatches; the losses equal
    one node's (DDP, 2 ranks x micro-batch 2)."""
    cluster = slurm_cluster_2n
    job = cluster.sbatch(LAUNCH / "slurm" / "torchrun.sbatch", *JOB_CFG, "parallel.pp=2", "train.micro_batch_size=4",
                         sbatch_args=("-N", "2"), cwd=tmp_path, env=launch_env(1))
    state = cluster.wait_done(job, 400)
    out_file = tmp_path / f"slurm-{job}.out"
    out = out_file.read_text(errors="replace") if out_file.exists() else ""
    assert state == "COMPLETED", f"job {job} {state}:\n{out[-5000:]}"
    info = cluster.job_info(job)
    assert info["NumNodes"] == "2" and info["NodeList"] == "node[1-2]", info
    assert "on 2 node(s) [node1 node2] x 1 rank(s)" in out, out[-3000:]
    run_dir = tmp_path / "runs" / f"slurm-{job}"
    meta = json.loads((latest_checkpoint(run_dir) / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == 8, meta
    assert meta["parallel"] == {"pp": 2, "dp_replicate": 1, "dp_shard": 1, "tp": 1}, meta
    assert_same_losses(losses_by_step(run_dir), ddp_reference, 1e-5)
