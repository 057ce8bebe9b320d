"""train.plan for falcon-40b on 8 / 16 / 32 / 64 x 80 GB GPUs (H100 SXM), fsdp / hsdp / zero3 / tp=8 x fsdp, full AC, seq 2048.

    .venv/bin/python benchmarks/falcon40b_plan.py [--mfu 0.4] [--seq-len 2048]

Per configuration: the per-GPU peak at micro-batch 1 (with the 5% fragmentation margin and 1 GiB of
CUDA context), the largest micro-batch that fits, and at that micro-batch the estimated step time and
tokens/s at the stated MFU, with the data-parallel communication time it has to hide (FSDP/ZeRO-3
all-gather the parameters twice and reduce-scatter the gradients every step; HSDP shards within a group
and all-reduces gradient shards across groups) and the tensor-parallel communication it adds (tp=8
inside each node over NVLink: all-gathers and reduce-scatters of the activations around every block,
with sequence parallel). tp8+fsdp = parallel.tp=8 (one node) x parallel.dp_shard=-1 (one rank per node).
"""

from __future__ import annotations

import argparse
import dataclasses

from train.plan import PlanArgs, model_shape, plan

# (label, strategy, extra PlanArgs fields)
LAYOUTS: tuple[tuple[str, str, dict[str, int]], ...] = (
    ("fsdp", "fsdp", {}),
    ("hsdp/16", "hsdp", {"hsdp_shard": 16}),
    ("zero3", "zero3", {}),
    ("tp8+fsdp", "fsdp", {"tp": 8, "dp_shard": -1}),
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="falcon-40b")
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--gpu-mem-gb", type=float, default=80.0)
    args = p.parse_args()
    shape = model_shape(args.model, args.seq_len)
    print(f"{args.model}: {shape.n_params / 1e9:.2f} B params, bf16, full AC, seq {args.seq_len}, "
          f"{args.gpu_mem_gb:g} GiB GPUs (H100 SXM, {args.mfu:.0%} MFU), AdamW")
    print(f"{'GPUs':>5} {'layout':<10}{'peak@B=1':>10}{'fits':>6}{'max B':>7}{'peak@max':>10}"
          f"{'step s':>8}{'comm s':>8}{'tp s':>7}{'tokens/s':>11}{'params':>8}{'grads':>7}{'optim':>7}{'acts':>7}"
          f"{'comm':>7}")
    for nodes in (1, 2, 4, 8):
        for label, strategy, extra in LAYOUTS:
            if strategy == "hsdp" and nodes == 1:
                continue  # one node: hsdp is fsdp
            a = PlanArgs(model=args.model, strategy=strategy, nodes=nodes, gpus=8, gpu_mem_gb=args.gpu_mem_gb,
                         micro_batch=1, seq_len=args.seq_len, precision="bf16", ac="full", mfu=args.mfu, gpu="h100",
                         **extra)
            one = plan(a, shape)
            b = one.max_micro_batch
            best = plan(dataclasses.replace(a, micro_batch=b), shape) if b else one
            m = one.memory_gib
            # a configuration that does not fit at micro-batch 1 has no "at the largest micro-batch" figures
            at_max = (f"{best.peak_gib:>9.1f}G{best.step_time_s:>8.2f}{best.comm_time_s:>8.2f}"
                      f"{best.tp_comm_time_s:>7.2f}{best.tokens_per_s:>11,.0f}") if b else (
                      f"{'-':>10}{'-':>8}{'-':>8}{'-':>7}{'-':>11}")
            print(f"{nodes * 8:>5} {label:<10}{one.peak_gib:>9.1f}G{'yes' if one.fits else 'NO':>6}{b:>7}"
                  f"{at_max}{m['parameters']:>8.1f}{m['gradients']:>7.1f}"
                  f"{m['optimizer_states']:>7.1f}{m['activations']:>7.1f}{m['communication_buffers']:>7.1f}")
    print("memory columns: GiB per GPU at micro-batch 1; tokens/s for the whole job at the largest micro-batch;\n"
          "comm s: data-parallel traffic (overlapped with compute); tp s: tensor-parallel traffic (added to the step);\n"
          "hsdp/16: shard groups of 16 GPUs (2 nodes), replicated across groups;\n"
          "tp8+fsdp: tp=8 inside each node x dp_shard = nodes (FSDP2 over one rank per node); micro-batch per TP group")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
