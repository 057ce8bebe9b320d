"""Parameter counts, FLOPs per token and storage bytes, computed from a GPTConfig alone (no model is built).

Used by `model.inspect`, the trainer's MFU, `train.bench` and `train.plan`.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.config import GPTConfig

BYTES_PER_DTYPE: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1}


@dataclass(frozen=True)
class ParamCount:
    """total: every parameter (a tied matrix once). non_embedding: total minus the input lookup tables (token
    embedding unless it is tied to the LM head, and the learned position table). per_block: one Block."""

    total: int
    non_embedding: int
    per_block: int
    embedding: int
    lm_head: int
    final_norm: int


def _norm_params(cfg: GPTConfig) -> int:
    return 2 * cfg.n_embd if cfg.norm == "layernorm" else cfg.n_embd  # LayerNorm has weight + bias


def attention_params(cfg: GPTConfig) -> int:
    """q, k, v, o projections (+ biases) of one block."""
    n = cfg.n_embd * cfg.q_dim + 2 * cfg.n_embd * cfg.kv_dim + cfg.q_dim * cfg.n_embd
    if cfg.bias:
        n += cfg.q_dim + 2 * cfg.kv_dim + cfg.n_embd
    return n


def mlp_params(cfg: GPTConfig) -> int:
    """up/down (+ gate for geglu/swiglu) projections (+ biases) of one block."""
    n_in = 1 if cfg.mlp == "gelu" else 2  # gated MLPs have gate_proj and up_proj
    n = (n_in + 1) * cfg.n_embd * cfg.ffn_hidden
    if cfg.bias:
        n += n_in * cfg.ffn_hidden + cfg.n_embd
    return n


def block_params(cfg: GPTConfig) -> int:
    n_norms = 1 if (cfg.parallel_residual and cfg.shared_attn_norm) else 2
    return attention_params(cfg) + mlp_params(cfg) + n_norms * _norm_params(cfg)


def count_params(cfg: GPTConfig) -> ParamCount:
    """Exact parameter counts of GPT(cfg) (equal to sum(p.numel()) with tied weights counted once)."""
    tok = cfg.vocab_size * cfg.n_embd
    pos = cfg.block_size * cfg.n_embd if cfg.pos == "learned" else 0
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.n_embd
    per_block = block_params(cfg)
    final_norm = _norm_params(cfg)
    total = tok + pos + cfg.n_layer * per_block + final_norm + head
    # a tied matrix does the LM head's matmul, so it counts as compute (nanoGPT / torchtitan convention)
    lookup = pos + (0 if cfg.tie_embeddings else tok)
    return ParamCount(total=total, non_embedding=total - lookup, per_block=per_block, embedding=tok + pos,
                      lm_head=cfg.vocab_size * cfg.n_embd, final_norm=final_norm)


def flops_per_token(cfg: GPTConfig, seq_len: int) -> int:
    """Training FLOPs (forward + backward) per token: 6 N + 12 L H Q T (PaLM appendix B).

    N = count_params(cfg).non_embedding: every parameter that takes part in a matmul, i.e. all parameters except
    the input lookup tables (token embedding unless tied to the LM head, learned positions). L = n_layer,
    H = n_head, Q = head_dim, T = seq_len (the attention score/value matmuls, counted without the causal half).
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len={seq_len} must be a positive integer")
    n = count_params(cfg).non_embedding
    return 6 * n + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len


def bytes_per_dtype(n_params: int) -> dict[str, int]:
    """Storage of n_params parameters in each dtype: {"fp32", "bf16", "fp16", "int8"} -> bytes."""
    return {name: n_params * size for name, size in BYTES_PER_DTYPE.items()}


# Mixed-precision AdamW, per parameter: fp32 master weights 4 + fp32 grads 4 + Adam m 4 + Adam v 4 = 16 bytes
# (bf16 compute copies live only transiently with FSDP/autocast). Activations come on top.
ADAMW_MIXED_BYTES_PER_PARAM = 16


def training_bytes_adamw(n_params: int) -> int:
    """Weights + grads + AdamW states for mixed-precision training, at 16 B/param (activations excluded)."""
    return n_params * ADAMW_MIXED_BYTES_PER_PARAM
