"""Strategies: how the model, its gradients and optimizer state are spread over processes.

``build_strategy(cfg, dist)`` maps ``strategy.name`` to a class. ``single`` and ``ddp`` live here;
``fsdp`` (train/strategy/fsdp.py) and ``zero1|zero2|zero3`` (train/strategy/deepspeed.py) are
imported lazily so a CPU laptop never needs DeepSpeed's import cost.
"""

from __future__ import annotations

import importlib

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


__all__ = ["STRATEGIES", "SingleStrategy", "Strategy", "build_strategy"]
