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


def precision_support_error(name: str, strategy: str, device_type: str, *, bf16_ok: bool,
                            cpu_fp16_ok: bool) -> str | None:
    """Why `precision=name` cannot run with `strategy` on `device_type` given the hardware facts, else None.

    bf16 needs a GPU of compute capability >= 8.0 (Ampere): older ones emulate it slowly or not at all.
    DeepSpeed refuses fp16 on CPU unless oneDNN has fp16 kernels for this CPU (AVX512-FP16 / AMX); plain torch
    autocast + GradScaler trains fp16 on any CPU.
    """
    if name == "bf16" and device_type == "cuda" and not bf16_ok:
        return ("precision=bf16 needs a GPU with bf16 support (compute capability >= 8.0) and this one has none; "
                "use precision=fp16 (loss-scaled) or precision=fp32")
    if name == "fp16" and device_type == "cpu" and strategy.startswith("zero") and not cpu_fp16_ok:
        return (f"precision=fp16 with strategy={strategy} on CPU needs oneDNN fp16 kernels (AVX512-FP16/AMX), "
                f"which this CPU lacks; use precision=bf16 or fp32, or strategy=single|ddp|fsdp for fp16 on CPU")
    return None


def check_precision_supported(name: str, strategy: str, device_type: str) -> None:
    """Raise ValueError (one line) when `precision=name` cannot run here; asks the hardware only when it matters."""
    bf16_ok = cpu_fp16_ok = True
    if name == "bf16" and device_type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported(including_emulation=False)
    if name == "fp16" and device_type == "cpu" and strategy.startswith("zero"):
        try:
            cpu_fp16_ok = bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())  # what DeepSpeed's CPU accelerator asks
        except (AttributeError, RuntimeError):
            cpu_fp16_ok = False
    problem = precision_support_error(name, strategy, device_type, bf16_ok=bf16_ok, cpu_fp16_ok=cpu_fp16_ok)
    if problem is not None:
        raise ValueError(problem)
