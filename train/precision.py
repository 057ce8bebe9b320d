"""Mixed-precision policy: autocast dtype, loss scaling, and the dtype names used in configs."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def to_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r} is not one of float32, bfloat16, float16") from None


@dataclass
class Precision:
    """Resolved policy for one device. Master weights stay fp32; autocast runs matmuls in
    ``param_dtype``; fp16 adds a dynamic ``GradScaler`` so small gradients do not underflow."""

    device_type: str
    param_dtype: torch.dtype
    reduce_dtype: torch.dtype
    autocast: bool
    grad_scaler: bool

    @classmethod
    def from_config(cls, cfg, device: torch.device) -> Precision:
        if cfg.name not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision={cfg.name!r} is not one of fp32, bf16, fp16")
        return cls(device_type=device.type, param_dtype=to_dtype(cfg.param_dtype),
                   reduce_dtype=to_dtype(cfg.reduce_dtype),
                   autocast=bool(cfg.autocast) and to_dtype(cfg.param_dtype) != torch.float32,
                   grad_scaler=bool(cfg.grad_scaler))

    def autocast_ctx(self) -> ContextManager:
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.param_dtype)

    def make_scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(self.device_type) if self.grad_scaler else None
