"""CPU training-step throughput: lmforge's trainer vs transformers' own GPT2LMHeadModel, same config.

    .venv/bin/python benchmarks/vs_transformers.py [--batch 2] [--seq-len 256] [--steps 5] [--threads 2]

Both run a full optimizer step (forward, fp32 cross-entropy, backward, grad-norm clip at 1.0, AdamW with
the same hyper-parameters and torch's default CPU kernel) on the same random tokens, with the same
torch thread count, in one process. Steps alternate between the two models so that load from other
processes hits both alike; the figure is the ratio of median step times. Ours is built by the trainer's
SingleStrategy from the same Hydra overrides as `python -m train` (model=gpt2-124m, fp32).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def build_ours(batch: int, seq_len: int):
    from train.bench import compose_config
    from train.distributed import DistInfo
    from train.main import build_gpt_config
    from train.strategy import build_strategy

    cfg = compose_config(["model=gpt2-124m", "strategy=single", "precision=fp32", "train.device=cpu",
                          f"train.micro_batch_size={batch}", f"train.seq_len={seq_len}", "optim.weight_decay=0.1"])
    strategy = build_strategy(cfg, DistInfo(device=torch.device("cpu")))
    strategy.build(build_gpt_config(cfg))

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        loss = strategy.micro_step(x, y, last=True)
        strategy.step()
        return float(loss.detach())

    return step, cfg


def build_hf(cfg):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_cfg = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_new",
                        tie_word_embeddings=True)
    model = GPT2LMHeadModel(hf_cfg)  # transformers picks its default attention (SDPA)
    model.train()
    o = cfg.optim
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=o.lr, betas=tuple(o.betas), eps=o.eps)

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        logits = model(input_ids=x).logits
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
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from tqdm import tqdm

    ours, cfg = build_ours(args.batch, args.seq_len)
    hf, n_hf = build_hf(cfg)
    g = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {"lmforge": [], "transformers": []}
    cpu: dict[str, list[float]] = {"lmforge": [], "transformers": []}
    losses: dict[str, float] = {}
    for i in tqdm(range(args.warmup + args.steps), desc="steps (both models)", file=sys.stderr):
        xy = torch.randint(0, 50257, (args.batch, args.seq_len + 1), generator=g)
        x, y = xy[:, :-1], xy[:, 1:]
        order = [("lmforge", ours), ("transformers", hf)] if i % 2 == 0 else [("transformers", hf), ("lmforge", ours)]
        for name, fn in order:
            t0, c0 = time.perf_counter(), time.process_time()
            losses[name] = fn(x, y)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    tokens = args.batch * args.seq_len
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    print(f"gpt2-124m ({n_hf / 1e6:.1f}M params) fp32 train step on CPU, {args.threads} threads, "
          f"batch {args.batch} x seq {args.seq_len}, median of {args.steps} steps after {args.warmup} warm-up")
    print(f"{'':<14}{'step s':>9}{'tokens/s':>10}{'CPU s':>9}{'last loss':>11}")
    for k in ("lmforge", "transformers"):
        print(f"{k:<14}{med[k]:>9.3f}{tokens / med[k]:>10.1f}{med_cpu[k]:>9.3f}{losses[k]:>11.4f}")
    print(f"throughput ratio lmforge / transformers: {med['transformers'] / med['lmforge']:.2f}x wall-clock, "
          f"{med_cpu['transformers'] / med_cpu['lmforge']:.2f}x CPU time (target >= 1.0x; CPU time is the steadier "
          "figure on a shared machine)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
