"""Predicted peak memory (train.plan) vs measured, on this machine's CPU or on a CUDA GPU.

    .venv/bin/python benchmarks/plan_vs_measured.py            # the table of the README
    .venv/bin/python benchmarks/plan_vs_measured.py --quick    # two small configs
    python benchmarks/plan_vs_measured.py --device cuda --precision bf16   # vs CUDA max allocated

Each configuration runs in a fresh process: the trainer's own engine (`strategy=single`, fp32, CPU)
is built from the same Hydra overrides as `python -m train`, then two optimizer steps run on random
tokens (the second one has AdamW's states allocated, as every later step does). Two measurements:
  RSS      peak resident set size minus the process's RSS just before the model is built (after one
           tiny warm-up step, so thread pools and kernel caches are part of the baseline);
  tensors  torch's own bookkeeping (train.bench.TensorMemoryTracker): parameter + optimizer bytes
           plus the peak of every tensor created during the second step.
On CUDA the measurement is `torch.cuda.max_memory_allocated` over the second step (everything the
caching allocator handed out: parameters, optimizer states, gradients, activations, temporaries).
The prediction is `train.plan.memory_bytes` for the same model / batch / AC / precision with the
device's AdamW kernel (CPU: for-loop, one tensor's temporaries at a time; CUDA: fused), no
fragmentation margin and no CUDA context (neither is in what is measured).
glibc's malloc is told to serve allocations above 256 KiB with mmap (MALLOC_MMAP_THRESHOLD_), so freed
tensors go back to the OS and RSS follows live memory instead of heap high-water marks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (label, model preset, extra model overrides, micro_batch, seq_len, AC)
CONFIGS = [
    ("gpt2-124m B1 T512 none", "gpt2-124m", {}, 1, 512, "none"),
    ("gpt2-124m B1 T1024 selective", "gpt2-124m", {}, 1, 1024, "selective"),
    ("gpt2-124m B2 T512 full", "gpt2-124m", {}, 2, 512, "full"),
    ("gpt2-124m 6L B2 T512 none", "gpt2-124m", {"n_layer": 6}, 2, 512, "none"),
    ("llama 8L/512 GQA B4 T512 none", "llama-tiny",
     {"n_layer": 8, "n_embd": 512, "n_head": 8, "n_kv_head": 4, "ffn_hidden": 1408, "vocab_size": 32000,
      "block_size": 1024}, 4, 512, "none"),
]
QUICK = [CONFIGS[0], CONFIGS[3]]


def overrides_for(preset: str, model_kw: dict, micro_batch: int, seq_len: int, ac: str,
                  device: str = "cpu", precision: str = "fp32") -> list[str]:
    return [f"model={preset}", *(f"model.{k}={v}" for k, v in model_kw.items()), "strategy=single",
            f"precision={precision}", f"train.device={device}", f"train.micro_batch_size={micro_batch}",
            f"train.seq_len={seq_len}", f"train.activation_checkpointing={ac}"]


def worker(overrides: list[str]) -> dict:
    """Runs in the child process: build, two steps, return the measurements."""
    import torch

    from train.bench import (
        TensorMemoryTracker,
        _peak_rss_bytes,
        _rss_bytes,
        compose_config,
        single_process_engine,
    )
    from train.config import resolve

    cfg = compose_config(overrides)
    gpt_config = resolve(cfg, 1).gpt_config
    device = torch.device(cfg.train.device)
    B, T = cfg.train.micro_batch_size, cfg.train.seq_len
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, gpt_config.vocab_size, (B, T + 1), generator=g).to(device) for _ in range(2)]
    if device.type == "cuda":
        strategy, _ = single_process_engine(cfg, device)
        for i, xy in enumerate(batches):
            if i == 1:  # the second step: AdamW's states exist, as in every later step
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            strategy.micro_step(xy[:, :-1], xy[:, 1:], last=True)
            strategy.step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"rss_peak_bytes": peak, "tensor_peak_bytes": peak}
    _warm_up_runtime()
    base = _rss_bytes()
    strategy, _ = single_process_engine(cfg, device)
    xy = batches[0]
    strategy.micro_step(xy[:, :-1], xy[:, 1:], last=True)
    strategy.step()
    state = strategy.state_bytes()  # params + AdamW states (grads are None between steps)
    existing = list(strategy.raw.parameters()) + list(strategy.raw.buffers())
    existing += [v for s in strategy.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    tracker = TensorMemoryTracker(exclude=existing)
    xy = batches[1]
    with tracker:
        strategy.micro_step(xy[:, :-1], xy[:, 1:], last=True)
        strategy.step()
    return {"rss_peak_bytes": _peak_rss_bytes() - base,
            "tensor_peak_bytes": state["params"] + state["optimizer"] + tracker.peak}


def _warm_up_runtime() -> None:
    """One tiny training step, so that thread pools, kernel caches and lazily loaded libraries (the CPU's
    analogue of the CUDA context, which the planner budgets separately) are in the baseline."""
    import gc

    import torch

    from model.config import GPTConfig
    from model.gpt import GPT

    cfg = GPTConfig.from_name("llama-tiny", vocab_size=256, n_layer=1)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randint(0, 256, (2, 32))
    torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
    opt.step()
    del model, opt
    gc.collect()


def predict(preset: str, model_kw: dict, micro_batch: int, seq_len: int, ac: str,
            device: str = "cpu", precision: str = "fp32") -> float:
    from train.plan import PlanArgs, memory_bytes, model_shape

    a = PlanArgs(model=preset, strategy="single", nodes=1, gpus=1, micro_batch=micro_batch, seq_len=seq_len,
                 precision=precision, ac=ac, optimizer="fused" if device == "cuda" else "forloop", frag=0.0,
                 context_gb=0.0)
    return memory_bytes(a, model_shape(preset, seq_len, **model_kw))[1]


def measure(overrides: list[str], threads: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="262144", OMP_NUM_THREADS=str(threads),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(overrides)], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"error: measuring {overrides} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="two small configurations")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: no CUDA device here")
    from tqdm import tqdm

    rows = []
    configs = QUICK if args.quick else CONFIGS
    for label, preset, kw, b, t, ac in tqdm(configs, desc="configs", file=sys.stderr):
        m = measure(overrides_for(preset, kw, b, t, ac, args.device, args.precision), args.threads)
        rows.append({"config": label, "predicted_gib": predict(preset, kw, b, t, ac, args.device, args.precision) / 2**30,
                     "rss_gib": m["rss_peak_bytes"] / 2**30, "tensors_gib": m["tensor_peak_bytes"] / 2**30})
    what = "RSS" if args.device == "cpu" else "CUDA"
    print(f"{f'config ({args.precision}, {args.device}, single)':<34}{'predicted':>10}{what:>9}{'err':>8}"
          f"{'tensors':>9}{'err':>8}")
    for r in rows:
        e1 = r["predicted_gib"] / r["rss_gib"] - 1
        e2 = r["predicted_gib"] / r["tensors_gib"] - 1
        print(f"{r['config']:<34}{r['predicted_gib']:>9.3f}G{r['rss_gib']:>8.3f}G{e1:>+8.1%}"
              f"{r['tensors_gib']:>8.3f}G{e2:>+8.1%}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
