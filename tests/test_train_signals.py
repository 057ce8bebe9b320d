"""Pre-emption and Ctrl-C, single process: SIGTERM finishes the current step, saves a checkpoint and exits
with EXIT_PREEMPTED (75); SIGINT (Ctrl-C, to the whole process group as a terminal sends it) does the same
with 130, and a second Ctrl-C aborts at once. The multi-rank cases (SIGUSR1 to one DDP rank, a hung peer, an
elastic restart) are in test_faults.py."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import (
    REPO,
    TINY,
    losses_of,
    read_metrics,
    start_train,
    train_command,
    train_env,
    train_in_process,
)

LONG = (*TINY, "train.max_steps=100000", "train.ckpt_every=0")


def _wait_for_steps(run_dir: Path, proc, n: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if len([e for e in read_metrics(run_dir) if "loss" in e]) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early ({proc.returncode}):\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("trainer did not log enough steps in time")


@pytest.mark.slow
def test_sigterm_saves_and_exits_then_resumes(tmp_path):
    from train.trainer import EXIT_PREEMPTED

    run_dir = tmp_path / "run"
    proc = start_train(run_dir, *LONG)
    _wait_for_steps(run_dir, proc, 3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    m = re.search(r"received SIGTERM: finished step (\d+), saved a checkpoint, exiting with code 75 "
                  r"\((\d+\.\d) s from signal to exit\)", out)
    assert m, out[-3000:]
    assert float(m.group(2)) < 60
    steps = [e["step"] for e in read_metrics(run_dir) if "loss" in e]
    last = steps[-1]
    assert int(m.group(1)) == last
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{last:07d}"
    # the checkpoint resumes: two more steps continue the step count and the log
    code, _ = train_in_process(run_dir, *TINY, f"train.max_steps={last + 2}", "train.ckpt_every=0")
    assert code == 0
    assert [e["step"] for e in read_metrics(run_dir) if "loss" in e] == steps + [last + 1, last + 2]
    assert all(v is not None for v in losses_of(run_dir))


def _start_in_own_group(run_dir: Path, *overrides: str) -> subprocess.Popen:
    """The trainer as the leader of its own process group: Ctrl-C in a terminal signals the whole group."""
    return subprocess.Popen(train_command(run_dir, overrides), cwd=REPO, env=train_env(threads=2), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_130_and_twice_aborts_at_once(tmp_path):
    from train.ops.errors import EXIT_INTERRUPTED

    run_dir = tmp_path / "once"
    proc = _start_in_own_group(run_dir, *LONG)
    _wait_for_steps(run_dir, proc, 3)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    m = re.search(r"received SIGINT: finished step (\d+), saved a checkpoint, exiting with code 130", out)
    assert m, out[-3000:]
    last = [e["step"] for e in read_metrics(run_dir) if "loss" in e][-1]
    assert int(m.group(1)) == last
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{last:07d}"

    # twice: the second Ctrl-C does not wait for the step boundary nor the checkpoint
    run_dir = tmp_path / "twice"
    # every step sleeps 2 s (a test hook) so both signals land inside one step
    proc = _start_in_own_group(run_dir, *LONG, "train.ckpt_every=2", "train.fault_slow_rank=0", "train.fault_slow_s=2")
    _wait_for_steps(run_dir, proc, 2)  # step 2 logged, then checkpointed; the signals land in step 3
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.5)  # two signals before Python's handler runs would be one
    os.killpg(proc.pid, signal.SIGINT)
    t0 = time.monotonic()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, err[-3000:]
    assert time.monotonic() - t0 < 30
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "interrupted twice" in errors[0] and "latest checkpoint:" in errors[0], err[-3000:]
    assert "Traceback" not in err and "received SIGINT: finished step" not in out
    assert [e["step"] for e in read_metrics(run_dir) if "loss" in e] == [1, 2]
    # only the periodic checkpoint: none was written for the signal
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    assert f"latest checkpoint: {run_dir / 'checkpoints' / 'step_0000002'}" in errors[0]
