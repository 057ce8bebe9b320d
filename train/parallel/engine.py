"""The trainer's one seam to the parallel model: ``Engine``, and ``NativeEngine`` for every layout on
the device mesh (one process, DDP, FSDP2, HSDP, tensor + sequence parallel, and their products).

The trainer calls only what ``Engine`` declares: micro_step, step, eval_loss, generate, save, load,
dp_mean, state_bytes and a few read-only facts. It never reads a backend's internals and never
branches on a strategy name; ``build_engine`` (train/parallel/__init__.py) is the one place that picks
the backend (``NativeEngine`` here, ``DeepSpeedEngine`` in train/parallel/deepspeed.py).

NativeEngine applies the transforms to a plain ``GPT`` in one fixed order: tensor/sequence parallel
-> activation checkpointing -> compile -> FSDP2 (dp_shard; HSDP on dp_replicate x dp_shard) or DDP
(dp_replicate only). Sharded layouts are built on ``meta`` and each rank materialises only its shards,
then writes its slice of the single-process init (``replay_init``). Checkpoints are DCP with the plain
model's parameter names, so they reshard across every layout and one process.
"""

from __future__ import annotations

import contextlib
import warnings
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from train.checkpoint import CheckpointError, check_dcp_files, check_shapes, dcp_failure_line, torch_load
from train.distributed import DistInfo
from train.loss import cross_entropy, torch_cross_entropy
from train.optim import build_optimizer, build_scheduler
from train.parallel.rng import seed_init, seed_training
from train.parallelize import apply_ac, apply_compile, apply_ddp, apply_fsdp, ensure_process_group
from train.precision import Precision

SCHED_FILE = "sched.pt"  # scheduler + grad scaler: replicated, written by rank 0


def _flat_optim_groups(ckpt_dir: Path) -> bool:
    """Whether a DCP checkpoint keys its optimizer param groups by parameter name (written under pp > 1)."""
    import torch.distributed.checkpoint as dcp

    keys = dcp.FileSystemReader(str(ckpt_dir)).read_metadata().state_dict_metadata
    return not any(k.startswith("optim.param_groups.0.") for k in keys)


@dataclass
class StepStats:
    """What an optimizer step reports: the global gradient norm (before clipping), whether the update was
    skipped (non-finite gradients), and the learning rate the step used."""

    grad_norm: torch.Tensor
    skipped: bool
    lr: float


@contextlib.contextmanager
def _quiet_redistribute():
    """DTensor warns on every step that a norm over a 2-D mesh takes two all-reduces (one per dim); that is
    what it is here (the dims are not flattened), so the warning is kept out of the training log."""
    import logging

    logger = logging.getLogger("torch.distributed.tensor._redistribute")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def nbytes(tensors) -> int:
    """Bytes this rank holds for ``tensors`` (a DTensor counts its local shard only)."""
    return sum(local(t).numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class Engine(ABC):
    """The parallel model, its optimizer, schedule and loss scaling, as the trainer sees them."""

    format: str = "dcp"  # the checkpoint format save() writes (meta.json "format")

    def __init__(self, cfg, spec, dist_info: DistInfo) -> None:
        self.cfg, self.spec, self.dist = cfg, spec, dist_info
        self.device = dist_info.device
        self.precision = Precision.from_config(cfg.precision, dist_info.device)
        self.dp_rank = spec.dims.dp_rank(dist_info.rank)

    # ---- facts the trainer may read
    n_params: int = 0
    loss_scaling: bool = False  # fp16 dynamic loss scale: an overflow skip is routine, not a fault

    @abstractmethod
    def micro_step(self, x: torch.Tensor, y: torch.Tensor, *, last: bool, poison: bool = False) -> torch.Tensor:
        """Forward + backward of one micro-batch; the loss is divided by grad_accum here (normalised once).
        Gradients are synchronised over the data-parallel ranks only when ``last``. ``poison`` (a test hook)
        makes the loss NaN before backward, so every gradient is NaN as after a real overflow. Returns
        the detached loss of this rank's micro-batch / grad_accum."""

    @abstractmethod
    def step(self) -> StepStats:
        """Unscale, clip (optim.grad_clip) on the global norm, optimizer + scheduler step, zero grads."""

    @abstractmethod
    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """No-grad mean token loss of one micro-batch (this data-parallel replica's)."""

    @abstractmethod
    def generate(self, idx: torch.Tensor, max_new_tokens: int, *, temperature: float, top_k: int | None,
                 generator: torch.Generator, vocab_limit: int | None) -> torch.Tensor | None:
        """Collective: sample continuations of ``idx`` [1, T]; the ids on rank 0 (None elsewhere)."""

    @abstractmethod
    def save(self, ckpt_dir: Path, dcp_save=None) -> None:
        """Collective: model, optimizer, scheduler and scaler state into ``ckpt_dir`` (meta.json and the
        per-rank trainer state are written by train/checkpoint.py). ``dcp_save`` replaces
        ``torch.distributed.checkpoint.save`` for the DCP part (train/checkpoint.py passes ``async_save``);
        an engine with its own format ignores it and writes synchronously."""

    @abstractmethod
    def load(self, ckpt_dir: Path, meta: dict) -> None:
        """Collective: restore what ``save`` wrote (from any layout where the format reshards)."""

    @abstractmethod
    def state_bytes(self) -> dict[str, int]:
        """This rank's {params, grads, optimizer} bytes (local shards only)."""

    def skip_update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Make the coming ``step()`` skip its update as after a non-finite gradient (the loss-spike guard's
        verdict, judged after the step's micro-steps): one more micro-batch with a NaN loss makes every gradient
        NaN on every rank."""
        self.micro_step(x, y, last=True, poison=True)

    def meta(self) -> dict[str, Any]:
        """What meta.json records about the layout that wrote a checkpoint."""
        return {"format": self.format, "strategy": self.cfg.strategy.name, "world_size": self.dist.world_size,
                "parallel": self.spec.dims.as_dict()}

    def dp_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean of ``t`` over the data-parallel ranks (in place); tensor-parallel ranks hold equal values."""
        if self.dist.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.dp_group())
            t /= self.spec.dims.dp_size
        return t

    def dp_group(self):
        return None  # the world: every rank is a data-parallel rank

    def _init_whole(self) -> nn.Module:
        """The single-process model for ``train.seed`` (or the Hugging Face weights of ``model.init_from``),
        built on ``meta`` and materialised once on the device."""
        from model import GPT

        if self.spec.init_from is not None:
            from train.init_from import load_hf_model

            return load_hf_model(self.spec.gpt_config, self.spec.init_from, self.device)
        with torch.device("meta"):
            model = GPT(self.spec.gpt_config)
        model.to_empty(device=self.device)
        with torch.no_grad():
            model.init_weights()
        return model


class NativeEngine(Engine):
    """One process, DDP, FSDP2 / HSDP and tensor + sequence parallel on the one device mesh."""

    def __init__(self, cfg, spec, dist_info: DistInfo) -> None:
        super().__init__(cfg, spec, dist_info)
        dims = spec.dims.with_device(self.device.type)
        self.dims = dims
        self.tp = dims.tp > 1
        self.sharded = self.tp or dims.fsdp  # parameters are DTensors: built on meta, gathered to sample
        self.ddp = dims.dp_replicate > 1 and not self.sharded
        if self.sharded:
            ensure_process_group(self.device, cfg.strategy.timeout_s)  # FSDP2 wants one even on one rank
        self.model, self.raw = self._build()
        self.n_params = sum(p.numel() for p in self.raw.parameters())
        self.optimizer = build_optimizer(self.raw, cfg.optim, self.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.max_steps)
        self.scaler = self.precision.make_scaler()
        self.loss_scaling = self.scaler is not None

    # ------------------------------------------------------------ construction

    def _build(self) -> tuple[nn.Module, nn.Module]:
        """(the module forward runs, the plain GPT whose names are the checkpoint's)."""
        from model import GPT

        cfg, t, dims = self.cfg, self.cfg.train, self.dims
        seed_init(t.seed)
        if not self.sharded:
            model = self._init_whole()
            apply_ac(model, t.activation_checkpointing)
            if t.compile:
                apply_compile(model)
            wrapped = apply_ddp(model, self.device, find_unused_parameters=cfg.strategy.find_unused_parameters,
                                bucket_cap_mb=cfg.strategy.bucket_cap_mb) if self.ddp else model
            seed_training(t.seed, self.dp_rank)
            return wrapped, model
        with torch.device("meta"):
            model = GPT(self.spec.gpt_config)  # shapes only: each rank allocates just its shards below
        if self.tp:
            from train.parallel.tp import apply_tp

            apply_tp(model, dims.tp_mesh)
        apply_ac(model, t.activation_checkpointing)
        if t.compile:
            apply_compile(model, self.device)
        offload = cfg.strategy.offload == "params"
        if dims.fsdp:
            apply_fsdp(model, dims.fsdp_mesh, param_dtype=self.precision.param_dtype,
                       reduce_dtype=self.precision.reduce_dtype,
                       reshard_after_forward=bool(cfg.strategy.reshard_after_forward), offload_params=offload)
        model.to_empty(device="cpu" if offload else self.device)
        from train.parallel.sharded_init import replay_init

        seed_init(t.seed)
        with torch.no_grad():
            replay_init(model)  # each rank writes its slice of the single-process init
        if self.spec.init_from is not None:
            self._load_hf_sharded(model)
        if offload:  # buffers (RoPE tables) are not offloaded: they live on the compute device
            model.init_buffers(self.device)
        seed_training(t.seed, self.dp_rank)
        return model, model

    def _load_hf_sharded(self, model: nn.Module) -> None:
        """Rank 0 reads the Hugging Face checkpoint (one full copy, on CPU); every rank receives only its shards."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        from train.init_from import load_hf_model

        full = (load_hf_model(self.spec.gpt_config, self.spec.init_from, torch.device("cpu")).state_dict()
                if self.dist.is_main else {})
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))

    def dp_group(self):
        if self.dist.world_size == 1 or self.dims.tp == 1:
            return None  # every rank is a data-parallel rank
        return self.dims.dp_mesh.get_group()

    # ------------------------------------------------------------ training

    def _no_sync(self, last: bool) -> AbstractContextManager:
        """Gradient sync only on the last micro-step: one all-reduce / reduce-scatter per optimizer step."""
        if self.dims.fsdp:
            self.model.set_requires_gradient_sync(last)
        elif self.ddp and not last:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def _loss_ctx(self) -> AbstractContextManager:
        if not self.tp:
            return contextlib.nullcontext()
        from torch.distributed.tensor.parallel import loss_parallel

        return loss_parallel()  # cross-entropy on vocabulary shards (forward and backward)

    @property
    def _fused_loss(self) -> bool:
        """The model computes the loss itself (fused, chunked LM head + cross-entropy: no [B, T, V] logits).
        Under tensor parallelism the logits are vocabulary shards and the vocabulary-parallel loss runs instead."""
        return not self.tp and self.cfg.train.loss_impl == "fused"

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.tp:  # logits are a DTensor sharded over the vocabulary: [B, T, V / tp] per rank
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        if self.cfg.train.loss_impl == "torch":
            return torch_cross_entropy(logits, y)
        return cross_entropy(logits, y)  # chunked fp32 loss, gradient computed in forward (train/loss.py)

    def micro_step(self, x, y, *, last, poison=False):
        self.model.train()
        with self._no_sync(last), self._loss_ctx():
            if self._fused_loss:
                with self.precision.autocast_ctx():
                    loss = self.model(x, targets=y) / self.cfg.train.grad_accum
            else:
                with self.precision.autocast_ctx():
                    logits = self.model(x)
                loss = self._loss(logits, y) / self.cfg.train.grad_accum
                del logits  # the loss holds what backward needs (its gradient, or the sharded log-softmax)
            if poison:
                loss = loss * float("nan")
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        loss = loss.detach()
        return loss.full_tensor() if isinstance(loss, DTensor) else loss

    def _grad_norm(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        params = [p for p in self.raw.parameters() if p.grad is not None]
        with _quiet_redistribute():
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0, foreach=True)
            if isinstance(norm, DTensor):  # partial sums over shards and TP ranks -> the global norm, on every rank
                norm = norm.full_tensor()
            if self.dims.tp > 1 and self.dims.dp_size > 1:
                # one all-reduce per mesh dim: ranks may sum in different orders; agree on one value bitwise so
                # every rank clips (and keeps its replicated parameters) identically
                dist.all_reduce(norm, op=dist.ReduceOp.MAX)
        return params, norm

    def step(self):
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
            if self.dist.world_size > 1 and self.sharded:  # each rank checked only its own shards
                state = self.scaler._per_optimizer_states[id(self.optimizer)]
                for flag in state["found_inf_per_device"].values():
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return self._finish_step()

    def _finish_step(self) -> StepStats:
        """After unscaling: the global norm, clipping, the update (skipped when not finite), the schedule."""
        params, norm = self._grad_norm()
        clip = self.cfg.optim.grad_clip
        if clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, clip, norm, foreach=True)
        finite = bool(torch.isfinite(norm))  # the one host sync per optimizer step
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips by itself on inf/nan
            self.scaler.update()
        elif finite:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepStats(norm.detach(), not finite, lr)

    @torch.no_grad()
    def _forward_eval(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            with self.precision.autocast_ctx():
                return self.model(x) if targets is None else self.model(x, targets=targets)
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def eval_loss(self, x, y):
        if self._fused_loss:  # the loss chunk by chunk, without the logits
            return self._forward_eval(x, y)
        with self._loss_ctx():
            loss = self._loss(self._forward_eval(x), y)
        return loss.full_tensor() if isinstance(loss, DTensor) else loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, *, temperature, top_k, generator, vocab_limit):
        from model.gpt import sample_next

        if not self.sharded and self.dims.pp == 1:  # whole weights on rank 0: its KV-cached decoder
            if not self.dist.is_main:
                return None
            with self.precision.autocast_ctx():
                return self.raw.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k,
                                         generator=generator, vocab_limit=vocab_limit)
        # sharded weights: every rank runs the same uncached steps (identical logits and generator -> same ids).
        # Sequence parallel splits the context over the TP ranks, so it is right-padded to a multiple of tp;
        # causal attention keeps the padding out of the logits read at the last real position.
        tp = self.dims.tp
        window = self.spec.gpt_config.block_size // tp * tp
        out = idx
        for _ in range(max_new_tokens):
            ctx = out[:, -window:]
            n = ctx.shape[1]
            if n % tp:
                ctx = torch.cat([ctx, ctx.new_zeros(ctx.shape[0], tp - n % tp)], dim=1)
            logits = self._forward_eval(ctx)  # [1, T, V] (vocabulary shards under TP; None off the last stage)
            tok = None
            if logits is not None:
                logits = logits[:, n - 1]
                if isinstance(logits, DTensor):
                    logits = logits.full_tensor()
                tok = sample_next(logits, temperature, top_k, generator, vocab_limit)
            out = torch.cat([out, self._share_token(tok, out[:, :1])], dim=1)
        return out if self.dist.is_main else None

    def _share_token(self, tok: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """The sampled token [1, 1] on every rank (here every rank sampled the same one)."""
        return tok

    # ------------------------------------------------------------ checkpoints (DCP, the plain model's names)

    def save(self, ckpt_dir, dcp_save=None):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self._sd_options(self.dims.pp > 1))
        with warnings.catch_warnings():  # one process without a group: DCP says it saves without one; it does
            warnings.simplefilter("ignore", UserWarning)
            (dcp_save or dcp.save)({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(ckpt_dir))
        if self.dist.is_main:
            sched = {"scheduler": self.scheduler.state_dict()}
            if self.scaler is not None:
                sched["scaler"] = self.scaler.state_dict()
            torch.save(sched, Path(ckpt_dir) / SCHED_FILE)

    def load(self, ckpt_dir, meta):
        ckpt_dir = Path(ckpt_dir)
        if meta["format"] == "torch":
            self._load_legacy(ckpt_dir)
            return
        if meta["format"] != "dcp":
            raise CheckpointError(f"checkpoint {ckpt_dir} has format {meta['format']!r} (strategy={meta['strategy']}); "
                                  f"strategy={self.cfg.strategy.name} resumes 'dcp' checkpoints (any parallel layout)"
                                  + (" -- DeepSpeed's partitions resume under the same zero strategy and world size;"
                                     " python -m train.export consolidates them" if meta["format"] == "deepspeed" else ""))
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        check_dcp_files(ckpt_dir)
        # shapes / shards to load into, the optimizer's param groups in the form the checkpoint has them
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer,
                                            options=self._sd_options(_flat_optim_groups(ckpt_dir)))
        state = {"model": model_sd, "optim": optim_sd}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                dcp.load(state, checkpoint_id=str(ckpt_dir))
        except dcp.CheckpointException as e:  # DCP gathers every rank's failure into this one exception
            raise CheckpointError(f"checkpoint {ckpt_dir} does not fit this model/optimizer "
                                  f"({dcp_failure_line(e)})") from None
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self._load_sched(ckpt_dir)

    @staticmethod
    def _sd_options(flatten: bool):
        """Pipeline stages hold different parameters, so their optimizer param groups are written per parameter
        name (``optim.param_groups.<fqn>.lr``): torch's default keys them by group index with a per-rank list of
        names, and DCP would keep one rank's list. Other layouts keep the default (older checkpoints are read in
        whichever form they were written)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(flatten_optimizer_state_dict=flatten)

    def _load_legacy(self, ckpt_dir: Path) -> None:
        """Format "torch" (model.pt + optim.pt, written by single / DDP runs before DCP): read into a
        whole (unsharded) model only."""
        if self.sharded:
            raise CheckpointError(f"checkpoint {ckpt_dir} is an older 'torch' checkpoint of a single/DDP run; resume "
                                  f"it with strategy=single or ddp (one save there rewrites it as DCP, which any "
                                  f"layout reads)")
        state = torch_load(ckpt_dir / "model.pt")
        if not isinstance(state, dict):
            raise CheckpointError(f"checkpoint file {ckpt_dir / 'model.pt'} does not hold a state dict")
        check_shapes({k: v.shape for k, v in self.raw.state_dict().items()}, state, f"checkpoint {ckpt_dir}")
        self.raw.load_state_dict(state)
        optim_state = torch_load(ckpt_dir / "optim.pt")
        try:
            self.optimizer.load_state_dict(optim_state["optimizer"])
            self.scheduler.load_state_dict(optim_state["scheduler"])
            if self.scaler is not None and "scaler" in optim_state:
                self.scaler.load_state_dict(optim_state["scaler"])
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint file {ckpt_dir / 'optim.pt'} does not fit this optimizer "
                                  f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None

    def _load_sched(self, ckpt_dir: Path) -> None:
        sched = torch_load(ckpt_dir / SCHED_FILE)
        self.scheduler.load_state_dict(sched["scheduler"])
        if self.scaler is not None and "scaler" in sched:
            self.scaler.load_state_dict(sched["scaler"])

    # ------------------------------------------------------------ accounting

    def state_bytes(self):
        params = list(self.raw.parameters())
        opt = [v for s in self.optimizer.state.values() for v in s.values()]
        return {"params": nbytes(params), "grads": nbytes(p.grad for p in params if p.grad is not None),
                "optimizer": nbytes(opt)}


