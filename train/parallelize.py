"""Transformations applied to a plain single-device ``GPT``, always in this order:
activation checkpointing -> torch.compile -> FSDP2 / DDP (DeepSpeed takes the model instead).

Blocks are modified in place (their ``forward`` is wrapped), never re-parented, so parameter
names -- and therefore checkpoints -- are identical with and without these transformations.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

AC_MODES = ("none", "full", "selective")

# Selective AC keeps the outputs of these (expensive) ops and recomputes the cheap pointwise ones
# (norms, activations, residual adds, dropout masks are replayed from the saved RNG state).
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _sac_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _checkpoint_forward(block: nn.Module, selective: bool) -> None:
    inner = block.forward  # bound method of the block (or an earlier wrapper)
    context_fn = functools.partial(create_selective_checkpoint_contexts, _sac_policy) if selective else None

    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():  # eval / generation: nothing to save
            return inner(*args, **kwargs)
        extra = {"context_fn": context_fn} if context_fn is not None else {}
        return checkpoint(inner, *args, use_reentrant=False, preserve_rng_state=True, **extra, **kwargs)

    block.forward = forward  # instance attribute: shadows the class method, keeps FQNs


def apply_ac(model: nn.Module, mode: str) -> None:
    """Activation checkpointing on ``model.blocks``.

    - ``full``: every block keeps only its input and recomputes everything in backward.
    - ``selective``: op-level selective AC in every block: matmul and attention outputs are
      saved, pointwise ops (norms, GELU/SwiGLU, residual adds) are recomputed -- most of the
      memory win for a few percent of recompute.
    """
    if mode not in AC_MODES:
        raise ValueError(f"train.activation_checkpointing={mode!r} is not one of {', '.join(AC_MODES)}")
    if mode == "none":
        return
    for block in model.blocks:
        _checkpoint_forward(block, selective=(mode == "selective"))


def apply_compile(model: nn.Module) -> None:
    """torch.compile each block in place (smaller graphs than the whole model, same speed-up,
    and it composes with per-block FSDP)."""
    for block in model.blocks:
        block.compile()


def apply_ddp(model: nn.Module, device: torch.device, *, find_unused_parameters: bool = False,
              bucket_cap_mb: int = 25) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids, find_unused_parameters=find_unused_parameters,
               bucket_cap_mb=bucket_cap_mb)
