"""Hang diagnosis (``train.hang_timeout_s``): a watchdog thread on every rank.

The training loop names the phase it is in (``data``, ``forward-backward``, ``optimizer``, ``sync``, ``eval``,
``checkpoint``, ...) at each change; the watchdog fires when a rank stays in one phase longer than the timeout
-- a hung collective, a stuck data worker, a rank sleeping in a step. Then every rank (each fires on its own):

1. writes the Python stacks of all its threads to ``<run.dir>/hang/rank<N>.txt`` (``faulthandler``: works while
   the main thread is blocked inside a C++ collective), headed by its last completed step and current phase;
   on CUDA with ``TORCH_NCCL_TRACE_BUFFER_SIZE`` set, also the NCCL flight recorder (``hang/nccl/nccl_trace_<N>``);
2. rank 0 waits briefly for the other ranks' files (the run dir is shared by all ranks) and prints one line
   naming the ranks that are behind the others (an earlier step, or an earlier phase of the same step);
3. the process exits with code 4 (EXIT_DIST) -- the main thread may be stuck in C++, so ``os._exit``.
"""

from __future__ import annotations

import faulthandler
import os
import re
import sys
import threading
import time
from pathlib import Path

from train.ops.errors import EXIT_DIST

# the order of a step's phases: a rank in an earlier phase of the same step is behind one in a later phase
PHASES = ("start", "data", "forward-backward", "optimizer", "sync", "log", "eval", "sample", "checkpoint")
_HEADER = re.compile(r"^rank (\d+): last completed step (\d+); in phase (\S+) of step (\d+)")


def hang_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "hang"


class HangWatchdog:
    def __init__(self, run_dir: str | Path, rank: int, world_size: int, timeout_s: float,
                 wait_for_peers_s: float = 15.0) -> None:
        self.dir = hang_dir(run_dir)
        self.rank, self.world_size, self.timeout_s = rank, world_size, float(timeout_s)
        self.wait_for_peers_s = wait_for_peers_s
        self.step_done = 0
        self._phase, self._since = "start", time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="lmforge-hang-watchdog", daemon=True)

    def start(self, step: int) -> HangWatchdog:
        self.step_done = step
        self.phase("start")
        self._thread.start()
        return self

    def phase(self, name: str) -> None:
        """The loop entered ``name`` (a plain attribute write: free in the hot loop)."""
        self._phase, self._since = name, time.monotonic()

    def completed(self, step: int) -> None:
        self.step_done = step

    def stop(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------ the thread

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            stuck = time.monotonic() - self._since
            if stuck > self.timeout_s:
                self._fire(stuck)

    def _fire(self, stuck: float) -> None:
        phase, step = self._phase, self.step_done
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"rank{self.rank}.txt"
        with open(path, "w") as f:
            f.write(f"rank {self.rank}: last completed step {step}; in phase {phase} of step {step + 1} for "
                    f"{stuck:.1f} s (train.hang_timeout_s={self.timeout_s:g}); host {os.uname().nodename} pid "
                    f"{os.getpid()}\n\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        self._dump_nccl_trace()
        if self.rank == 0:
            behind = self._ranks_behind()
            names = ", ".join(f"rank {r} ({why})" for r, why in behind) if behind else "none found"
            print(f"error: hang: rank 0 made no progress for {stuck:.0f} s (train.hang_timeout_s={self.timeout_s:g}) "
                  f"in phase {phase} of step {step + 1}; behind the others: {names}; Python stacks of every rank "
                  f"in {self.dir}/rank<N>.txt", file=sys.stderr, flush=True)
        else:
            time.sleep(min(self.wait_for_peers_s, 5.0))  # rank 0 reads the files; the launcher may stop us after
        os._exit(EXIT_DIST)

    def _dump_nccl_trace(self) -> None:
        if not os.environ.get("TORCH_NCCL_TRACE_BUFFER_SIZE"):
            return
        try:
            import torch

            if not torch.cuda.is_available():
                return
            trace = torch._C._distributed_c10d._dump_nccl_trace()  # the flight recorder's pickled entries (NCCL builds)
            # named <prefix>_<rank> in a dir of their own, as torch.distributed.flight_recorder.fr_trace reads them
            (self.dir / "nccl").mkdir(exist_ok=True)
            (self.dir / "nccl" / f"nccl_trace_{self.rank}").write_bytes(trace)
        except Exception as e:  # noqa: BLE001 - diagnostics must never mask the hang report
            print(f"warning: rank {self.rank}: NCCL flight recorder dump failed ({type(e).__name__}: {e})",
                  file=sys.stderr)

    def _ranks_behind(self) -> list[tuple[int, str]]:
        """Ranks whose (step, phase) is behind the most advanced rank's, from the stack files' headers."""
        deadline = time.monotonic() + self.wait_for_peers_s
        found: dict[int, tuple[int, str]] = {}
        while True:
            for r in range(self.world_size):
                if r in found:
                    continue
                p = self.dir / f"rank{r}.txt"
                m = _HEADER.match(p.read_text().split("\n", 1)[0]) if p.is_file() else None
                if m:
                    found[r] = (int(m.group(2)), m.group(3))
            if len(found) == self.world_size or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        missing = [(r, "no stack file: not responding") for r in range(self.world_size) if r not in found]

        def key(v: tuple[int, str]) -> tuple[int, int]:
            return v[0], PHASES.index(v[1]) if v[1] in PHASES else -1

        if not found:
            return missing
        ahead = max(found.values(), key=key)
        behind = [(r, f"in {ph} of step {st + 1}, others in {ahead[1]} of step {ahead[0] + 1}")
                  for r, (st, ph) in sorted(found.items()) if key((st, ph)) < key(ahead)]
        return behind + missing
