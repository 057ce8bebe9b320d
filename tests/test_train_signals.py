"""Pre-emption: SIGTERM / SIGUSR1 finish the current step, save a checkpoint and exit with
EXIT_PREEMPTED (75); under DDP a signal to one rank stops every rank at the same step."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from helpers import TINY, losses_of, read_metrics, start_train, train_in_process

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


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _rank_of(pid: int) -> int | None:
    try:
        env = dict(kv.split("=", 1) for kv in (Path("/proc") / str(pid) / "environ").read_text().split("\0") if "=" in kv)
    except OSError:
        return None
    return int(env["RANK"]) if "RANK" in env else None


@pytest.mark.slow
def test_sigterm_saves_and_exits_then_resumes(tmp_path):
    from train.trainer import EXIT_PREEMPTED

    run_dir = tmp_path / "run"
    proc = start_train(run_dir, *LONG)
    _wait_for_steps(run_dir, proc, 3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "received SIGTERM" in out and "from signal to exit" in out
    steps = [e["step"] for e in read_metrics(run_dir) if "loss" in e]
    last = steps[-1]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{last:07d}"
    # the checkpoint resumes: two more steps continue the step count and the log
    code, _ = train_in_process(run_dir, *TINY, f"train.max_steps={last + 2}", "train.ckpt_every=0")
    assert code == 0
    assert [e["step"] for e in read_metrics(run_dir) if "loss" in e] == steps + [last + 1, last + 2]
    assert all(v is not None for v in losses_of(run_dir))


@pytest.mark.slow
def test_signal_to_one_ddp_rank_stops_all_ranks_at_the_same_step(tmp_path):
    run_dir = tmp_path / "run"
    proc = start_train(run_dir, *LONG, "strategy=ddp", "train.micro_batch_size=2", nproc=2)
    _wait_for_steps(run_dir, proc, 3)
    ranks = {_rank_of(p): p for p in _children(proc.pid)}
    assert set(ranks) >= {0, 1}, ranks
    os.kill(ranks[1], signal.SIGUSR1)  # only rank 1 hears it
    out, err = proc.communicate(timeout=180)
    assert proc.returncode != 0  # torchrun reports the workers' exit code 75 as a failure
    assert "exitcode" in err and "75" in err, err[-3000:]
    assert "a signal on another rank" in out  # rank 0 learned it through the all-reduced flag
    last = [e["step"] for e in read_metrics(run_dir) if "loss" in e][-1]
    ckpt = run_dir / "checkpoints" / f"step_{last:07d}"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == ckpt.name
    assert sorted(p.name for p in ckpt.glob("extra_rank*.pt")) == ["extra_rank0.pt", "extra_rank1.pt"]


@pytest.mark.slow
def test_hung_peer_ends_with_an_error_naming_the_rank(tmp_path):
    """strategy.timeout_s bounds every collective: rank 1 stalls, rank 0's all-reduce times out,
    and each rank exits with code 4 and one line naming itself."""
    from helpers import run_train

    from train.main import EXIT_DIST

    res = run_train(tmp_path / "run", *TINY, "strategy=ddp", "train.micro_batch_size=2", "train.max_steps=4",
                    "strategy.timeout_s=5", "train.fault_stall_rank=1", nproc=2, check=False, timeout=300)
    assert res.returncode != 0
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: rank ")]
    assert any(ln.startswith("error: rank 0: a collective failed or timed out (strategy.timeout_s=5)")
               for ln in errors), res.explain()
    assert f"exitcode  : {EXIT_DIST}" in res.stderr
