"""AdamW with decoupled weight decay on >= 2-D weights only, and the warm-up + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices (linear and embedding weights) decay; biases, norm gains and other vectors do not."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg, device: torch.device) -> torch.optim.AdamW:
    """AdamW; the fused kernel where the device has one (CUDA) unless ``optim.fused`` says no."""
    if cfg.name != "adamw":
        raise ValueError(f"optim={cfg.name!r} is not supported; allowed: adamw")
    fused = cfg.fused if cfg.fused is not None else device.type == "cuda"
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                             eps=cfg.eps, fused=bool(fused))


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up to ``lr`` over
    ``warmup_steps``, then cosine down to ``min_lr`` at ``decay_steps``, then flat."""
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


class WarmupCosine:
    """A multiplier of the base lr for ``LambdaLR`` (a class, not a closure, so it is inspectable)."""

    def __init__(self, lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> None:
        self.lr, self.min_lr, self.warmup_steps, self.decay_steps = lr, min_lr, warmup_steps, decay_steps

    def __call__(self, step: int) -> float:
        return lr_at(step, self.lr, self.min_lr, self.warmup_steps, self.decay_steps) / self.lr


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    decay_steps = cfg.decay_steps if cfg.decay_steps is not None else max_steps
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(cfg.lr, cfg.min_lr, cfg.warmup_steps, decay_steps))
