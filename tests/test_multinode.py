"""The shipped multi-node jobs on a real 2-node Slurm cluster on this machine (one cluster for the module: each
start of it costs seconds of daemons and network namespaces).

Two slurmd daemons (node1, node2), each in its own network namespace with its own hostname where
`ip netns` works (see tests/slurm_cluster.py), so rendezvous and collectives cross a veth + bridge;
one rank per node, or two for tensor parallel inside a node with FSDP2 across nodes, and pipeline parallel with
one stage per node: the Falcon-40B layout's shape (TP within the fast links of a node, pipeline stages and data
parallel over the network) at the smallest size. Losses must equal a 2-rank single-node run of the same config
and global batch (fp32, CPU; for the TP layout, the same 4-rank tp x dp_shard layout on one node gave those
losses within 1e-6, measured). The lost-node test runs last: it kills and restarts node2."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from slurm_cluster import (
    JOB_CFG,
    LAUNCH,
    REPO,
    SlurmCluster,
    assert_same_losses,
    ddp_reference,
    latest_checkpoint,
    launch_env,
    losses_by_step,
    slurm_cluster_2n,
    train_steps,
    zero3_reference,
)

pytestmark = pytest.mark.slow
__all__ = ["ddp_reference", "slurm_cluster_2n", "zero3_reference"]  # fixtures used below

# HSDP with one rank per node: replicas across the nodes, shard groups of one rank. Its oracle is launch/torchrun.sh's
# DDP run on one node (the session's ddp_reference): the same arithmetic, losses equal bitwise (measured)
HSDP = ("strategy=fsdp", "strategy.replicate_degree=2")
HAS_ZERO3 = (REPO / "train" / "parallel" / "deepspeed.py").is_file()


def _output(job: int, cwd: Path) -> str:
    out = cwd / f"slurm-{job}.out"
    return out.read_text(errors="replace") if out.exists() else ""


def _check_two_node_run(cluster: SlurmCluster, job: int, cwd: Path) -> Path:
    state = cluster.wait_done(job, 400)
    out = _output(job, cwd)
    assert state == "COMPLETED", f"job {job} {state}:\n{out[-5000:]}"
    info = cluster.job_info(job)
    assert info["NumNodes"] == "2" and info["NodeList"] == "node[1-2]", info
    assert "on 2 node(s) [node1 node2] x 1 rank(s)" in out
    run_dir = cwd / "runs" / f"slurm-{job}"
    meta = json.loads((latest_checkpoint(run_dir) / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == 8, meta
    return run_dir


@pytest.mark.skipif(not HAS_ZERO3, reason="strategy=zero3 (train/parallel/deepspeed.py) is not in this build yet")
def test_zero3_across_two_nodes_matches_single_node(slurm_cluster_2n, zero3_reference, tmp_path):
    """sbatch -N 2 launch/slurm/deepspeed.sbatch strategy=zero3: DeepSpeed's per-node launcher on each
    node (started by srun, no ssh) with the hostfile written from the allocation."""
    job = slurm_cluster_2n.sbatch(LAUNCH / "slurm" / "deepspeed.sbatch", *JOB_CFG, "strategy=zero3",
                                  sbatch_args=("-N", "2"), cwd=tmp_path, env=launch_env(1))
    run_dir = _check_two_node_run(slurm_cluster_2n, job, tmp_path)
    assert (run_dir / "hostfile").read_text().split() == ["node1", "slots=1", "node2", "slots=1"]
    assert_same_losses(losses_by_step(run_dir), zero3_reference, 1e-5)


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


def test_lost_node_fails_naming_the_rank_then_requeued_job_resumes(slurm_cluster_2n, ddp_reference, tmp_path):
    """sbatch -N 2 launch/slurm/torchrun.sbatch strategy=fsdp strategy.replicate_degree=2 (c10d rendezvous
    across nodes, replicas across nodes): node2's slurmd and every process on it are killed mid-run: the job
    fails (no hang) with a message naming the lost rank; once the node is back, the requeued job runs on both
    nodes again, resumes from the latest complete checkpoint and ends with the uninterrupted one-node run's
    losses (so HSDP across two nodes equals one node; no separate uninterrupted 2-node job)."""
    cluster = slurm_cluster_2n
    job = cluster.sbatch(LAUNCH / "slurm" / "torchrun.sbatch", *JOB_CFG, *HSDP, "strategy.timeout_s=30",
                         sbatch_args=("-N", "2"), cwd=tmp_path, env=launch_env(1))
    run_dir = tmp_path / "runs" / f"slurm-{job}"
    end = time.monotonic() + 300
    while latest_checkpoint(run_dir) is None or max(train_steps(run_dir), default=0) < 3:
        assert time.monotonic() < end, f"no checkpoint in {run_dir}:\n{_output(job, tmp_path)[-4000:]}"
        assert cluster.job_state(job) in ("PENDING", "CONFIGURING", "RUNNING"), _output(job, tmp_path)[-4000:]
        time.sleep(0.2)
    lost_at = time.monotonic()
    cluster.stop_node("node2")
    state = cluster.wait_state(job, {"FAILED", "NODE_FAIL", "PENDING", "REQUEUED", "REQUEUE_FED"}, 180)
    failed_after = time.monotonic() - lost_at
    out = _output(job, tmp_path)
    # node2 ran global rank 1 (one rank per node, node 0 hosts the rendezvous)
    assert re.search(r"rank 1\b", out), f"no message names the lost rank 1 (job {state}):\n{out[-5000:]}"
    assert failed_after < 120, f"the job took {failed_after:.0f}s to notice the lost node"

    cluster.start_node("node2")
    cluster.wait_nodes_idle(120)
    if cluster.job_state(job) in ("FAILED", "NODE_FAIL"):
        cluster.requeue(job)
    cluster.release_requeued(job)
    assert _check_two_node_run(cluster, job, tmp_path) == run_dir
    out = _output(job, tmp_path)
    resumed = re.findall(r"resumed from \S+/(step_\d+) at step (\d+)", out)
    assert len(resumed) == 1 and int(resumed[0][1]) >= 2, out[-4000:]
    assert_same_losses(losses_by_step(run_dir), ddp_reference, 1e-5)
