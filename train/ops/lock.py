"""The run-dir lock: one run at a time per ``run.dir``.

``<run.dir>/.lock`` holds the holder's host and PID and is locked with ``fcntl.flock`` by rank 0 for
the whole run. The kernel drops the lock when the holder dies however it dies (kill -9 included), so a
lock file left by a dead process is stale by construction and simply taken over (with a log line naming
the old holder). A second run on a locked dir gets :class:`RunDirLocked`, one line naming the holder.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from pathlib import Path

from train.config import ConfigError

log = logging.getLogger("train")

LOCK_FILE = ".lock"


class RunDirLocked(ConfigError):
    """Another live process holds the run dir (exit 2, before any work)."""


class RunDirLock:
    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunDirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirLocked(f"run.dir {self.path.parent} is in use by another run ({holder}, lock file "
                               f"{self.path}); wait for it to finish, stop it, or choose another run.dir") from None
        previous = os.pread(fd, 200, 0).decode(errors="replace").strip()
        me = f"host {socket.gethostname()} pid {os.getpid()}"
        if previous and previous != me:
            log.warning(f"run.dir {self.path.parent}: took over a stale lock of a process that is gone ({previous})")
        os.ftruncate(fd, 0)
        os.pwrite(fd, (me + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if self.path.exists():
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None
