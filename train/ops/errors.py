"""Exit codes, and sorting a failure into one of them (../shared/DESIGN.md "Exit codes").

Only a validation error of the config or the inputs is a usage error (2, before any work); a full or
read-only disk while writing is a storage error (5, naming the path); anything unexpected is an
internal error (1): the run dir and its checkpoints are kept and the full traceback goes to
``<run.dir>/error.txt`` (rank 0; other ranks ``error_rank<N>.txt``) while the console gets one line.
"""

from __future__ import annotations

import errno
import shutil
import socket
import time
import traceback
from pathlib import Path

EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug or an unexpected failure: run dir kept, traceback in <run.dir>/error.txt
EXIT_USAGE = 2  # bad config or input, found before any work
EXIT_NAN = 3  # non-finite loss, or repeated loss spikes beyond train.spike.max_rollbacks
EXIT_DIST = 4  # a collective failed or timed out, or the hang watchdog fired
EXIT_STORAGE = 5  # disk full / unwritable while writing; the previous checkpoint stays `latest`
EXIT_PREEMPTED = 75  # SIGTERM / SIGUSR1: checkpoint saved (EX_TEMPFAIL: requeue me)
EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C): checkpoint saved

# errno values that mean "the storage cannot take this write" (not a bug, not bad input)
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
# free bytes below which a failed write on that file system is taken as "disk full": torch's zip writer
# reports a short write as "unexpected pos N vs M" with no errno
_NEARLY_FULL = 1 << 20


class StorageError(Exception):
    """A write failed because the storage is full or read-only (one line, naming the path)."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = path


class WandbStartError(RuntimeError):
    """W&B could not start online and no fallback was asked for (one line; exit 2)."""


def _chain(e: BaseException) -> list[BaseException]:
    """``e``, its causes / contexts, and the per-rank failures a DCP ``CheckpointException`` carries."""
    seen: list[BaseException] = []
    todo = [e]
    while todo:
        x = todo.pop()
        if x is None or any(x is s for s in seen) or len(seen) > 50:
            continue
        seen.append(x)
        todo += [x.__cause__, x.__context__]
        failures = getattr(x, "failures", None)  # CheckpointException: {rank: (exception, traceback)}
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return seen


def free_bytes(path: str | Path) -> int | None:
    """Free bytes of the file system holding ``path`` (its nearest existing ancestor); None if unknown."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def storage_cause(e: BaseException, path: str | Path) -> str | None:
    """Why a write under ``path`` failed, when the storage is to blame: "no space left on device",
    "read-only file system", ... ; None for anything else (a bug, a bad input)."""
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno in STORAGE_ERRNOS:
            return "no space left on device" if x.errno in (errno.ENOSPC, errno.EDQUOT) else (
                x.strerror or errno.errorcode.get(x.errno, "storage error")).lower()
        if "No space left" in str(x):
            return "no space left on device"
    free = free_bytes(path)
    if free is not None and free < _NEARLY_FULL:  # a short write without errno (torch's zip writer)
        return f"no space left on device ({free} bytes free)"
    return None


def error_file(run_dir: str | Path, rank: int) -> Path:
    return Path(run_dir) / ("error.txt" if rank == 0 else f"error_rank{rank}.txt")


def write_error_file(run_dir: str | Path, rank: int, exc: BaseException) -> Path | None:
    """The full traceback of ``exc`` (with host, PID, time) for the user and the bug report; None when
    even that cannot be written (then the traceback goes to stderr)."""
    path = error_file(run_dir, rank)
    text = (f"lmforge internal error on rank {rank} (host {socket.gethostname()}, pid {__import__('os').getpid()}, "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n\n"
            + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError:
        return None
    return path


def one_line(e: BaseException, limit: int = 400) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."
