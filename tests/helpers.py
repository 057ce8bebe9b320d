"""Shared test helpers: run the trainer (subprocess, torchrun, or in-process) and read what it left.

    res = run_train(tmp_path / "run", *TINY, "train.max_steps=5")       # python -m train ...
    res = run_train(tmp_path / "run", *TINY, "strategy=ddp", nproc=2)   # torchrun --nproc_per_node=2 -m train
    res.returncode, res.stderr, res.metrics, res.losses, res.val_losses

Every run gets ``run.dir=<run_dir>`` and the environment of ``train_env()`` (one thread per rank,
W&B never online). Keep tests small: ``TINY`` is a 2-layer, 32-wide GPT-2 with seq_len 32.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# a 2-layer, 32-wide gpt2 (the real 50257 vocabulary: the data is tokenized with gpt2), short sequences,
# every step logged, no eval / samples / periodic checkpoints unless a test asks for them
TINY: tuple[str, ...] = (
    "model=gpt2-tiny", "model.n_layer=2", "model.n_head=2", "model.n_embd=32",
    "train.seq_len=32", "train.micro_batch_size=4", "train.grad_accum=1", "train.max_steps=10",
    "train.log_every=1", "train.eval_every=0", "train.eval_steps=0", "train.ckpt_every=0",
    "train.sample_every=0", "train.sample_tokens=0", "train.device=cpu", "optim.warmup_steps=2",
)


def train_env(extra: dict | None = None, threads: int = 1) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "WANDB_MODE": "offline",
                "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.pop("HYDRA_FULL_ERROR", None)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE"):
        env.pop(var, None)
    env.update(extra or {})
    return env


@dataclass
class RunResult:
    returncode: int
    stdout: str
    stderr: str
    run_dir: Path
    cmd: list[str] = field(default_factory=list)

    @property
    def metrics(self) -> list[dict]:
        return read_metrics(self.run_dir)

    @property
    def train_events(self) -> list[dict]:
        return [e for e in self.metrics if "loss" in e]

    @property
    def losses(self) -> list[float]:
        return [e["loss"] for e in self.train_events]

    @property
    def val_losses(self) -> list[float]:
        return [e["val_loss"] for e in self.metrics if "val_loss" in e]

    def explain(self) -> str:
        return (f"command: {' '.join(self.cmd)}\nexit code {self.returncode}\n--- stdout (tail)\n{self.stdout[-3000:]}"
                f"\n--- stderr (tail)\n{self.stderr[-5000:]}")


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_command(run_dir: Path | None, overrides: Sequence[str], nproc: int = 1, module: str = "train",
                  multirun: bool = False) -> list[str]:
    if nproc > 1:
        cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", module]
    else:
        cmd = [PYTHON, "-m", module]
    if multirun:
        cmd.append("-m")
    if run_dir is not None:
        cmd.append(f"run.dir={run_dir}")
    return cmd + list(overrides)


def run_train(run_dir: str | Path | None, *overrides: str, nproc: int = 1, env: dict | None = None,
              timeout: float = 600, check: bool = True, threads: int | None = None, multirun: bool = False,
              cwd: Path | None = None) -> RunResult:
    """Run ``python -m train`` (or torchrun with ``nproc`` ranks) as a subprocess and wait for it.

    ``check=True`` asserts exit code 0 and shows stdout/stderr on failure. Threads per rank default
    to 2 for one process and 1 per rank otherwise (the CI machine has 2 cores)."""
    run_dir = Path(run_dir) if run_dir is not None else None
    cmd = train_command(run_dir, overrides, nproc=nproc, multirun=multirun)
    threads = threads if threads is not None else (2 if nproc == 1 else 1)
    proc = subprocess.run(cmd, cwd=cwd or REPO, env=train_env(env, threads), capture_output=True, text=True,
                          timeout=timeout, check=False)
    res = RunResult(proc.returncode, proc.stdout, proc.stderr, run_dir, cmd)
    if check:
        assert proc.returncode == 0, res.explain()
    return res


def start_train(run_dir: str | Path, *overrides: str, nproc: int = 1, env: dict | None = None,
                threads: int | None = None) -> subprocess.Popen:
    """Start the trainer without waiting (signal tests). stdout/stderr are pipes."""
    cmd = train_command(Path(run_dir), overrides, nproc=nproc)
    threads = threads if threads is not None else (2 if nproc == 1 else 1)
    return subprocess.Popen(cmd, cwd=REPO, env=train_env(env, threads), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def compose(*overrides: str):
    """The composed, type-checked config (as ``python -m train`` would see it), without running."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from train.main import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return hydra_compose(config_name="config", overrides=list(overrides))


def train_in_process(run_dir: str | Path, *overrides: str) -> tuple[int, Path]:
    """``train.main.run`` in this process (single process only): no interpreter start-up cost.
    Returns (exit code, run dir); read results with ``read_metrics``."""
    from train.main import run

    run_dir = Path(run_dir)
    cfg = compose(f"run.dir={run_dir}", *overrides)
    run_dir.mkdir(parents=True, exist_ok=True)  # as Hydra does before calling the task
    return run(cfg, run_dir), run_dir


def dcp_state(ckpt_dir: str | Path) -> dict:
    """Everything a DCP checkpoint (format "dcp") holds, as one nested dict ``{"model": {name: tensor},
    "optim": {"state": ..., "param_groups": ...}}``, read with torch's own converter
    (``torch.distributed.checkpoint.format_utils``): an oracle that shares no code with train/."""
    import tempfile
    import warnings

    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp_to_torch_save(str(ckpt_dir), f"{tmp}/state.pt")
        return torch.load(f"{tmp}/state.pt", weights_only=True)


def losses_of(run_dir: str | Path) -> list[float]:
    return [e["loss"] for e in read_metrics(run_dir) if "loss" in e]


def one_line_error(stderr: str) -> str:
    """The last non-empty stderr line, asserting the error is reported on a single line."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert lines, "nothing on stderr"
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, f"expected exactly one 'error:' line, got:\n{stderr[-3000:]}"
    return errors[0]


# ---------------------------------------------------------------- W&B offline run files

_WANDB_BLOCK = 32 * 1024
_WANDB_FILE_HEADER = 7  # ":W&B" (4) magic (2) version (1)
_REC_HEADER = 7  # crc32c (4) length (2) type (1)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: str | Path) -> Iterable[bytes]:
    """Payloads of a ``.wandb`` transaction log: LevelDB-log-style 32 KiB blocks of chunks, each
    ``crc32c length type`` + data, a record split over blocks as first/middle/last chunks."""
    data = Path(path).read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:_WANDB_FILE_HEADER])
    assert ident == b":W&B", f"{path} is not a W&B transaction log (header {ident!r})"
    pos, pending = _WANDB_FILE_HEADER, b""
    while pos + _REC_HEADER <= len(data):
        left_in_block = _WANDB_BLOCK - pos % _WANDB_BLOCK
        if left_in_block < _REC_HEADER:  # block trailer: zero padding
            pos += left_in_block
            continue
        start = pos
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _REC_HEADER])
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos = start + left_in_block
            continue
        pos += _REC_HEADER
        chunk = data[pos:pos + length]
        pos += length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""
        else:
            raise AssertionError(f"{path}: bad chunk type {kind} at byte {start}")


def wandb_history(path: str | Path) -> list[dict]:
    """History rows (one dict per ``run.log``) of a ``.wandb`` file, with ``_step``."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for payload in wandb_records(path):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(payload)
        if rec.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in rec.history.item:
            key = item.key or "/".join(item.nested_key)
            row[key] = json.loads(item.value_json)
        if rec.history.HasField("step"):
            row.setdefault("_step", rec.history.step.num)
        rows.append(row)
    return rows


def wandb_record_types(path: str | Path) -> list[str]:
    from wandb.proto import wandb_internal_pb2

    kinds = []
    for payload in wandb_records(path):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(payload)
        kinds.append(rec.WhichOneof("record_type"))
    return kinds


def wait_for_wandb_exit(path: str | Path, timeout: float = 60.0) -> None:
    """W&B's service may still be appending to the log after ``run.finish()`` returns: wait for its
    final ``exit`` record."""
    import time

    deadline = time.time() + timeout
    while "exit" not in wandb_record_types(path):
        assert time.time() < deadline, f"{path} has no exit record after {timeout} s"
        time.sleep(0.25)


def find_wandb_file(run_dir: str | Path) -> Path:
    found = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert found, f"no offline W&B run under {run_dir}/wandb"
    return found[-1]
