"""Complete-or-nothing checkpoints, keep-last-K, and resume.

Layout (``docs/ARCHITECTURE.md``)::

    <run.dir>/checkpoints/step_0000100/meta.json       format, step, strategy, world_size, parallel dims,
                                                       model config, precision
                                       .metadata, *.distcp, sched.pt   (format "dcp": every native layout)
                                       ds/, sched.pt                   (format "deepspeed": ZeRO)
                                       model.pt, optim.pt              (format "torch": older single / DDP runs)
                                       extra_rank<r>.pt   trainer / data / RNG state of rank r
    <run.dir>/checkpoints/latest                          "step_0000100"

A checkpoint is written under ``step_NNNNNNN.tmp`` and renamed when every rank has finished, and
``latest`` is replaced atomically after that, so a crash or a failed save never leaves a partial
checkpoint under a final name and never touches the previous good one. Everything is read back
with ``torch.load(weights_only=True)``: a checkpoint cannot run code.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from train.distributed import any_rank, barrier
from train.ops.errors import StorageError, storage_cause

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CKPT_DIR = "checkpoints"
LATEST = "latest"
_NAME_RE = re.compile(r"^step_(\d{7,})$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit the model (one-line message)."""


class CheckpointSaveError(CheckpointError):
    """Writing a checkpoint failed for a reason other than the storage: during training that is an
    internal error (exit 1, train/ops/errors.py), never a usage error."""


def ckpt_name(step: int) -> str:
    return f"step_{step:07d}"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CKPT_DIR


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` names, or None when the run has none."""
    marker = checkpoints_dir(run_dir) / LATEST
    if not marker.is_file():
        return None
    path = marker.parent / marker.read_text().strip()
    if not (path / "meta.json").is_file():
        raise CheckpointError(f"{marker} names {path.name!r}, which is not a complete checkpoint")
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir (has meta.json), or a run dir whose `checkpoints/latest` names one."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint {path}: no such file or directory")
    if (p / "meta.json").is_file():
        return p
    latest = latest_checkpoint(p) if p.is_dir() else None
    if latest is None:
        raise CheckpointError(f"checkpoint {path}: neither a checkpoint dir (no meta.json) nor a run dir "
                              f"(no checkpoints/latest)")
    return latest


def resolve_resume(resume: str, run_dir: str | Path) -> Path | None:
    """``auto``: this run dir's ``latest`` (None on a fresh run); ``none``: None; else a checkpoint
    dir (has meta.json) or a run dir (has checkpoints/latest)."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume).expanduser()
    if not path.exists():
        raise CheckpointError(f"resume={resume}: no such file or directory")
    if path.is_dir() and (path / "meta.json").exists():
        return path
    if path.is_dir() and (checkpoints_dir(path) / LATEST).is_file():
        return latest_checkpoint(path)
    raise CheckpointError(f"resume={resume}: not a checkpoint (no meta.json) nor a run dir (no {CKPT_DIR}/{LATEST})")


# ---------------------------------------------------------------- reading and writing parts


def write_meta(ckpt_dir: Path, *, format: str, step: int, strategy: str, world_size: int,
               model_config: Mapping[str, Any], **more: Any) -> None:
    meta = {"format": format, "version": FORMAT_VERSION, "step": int(step), "strategy": strategy,
            "world_size": int(world_size), "model_config": dict(model_config), **more}
    (Path(ckpt_dir) / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def read_meta(ckpt_dir: str | Path, expect_format: str | None = None, reader: str = "") -> dict:
    """meta.json of a checkpoint; with `expect_format`, a one-line error naming `reader` (e.g.
    "strategy=fsdp") when the checkpoint was written in another format."""
    path = Path(ckpt_dir) / "meta.json"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {ckpt_dir}: meta.json is missing")
    try:
        meta = json.loads(path.read_text())
        for key in ("format", "step", "strategy", "world_size", "model_config"):
            meta[key]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {ckpt_dir}: meta.json is unreadable ({type(e).__name__}: {e})") from None
    if expect_format is not None and meta["format"] != expect_format:
        raise CheckpointError(f"checkpoint {ckpt_dir} has format {meta['format']!r} (strategy={meta['strategy']}); "
                              f"{reader} resumes only format {expect_format!r} checkpoints")
    return meta


def check_dcp_files(ckpt_dir: Path) -> None:
    """One line for a DCP checkpoint without its ``.metadata`` index (what DCP writes last, and what torch
    versions report differently: "metadata is None", with or without the read error)."""
    if not (Path(ckpt_dir) / ".metadata").is_file():
        raise CheckpointError(f"checkpoint {ckpt_dir}: the DCP index .metadata is missing (an incomplete or "
                              f"damaged checkpoint; its shards cannot be read without it)")


def dcp_failure_line(e: BaseException) -> str:
    """The lowest failing rank's own error on one line (`str(e)` of a ``CheckpointException`` is every
    failing rank's traceback)."""
    failures = getattr(e, "failures", None)
    exc = failures[min(failures)][0] if failures else e
    # an exception without a message (EOFError of a truncated / garbage shard) is named by its type
    return (" ".join(str(exc).split()) or type(exc).__name__)[:300]


def torch_load(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` with a one-line error for missing / truncated / garbage files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, pickle garbage, disallowed globals ...
        raise CheckpointError(f"checkpoint file {path} is truncated or not a checkpoint "
                              f"({_load_failure(e)})") from None


def _load_failure(e: BaseException) -> str:
    """The reason in torch.load's error, without its paragraphs about ``weights_only``."""
    text = str(e)
    if "WeightsUnpickler error:" in text:  # garbage bytes or a pickle of something other than tensors / containers
        reason = " ".join(text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0].split())
        return f"unpickling failed: {reason[:120]}" if reason else "unpickling failed"
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return first[:160]


def check_shapes(expected: Mapping[str, torch.Size], found: Mapping[str, Any], where: str) -> None:
    """Name the first tensor whose presence or shape differs between model and checkpoint."""
    missing = [k for k in expected if k not in found]
    if missing:
        raise CheckpointError(f"{where} does not fit the model: tensor {missing[0]!r} is missing "
                              f"({len(missing)} missing)")
    unexpected = [k for k in found if k not in expected]
    if unexpected:
        raise CheckpointError(f"{where} does not fit the model: unexpected tensor {unexpected[0]!r} "
                              f"({len(unexpected)} unexpected)")
    for k, shape in expected.items():
        got = tuple(found[k].shape)
        if got != tuple(shape):
            raise CheckpointError(f"{where} does not fit the model: tensor {k!r} has shape {list(got)} "
                                  f"in the checkpoint but {list(shape)} in the model")


def save_extra(ckpt_dir: str | Path, extra: Mapping[str, Any], rank: int) -> None:
    torch.save(dict(extra), Path(ckpt_dir) / f"extra_rank{rank}.pt")


def load_extra(ckpt_dir: str | Path, rank: int) -> dict:
    """This rank's extra state; on a different world size, rank 0's (RNG streams then differ)."""
    path = Path(ckpt_dir) / f"extra_rank{rank}.pt"
    if not path.is_file() and rank > 0:
        path = Path(ckpt_dir) / "extra_rank0.pt"
    return torch_load(path)


# ---------------------------------------------------------------- RNG state (weights_only-safe)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------- save / load orchestration


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _begin(root: Path, tmp: Path, is_main: bool) -> None:
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("step_*.tmp"):  # left by a crash during an earlier save (never one in flight:
            shutil.rmtree(stale, ignore_errors=True)  # a save starts only when the previous one is finished)
        tmp.mkdir()
    barrier()


def _write_parts(engine, tmp: Path, step: int, extra: Mapping[str, Any], model_config: Mapping, precision: str,
                 is_main: bool, fault: str | None, dcp_save=None) -> BaseException | None:
    """This rank's share of a checkpoint (the engine's state, meta.json on rank 0, its ``extra``); the error."""
    try:
        engine.save(tmp, dcp_save=dcp_save) if dcp_save is not None else engine.save(tmp)
        if is_main:
            write_meta(tmp, step=step, model_config=model_config, precision=precision, **engine.meta())
        save_extra(tmp, extra, engine.dist.rank)
        if fault == "enospc" and dcp_save is None:  # test hook (train.fault_enospc_steps): the writer hits a full disk
            raise _enospc(tmp)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException; reported by _conclude
        return e
    return None


def _enospc(tmp: Path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "__0_0.distcp"))


def _conclude(run_dir: Path, step: int, error: BaseException | None, keep_last: int, is_main: bool,
              background: bool = False) -> Path:
    """Collective: publish ``step_N.tmp`` as ``step_N`` + ``latest`` when every rank wrote its part, else remove
    it and raise StorageError / CheckpointSaveError on every rank (naming the step; the previous checkpoint
    stays ``latest``)."""
    root = checkpoints_dir(run_dir)
    final, tmp = root / ckpt_name(step), root / (ckpt_name(step) + ".tmp")
    # what the storage says before the partial checkpoint is removed (removing it frees the space again)
    storage = storage_cause(error, tmp) if error is not None else None
    if any_rank(error is not None):
        full = any_rank(storage is not None)
        barrier()
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir)
        kept = f"latest is still {previous.name}" if previous is not None else "no earlier checkpoint exists"
        how = "saving checkpoint" if not background else "saving checkpoint (in the background)"
        if full:
            raise StorageError(f"{how} {final} failed: {storage or 'no space left on device (another rank)'}"
                               f" under {root}; {kept}; free space there and resume=auto continues", path=root)
        why = f"{type(error).__name__}: {dcp_failure_line(error)}" if error is not None else "failed on another rank"
        raise CheckpointSaveError(f"{how} {final} failed ({why}); {kept}")
    barrier()
    if is_main:
        if final.exists():  # the same step saved again (e.g. resumed then stopped at once)
            old = root / (final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _atomic_write_text(root / LATEST, final.name + "\n")
        if keep_last > 0:  # only complete checkpoints are listed: one still being written is a .tmp
            for old in list_checkpoints(run_dir)[:-keep_last]:
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def save_checkpoint(engine, run_dir: str | Path, step: int, extra: Mapping[str, Any], *, model_config: Mapping,
                    precision: str, keep_last: int, is_main: bool, fault: str | None = None) -> Path:
    """Collective. Writes ``step_NNNNNNN.tmp`` (the engine's state, meta.json, every rank's ``extra``),
    renames it, then points ``latest`` at it and prunes to ``keep_last``. On any rank's failure the temp
    dir is removed, the previous checkpoints and ``latest`` are untouched, and on all ranks StorageError is
    raised (disk full / read-only: exit 5) or CheckpointSaveError (anything else). The one place meta.json is
    written."""
    run_dir = Path(run_dir)
    root = checkpoints_dir(run_dir)
    tmp = root / (ckpt_name(step) + ".tmp")
    _begin(root, tmp, is_main)
    error = _write_parts(engine, tmp, step, extra, model_config, precision, is_main, fault)
    return _conclude(run_dir, step, error, keep_last, is_main)


class Checkpointer:
    """The trainer's checkpoint writer: synchronous (``save_checkpoint``), or with ``checkpoint.async_save``
    DCP's ``async_save``: the state is staged to CPU memory and written by a background thread while training
    goes on. The guarantees stay those of a synchronous save:

    - at most one save in flight: a new save first waits for the previous one;
    - ``latest`` names only complete checkpoints: the one in flight is ``step_N.tmp`` until every rank's write
      finished (checked collectively by ``poll`` at each step boundary), then renamed and published;
    - keep_last pruning only ever sees complete checkpoints, so it never removes the one being written;
    - ``wait`` (the final save, SIGTERM / SIGINT) blocks until the write is complete and published;
    - a write that fails in the background raises StorageError / CheckpointSaveError naming its step at the
      next ``poll`` / ``wait``: the run ends with one line, the previous checkpoint stays ``latest``.

    The background writes use their own gloo process group, so their collectives never interleave with the
    training loop's. Engines with their own format (DeepSpeed) ignore ``dcp_save`` and write synchronously.
    """

    def __init__(self, engine, run_dir: str | Path, *, model_config: Mapping, precision: str, keep_last: int,
                 is_main: bool, async_save: bool = False) -> None:
        self.engine, self.run_dir = engine, Path(run_dir)
        self.model_config, self.precision, self.keep_last, self.is_main = model_config, precision, keep_last, is_main
        self.async_save = async_save
        self._pending: tuple[int, Any] | None = None  # (step, future of the background write)
        self._group = None
        if async_save and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            self._group = torch.distributed.new_group(backend="gloo")  # collective: every rank builds the trainer
        self.last_stall_s = 0.0  # how long the last save() held the training loop
        if async_save:  # the background thread's "no process group: saving in a single process" notice
            import warnings

            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

    @property
    def in_flight(self) -> int | None:
        return self._pending[0] if self._pending is not None else None

    def save(self, step: int, extra: Mapping[str, Any], *, wait: bool = False, fault: str | None = None) -> Path:
        """Collective. Returns the checkpoint's final path (complete once ``latest`` names it)."""
        import time

        t0 = time.perf_counter()
        self.wait()
        if not self.async_save:
            path = save_checkpoint(self.engine, self.run_dir, step, extra, model_config=self.model_config,
                                   precision=self.precision, keep_last=self.keep_last, is_main=self.is_main,
                                   fault=fault)
            self.last_stall_s = time.perf_counter() - t0
            return path
        root = checkpoints_dir(self.run_dir)
        tmp = root / (ckpt_name(step) + ".tmp")
        _begin(root, tmp, self.is_main)
        futures: list[Any] = []
        error = _write_parts(self.engine, tmp, step, extra, self.model_config, self.precision, self.is_main, fault,
                             dcp_save=lambda state, checkpoint_id: futures.append(self._async_write(state,
                                                                                                    checkpoint_id)))
        if any_rank(error is not None or not futures):
            # the synchronous part failed, or the engine wrote its own format synchronously: done either way
            for f in futures:
                _result(f)
            path = _conclude(self.run_dir, step, error, self.keep_last, self.is_main)
            self.last_stall_s = time.perf_counter() - t0
            return path
        future = futures[0]
        if fault == "enospc":  # test hook: the background writer hits a full disk
            future = _failing_after(future, _enospc(tmp))
        self._pending = (step, future)
        if wait:
            self.wait()
        self.last_stall_s = time.perf_counter() - t0
        return root / ckpt_name(step)

    def _async_write(self, state, checkpoint_id):
        import torch.distributed.checkpoint as dcp

        return dcp.async_save(state, checkpoint_id=checkpoint_id, process_group=self._group)

    def poll(self) -> None:
        """Collective, at a step boundary: publish the save in flight if every rank's write has finished."""
        if self._pending is None:
            return
        if any_rank(not self._pending[1].done()):
            return
        self.wait()

    def wait(self) -> None:
        """Collective: block until the save in flight is written, then publish it (or raise naming its step)."""
        if self._pending is None:
            return
        step, future = self._pending
        self._pending = None
        error = _result(future)
        _conclude(self.run_dir, step, error, self.keep_last, self.is_main, background=True)


def _result(future) -> BaseException | None:
    try:
        future.result()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
        return e
    return None


def _failing_after(future, error: BaseException):
    """A future that completes when ``future`` does, with ``error`` (the background ENOSPC test hook)."""
    from concurrent.futures import Future

    out: Future = Future()
    future.add_done_callback(lambda _: out.set_exception(error))
    return out


def load_checkpoint(engine, ckpt_dir: str | Path) -> dict:
    """Collective. Validates meta.json, lets the engine restore its state (it names the formats it reads),
    and returns this rank's ``extra`` (trainer, data and RNG state)."""
    meta = read_meta(ckpt_dir)
    engine.load(Path(ckpt_dir), meta)
    return load_extra(ckpt_dir, engine.dist.rank)
