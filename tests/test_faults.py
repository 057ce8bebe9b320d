"""Faults, for real: pre-emption of one rank, an elastic restart after SIGKILL, a kill during a checkpoint
save, non-finite losses, and a hung collective. Multi-rank runs use 2 gloo ranks on CPU. (SIGTERM and
Ctrl-C of one process: test_train_signals.py.)"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import (
    JOB_CFG,
    LAUNCH,
    REPO,
    assert_same_losses,
    ddp_reference,
    free_port,
    latest_checkpoint,
    launch_env,
    losses_by_step,
    train_steps,
)

pytestmark = pytest.mark.slow
__all__ = ["ddp_reference"]  # fixture used below


def _start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    full = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK"):
        full.pop(k, None)
    full.update(launch_env(2, env))
    # own process group: the test can kill everything it started, and only that
    return subprocess.Popen(cmd, cwd=REPO, env=full, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _torchrun(run_dir: Path, *overrides: str, log: Path, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}", *extra,
           "-m", "train", f"run.dir={run_dir}", *overrides]
    return _start(cmd, log)


def _rank_pids(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of the training processes below ``launcher_pid`` (by their RANK variable)."""
    found: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != launcher_pid:
                continue
            env = dict(kv.split("=", 1) for kv in (entry / "environ").read_text().split("\0") if "=" in kv)
        except (OSError, ValueError):
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(entry.name)
    return found


def _wait(cond, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > end:
            raise TimeoutError(f"{what} not reached after {timeout}s")
        time.sleep(0.05)


def _stop_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


def test_sigusr1_on_one_rank_checkpoints_every_rank(tmp_path):
    """SIGUSR1 (Slurm's pre-emption warning) on rank 1 only: every rank stops at the same step
    boundary and one complete checkpoint of that step is written (all ranks' state in it)."""
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    proc = _torchrun(run_dir, *JOB_CFG, "strategy=ddp", "train.max_steps=500", "train.ckpt_every=0", log=log)
    try:
        _wait(lambda: max(train_steps(run_dir), default=0) >= 2, 240, "step 2", proc, log)
        ranks = _rank_pids(proc.pid)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGUSR1)
        proc.wait(120)
    finally:
        _stop_group(proc)
    out = log.read_text()
    assert "exitcode  : 75" in out, out[-3000:]  # torchrun's report: the signalled rank asked to be requeued
    assert "received a signal on another rank: finished step" in out, out[-3000:]  # rank 0 learned it via the flag
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None, out[-3000:]
    step = int(ckpt.name.split("_")[1])
    assert 2 <= step < 500 and max(train_steps(run_dir)) == step
    assert {"extra_rank0.pt", "extra_rank1.pt", "meta.json"} <= {p.name for p in ckpt.iterdir()}


def test_elastic_restart_after_sigkill_resumes_with_uninterrupted_losses(ddp_reference, tmp_path):
    """launch/torchrun.sh with TORCHRUN_ARGS=--max-restarts=1: rank 1 is SIGKILLed mid-run, torchrun
    restarts the group, which resumes (resume=auto) from the latest complete checkpoint; the final
    losses equal an uninterrupted run's."""
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    cmd = ["bash", str(LAUNCH / "torchrun.sh"), f"run.dir={run_dir}", *JOB_CFG, "strategy=ddp"]
    proc = _start(cmd, log, {"TORCHRUN_ARGS": "--max-restarts=1"})
    try:
        _wait(lambda: latest_checkpoint(run_dir) is not None and max(train_steps(run_dir), default=0) >= 3,
              240, "a checkpoint and step 3", proc, log)
        # torchrun.sh execs torchrun: the ranks are its children
        ranks = _rank_pids(proc.pid)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGKILL)
        proc.wait(300)
    finally:
        _stop_group(proc)
    out = log.read_text()
    assert proc.returncode == 0, out[-4000:]
    resumed = re.findall(r"resumed from \S+/(step_\d+) at step (\d+)", out)
    assert len(resumed) == 1 and int(resumed[0][1]) >= 2, out[-4000:]
    assert_same_losses(losses_by_step(run_dir), ddp_reference, 1e-6)


def test_kill_during_checkpoint_save_keeps_the_previous_one(tmp_path):
    """SIGKILL while a checkpoint is being written (its step_N.tmp dir exists): `latest` still names
    a complete checkpoint, the partial one is never used, and resume=auto continues from `latest`."""
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    # the default tiny width: a few MB per checkpoint, written every step
    cfg = [o for o in JOB_CFG if not o.startswith(("model.n_layer", "model.n_head", "model.n_embd"))]
    cmd = [sys.executable, "-m", "train", f"run.dir={run_dir}", *cfg, "train.ckpt_every=1", "train.keep_last=0",
           "train.max_steps=200"]
    proc = _start(cmd, log)
    ckpts = run_dir / "checkpoints"
    partial: list[str] = []

    def saving() -> bool:
        if latest_checkpoint(run_dir) is None:
            return False
        partial[:] = [e.name for e in os.scandir(ckpts) if e.name.endswith(".tmp") and e.is_dir()]
        return bool(partial)

    try:
        _wait(saving, 240, "a checkpoint save in progress", proc, log)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        _stop_group(proc)
    latest = latest_checkpoint(run_dir)
    assert latest is not None and latest.is_dir() and not latest.name.endswith(".tmp")
    assert all((latest / f).is_file() for f in ("meta.json", ".metadata", "__0_0.distcp", "sched.pt",
                                                 "extra_rank0.pt")), sorted(p.name for p in latest.iterdir())
    assert latest.name not in partial
    saved_step = int(latest.name.split("_")[1])

    res = subprocess.run([sys.executable, "-m", "train", f"run.dir={run_dir}", *cfg, "train.ckpt_every=1",
                          f"train.max_steps={saved_step + 2}"], cwd=REPO, env={**os.environ, **launch_env(1)},
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert f"at step {saved_step} " in res.stdout + res.stderr, (res.stdout + res.stderr)[-3000:]
    assert latest_checkpoint(run_dir).name == f"step_{saved_step + 2:07d}"
    assert not [p for p in ckpts.iterdir() if p.name.endswith(".tmp")], "a partial checkpoint was left behind"


def test_nonfinite_loss_skips_then_stops_naming_step_and_checkpoint(tmp_path):
    """A NaN step is skipped with a warning; K in a row stop the run with a message naming the step
    and the last good checkpoint (exit 3)."""
    run_dir = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "train", f"run.dir={run_dir}", *JOB_CFG, "train.max_steps=20",
                          "train.fault_nan_steps=[2,5,6,7]", "train.max_nan_skips=3"], cwd=REPO,
                         env={**os.environ, **launch_env(1)}, capture_output=True, text=True, timeout=300, check=False)
    out = res.stdout + res.stderr
    assert res.returncode == 3, out[-3000:]
    assert "step 2: non-finite loss/gradients, update skipped (1/3 in a row)" in out
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "step 7" in errors[0] and "step_0000006" in errors[0], res.stderr[-3000:]
    # steps 3 and 4 trained after the skipped step 2; nothing after step 7
    assert max(train_steps(run_dir)) <= 7 and {3, 4} <= set(train_steps(run_dir))
    # steps 5-6 were skipped, so step 6 holds step 4's weights: still a good checkpoint
    assert latest_checkpoint(run_dir).name == "step_0000006"


def test_hung_collective_times_out_naming_the_rank(tmp_path):
    """Rank 1 freezes (SIGSTOP) mid-run: rank 0's next collective ends after strategy.timeout_s
    with a one-line error naming rank 0 and the timeout, instead of a silent hang."""
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    proc = _torchrun(run_dir, *JOB_CFG, "strategy=ddp", "train.max_steps=500", "train.ckpt_every=0",
                     "strategy.timeout_s=10", log=log)
    try:
        _wait(lambda: max(train_steps(run_dir), default=0) >= 2, 240, "step 2", proc, log)
        ranks = _rank_pids(proc.pid)
        os.kill(ranks[1], signal.SIGSTOP)
        stopped = time.monotonic()
        _wait(lambda: "error: rank 0" in log.read_text(), 120, "rank 0's timeout error", proc, log)
        took = time.monotonic() - stopped
        os.kill(ranks[1], signal.SIGCONT)
        proc.wait(120)
    finally:
        _stop_group(proc)
    out = log.read_text()
    line = next(ln for ln in out.splitlines() if ln.startswith("error: rank 0"))
    # the rank whose collective timed out names itself and the configured timeout (gloo cannot tell
    # which peer is stuck)
    assert "timed out" in line and "timeout_s=10" in line, line
    assert 8 <= took < 90, took
    assert proc.returncode != 0
    assert re.search(r"exitcode\s*: 4\b", out), out[-3000:]  # torchrun's report of rank 0: EXIT_DIST
