"""Initialize a sharded model so its weights equal the single-process init for the same seed.

`GPT.init_weights()` works on plain tensors: each parameter gets a full-size fp32 draw from its own
generator (seeded by the global seed and the parameter's name), written with one `copy_`, or one
`fill_` for constants. On sharded parameters (FSDP2 DTensor shards, DeepSpeed ZeRO-3 partitions)
those writes would fail or touch only an empty placeholder. `replay_init` runs the init under a
torch-function mode that makes each write land as the single-process one would:

- FSDP2: `copy_(full)` into a DTensor keeps this rank's slice of `full` (`local_shard_of`); `fill_`
  is DTensor's own (no communication); an in-place random draw on a DTensor (`normal_`, `nn.init.*`:
  init code that uses the global RNG) is replayed on a full-size temporary whose slice is kept, so
  the global RNG advances exactly as in the single-process run.
- ZeRO-3: the first use of a parameter gathers it (releasing the previous one); every rank runs the
  ops on the whole parameter and rank 0's values are re-partitioned on release.

Peak extra memory is one full parameter, never the whole model. All knowledge of sharded
parameters lives here: `model/` never sees a DTensor or a DeepSpeed parameter type.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.overrides import TorchFunctionMode

# Tensor methods that overwrite every element from the RNG or a constant: replayed on a temporary.
_OVERWRITE_METHODS = {
    torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.random_, torch.Tensor.bernoulli_,
    torch.Tensor.exponential_, torch.Tensor.geometric_, torch.Tensor.cauchy_, torch.Tensor.log_normal_,
}
# nn.init functions that dispatch through __torch_function__ themselves (the rest reach us as the
# Tensor methods above); all of them overwrite the whole tensor.
_INIT_FUNCS = {getattr(nn.init, n) for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")}


def _is_ds_param(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and hasattr(t, "ds_id")


def local_shard_of(full: torch.Tensor, like: DTensor) -> torch.Tensor:
    """The slice of `full` (global tensor) that this rank holds under `like`'s placements, including the
    strided shards FSDP2 makes on top of tensor parallelism (both split dim 0)."""
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:  # private helper: fall back to chunking mesh dim by mesh dim (exact without strides)
        compute_local_shape_and_global_offset = None
    if compute_local_shape_and_global_offset is not None:
        shape, offset = compute_local_shape_and_global_offset(full.shape, like.device_mesh, like.placements)
        local = full
        for dim, (size, start) in enumerate(zip(shape, offset)):
            local = local.narrow(dim, start, size) if size else local.narrow(dim, 0, 0)
        return local
    local = full
    coord = like.device_mesh.get_coordinate()
    assert coord is not None, "this rank is not part of the parameter's mesh"
    for mesh_dim, placement in enumerate(like.placements):
        if placement.is_shard():
            dim = placement.dim  # type: ignore[attr-defined]
            chunks = torch.chunk(local, like.device_mesh.size(mesh_dim), dim=dim)
            idx = coord[mesh_dim]
            # torch.chunk may give fewer chunks than ranks: trailing ranks hold an empty shard
            local = chunks[idx] if idx < len(chunks) else local.narrow(dim, 0, 0)
    return local


class _ReplayInitMode(TorchFunctionMode):
    """Torch-function mode behind `replay_init`; holds at most one gathered ZeRO-3 parameter."""

    def __init__(self) -> None:
        super().__init__()
        self._gathered: Any = None
        self._gathered_param: torch.Tensor | None = None

    def release(self) -> None:
        if self._gathered is not None:
            self._gathered.__exit__(None, None, None)
            self._gathered, self._gathered_param = None, None

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None):
        kwargs = dict(kwargs or {})
        if not args and "tensor" in kwargs:  # nn.init.* forward their tensor as a keyword
            args = (kwargs.pop("tensor"),)
        target = args[0] if args else None
        if isinstance(target, DTensor) and (func in _OVERWRITE_METHODS or func in _INIT_FUNCS):
            full = torch.empty(target.shape, dtype=target.dtype, device=target.device)  # one parameter
            func(full, *args[1:], **kwargs)
            with torch.no_grad():
                target.to_local().copy_(local_shard_of(full, target))
            return target
        if isinstance(target, DTensor) and func is torch.Tensor.copy_ and not isinstance(args[1], DTensor):
            full = args[1].expand(target.shape)  # copy_ broadcasts its source; a wrong shape fails here
            with torch.no_grad():
                target.to_local().copy_(local_shard_of(full, target))  # copy_ casts to the shard's dtype
            return target
        if _is_ds_param(target):  # any use (shape, .data, in-place op) sees the whole parameter
            # Gather this one parameter (releasing the previous one) and let every rank run the op:
            # all ranks draw what one process would; on release rank 0's values are re-partitioned.
            if target is not self._gathered_param:
                self.release()
                import deepspeed  # ZeRO-3 parameters exist only when DeepSpeed is in use

                self._gathered = deepspeed.zero.GatheredParameters([target], modifier_rank=0)
                self._gathered.__enter__()
                self._gathered_param = target
            with torch.no_grad():
                return func(*args, **kwargs)
        return func(*args, **kwargs)


def replay_init(model: nn.Module, init: Callable[[], None] | None = None) -> None:
    """Run `init` (default `model.init_weights`) so sharded parameters get the single-process values.

    Plain parameters are written as usual, so it is also right on an unsharded model. All ranks must
    call it with the same RNG state (same seed); it is collective under ZeRO-3.
    """
    mode = _ReplayInitMode()
    with mode:
        (init or model.init_weights)()
    mode.release()  # outside the mode: the re-partition's own ops must not be intercepted
