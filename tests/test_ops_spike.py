"""The loss-spike guard (train.spike.*, train/ops/spike.py), single process: a data fault hook gives the steps
that draw global samples [96, 104) wrong targets. The guard skips the first spike, rolls back to the step-20
checkpoint on the second and skips that sample range; the oracle for "skipped exactly that range" is a clean
run's per-step sample hashes (train.trace_samples) shifted by two steps."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TINY, losses_of, one_line_error, read_metrics, train_in_process

SPIKE = ("train.spike.enabled=true", "train.spike.warmup=10", "train.spike.window=10", "train.spike.threshold=4",
         "train.spike.repeat=2", "train.spike.repeat_window=5", "train.spike.max_rollbacks=1", "optim.lr=2e-3",
         "optim.decay_steps=60", "train.ckpt_every=10", "train.keep_last=0", "train.trace_samples=true")
BAD = "train.fault_corrupt_samples=[96,104]"  # 4 samples per step: steps 25 and 26


def _trace(run_dir) -> dict[int, list[str]]:
    """step -> the hashes of its samples; after a rollback the replayed (last) occurrence counts."""
    out: dict[int, list[str]] = {}
    for line in (run_dir / "trace" / "rank0.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["samples"]
    return out


@pytest.fixture(scope="module")
def spiky(tmp_path_factory):
    code, run_dir = train_in_process(tmp_path_factory.mktemp("spike") / "run", *TINY, *SPIKE, BAD,
                                     "train.max_steps=40")
    assert code == 0
    return run_dir


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    code, run_dir = train_in_process(tmp_path_factory.mktemp("clean") / "run", *TINY, *SPIKE, "train.max_steps=42")
    assert code == 0
    return run_dir


def test_spikes_are_skipped_then_rolled_back_and_the_bad_range_is_skipped(spiky, clean):
    events = read_metrics(spiky)
    assert [(e["step"], e["event"]) for e in events if "event" in e] == [(25, "spike"), (26, "spike"),
                                                                         (26, "rollback")]
    rollback = next(e for e in events if e.get("event") == "rollback")
    assert rollback["to_step"] == 20 and rollback["skip_samples"] == [96, 104] and rollback["rollbacks"] == 1
    assert all(e["spike_score"] > 4 for e in events if e.get("event") == "spike")
    # every step logged once (the first pass over 21-26 is dropped), training finished
    assert [e["step"] for e in events if "loss" in e] == list(range(1, 41))
    # the data: steps 1-24 saw the clean run's samples; from step 25 on, those of the clean run two steps later
    seen, ref = _trace(spiky), _trace(clean)
    assert all(seen[s] == ref[s] for s in range(1, 25))
    assert all(seen[s] == ref[s + 2] for s in range(25, 41))
    # up to the spikes, the same losses as the clean run (the rollback replays 21-24 exactly)
    assert losses_of(spiky)[:24] == losses_of(clean)[:24]
    # the range is recorded in the data state of the checkpoint rolled back to (saved again) and of later ones
    for step in (20, 40):
        extra = torch.load(spiky / "checkpoints" / f"step_{step:07d}" / "extra_rank0.pt", weights_only=True)
        assert extra["trainer"]["skip_ranges"] == [[96, 104]] and extra["trainer"]["rollbacks"] == 1


def test_a_resume_after_the_rollback_does_not_replay_the_range(spiky, tmp_path):
    """From the step-20 checkpoint (the one rolled back to): no spike, and exactly the rolled-back run's losses."""
    code, run_dir = train_in_process(tmp_path / "resumed", *TINY, *SPIKE, BAD, "train.max_steps=40",
                                     f"resume={spiky / 'checkpoints' / 'step_0000020'}")
    assert code == 0
    events = read_metrics(run_dir)
    assert not [e for e in events if "event" in e]
    assert losses_of(run_dir) == losses_of(spiky)[20:]


def test_spikes_beyond_max_rollbacks_stop_with_exit_3(tmp_path, capsys):
    code, _ = train_in_process(tmp_path / "run", *TINY, *SPIKE, BAD, "train.max_steps=40",
                               "train.spike.max_rollbacks=0")
    assert code == 3
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith("error: step 26: loss spikes repeated (2 within 5 steps) after 0 rollback(s) "
                           "(train.spike.max_rollbacks=0); stopped. Last good checkpoint: "), line
    assert line.endswith("step_0000020")


@pytest.mark.parametrize(("override", "message"), [
    ("train.spike.method=median", "train.spike.method='median' is not one of zscore, ema"),
    ("train.spike.repeat=0", "train.spike.repeat=0 must be >= 1"),
])
def test_bad_spike_settings_are_one_line(tmp_path, capsys, override, message):
    code, _ = train_in_process(tmp_path / "run", *TINY, "train.spike.enabled=true", override)
    assert code == 2
    assert one_line_error(capsys.readouterr().err) == f"error: {message}"
