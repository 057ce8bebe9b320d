"""Transformations applied to a plain single-device ``GPT``, always in this order:
tensor/sequence parallel (train/parallel/tp.py) -> activation checkpointing -> torch.compile ->
FSDP2 / HSDP or DDP (DeepSpeed takes the model instead). ``train/parallel/engine.py`` applies them.

Blocks are modified in place (their ``forward`` is wrapped), never re-parented, so parameter
names -- and therefore checkpoints -- are identical with and without these transformations.
"""

from __future__ import annotations

import datetime
import functools
import importlib.util

import torch
import torch.distributed as dist
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


def _cpp_compiler_problem() -> str | None:
    """Why TorchInductor would find no working C++ compiler for CPU kernels, or None when it does. Asks
    Inductor's own search (``torch._inductor.config.cpp.cxx``, else ``$CXX`` / g++), so the answer is
    the one the first compiled step would get; None as well where that private helper is missing."""
    try:
        from torch._inductor import config as inductor_config
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:
        return None
    try:
        get_cpp_compiler()
    except Exception:  # noqa: BLE001 - InvalidCxxCompiler, or whatever a broken toolchain raises
        cxx = inductor_config.cpp.cxx
        tried = [c for c in (cxx if isinstance(cxx, (list, tuple)) else (cxx,)) if c]
        return f"no working C++ compiler (tried {', '.join(tried) or 'none'})"
    return None


def check_compile_supported(device: torch.device | str) -> None:
    """``train.compile=true`` needs TorchInductor's toolchain for ``device``: a working C++ compiler
    on CPU; Triton and a GPU of compute capability >= 7.0 on CUDA. Raises ValueError with one line
    naming what is missing, before anything is compiled (else the first step dies in a long Inductor
    traceback)."""
    device = torch.device(device)
    try:
        from torch._dynamo.eval_frame import check_if_dynamo_supported
    except ImportError:  # private: absent in some torch version -> torch.compile reports it itself
        check_if_dynamo_supported = None
    if check_if_dynamo_supported is not None:
        try:
            check_if_dynamo_supported()  # e.g. a Python version torch.compile does not support yet
        except RuntimeError as e:
            raise ValueError(f"train.compile=true is not supported here: {e}; set train.compile=false") from None
    if device.type == "cpu":
        problem = _cpp_compiler_problem()
        if problem is not None:
            raise ValueError(f"train.compile=true on CPU needs a C++ compiler for TorchInductor's kernels: "
                             f"{problem}; install one (e.g. apt-get install g++) or point $CXX at it, or set "
                             f"train.compile=false")
    elif device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            raise ValueError("train.compile=true on CUDA needs Triton (TorchInductor writes Triton kernels) and "
                             "it is not installed: pip install triton, or set train.compile=false")
        major, minor = torch.cuda.get_device_capability(device)
        if major < 7:
            raise ValueError(f"train.compile=true needs a GPU of compute capability >= 7.0 for Triton; "
                             f"{torch.cuda.get_device_name(device)} is {major}.{minor}: set train.compile=false")


def _compute_device(model: nn.Module) -> torch.device:
    """Where the model's parameters live; for a model still on ``meta`` (FSDP2 shards it before
    materialising) the device a run picks by default: cuda when there is one, else cpu."""
    param = next(model.parameters(), None)
    if param is not None and param.device.type != "meta":
        return param.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def apply_compile(model: nn.Module, device: torch.device | str | None = None) -> None:
    """torch.compile each block in place (smaller graphs than the whole model, same speed-up,
    and it composes with per-block FSDP).

    The blocks are instances of one class with the same shapes, so they share one compiled graph:
    Dynamo guards on the type of ``self`` and takes parameters as graph inputs, so the second block
    reuses the first block's code (no recompile per block). ``device`` (default: where the
    parameters are) selects the toolchain that ``check_compile_supported`` asks for."""
    check_compile_supported(device if device is not None else _compute_device(model))
    for block in model.blocks:
        block.compile()


def apply_ddp(model: nn.Module, device: torch.device, *, find_unused_parameters: bool = False,
              bucket_cap_mb: int = 25) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids, find_unused_parameters=find_unused_parameters,
               bucket_cap_mb=bucket_cap_mb)


def ensure_process_group(device: torch.device, timeout_s: int) -> None:
    """FSDP2 and DeepSpeed need a process group even on one rank: make a private 1-rank group when there is none."""
    if dist.is_initialized():
        return
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=timeout_s), **kwargs)


def apply_fsdp(model: nn.Module, mesh, *, param_dtype: torch.dtype, reduce_dtype: torch.dtype,
               reshard_after_forward: bool, offload_params: bool) -> None:
    """`fully_shard` each block, then the root (in place; parameter names are unchanged). ``mesh`` is 1-D
    (FSDP over dp_shard) or 2-D (HSDP: replicate over dp_replicate, shard over dp_shard). Parameters that
    tensor parallelism already made DTensors on the tp mesh become 2-D / 3-D DTensors."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    # pinned host memory speeds the H2D copies; it needs a GPU (on a CPU-only run offload is a no-op move)
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload_params else OffloadPolicy()
    for i, block in enumerate(model.blocks):
        # the last block's parameters would be all-gathered again at once by backward: keep them
        reshard = reshard_after_forward and i < len(model.blocks) - 1
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp, offload_policy=offload)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp, offload_policy=offload)
