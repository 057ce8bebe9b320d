"""checkpoint.async_save=true (DCP async_save behind train/checkpoint.py's Checkpointer): a kill -9 while a
background write is in flight leaves `latest` on the previous complete checkpoint and the relaunch continues
the uninterrupted losses exactly (fp32); a write that fails in the background ends the run with one line
naming its step; on 2 FSDP ranks the background checkpoints hold the one-process weights. The stall figures
(sync vs async) come from ``python -m train.ops.ckpt_bench``, not from a test."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from helpers import (
    TINY,
    dcp_state,
    losses_of,
    one_line_error,
    read_metrics,
    run_train,
    start_train,
    train_in_process,
)

ASYNC = ("checkpoint.async_save=true",)
DECAY = ("optim.decay_steps=400",)  # the schedule does not depend on max_steps: runs of any length compare


def _losses_by_step(run_dir) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_metrics(run_dir) if "loss" in e}


def test_kill_9_during_a_background_write_keeps_latest_and_the_relaunch_continues_exactly(tmp_path):
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    proc = start_train(run_dir, *TINY, *ASYNC, *DECAY, "train.max_steps=400", "train.ckpt_every=1",
                       "train.keep_last=2", "model.n_embd=64", threads=1)
    in_flight: list[str] = []

    def writing() -> bool:
        """`latest` exists and a checkpoint is being written: its .tmp dir has no DCP index yet."""
        if not (ckpts / "latest").is_file():
            return False
        in_flight[:] = [e.name for e in os.scandir(ckpts) if e.name.endswith(".tmp")
                        and not os.path.exists(os.path.join(e.path, ".metadata"))]
        return bool(in_flight)

    try:
        deadline = time.monotonic() + 240
        while not writing():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "never caught a background write in flight"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        out, _ = proc.communicate(timeout=60)
    assert "in the background (loop held" in out
    latest = (ckpts / "latest").read_text().strip()
    assert latest + ".tmp" not in in_flight and {".metadata", "meta.json", "extra_rank0.pt"} <= set(os.listdir(ckpts / latest))
    saved = int(latest.split("_")[1])
    code, _ = train_in_process(run_dir, *TINY, *ASYNC, *DECAY, f"train.max_steps={saved + 3}", "train.ckpt_every=1",
                               "train.keep_last=2", "model.n_embd=64")
    assert code == 0
    assert not [p for p in os.listdir(ckpts) if p.endswith(".tmp")]
    code, ref = train_in_process(tmp_path / "ref", *TINY, *DECAY, f"train.max_steps={saved + 3}", "model.n_embd=64")
    assert code == 0
    resumed, uninterrupted = _losses_by_step(run_dir), _losses_by_step(ref)
    assert sorted(resumed) == list(range(1, saved + 4))
    assert resumed == uninterrupted  # exact: fp32, the same data order, RNG and optimizer state


def test_a_background_write_that_fails_ends_the_run_naming_its_step(tmp_path, capsys):
    code, run_dir = train_in_process(tmp_path / "run", *TINY, *ASYNC, "train.max_steps=8", "train.ckpt_every=2",
                                     "train.fault_enospc_steps=[4]")
    assert code == 5
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith(f"error: saving checkpoint (in the background) {run_dir / 'checkpoints' / 'step_0000004'} "
                           f"failed: no space left on device"), line
    assert "latest is still step_0000002" in line
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["latest", "step_0000002"]
    # the failure surfaced at a step boundary after it (at the latest when the step-6 save waits for it), not at
    # the end of the run
    assert max(e["step"] for e in read_metrics(run_dir)) in (5, 6)


@pytest.mark.slow
def test_async_checkpoints_of_2_fsdp_ranks_hold_the_one_process_weights(tmp_path):
    """Step 2 is written in the background while steps 3-4 train: what lands on disk is step 2's state."""
    common = (*TINY, "train.max_steps=4", "train.ckpt_every=2", "train.keep_last=2")
    res = run_train(tmp_path / "fsdp", *common, *ASYNC, "strategy=fsdp", "train.micro_batch_size=2", nproc=2)
    assert res.stdout.count("in the background (loop held") == 1  # step 2; the final save waits
    code, single = train_in_process(tmp_path / "single", *common)
    assert code == 0
    assert losses_of(res.run_dir) == pytest.approx(losses_of(single), abs=1e-5)
    for step in ("step_0000002", "step_0000004"):
        a, b = dcp_state(res.run_dir / "checkpoints" / step), dcp_state(single / "checkpoints" / step)
        assert sorted(a["model"]) == sorted(b["model"])
        for k in b["model"]:
            torch.testing.assert_close(a["model"][k], b["model"][k], atol=2e-5, rtol=1e-4)
