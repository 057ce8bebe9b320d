"""Strategies: how the model, its gradients and optimizer state are spread over processes.

``build_strategy(cfg, dist)`` maps ``strategy.name`` to a class. ``single`` and ``ddp`` live here;
``fsdp`` (train/strategy/fsdp.py) and ``zero1|zero2|zero3`` (train/strategy/deepspeed.py) are
imported lazily so a CPU laptop never needs DeepSpeed's import cost.
"""

from __future__ import annotations

import importlib
import os

from train.distributed import DistInfo
from train.strategy.base import SingleStrategy, Strategy

# name -> "module:Class"
STRATEGIES = {
    "single": "train.strategy.base:SingleStrategy",
    "ddp": "train.strategy.ddp:DDPStrategy",
    "fsdp": "train.strategy.fsdp:FSDPStrategy",
    "zero1": "train.strategy.deepspeed:DeepSpeedStrategy",
    "zero2": "train.strategy.deepspeed:DeepSpeedStrategy",
    "zero3": "train.strategy.deepspeed:DeepSpeedStrategy",
}


# strategies that only mean something with one process per rank: as one plain process they would silently train
# unsharded on one device (fsdp / zero* run as a 1-rank group instead, e.g. to resume a sharded checkpoint)
NEEDS_LAUNCHER = ("ddp",)


def launched() -> bool:
    """True under torchrun / deepspeed (WORLD_SIZE, even 1) or a Slurm step our launch scripts set up."""
    return "WORLD_SIZE" in os.environ or all(v in os.environ for v in ("SLURM_PROCID", "SLURM_NTASKS", "MASTER_ADDR"))


def check_environment(cfg) -> None:
    """Before any work: the launcher, the libraries and the hardware the config asks for are there.
    Raises ValueError with one line naming the value and the fix."""
    import torch

    from train.precision import check_precision_supported

    name = cfg.strategy.name
    if name in NEEDS_LAUNCHER and not launched():
        raise ValueError(f"strategy={name} needs one process per rank but WORLD_SIZE is not set: launch with "
                         f"torchrun (torchrun --nproc_per_node=N -m train strategy={name}), deepspeed or srun "
                         f"(launch/slurm/*.sbatch), or use strategy=single for one process")
    if name.startswith("zero"):
        try:
            import deepspeed  # noqa: F401  (imported here so a broken install fails before any work)
        except Exception as e:  # noqa: BLE001 - ImportError, or whatever a half-installed deepspeed raises
            msg = " ".join(str(e).split()) or type(e).__name__
            raise ValueError(f"strategy={name} needs deepspeed: pip install deepspeed (import failed: {msg})") from None
    device = cfg.train.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():  # before asking a missing GPU about bf16
        raise ValueError(f"train.device=cuda but no CUDA GPU is visible; use train.device=auto or cpu "
                         f"(precision={cfg.precision.name}, strategy={name})")
    check_precision_supported(cfg.precision.name, name, device)


def build_strategy(cfg, dist: DistInfo) -> Strategy:
    name = cfg.strategy.name
    if name not in STRATEGIES:
        raise ValueError(f"strategy={name!r} is not one of {', '.join(STRATEGIES)}")
    module, cls = STRATEGIES[name].split(":")
    try:
        klass = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"strategy={name!r} is not available in this build ({e})") from None
    return klass(cfg, dist)


__all__ = ["NEEDS_LAUNCHER", "STRATEGIES", "SingleStrategy", "Strategy", "build_strategy", "check_environment", "launched"]
