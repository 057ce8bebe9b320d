"""Straggler detection (``train.straggler_ratio``): every ``log_every`` steps each rank's local step time and
data-wait time are all-gathered (a CPU tensor: gloo, no GPU sync).

A rank's local step time runs from the start of the step to its arrival at the end-of-step flag all-reduce,
the point where every rank meets; a slow rank arrives late (its peers then wait inside that collective, which is
not counted), so the arrival time is what tells ranks apart. A rank whose mean step time is more than
``straggler_ratio`` x the median of the other ranks' is named in the log and as ``straggler_rank`` /
``straggler_ratio`` in metrics.jsonl.
"""

from __future__ import annotations

import statistics

import torch
import torch.distributed as dist


def gather_times(step_s: float, data_s: float, steps: int) -> list[tuple[float, float]]:
    """[(mean step time, mean data wait)] per rank; collective over the default group."""
    local = torch.tensor([step_s / max(steps, 1), data_s / max(steps, 1)], dtype=torch.float64)
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [(float(local[0]), float(local[1]))]
    out = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(out, local)
    return [(float(t[0]), float(t[1])) for t in out]


def find_straggler(times: list[tuple[float, float]], ratio: float) -> tuple[int | None, float]:
    """(the slowest rank if it is ``ratio`` x slower than the median of the other ranks, else None; that ratio).
    The median of the *others*: with 2 ranks the median of all would be the mean of the slow and the fast one."""
    steps = [s for s, _ in times]
    slowest = max(range(len(steps)), key=steps.__getitem__)
    others = [s for i, s in enumerate(steps) if i != slowest]
    median = statistics.median(others) if others else steps[slowest]
    r = steps[slowest] / median if median > 0 else 1.0
    return (slowest if r >= ratio else None), r
