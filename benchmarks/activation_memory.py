"""Activation memory under activation checkpointing none / selective / full (gpt2-124m, seq 1024, fp32 CPU).

    .venv/bin/python benchmarks/activation_memory.py [--model gpt2-124m] [--batch 1] [--seq-len 1024]

Measured with torch's own tensor bookkeeping (train.bench.TensorMemoryTracker): every tensor created
during one training micro-step is counted from allocation to free, so the numbers are exact and free
of allocator effects. AC is applied by the trainer's `train.parallelize.apply_ac`. Two figures:
  blocks     bytes held by the transformer blocks between forward and backward (live bytes when the
             final norm starts, minus those when the first block starts);
  step peak  the peak over forward + backward of everything (blocks, logits, the fp32 log-softmax and
             gradients of the loss, parameter gradients as backward allocates them);
and the planner's prediction of each (train.plan.activation_bytes).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def measure(model_name: str, ac: str, batch: int, seq_len: int) -> dict:
    from model.config import GPTConfig
    from model.gpt import GPT
    from train.bench import TensorMemoryTracker
    from train.loss import cross_entropy
    from train.parallelize import apply_ac

    cfg = GPTConfig.from_name(model_name)
    torch.manual_seed(0)
    model = GPT(cfg)
    apply_ac(model, ac)
    g = torch.Generator().manual_seed(0)
    xy = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=g)
    tracker = TensorMemoryTracker(exclude=list(model.parameters()) + list(model.buffers()))
    marks: dict[str, int] = {}
    h1 = model.blocks[0].register_forward_pre_hook(lambda *_: marks.__setitem__("blocks_in", tracker.current))
    h2 = model.norm_f.register_forward_pre_hook(lambda *_: marks.__setitem__("blocks_out", tracker.current))
    t0 = time.perf_counter()
    with tracker:
        logits = model(xy[:, :-1])
        loss = cross_entropy(logits, xy[:, 1:])
        del logits  # as the trainer does: the loss holds the logits' gradient
        loss.backward()
        del loss
    h1.remove()
    h2.remove()
    return {"blocks": marks["blocks_out"] - marks["blocks_in"], "step_peak": tracker.peak,
            "grads": sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()),
            "seconds": time.perf_counter() - t0}


def predict(model_name: str, ac: str, batch: int, seq_len: int, grads: int) -> dict:
    from train.plan import activation_bytes, model_shape

    s = model_shape(model_name, seq_len)
    est = activation_bytes(s, batch, seq_len, ac, act=4, resid=4, autocast=False)
    # the measured difference leaves out block 0's input (the embeddings, alive before) and adds the
    # last block's output: the same size, so it equals what the blocks save
    blocks = est.saved_blocks
    return {"blocks": blocks, "step_peak": est.peak(grads, s.root_params * 4)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2-124m")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=1024)
    args = p.parse_args()
    from tqdm import tqdm

    rows = {}
    for ac in tqdm(("none", "selective", "full"), desc="AC modes", file=sys.stderr):
        m = measure(args.model, ac, args.batch, args.seq_len)
        rows[ac] = (m, predict(args.model, ac, args.batch, args.seq_len, m["grads"]))
    mib = 2**20
    print(f"{args.model} fp32, batch {args.batch} x seq {args.seq_len}: activation memory by AC mode "
          f"(MiB; predicted = train.plan)")
    print(f"{'AC':<11}{'blocks':>9}{'pred':>9}{'cut':>7}{'step peak':>11}{'pred':>9}{'cut':>7}{'fwd+bwd s':>11}")
    base = rows["none"][0]
    for ac, (m, pr) in rows.items():
        print(f"{ac:<11}{m['blocks'] / mib:>9.0f}{pr['blocks'] / mib:>9.0f}{base['blocks'] / m['blocks']:>6.1f}x"
              f"{m['step_peak'] / mib:>11.0f}{pr['step_peak'] / mib:>9.0f}{base['step_peak'] / m['step_peak']:>6.1f}x"
              f"{m['seconds']:>11.1f}")
    full_cut = base["blocks"] / rows["full"][0]["blocks"]
    print(f"full AC cuts the blocks' activations {full_cut:.1f}x (target >= 3x); the step peak less, because "
          f"the {args.model} head (the logits and their gradient, V-wide) and the gradients are not checkpointed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
