"""Train-step throughput: lmforge's trainer vs transformers' own GPT2LMHeadModel, same config, one process.

    .venv/bin/python benchmarks/vs_transformers.py [--batch 2] [--seq-len 256] [--steps 5] [--threads 2]
    python benchmarks/vs_transformers.py --device cuda --precision bf16 --compile --batch 16 --seq-len 1024 --steps 20

Both run a full optimizer step (forward, fp32 cross-entropy, backward, grad-norm clip at 1.0, AdamW with
the same hyper-parameters and the same kernel: torch's default on CPU, fused on CUDA) on the same random
tokens, in one process. Ours is the trainer's single-process engine (train.parallel) built from the same
Hydra overrides as `python -m train` (model=gpt2-124m, precision=fp32|bf16, train.compile). transformers runs with its
default attention (SDPA), fp32 weights under bf16 autocast when --precision bf16 (what our trainer
does), and `torch.compile` of the whole model when --compile. Steps alternate between the two models so
that load from other processes hits both alike; the figure is the ratio of median step times. MFU uses
the trainer's FLOPs per token (6N + 12 L H Q T) and peak (datasheet on a known GPU, else measured).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_ours(batch: int, seq_len: int, device: str = "cpu", precision: str = "fp32", compile: bool = False):
    from train.bench import compose_config, single_process_engine

    cfg = compose_config(["model=gpt2-124m", "strategy=single", f"precision={precision}", f"train.device={device}",
                          f"train.micro_batch_size={batch}", f"train.seq_len={seq_len}", "optim.weight_decay=0.1",
                          f"train.compile={str(compile).lower()}"])
    engine, _spec = single_process_engine(cfg, torch.device(device))

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        loss = engine.micro_step(x, y, last=True)
        engine.step()
        return float(loss.detach())

    return step, cfg


def build_hf(cfg, device: str = "cpu", precision: str = "fp32", compile: bool = False):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_cfg = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_new",
                        tie_word_embeddings=True)
    model = GPT2LMHeadModel(hf_cfg).to(device)  # transformers picks its default attention (SDPA)
    model.train()
    fwd = torch.compile(model) if compile else model
    o = cfg.optim
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                            fused=device.startswith("cuda"))
    amp = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        with amp:
            logits = fwd(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    n = sum(p.numel() for p in model.parameters())
    return step, n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile both models (ours per block, as the trainer)")
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device here")
    torch.set_num_threads(args.threads)
    from tqdm import tqdm

    from model.config import GPTConfig
    from model.stats import flops_per_token
    from train.metrics import peak_flops

    dev = torch.device(args.device)
    ours, cfg = build_ours(args.batch, args.seq_len, args.device, args.precision, args.compile)
    hf, n_hf = build_hf(cfg, args.device, args.precision, args.compile)
    g = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {"lmforge": [], "transformers": []}
    cpu: dict[str, list[float]] = {"lmforge": [], "transformers": []}
    losses: dict[str, float] = {}
    for i in tqdm(range(args.warmup + args.steps), desc="steps (both models)", file=sys.stderr):
        xy = torch.randint(0, 50257, (args.batch, args.seq_len + 1), generator=g).to(dev)
        x, y = xy[:, :-1], xy[:, 1:]
        order = [("lmforge", ours), ("transformers", hf)] if i % 2 == 0 else [("transformers", hf), ("lmforge", ours)]
        for name, fn in order:
            t0, c0 = time.perf_counter(), time.process_time()
            losses[name] = fn(x, y)  # float(loss) waits for the device
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    tokens = args.batch * args.seq_len
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    fpt = flops_per_token(GPTConfig.from_name("gpt2-124m"), args.seq_len)
    peak, source = peak_flops(dev, torch.bfloat16 if args.precision == "bf16" else torch.float32)
    where = (f"{torch.cuda.get_device_name(dev)}" if dev.type == "cuda" else f"CPU, {args.threads} threads")
    print(f"gpt2-124m ({n_hf / 1e6:.1f}M params) {args.precision}{' compiled' if args.compile else ''} train step on "
          f"{where}, batch {args.batch} x seq {args.seq_len}, median of {args.steps} steps after {args.warmup} warm-up")
    print(f"peak {peak / 1e12:.1f} TFLOP/s ({source}); {fpt / 1e6:.1f} MFLOPs per token (6N + 12LHQT)")
    print(f"{'':<14}{'step s':>9}{'tokens/s':>12}{'MFU':>8}{'CPU s':>9}{'last loss':>11}")
    for k in ("lmforge", "transformers"):
        tps = tokens / med[k]
        print(f"{k:<14}{med[k]:>9.3f}{tps:>12.1f}{tps * fpt / peak:>8.1%}{med_cpu[k]:>9.3f}{losses[k]:>11.4f}")
    line = f"throughput ratio lmforge / transformers: {med['transformers'] / med['lmforge']:.2f}x wall-clock"
    if dev.type == "cpu":
        line += (f", {med_cpu['transformers'] / med_cpu['lmforge']:.2f}x CPU time (CPU time is the steadier figure "
                 "on a shared machine)")
    print(line + " (target >= 1.0x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
