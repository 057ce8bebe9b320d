"""Process-group set-up and teardown, rank helpers, timeouts.

Initialisation reads the environment that torchrun, ``deepspeed`` and Slurm (via our launch
scripts) set: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``. Plain
``srun`` without those falls back to ``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID``.
"""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

# rendezvous store shared by the run-dir broadcast (before Hydra) and init_process_group
_STORE: dist.Store | None = None


@dataclass
class DistInfo:
    """Where this process sits. ``world_size == 1`` means no process group."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_rank_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's variables, else Slurm's, else (0, 0, 1)."""
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        return (int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), int(os.environ["WORLD_SIZE"]))
    if "SLURM_PROCID" in os.environ and "MASTER_ADDR" in os.environ and "SLURM_NTASKS" in os.environ:
        return (int(os.environ["SLURM_PROCID"]), int(os.environ.get("SLURM_LOCALID", "0")),
                int(os.environ["SLURM_NTASKS"]))
    return 0, 0, 1


def _get_store(timeout_s: float = 300.0) -> dist.Store:
    """The TCP store of this job: torchrun's agent hosts one (we connect as a client); otherwise
    rank 0 hosts it at MASTER_ADDR:MASTER_PORT."""
    global _STORE
    if _STORE is None:
        rank, _, world = env_rank_info()
        host = os.environ.get("MASTER_ADDR", "127.0.0.1")
        port = int(os.environ.get("MASTER_PORT", "29500"))
        agent_hosted = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "") == "True"
        # multi_tenant: a later env:// init (e.g. by DeepSpeed) in this process reuses the server
        _STORE = dist.TCPStore(host, port, world, is_master=(rank == 0 and not agent_hosted),
                               timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False,
                               multi_tenant=True)
    return _STORE


def shared_timestamp() -> float:
    """Rank 0's wall-clock time, the same on every rank (used to name the default run dir)."""
    rank, _, world = env_rank_info()
    if world <= 1:
        return time.time()
    store = _get_store()
    key = "lmforge/run_stamp"
    if rank == 0:
        # set once per job: after an elastic restart (torchrun's agent keeps its store) the group keeps the
        # first attempt's stamp, so a default run dir stays the same and resume=auto finds its checkpoints
        store.compare_set(key, "", repr(time.time()))
    return float(store.get(key).decode())


def _attempt_store() -> dist.Store:
    """The job's store under a prefix unique to this torchelastic attempt: after a restart the agent's store
    still holds attempt N-1's gloo/NCCL addresses, which the new group must not read (torchrun's own env://
    rendezvous prefixes the same way)."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"lmforge/attempt_{attempt}", _get_store())


def init_distributed(device: str = "auto", backend: str | None = None, timeout_s: int = 1800) -> DistInfo:
    """Pick the device and, under a multi-process launcher, join the default process group.

    On CUDA the group is ``cuda:nccl,cpu:gloo`` so small CPU tensors (the stop flag) can be
    all-reduced without a device sync. ``timeout_s`` bounds every collective: a hung peer ends
    the run with an error that names the rank instead of hanging forever.
    """
    rank, local_rank, world = env_rank_info()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device=cuda but no CUDA GPU is visible; use train.device=auto or cpu")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    elif device == "cpu":
        dev = torch.device("cpu")
    else:
        raise ValueError(f"train.device={device!r} is not one of auto, cpu, cuda")
    info = DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=dev)
    if world > 1 and not dist.is_initialized():
        if backend is None:
            backend = "cpu:gloo,cuda:nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"backend": backend, "rank": rank, "world_size": world,
                  "timeout": datetime.timedelta(seconds=timeout_s)}
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        dist.init_process_group(store=_attempt_store(), **kwargs)
    return info


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (in place); a no-op without a process group."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def any_rank(flag: bool) -> bool:
    """True when ``flag`` is true on any rank (a CPU all-reduce: no GPU sync)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(obj: object, src: int = 0) -> object:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
