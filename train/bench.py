"""Benchmark: tokens/s, step time, MFU/HFU and peak memory of one training configuration.

    python -m train.bench model=gpt2-124m precision=bf16 train.micro_batch_size=8 train.seq_len=1024
    torchrun --nproc_per_node 8 -m train.bench model=falcon-40b strategy=fsdp train.activation_checkpointing=full

Overrides are exactly `python -m train`'s (the same conf/ tree, composed with Hydra's compose API),
plus `bench.steps`, `bench.warmup`, `bench.data=synthetic|real`. The model, strategy, precision, AC and
compile are built by the trainer's own Strategy, so the figures are the trainer's. JSON goes to stdout
(rank 0), a human table to stderr.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorMemoryTracker(TorchDispatchMode):
    """Live and peak bytes of the tensor storages created while active (any device, CPU included).

    Every op's outputs are recorded once per storage and counted until that storage is freed
    (a weakref finalizer on the storage). Tensors that existed before entering (parameters,
    inputs) are not counted; views of them are skipped. This is torch's own bookkeeping, free of
    allocator caching and of the C library's heap behaviour, so it is what the planner's
    activation formulas are checked against.
    """

    def __init__(self, exclude: list[torch.Tensor] | None = None) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}
        self._skip = {t.untyped_storage().data_ptr() for t in (exclude or [])}

    def reset_peak(self) -> None:
        self.peak = self.current

    def _freed(self, key: int, nbytes: int) -> None:
        if self._live.pop(key, None) is not None:
            self.current -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            key, nbytes = st.data_ptr(), st.nbytes()
            if nbytes == 0 or key in self._live or key in self._skip:
                continue
            self._live[key] = nbytes
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(st, self._freed, key, nbytes)
        return out
