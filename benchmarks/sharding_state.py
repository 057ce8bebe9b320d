"""Per-rank model + optimizer state at 1 and 2 ranks, fsdp and zero3 (CPU, gloo), from train.bench.

    .venv/bin/python benchmarks/sharding_state.py [--model gpt2-tiny]

Each run is `torchrun --nproc_per_node N -m train.bench strategy=<s> ...` (the trainer's engines on
real gloo process groups); the state is each rank's `Engine.state_bytes()` after the optimizer
has stepped (parameters, AdamW moments, and ZeRO's fp32 master partition). The figure is the largest
rank's state at N ranks over the 1-rank state, against the ideal 1/N (target <= 1.05 x 1/N).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(strategy: str, nproc: int, model: str, port: int) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
           "-m", "train.bench", f"model={model}", f"strategy={strategy}", "precision=fp32", "train.device=cpu",
           "train.micro_batch_size=2", "train.seq_len=64", "bench.steps=1", "bench.warmup=1"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd[3:])} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["state_bytes_per_rank"]


def total(state: dict) -> int:
    return state["params"] + state["optimizer"] + state.get("master", 0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2-tiny")
    p.add_argument("--strategies", default="fsdp,zero3")
    args = p.parse_args()
    from tqdm import tqdm

    rows = []
    jobs = [(s, n) for s in args.strategies.split(",") for n in (1, 2)]
    results = {}
    for i, (s, n) in enumerate(tqdm(jobs, desc="runs", file=sys.stderr)):
        results[(s, n)] = run(s, n, args.model, 29611 + i)
    print(f"{args.model} fp32, per-rank model + optimizer state (bytes) from Engine.state_bytes()")
    print(f"{'strategy':<10}{'1 rank':>12}{'2 ranks (max)':>15}{'ratio':>8}{'ideal':>7}{'vs ideal':>10}")
    for s in args.strategies.split(","):
        one = total(results[(s, 1)][0])
        two = max(total(r) for r in results[(s, 2)])
        ratio = two / one
        rows.append((s, one, two, ratio))
        print(f"{s:<10}{one:>12,}{two:>15,}{ratio:>8.3f}{0.5:>7.2f}{ratio / 0.5:>9.3f}x  (target <= 1.05x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
