"""`strategy=fsdp`: PyTorch FSDP2 (`fully_shard`), HSDP, CPU offload, DCP checkpoints.

Every transformer block is one FSDP unit (its parameters are all-gathered just before it runs and
resharded after), the root holds the embeddings, final norm and head. The model is built on the
`meta` device and sharded before any memory is allocated, so no rank ever holds the full model;
`replay_init` then runs `init_weights()` so each rank writes its slice of the single-process
initialization (train/strategy/sharded_init.py).

World size 1 is allowed (a 1-rank process group is created when none exists): it is how a
checkpoint saved on N ranks is continued on one process, and how the code path is tried on a laptop.
"""

from __future__ import annotations

import contextlib
import datetime
from contextlib import AbstractContextManager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor

from train.checkpoint import CheckpointError, load_extra, read_meta, save_extra, torch_load, write_meta
from train.strategy.base import Strategy, gpt_config_dict
from train.strategy.sharded_init import replay_init

FSDP_OFFLOAD = ("none", "params")
SCHED_FILE = "sched.pt"  # scheduler + grad scaler: replicated, written by rank 0


def validate_fsdp_config(cfg, world_size: int) -> None:
    """One-line errors for FSDP settings, before anything is built."""
    s = cfg.strategy
    if s.offload not in FSDP_OFFLOAD:
        raise ValueError(f"strategy.offload={s.offload!r} is not supported by strategy=fsdp; allowed: "
                         f"{', '.join(FSDP_OFFLOAD)} (params offloads parameters, gradients and optimizer state)")
    r = int(s.replicate_degree)
    if r < 1 or world_size % r != 0:
        raise ValueError(f"strategy.replicate_degree={r} must be >= 1 and divide the world size {world_size}")


def ensure_process_group(device: torch.device, timeout_s: int) -> None:
    """FSDP2 needs a process group even on one rank: make a private 1-rank group when there is none."""
    if dist.is_initialized():
        return
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=timeout_s), **kwargs)


def build_mesh(device: torch.device, world_size: int, replicate_degree: int) -> DeviceMesh:
    """1-D (shard) mesh for FSDP; 2-D (replicate, shard) for HSDP: shard within a group of
    world/replicate ranks (a node), replicate across groups."""
    if replicate_degree == 1:
        return init_device_mesh(device.type, (world_size,), mesh_dim_names=("shard",))
    return init_device_mesh(device.type, (replicate_degree, world_size // replicate_degree),
                            mesh_dim_names=("replicate", "shard"))


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, *, param_dtype: torch.dtype, reduce_dtype: torch.dtype,
               reshard_after_forward: bool, offload_params: bool) -> None:
    """`fully_shard` each block, then the root (in place; parameter names are unchanged)."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    # pinned host memory speeds the H2D copies; it needs a GPU (on a CPU-only run offload is a no-op move)
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if offload_params else OffloadPolicy()
    for i, block in enumerate(model.blocks):
        # the last block's parameters would be all-gathered again at once by backward: keep them
        reshard = reshard_after_forward and i < len(model.blocks) - 1
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp, offload_policy=offload)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp, offload_policy=offload)


def check_dcp_files(ckpt_dir: Path) -> None:
    """One line for a DCP checkpoint without its ``.metadata`` index (what DCP writes last, and what torch
    versions report differently: "metadata is None", with or without the read error)."""
    if not (Path(ckpt_dir) / ".metadata").is_file():
        raise CheckpointError(f"checkpoint {ckpt_dir}: the DCP index .metadata is missing (an incomplete or "
                              f"damaged checkpoint; its shards cannot be read without it)")


def dcp_failure_line(e: CheckpointException) -> str:
    """The lowest failing rank's own error on one line (`str(e)` is every failing rank's traceback)."""
    exc, _trace = e.failures[min(e.failures)]
    return " ".join(str(exc).split())[:300]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class FSDPStrategy(Strategy):
    name = "fsdp"
    format = "dcp"

    def __init__(self, cfg, dist_info) -> None:
        super().__init__(cfg, dist_info)
        validate_fsdp_config(cfg, dist_info.world_size)
        self.mesh: DeviceMesh | None = None

    # ------------------------------------------------------------ construction

    def build(self, gpt_config) -> None:
        from model import GPT

        self.gpt_config = gpt_config
        s = self.cfg.strategy
        ensure_process_group(self.device, s.timeout_s)
        self.mesh = build_mesh(self.device, self.dist.world_size, int(s.replicate_degree))
        with torch.device("meta"):
            model = GPT(gpt_config)  # no memory: shapes only
        self.apply_transforms(model)  # AC -> compile, before sharding
        offload = s.offload == "params"
        apply_fsdp(model, self.mesh, param_dtype=self.precision.param_dtype, reduce_dtype=self.precision.reduce_dtype,
                   reshard_after_forward=bool(s.reshard_after_forward), offload_params=offload)
        # now every parameter is a DTensor shard on meta: allocate only the local shards
        model.to_empty(device="cpu" if offload else self.device)
        torch.manual_seed(self.cfg.train.seed)
        with torch.no_grad():
            replay_init(model)  # each rank writes its slice of the single-process init
        if getattr(self, "init_from", None) is not None:  # model.init_from: start from HF weights instead
            self._load_hf_weights(model, self.init_from)
        if offload:  # buffers (RoPE tables) are not offloaded: they live on the compute device
            model.init_buffers(self.device)
        self.model = model
        self.build_optim(model)

    def _load_hf_weights(self, model: nn.Module, init_from: str) -> None:
        """Rank 0 reads the Hugging Face checkpoint (one full copy, on CPU) and every rank receives
        only its shards (broadcast from rank 0)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        from train.init_from import load_hf_model

        full = load_hf_model(self.gpt_config, init_from, torch.device("cpu")).state_dict() if self.dist.is_main else {}
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))

    # ------------------------------------------------------------ training

    def no_sync(self, last: bool) -> AbstractContextManager:
        # non-last micro-steps keep unsharded gradients locally: one reduce-scatter per optimizer step
        assert isinstance(self.model, FSDPModule)
        self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def clip_grad_norm(self) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
        if isinstance(norm, DTensor):  # partial sums of the shards -> the global norm, same on every rank
            norm = norm.full_tensor()
        clip = self.cfg.optim.grad_clip
        if clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, clip, norm, foreach=True)
        return norm

    def _agree_on_inf(self) -> None:
        """fp16 loss scaling: each rank checked only its own gradient shards for inf/nan; OR the
        flags over the group so every rank skips (and rescales) the same steps."""
        state = self.scaler._per_optimizer_states[id(self.optimizer)]
        for flag in state["found_inf_per_device"].values():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)

    # ------------------------------------------------------------ checkpoints (format "dcp")

    def save(self, ckpt_dir: Path, extra: dict) -> None:
        """Collective: every rank writes its shards of model and optimizer (DCP, resharding-friendly)."""
        ckpt_dir = Path(ckpt_dir)
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(ckpt_dir))
        if self.dist.is_main:
            sched = {"scheduler": self.scheduler.state_dict()}
            if self.scaler is not None:
                sched["scaler"] = self.scaler.state_dict()
            torch.save(sched, ckpt_dir / SCHED_FILE)
            step = int(extra.get("trainer", {}).get("step", 0))
            write_meta(ckpt_dir, format=self.format, step=step, strategy=self.name, world_size=self.dist.world_size,
                       model_config=gpt_config_dict(self.gpt_config), precision=self.cfg.precision.name)
        save_extra(ckpt_dir, extra, self.dist.rank)

    def load(self, ckpt_dir: Path) -> dict:
        """Collective: reads a DCP checkpoint saved on any number of ranks (DCP reshards)."""
        ckpt_dir = Path(ckpt_dir)
        read_meta(ckpt_dir, self.format, f"strategy={self.name}")
        check_dcp_files(ckpt_dir)
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)  # shapes/shards to load into
        state = {"model": model_sd, "optim": optim_sd}
        try:
            dcp.load(state, checkpoint_id=str(ckpt_dir))
        except CheckpointException as e:  # DCP gathers every rank's failure into this one exception
            raise CheckpointError(f"checkpoint {ckpt_dir} does not fit this model/optimizer "
                                  f"({dcp_failure_line(e)})") from None
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        sched = torch_load(ckpt_dir / SCHED_FILE)
        self.scheduler.load_state_dict(sched["scheduler"])
        if self.scaler is not None and "scaler" in sched:
            self.scaler.load_state_dict(sched["scaler"])
        return load_extra(ckpt_dir, self.dist.rank)

    # ------------------------------------------------------------ accounting

    def local_state_bytes(self) -> dict[str, int]:
        """Bytes this rank holds: local shards only (a DTensor's numel is the global one)."""
        def nbytes(ts) -> int:
            return sum(_local(t).numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))

        params = list(self.model.parameters())
        opt = [v for s in self.optimizer.state.values() for v in s.values()] if self.optimizer else []
        return {"params": nbytes(params), "grads": nbytes(p.grad for p in params if p.grad is not None),
                "optimizer": nbytes(opt)}
