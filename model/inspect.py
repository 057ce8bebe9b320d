"""`python -m model.inspect <preset | HF dir> [--json] [--seq-len N]`: explain a model's architecture.

Prints the module tree (HF `print(model)` style), every weight shape by component, parameter counts, storage per
dtype, training memory for mixed-precision AdamW and FLOPs per token. The model is built on the `meta` device, so
even falcon-40b inspects in seconds without allocating its weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from model.config import PRESETS, GPTConfig
from model.gpt import GPT
from model.stats import (
    ADAMW_MIXED_BYTES_PER_PARAM,
    bytes_per_dtype,
    count_params,
    flops_per_token,
    training_bytes_adamw,
)

_COMPONENTS = {
    "attn_norm": "attention norm", "attn.q_proj": "attention query", "attn.k_proj": "attention key",
    "attn.v_proj": "attention value", "attn.o_proj": "attention output", "mlp_norm": "MLP norm",
    "mlp.gate_proj": "MLP gate", "mlp.up_proj": "MLP up", "mlp.down_proj": "MLP down",
}


def load_config(spec: str) -> tuple[str, GPTConfig]:
    """A preset name, or a Hugging Face model dir / config.json path."""
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" and path.is_file():
        from model.hf_convert import config_from_hf

        return str(spec), config_from_hf(json.loads(path.read_text()))
    return spec, GPTConfig.from_name(spec)


def build_meta(cfg: GPTConfig) -> GPT:
    with torch.device("meta"):
        return GPT(cfg)


def weight_table(model: GPT) -> list[dict[str, Any]]:
    """One row per distinct weight: component, parameter name, shape (Linear as in x out, as HF prints it),
    parameters per copy and number of copies (n_layer for block weights)."""
    cfg = model.config
    rows: list[dict[str, Any]] = []

    def add(component: str, name: str, p: torch.Tensor, copies: int = 1, note: str = "") -> None:
        shape = list(p.shape)
        if p.dim() == 2 and not name.endswith(("tok_emb.weight", "pos_emb.weight")):
            shape = shape[::-1]  # nn.Linear stores (out, in); show in x out
        rows.append({"component": component, "name": name, "shape": shape, "params": p.numel(),
                     "copies": copies, "note": note})

    add("token embedding", "tok_emb.weight", model.tok_emb.weight)
    if model.pos_emb is not None:
        add("position embedding", "pos_emb.weight", model.pos_emb.weight)
    for name, p in model.blocks[0].named_parameters():
        mod, kind = name.rsplit(".", 1)
        comp = _COMPONENTS.get(mod, mod) + (" bias" if kind == "bias" else "")
        add(comp, f"blocks.*.{name}", p, copies=cfg.n_layer)
    for name, p in model.norm_f.named_parameters():
        add("final norm" + (" bias" if name == "bias" else ""), f"norm_f.{name}", p)
    note = "tied to tok_emb, counted once" if cfg.tie_embeddings else ""
    add("LM head", "lm_head.weight", model.lm_head.weight, copies=0 if cfg.tie_embeddings else 1, note=note)
    return rows


def activation_bytes_estimate(cfg: GPTConfig, seq_len: int) -> int:
    """Rough activation memory per sequence with 16-bit activations, fused (flash) attention and no activation
    checkpointing: ~34 * T * d bytes per layer (Korthikanti et al. 2022, without the T^2 attention term)."""
    return 34 * seq_len * cfg.n_embd * cfg.n_layer


def report(name: str, cfg: GPTConfig, seq_len: int) -> dict[str, Any]:
    c = count_params(cfg)
    return {
        "name": name,
        "family": cfg.family,
        "config": cfg.to_dict(),
        "n_params": c.total,
        "n_params_non_embedding": c.non_embedding,
        "n_params_per_block": c.per_block,
        "n_params_embedding": c.embedding,
        "bytes": bytes_per_dtype(c.total),
        "training_bytes_adamw_mixed": training_bytes_adamw(c.total),
        "training_bytes_per_param": ADAMW_MIXED_BYTES_PER_PARAM,
        "activation_bytes_per_sequence_estimate": activation_bytes_estimate(cfg, seq_len),
        "seq_len": seq_len,
        "flops_per_token": flops_per_token(cfg, seq_len),
    }


def _human(n: float, unit: str = "B") -> str:
    for prefix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or prefix == "T":
            return f"{n:.2f} {prefix}{unit}" if prefix else f"{n:.0f} {unit}"
        n /= 1000
    return f"{n}"  # pragma: no cover


def render_text(model: GPT, info: dict[str, Any]) -> str:
    cfg = model.config
    out = [f"== {info['name']} (family {cfg.family}) ==", "", repr(model), "", "Weights (Linear shown as in x out):"]
    rows = weight_table(model)
    w = max(len(r["component"]) for r in rows)
    out.append(f"  {'component':<{w}}  {'shape':>16}  {'params':>14}  {'copies':>6}  parameter")
    for r in rows:
        shape = " x ".join(str(s) for s in r["shape"])
        out.append(f"  {r['component']:<{w}}  {shape:>16}  {r['params']:>14,}  {r['copies']:>6}  {r['name']}"
                   + (f"  ({r['note']})" if r["note"] else ""))
    out += [
        "",
        "Parameters:",
        f"  total           {info['n_params']:>16,}",
        f"  non-embedding   {info['n_params_non_embedding']:>16,}   (all but input lookup tables; a tied embedding counts as the LM head)",
        f"  per block       {info['n_params_per_block']:>16,}   x {cfg.n_layer} blocks",
        f"  embedding       {info['n_params_embedding']:>16,}",
        "",
        "Storage of the weights:",
    ]
    for dt, b in info["bytes"].items():
        out.append(f"  {dt:<5} {_human(b):>12}  ({b:,} bytes)")
    tb = info["training_bytes_adamw_mixed"]
    act = info["activation_bytes_per_sequence_estimate"]
    out += [
        "",
        (f"Training memory, mixed-precision AdamW at {info['training_bytes_per_param']} B/param "
        "(fp32 master weights 4 + fp32 grads 4 + Adam m 4 + Adam v 4):"),
        f"  weights + grads + optimizer  {_human(tb):>12}   (divide by the data-parallel size with ZeRO-3 / FSDP)",
        (f"  activations, extra           ~{_human(act)} per sequence of {info['seq_len']} tokens "
        "(bf16, flash attention, no activation checkpointing)"),
        "",
        (f"FLOPs per token (training, seq_len {info['seq_len']}): {info['flops_per_token']:,} "
        f"= 6 N + 12 L H Q T, N = {info['n_params_non_embedding']:,}"),
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m model.inspect",
        description="Explain a model: module tree, weight shapes, parameters, storage, training memory, FLOPs/token. "
                    "Built on the meta device (no weights allocated).")
    ap.add_argument("model", help=f"preset ({', '.join(PRESETS)}) or a Hugging Face model dir / config.json")
    ap.add_argument("--json", action="store_true", help="print the numbers as one JSON object")
    ap.add_argument("--seq-len", type=int, default=None, help="sequence length for FLOPs (default: block_size)")
    args = ap.parse_args(argv)
    try:
        name, cfg = load_config(args.model)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seq_len = cfg.block_size if args.seq_len is None else args.seq_len
    if seq_len <= 0 or seq_len > cfg.block_size:
        print(f"error: --seq-len {seq_len} must be in 1..{cfg.block_size} (block_size of {name})", file=sys.stderr)
        return 2
    info = report(name, cfg, seq_len)
    if args.json:
        print(json.dumps(info))
    else:
        print(render_text(build_meta(cfg), info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
