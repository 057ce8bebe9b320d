"""The shipped Slurm jobs on a real one-node Slurm cluster (slurmctld + slurmd started by the test).

Each job trains JOB_CFG with 2 CPU ranks; its losses must equal the same config launched directly
with launch/torchrun.sh or launch/deepspeed.sh (which these tests also exercise)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from helpers import read_metrics
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
    slurm_cluster,
    train_steps,
    zero3_reference,
)

pytestmark = pytest.mark.slow
__all__ = ["ddp_reference", "slurm_cluster", "zero3_reference"]  # fixtures used below


def _job_output(cluster: SlurmCluster, job: int, cwd: Path) -> str:
    out = cwd / f"slurm-{job}.out"
    return out.read_text(errors="replace") if out.exists() else ""


def _wait_for_step(run_dir: Path, step: int, timeout: float, cluster: SlurmCluster, job: int) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if latest_checkpoint(run_dir) is not None and max(train_steps(run_dir), default=0) >= step:
            return
        state = cluster.job_state(job)
        assert state in ("PENDING", "CONFIGURING", "RUNNING"), f"job {job} ended early ({state})"
        time.sleep(0.2)
    raise TimeoutError(f"no checkpoint and step {step} in {run_dir} after {timeout}s")


def test_torchrun_sbatch_requeued_job_resumes_with_torchrun_sh_losses(slurm_cluster, ddp_reference, tmp_path):
    """sbatch launch/slurm/torchrun.sbatch (DDP, 2 ranks) is requeued with `scontrol requeue` after
    its first checkpoint: the trainer checkpoints on SIGTERM, the requeued job (same id, same run dir)
    resumes instead of restarting, and the finished run's losses equal launch/torchrun.sh's."""
    job = slurm_cluster.sbatch(LAUNCH / "slurm" / "torchrun.sbatch", *JOB_CFG, "strategy=ddp",
                               "train.max_steps=8", cwd=tmp_path, env=launch_env(2))
    run_dir = tmp_path / "runs" / f"slurm-{job}"
    _wait_for_step(run_dir, 3, 300, slurm_cluster, job)
    slurm_cluster.requeue(job)
    slurm_cluster.release_requeued(job)
    state = slurm_cluster.wait_done(job, 400)
    out = _job_output(slurm_cluster, job, tmp_path)
    assert state == "COMPLETED", f"job {job} {state}:\n{out[-5000:]}"
    assert slurm_cluster.job_info(job).get("Restarts") == "1", out[-3000:]
    assert f"job {job} (restart 1)" in out

    # resumed, not restarted: the second run starts from a checkpoint, step 1 ran once, the steps go on
    resumed = re.findall(r"resumed from \S+/(step_\d+) at step (\d+)", out)
    assert len(resumed) == 1 and int(resumed[0][1]) >= 2, out[-4000:]
    assert train_steps(run_dir) == list(range(1, 9)), train_steps(run_dir)
    assert_same_losses(losses_by_step(run_dir), ddp_reference, 1e-6)
    assert (run_dir / "config.yaml").is_file()
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None and ckpt.name == "step_0000008" and (ckpt / "meta.json").is_file()


@pytest.mark.skipif(not (REPO / "train" / "parallel" / "deepspeed.py").is_file(),
                    reason="strategy=zero3 (train/parallel/deepspeed.py) is not in this build yet")
def test_deepspeed_sbatch_zero3_preempted_with_usr1_requeues_itself_and_matches(slurm_cluster, zero3_reference,
                                                                                  tmp_path):
    """sbatch launch/slurm/deepspeed.sbatch (ZeRO-3, 2 ranks) gets the pre-emption signal that
    `--signal=B:USR1@<s>` delivers: the batch script forwards it, the trainer checkpoints, the job
    requeues itself and resumes; losses equal launch/deepspeed.sh's."""
    job = slurm_cluster.sbatch(LAUNCH / "slurm" / "deepspeed.sbatch", *JOB_CFG, cwd=tmp_path, env=launch_env(2))
    run_dir = tmp_path / "runs" / f"slurm-{job}"
    _wait_for_step(run_dir, 3, 300, slurm_cluster, job)
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", str(job))
    slurm_cluster.release_requeued(job)  # the batch script requeues the job itself
    state = slurm_cluster.wait_done(job, 400)
    out = _job_output(slurm_cluster, job, tmp_path)
    assert state == "COMPLETED", f"job {job} {state}:\n{out[-5000:]}"
    assert "SIGUSR1" in out and f"requeueing job {job}" in out, out[-4000:]
    assert slurm_cluster.job_info(job).get("Restarts") == "1"
    resumed = re.findall(r"resumed from \S+/(step_\d+) at step (\d+)", out)
    assert len(resumed) == 1 and int(resumed[0][1]) >= 2, out[-4000:]
    assert train_steps(run_dir) == list(range(1, 9)), train_steps(run_dir)
    assert_same_losses(losses_by_step(run_dir), zero3_reference, 1e-6)
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None and ckpt.name == "step_0000008"
    assert (run_dir / "hostfile").read_text().split() == ["node1", "slots=2"]
    assert read_metrics(run_dir)
