"""``train.profile.*``: a torch.profiler trace per rank for a window of steps, and CUDA memory snapshots.

``train.profile.steps=[a,b]`` records steps a..b (inclusive) on every rank and writes
``<run.dir>/profile/rank<N>.trace.json`` (Chrome / Perfetto JSON: open it at https://ui.perfetto.dev or
chrome://tracing). The loop labels its regions ``lmforge/data_wait``, ``lmforge/forward_backward`` (autograd's
backward ops appear inside it as ``autograd::engine::evaluate_function: ...``), ``lmforge/optimizer`` and
``lmforge/sync``; communication shows as the process group's own events (``gloo:all_reduce``,
``nccl:all_reduce``, ...). On CUDA ``train.profile.memory=true`` also records the allocator's history for the
same steps and writes ``<run.dir>/profile/rank<N>.memory.pickle`` (drag it onto https://pytorch.org/memory_viz);
an out-of-memory error writes ``<run.dir>/oom_rank<N>.memory.pickle`` before the run ends.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger("train")


@dataclass
class ProfileConfig:
    """``train.profile.*``"""

    steps: list[int] = field(default_factory=list)  # [first, last] optimizer steps to record (1-based); [] = off
    memory: bool = False  # CUDA: also record a memory snapshot over the same steps


def validate_profile(p) -> str | None:
    steps = list(p.steps)
    if steps and (len(steps) != 2 or not 1 <= steps[0] <= steps[1]):
        return f"train.profile.steps={steps} must be [first, last] with 1 <= first <= last (or [] for no profile)"
    return None


def region(name: str):
    """A labelled region in the trace (cheap when no profiler is recording)."""
    return torch.profiler.record_function(f"lmforge/{name}")


class StepProfiler:
    def __init__(self, cfg, run_dir: str | Path, rank: int, device: torch.device) -> None:
        self.first, self.last = (int(cfg.steps[0]), int(cfg.steps[1])) if cfg.steps else (0, -1)
        self.memory = bool(cfg.memory) and device.type == "cuda"
        self.dir, self.rank, self.device = Path(run_dir) / "profile", rank, device
        self._prof: torch.profiler.profile | None = None

    @property
    def enabled(self) -> bool:
        return self.last >= self.first >= 1

    def step_begins(self, step: int) -> None:
        """Called before optimizer step ``step`` (1-based) starts."""
        if not self.enabled or step != self.first:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        if self.memory:
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        self._prof = torch.profiler.profile(activities=activities, record_shapes=False, with_stack=False)
        self._prof.__enter__()

    def step_ends(self, step: int) -> None:
        if self._prof is None or step < self.last:
            return
        self.finish()

    def finish(self) -> None:
        """Stop recording and write the files (also when the run ends inside the window)."""
        if self._prof is None:
            return
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self.dir.mkdir(parents=True, exist_ok=True)
        trace = self.dir / f"rank{self.rank}.trace.json"
        prof.export_chrome_trace(str(trace))
        written = [trace]
        if self.memory:
            snap = self.dir / f"rank{self.rank}.memory.pickle"
            torch.cuda.memory._dump_snapshot(str(snap))
            torch.cuda.memory._record_memory_history(enabled=None)
            written.append(snap)
        if self.rank == 0:
            log.info(f"profile of steps {self.first}-{self.last}: {', '.join(str(p) for p in written)} (and the "
                     f"other ranks' beside them; docs/operations.md says how to open them)")


def dump_oom_snapshot(run_dir: str | Path, rank: int) -> Path | None:
    """After a CUDA out-of-memory error: the allocator's state (and its history, when recording) to a file."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    path = Path(run_dir) / f"oom_rank{rank}.memory.pickle"
    with contextlib.suppress(Exception):
        torch.cuda.memory._dump_snapshot(str(path))
        return path
    return None
