"""Parallelism: the parallel dims and their one device mesh (dims.py), tensor parallelism (tp.py), and the
engines behind the trainer's one seam (engine.py: native DDP / FSDP2 / TP; deepspeed.py: ZeRO).

``build_engine`` is the only place that picks a backend by name; DeepSpeed is imported lazily so a CPU
laptop never pays for it.
"""

from __future__ import annotations

import os

from train.distributed import DistInfo
from train.parallel.dims import DEEPSPEED, NATIVE, ParallelDims
from train.parallel.engine import Engine, StepStats

STRATEGIES = NATIVE + DEEPSPEED

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
    if name in DEEPSPEED:
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


def build_engine(cfg, spec, dist: DistInfo) -> Engine:
    """The parallel model for ``spec.dims`` (collective when distributed): weights equal the single-process
    init for ``train.seed`` (or ``model.init_from``'s), optimizer, schedule and loss scaling ready."""
    if spec.dims.engine == "deepspeed":
        from train.parallel.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(cfg, spec, dist)
    if spec.dims.pp > 1:
        from train.parallel.pipeline import PipelineEngine

        return PipelineEngine(cfg, spec, dist)
    from train.parallel.engine import NativeEngine

    return NativeEngine(cfg, spec, dist)


__all__ = ["NEEDS_LAUNCHER", "STRATEGIES", "Engine", "ParallelDims", "StepStats", "build_engine",
           "check_environment", "launched"]
