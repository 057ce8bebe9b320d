"""Multi-rank operations on 2 real gloo ranks (torchrun): the hang watchdog (a rank that sleeps inside a step,
train.fault_stall_rank), straggler detection (a rank made slower by train.fault_slow_rank) and the profiler
(train.profile.steps: one Chrome trace per rank with the loop's labelled regions)."""

from __future__ import annotations

import json
import re
import time

from helpers import TINY, read_metrics, run_train

DDP = (*TINY, "strategy=ddp", "train.micro_batch_size=2")


def test_a_rank_sleeping_in_a_step_is_named_with_every_ranks_stacks_and_exit_4(tmp_path):
    t0 = time.monotonic()
    # gloo's own timeout is longer than the watchdog's: the watchdog reports first
    res = run_train(tmp_path / "run", *DDP, "train.max_steps=6", "train.hang_timeout_s=8", "strategy.timeout_s=120",
                    "train.fault_stall_rank=1", nproc=2, check=False, timeout=300)
    took = time.monotonic() - t0
    hang = res.run_dir / "hang"
    assert sorted(p.name for p in hang.iterdir()) == ["rank0.txt", "rank1.txt"], res.explain()
    r0, r1 = (hang / "rank0.txt").read_text(), (hang / "rank1.txt").read_text()
    # the sleeping rank's stack names the function it sleeps in, inside the training loop
    assert r1.startswith("rank 1: last completed step 1; in phase data of step 2") and "_stall_in_step" in r1, r1
    assert "in _loop" in r1 and "lmforge-hang-watchdog" not in r1.split("\n", 1)[0]
    # the other rank waits inside the step's gradient all-reduce
    assert r0.startswith("rank 0: last completed step 1; in phase forward-backward of step 2"), r0
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: hang:")]
    assert len(errors) == 1, res.explain()
    assert "behind the others: rank 1 (in data of step 2, others in forward-backward of step 2)" in errors[0]
    assert re.search(r"exitcode\s*: 4\b", res.stderr), res.explain()
    assert took < 8 + 30 + 60, took  # start-up of 2 ranks (<= 60 s here) + the timeout + 30 s


def test_a_rank_slowed_3x_is_named_as_straggler_within_two_log_intervals(tmp_path):
    # rank 1 sleeps 0.4 s in every step: several times a tiny step's time on these CPUs
    res = run_train(tmp_path / "run", *DDP, "train.max_steps=4", "train.log_every=2", "train.fault_slow_rank=1",
                    "train.fault_slow_s=0.4", nproc=2, timeout=300)
    events = [e for e in read_metrics(res.run_dir) if "loss" in e]
    assert [e["step"] for e in events] == [2, 4]
    assert any(e["straggler_rank"] == 1 for e in events), events
    named = next(e for e in events if e["straggler_rank"] == 1)
    assert named["straggler_ratio"] >= 2.0
    assert re.search(r"straggler: rank 1 takes \d+\.\d+ s per step, \d+\.\dx the median of the other ranks",
                     res.stdout), res.stdout[-3000:]


def test_even_ranks_name_no_straggler_and_the_profiler_writes_a_trace_per_rank(tmp_path):
    res = run_train(tmp_path / "run", *DDP, "train.max_steps=4", "train.log_every=2", "train.profile.steps=[2,3]",
                    nproc=2, timeout=300)
    events = [e for e in read_metrics(res.run_dir) if "loss" in e]
    assert all(e["straggler_rank"] is None and 1.0 <= e["straggler_ratio"] < 2.0 for e in events), events
    traces = sorted((res.run_dir / "profile").iterdir())
    assert [p.name for p in traces] == ["rank0.trace.json", "rank1.trace.json"]
    for path in traces:
        names = {e.get("name", "") for e in json.loads(path.read_text())["traceEvents"]}
        regions = {n for n in names if n.startswith("lmforge/")}
        assert regions == {"lmforge/data_wait", "lmforge/forward_backward", "lmforge/optimizer", "lmforge/sync"}
        assert any(n.startswith("autograd::engine::evaluate_function:") for n in names)  # backward
        assert any("allreduce" in n.replace("_", "").lower() for n in names), sorted(names)[:50]  # communication
    # two steps recorded: each region twice per rank
    steps = [e for e in json.loads(traces[0].read_text())["traceEvents"] if e.get("name") == "lmforge/optimizer"]
    assert len(steps) == 2
