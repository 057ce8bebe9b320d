"""train.loss_impl=fused vs chunked_logits: peak memory and step time of a training step, and the planner.

    .venv/bin/python benchmarks/fused_loss.py                 # gemma-tiny (256K vocabulary) and gpt2-124m, seq 1024
    .venv/bin/python benchmarks/fused_loss.py --quick         # gemma-tiny only
    .venv/bin/python benchmarks/fused_loss.py --compile-head  # also: eager vs torch.compile of the fused head + loss

Each (model, loss path) runs in a fresh process (strategy=single, fp32, CPU, batch 1 x seq 1024, random tokens)
built by the trainer's own engine, as `python -m train` builds it:
  step peak     parameters + AdamW states + torch's own peak of every tensor created during the second optimizer
                step (train.bench.TensorMemoryTracker; exact, independent of the allocator and of load), and
                the peak RSS above the process's RSS just before the model was built;
  loss part     the LM head + loss alone (forward and backward on the model's real head shape, hidden states
                [B*T, C] in, their gradient and the head weight's gradient out): its tensor peak minus those
                two gradients, which every path produces (the weight's is a parameter gradient);
  step time     median wall-clock of the timed steps (untracked), both paths alternated run by run;
  predicted     train.plan.memory_bytes for the same model / batch / loss_impl (for-loop AdamW as torch uses on
                CPU, no fragmentation margin, no CUDA context).
glibc's malloc serves allocations above 256 KiB with mmap (MALLOC_MMAP_THRESHOLD_), so RSS follows live memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (label, preset, model overrides, micro_batch, seq_len)
CONFIGS = [
    ("gemma-tiny V=256000", "gemma-tiny", {"block_size": 1024}, 1, 1024),
    ("gpt2-124m V=50257", "gpt2-124m", {}, 1, 1024),
]
IMPLS = ("chunked_logits", "fused")


def worker(spec: dict) -> dict:
    import torch

    from train.bench import (
        TensorMemoryTracker,
        _peak_rss_bytes,
        _rss_bytes,
        compose_config,
        single_process_engine,
    )
    from train.config import resolve

    preset, kw, B, T, impl = spec["preset"], spec["model"], spec["micro_batch"], spec["seq_len"], spec["impl"]
    overrides = [f"model={preset}", *(f"model.{k}={v}" for k, v in kw.items()), "strategy=single", "precision=fp32",
                 "train.device=cpu", f"train.micro_batch_size={B}", f"train.seq_len={T}", f"train.loss_impl={impl}"]
    cfg = compose_config(overrides)
    V = resolve(cfg, 1).gpt_config.vocab_size
    g = torch.Generator().manual_seed(0)
    steps = 2 + spec["timed"]
    data = [torch.randint(0, V, (B, T + 1), generator=g) for _ in range(steps)]
    base = _rss_bytes()
    engine, _ = single_process_engine(cfg, torch.device("cpu"))
    times = []
    for i, xy in enumerate(data):
        tracker = None
        if i == 1:  # the second step: AdamW's states exist, as in every later step
            state = engine.state_bytes()
            existing = list(engine.raw.parameters()) + list(engine.raw.buffers())
            existing += [v for s in engine.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
            tracker = TensorMemoryTracker(exclude=existing)
            tracker.__enter__()
        t0 = time.perf_counter()
        engine.micro_step(xy[:, :-1], xy[:, 1:], last=True)
        engine.step()
        if tracker is not None:
            tracker.__exit__(None, None, None)
            step_peak = state["params"] + state["optimizer"] + tracker.peak
        elif i >= 2:
            times.append(time.perf_counter() - t0)
    rss = _peak_rss_bytes() - base
    loss_part = loss_region_peak(engine.raw.lm_head.weight.detach(), B * T, impl)
    return {"step_peak_bytes": step_peak, "rss_peak_bytes": rss, "loss_part_bytes": loss_part, "step_times_s": times}


def loss_region_peak(weight, n_tokens: int, impl: str) -> int:
    """Tensor peak of the LM head + loss (forward + backward) beyond the hidden states' and the head weight's
    gradients (which every path produces)."""
    import torch

    from model.loss import fused_linear_cross_entropy
    from train.bench import TensorMemoryTracker
    from train.loss import cross_entropy

    V, C = weight.shape
    g = torch.Generator().manual_seed(1)
    h = torch.randn(n_tokens, C, generator=g).requires_grad_()
    w = weight.clone().requires_grad_()
    y = torch.randint(0, V, (n_tokens,), generator=g)
    tracker = TensorMemoryTracker(exclude=[h, w, y])
    with tracker:
        if impl == "fused":
            loss = fused_linear_cross_entropy(h, w, y)
        else:
            logits = torch.nn.functional.linear(h, w)
            loss = cross_entropy(logits, y)
            del logits  # as the trainer does
        loss.backward()
        del loss
    return tracker.peak - 4 * (V * C + n_tokens * C)


def predict(preset: str, kw: dict, B: int, T: int, impl: str) -> float:
    from train.plan import PlanArgs, memory_bytes, model_shape

    a = PlanArgs(model=preset, strategy="single", nodes=1, gpus=1, micro_batch=B, seq_len=T, precision="fp32",
                 ac="none", optimizer="forloop", frag=0.0, context_gb=0.0, loss_impl=impl)
    return memory_bytes(a, model_shape(preset, T, **kw))[1]


def run_worker(spec: dict, threads: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="262144", OMP_NUM_THREADS=str(threads),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"error: {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compile_head(threads: int) -> None:
    """Eager vs torch.compile of fused_linear_cross_entropy (fwd + bwd) on gpt2-124m's head, 1024 tokens."""
    import torch

    from model.loss import fused_linear_cross_entropy

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    V, C, N = 50257, 768, 1024
    h = torch.randn(N, C, generator=g).requires_grad_()
    w = (torch.randn(V, C, generator=g) * 0.02).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    compiled = torch.compile(fused_linear_cross_entropy)
    out = {}
    for name, fn in (("eager", fused_linear_cross_entropy), ("compiled", compiled)) * 2:
        fn(h, w, y).backward()  # warm-up / compilation
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn(h, w, y).backward()
            ts.append(time.perf_counter() - t0)
        out.setdefault(name, []).extend(ts)
    e, c = statistics.median(out["eager"]), statistics.median(out["compiled"])
    print(f"fused head + loss, gpt2-124m head, {N} tokens, fwd+bwd: eager {e * 1e3:.0f} ms, "
          f"torch.compile {c * 1e3:.0f} ms ({e / c:.2f}x)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="gemma-tiny only")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="processes per (model, path), alternated")
    p.add_argument("--timed", type=int, default=3, help="timed steps per process")
    p.add_argument("--compile-head", action="store_true")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    print(f"load average before: {os.getloadavg()[0]:.1f}", file=sys.stderr)
    rows = []
    for label, preset, kw, B, T in CONFIGS[:1] if args.quick else CONFIGS:
        got: dict[str, list[dict]] = {i: [] for i in IMPLS}
        for r in range(args.repeats):
            for impl in IMPLS if r % 2 == 0 else IMPLS[::-1]:
                spec = {"preset": preset, "model": kw, "micro_batch": B, "seq_len": T, "impl": impl,
                        "timed": args.timed}
                got[impl].append(run_worker(spec, args.threads))
        row = {"config": f"{label} B{B} T{T}"}
        for impl in IMPLS:
            ms = got[impl]
            row[impl] = {"step_peak_gib": ms[0]["step_peak_bytes"] / 2**30,
                         "rss_peak_gib": max(m["rss_peak_bytes"] for m in ms) / 2**30,
                         "loss_part_mib": ms[0]["loss_part_bytes"] / 2**20,
                         "step_time_s": statistics.median([t for m in ms for t in m["step_times_s"]]),
                         "predicted_gib": predict(preset, kw, B, T, impl) / 2**30}
        rows.append(row)
    print(f"load average after: {os.getloadavg()[0]:.1f}", file=sys.stderr)
    print(f"{'config (fp32, CPU, single)':<34}{'path':<16}{'loss part':>11}{'step peak':>11}{'predicted':>11}"
          f"{'err':>8}{'peak RSS':>10}{'step time':>11}")
    for r in rows:
        for impl in IMPLS:
            m = r[impl]
            err = m["predicted_gib"] / m["step_peak_gib"] - 1
            print(f"{r['config']:<34}{impl:<16}{m['loss_part_mib']:>8.1f}MiB{m['step_peak_gib']:>10.3f}G"
                  f"{m['predicted_gib']:>10.3f}G{err:>+8.1%}{m['rss_peak_gib']:>9.3f}G{m['step_time_s']:>10.2f}s")
        c, f = r["chunked_logits"], r["fused"]
        print(f"{'':<34}fused vs chunked_logits: loss part {c['loss_part_mib'] / f['loss_part_mib']:.1f}x smaller, "
              f"step peak {c['step_peak_gib'] / f['step_peak_gib']:.2f}x smaller, "
              f"speed {c['step_time_s'] / f['step_time_s']:.2f}x")
    if args.compile_head:
        compile_head(args.threads)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
