"""Parallel dimensions: how many ways the model and the data are split, and the one device mesh.

``ParallelDims`` holds the degrees ``pp x dp_replicate x dp_shard x tp`` (their product is the world
size) and builds ONE named ``DeviceMesh`` with its dimensions in that order: tp innermost, so a
tensor-parallel group is a run of contiguous ranks (one node), then the FSDP shard group, then the
replicas, then pipeline stages outermost. Every process group a component needs is a submesh of it:

    tp_mesh     the tensor-parallel group                          mesh["tp"]
    pp group    the pipeline stages of one model replica            mesh["pp"] (train/parallel/pipeline.py)
    fsdp_mesh   FSDP2's mesh: dp_shard, or dp_replicate x dp_shard  (HSDP)
    dp_mesh     the data-parallel ranks (dp_replicate x dp_shard flattened): data loading, loss means

``strategy=single|ddp|fsdp|hsdp|zero1|zero2|zero3`` are shorthands: they fill in the dims the user did
not set (``parallel.*`` left at null). DeepSpeed ZeRO is a data-parallel engine: it never combines
with tp or pp. Replicas next to tp or pp are HSDP (FSDP2 with a replicate dim), not DDP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

DIM_NAMES = ("pp", "dp_replicate", "dp_shard", "tp")
NATIVE = ("single", "ddp", "fsdp", "hsdp")
DEEPSPEED = ("zero1", "zero2", "zero3")


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    engine: str = "native"  # native (DDP / FSDP2 / TP on the mesh) | deepspeed (ZeRO over the dp ranks)
    fsdp: bool = False  # shard parameters with FSDP2 even on one shard rank (strategy=fsdp|hsdp asked for it)
    mesh_device: str = field(default="cpu", compare=False)

    # ------------------------------------------------------------ construction

    @classmethod
    def resolve(cls, strategy: str, parallel: Any, world_size: int, replicate_degree: int = 1) -> ParallelDims:
        """Dims from ``parallel.*`` (None = from the strategy shorthand) for ``world_size`` ranks.
        Raises ValueError with one line naming the bad value and what is allowed."""
        given = {k: getattr(parallel, k) for k in DIM_NAMES}
        for k, v in given.items():
            if v is not None and (v == 0 or v < -1 or (v == -1 and k not in ("dp_replicate", "dp_shard"))):
                allowed = "an integer >= 1, or -1 for the rest of the world" if k.startswith("dp") else "an integer >= 1"
                raise ValueError(f"parallel.{k}={v} must be {allowed}")
        tp, pp = given["tp"] or 1, given["pp"] or 1
        if strategy in DEEPSPEED:
            if pp != 1:
                raise ValueError(f"parallel.pp={pp} does not combine with strategy={strategy}: DeepSpeed ZeRO is "
                                 f"data-parallel only here; use strategy=fsdp parallel.pp={pp} (FSDP2 shards each "
                                 f"stage over the dp_shard ranks, like ZeRO-3)")
            if tp != 1:
                raise ValueError(f"parallel.tp={tp} does not combine with strategy={strategy}: DeepSpeed ZeRO is "
                                 f"data-parallel only here; use strategy=fsdp parallel.tp={tp} (FSDP2 shards "
                                 f"parameters, gradients and optimizer state like ZeRO-3, on the dp_shard ranks)")
            defaults = {"dp_replicate": 1, "dp_shard": -1}
        elif strategy in NATIVE:
            if strategy in ("fsdp", "hsdp") and (replicate_degree < 1 or world_size % replicate_degree):
                raise ValueError(f"strategy.replicate_degree={replicate_degree} must be >= 1 and divide the world "
                                 f"size {world_size}")
            # fsdp with strategy.replicate_degree > 1 is HSDP (conf/strategy/hsdp.yaml)
            defaults = {"single": {"dp_replicate": 1, "dp_shard": -1},
                        "ddp": {"dp_replicate": -1, "dp_shard": 1},
                        "fsdp": {"dp_replicate": replicate_degree, "dp_shard": -1},
                        "hsdp": {"dp_replicate": replicate_degree, "dp_shard": -1}}[strategy]
        else:
            raise ValueError(f"strategy={strategy!r} is not one of {', '.join(NATIVE + DEEPSPEED)}")
        if strategy == "single" and world_size > 1 and all(v is None for v in given.values()):
            raise ValueError(f"strategy=single runs one process but the world size is {world_size}: use "
                             f"strategy=ddp|fsdp|hsdp|zero1|zero2|zero3, or set parallel.* dims (e.g. parallel.tp=2)")
        rep = given["dp_replicate"] if given["dp_replicate"] is not None else defaults["dp_replicate"]
        shard = given["dp_shard"] if given["dp_shard"] is not None else defaults["dp_shard"]
        if rep == -1 and shard == -1:
            raise ValueError("parallel.dp_replicate=-1 and parallel.dp_shard=-1: at most one dim can take the rest "
                             "of the world")
        fixed = pp * tp * max(rep, 1) * max(shard, 1)
        if -1 in (rep, shard):
            if world_size % fixed:
                raise ValueError(f"parallel dims {_describe(pp, rep, shard, tp)} do not divide the world size "
                                 f"{world_size} (the fixed dims multiply to {fixed})")
            rest = world_size // fixed
            rep, shard = (rest, shard) if rep == -1 else (rep, rest)
        product = pp * rep * shard * tp
        if product != world_size:
            raise ValueError(f"parallel dims {_describe(pp, rep, shard, tp)} multiply to {product} but the world "
                             f"size is {world_size}; their product must equal it")
        engine = "deepspeed" if strategy in DEEPSPEED else "native"
        return cls(dp_replicate=rep, dp_shard=shard, tp=tp, pp=pp, engine=engine,
                   fsdp=engine == "native" and (shard > 1 or strategy in ("fsdp", "hsdp")
                                                or ((tp > 1 or pp > 1) and rep > 1)))

    # ------------------------------------------------------------ sizes and coordinates (no process group needed)

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.tp

    @property
    def dp_size(self) -> int:
        """Data-parallel replicas of the model: ranks that read different samples."""
        return self.dp_replicate * self.dp_shard

    def coordinate(self, rank: int) -> dict[str, int]:
        """This rank's position on each mesh dim (row-major over ``DIM_NAMES``, tp fastest)."""
        out, r = {}, rank
        for name in reversed(DIM_NAMES):
            size = getattr(self, name)
            out[name], r = r % size, r // size
        return {k: out[k] for k in DIM_NAMES}

    def dp_rank(self, rank: int) -> int:
        c = self.coordinate(rank)
        return c["dp_replicate"] * self.dp_shard + c["dp_shard"]

    def describe(self) -> str:
        return _describe(self.pp, self.dp_replicate, self.dp_shard, self.tp)

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in DIM_NAMES}

    # ------------------------------------------------------------ the mesh (needs the process group)

    @cached_property
    def mesh(self):
        """The one named DeviceMesh ``(pp, dp_replicate, dp_shard, tp)`` over the default process group."""
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(self.mesh_device, tuple(getattr(self, k) for k in DIM_NAMES), mesh_dim_names=DIM_NAMES)

    @property
    def tp_mesh(self):
        return self.mesh["tp"]

    @property
    def fsdp_mesh(self):
        """FSDP2's mesh: 1-D dp_shard, or 2-D (dp_replicate, dp_shard) = HSDP when there are replicas."""
        return self.mesh["dp_replicate", "dp_shard"] if self.dp_replicate > 1 else self.mesh["dp_shard"]

    @cached_property
    def dp_mesh(self):
        """The data-parallel ranks as one 1-D mesh (for loss means and sample counts)."""
        if self.dp_replicate == 1:
            return self.mesh["dp_shard"]
        if self.dp_shard == 1:
            return self.mesh["dp_replicate"]
        return self.mesh["dp_replicate", "dp_shard"]._flatten("dp")

    def with_device(self, device_type: str) -> ParallelDims:
        from dataclasses import replace

        return replace(self, mesh_device=device_type)


def _describe(pp: int, rep: int, shard: int, tp: int) -> str:
    return f"pp={pp} x dp_replicate={rep} x dp_shard={shard} x tp={tp}"
