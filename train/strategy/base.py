"""The trainer <-> strategy seam (``docs/ARCHITECTURE.md``) and the single-process strategy.

The loop knows only ``Strategy``: build, micro_step, step, eval_logits, save, load,
local_state_bytes. ``SingleStrategy`` implements it for one process; ``DDPStrategy`` (ddp.py)
and the sharded strategies (fsdp.py, deepspeed.py) override the parts that differ.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from train.checkpoint import CheckpointError, check_shapes, load_extra, save_extra, torch_load, write_meta
from train.distributed import DistInfo
from train.loss import cross_entropy
from train.optim import build_optimizer, build_scheduler
from train.parallelize import apply_ac, apply_compile
from train.precision import Precision


def gpt_config_dict(gpt_config) -> dict:
    return gpt_config.to_dict() if hasattr(gpt_config, "to_dict") else dict(vars(gpt_config))


class Strategy:
    """Base class: everything a strategy needs, implemented for one process.

    Attributes set by ``build``: ``model`` (what forward runs: possibly wrapped), ``optimizer``,
    ``scheduler``, ``scaler`` (GradScaler or None), ``gpt_config``.
    """

    name: str = "base"
    format: str = "torch"  # checkpoint format written by save (meta.json "format")

    def __init__(self, cfg, dist: DistInfo) -> None:
        self.cfg = cfg
        self.dist = dist
        self.device = dist.device
        self.precision = Precision.from_config(cfg.precision, dist.device)
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self.gpt_config = None
        # model.init_from (a local HF dir after train.main resolves it); None = random init for train.seed.
        # train.main clears it when resuming: the checkpoint's weights replace the start anyway.
        self.init_from: str | None = cfg.model.init_from

    # ------------------------------------------------------------ construction

    @property
    def raw_model(self) -> nn.Module:
        """The plain ``GPT`` (unwrapped): its ``state_dict`` keys are the checkpoint's."""
        return self.model

    def init_model(self, gpt_config) -> nn.Module:
        """The single-process initialisation for ``train.seed``: built on ``meta`` (no RAM for the
        random init of a big model), materialised on the device, then ``init_weights()``. With
        ``model.init_from`` the Hugging Face checkpoint's weights instead (fp32 master weights)."""
        from model import GPT

        if self.init_from is not None:
            from train.init_from import load_hf_model

            return load_hf_model(gpt_config, self.init_from, self.device)
        with torch.device("meta"):
            model = GPT(gpt_config)
        model.to_empty(device=self.device)
        torch.manual_seed(self.cfg.train.seed)
        with torch.no_grad():
            model.init_weights()
        return model

    def apply_transforms(self, model: nn.Module) -> None:
        """Activation checkpointing, then compile (before any wrapping)."""
        apply_ac(model, self.cfg.train.activation_checkpointing)
        if self.cfg.train.compile:
            apply_compile(model)

    def build_optim(self, model: nn.Module) -> None:
        self.optimizer = build_optimizer(model, self.cfg.optim, self.device)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.optim, self.cfg.train.max_steps)
        self.scaler = self.precision.make_scaler()

    def build(self, gpt_config) -> None:
        self.gpt_config = gpt_config
        model = self.init_model(gpt_config)
        self.apply_transforms(model)
        self.model = model
        self.build_optim(model)

    # ------------------------------------------------------------ training

    def no_sync(self, last: bool) -> ContextManager:
        """Context for a micro-step's backward: gradient sync is skipped unless ``last``."""
        return contextlib.nullcontext()

    def micro_step(self, x: torch.Tensor, y: torch.Tensor, *, last: bool) -> torch.Tensor:
        self.model.train()
        with self.no_sync(last):
            with self.precision.autocast_ctx():
                logits = self.model(x)  # [B, T, V]
            loss = cross_entropy(logits, y) / self.cfg.train.grad_accum  # normalised once, here
            del logits  # the loss holds the logits' gradient; the logits themselves are not needed again
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
        return loss.detach()

    def clip_grad_norm(self) -> torch.Tensor:
        clip = self.cfg.optim.grad_clip
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"),
                                              foreach=True)

    def step(self) -> tuple[torch.Tensor, bool]:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
            self._agree_on_inf()
        norm = self.clip_grad_norm()
        # one host sync per optimizer step (not per micro-step): a non-finite gradient skips the update
        finite = bool(torch.isfinite(norm))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips by itself on inf/nan
            self.scaler.update()
        elif finite:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach(), not finite

    def _agree_on_inf(self) -> None:
        """fp16 loss scaling, after unscaling: make every rank's GradScaler see the same inf/nan verdict.
        Whole gradients (one process, or DDP's all-reduced ones) already agree; sharded ones override."""

    @torch.no_grad()
    def eval_logits(self, x: torch.Tensor) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            with self.precision.autocast_ctx():
                return self.model(x)
        finally:
            self.model.train(was_training)

    # ------------------------------------------------------------ checkpoints (format "torch")

    def save(self, ckpt_dir: Path, extra: dict) -> None:
        """Rank 0 writes the (replicated) model and optimizer; every rank writes its ``extra``."""
        ckpt_dir = Path(ckpt_dir)
        if self.dist.is_main:
            torch.save(self.raw_model.state_dict(), ckpt_dir / "model.pt")
            optim_state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
            if self.scaler is not None:
                optim_state["scaler"] = self.scaler.state_dict()
            torch.save(optim_state, ckpt_dir / "optim.pt")
            step = int(extra.get("trainer", {}).get("step", 0))
            write_meta(ckpt_dir, format=self.format, step=step, strategy=self.name,
                       world_size=self.dist.world_size, model_config=gpt_config_dict(self.gpt_config),
                       precision=self.cfg.precision.name)
        save_extra(ckpt_dir, extra, self.dist.rank)

    def load(self, ckpt_dir: Path) -> dict:
        ckpt_dir = Path(ckpt_dir)
        state = torch_load(ckpt_dir / "model.pt")
        if not isinstance(state, dict):
            raise CheckpointError(f"checkpoint file {ckpt_dir / 'model.pt'} does not hold a state dict")
        model = self.raw_model
        check_shapes({k: v.shape for k, v in model.state_dict().items()}, state, f"checkpoint {ckpt_dir}")
        model.load_state_dict(state)
        optim_state = torch_load(ckpt_dir / "optim.pt")
        try:
            self.optimizer.load_state_dict(optim_state["optimizer"])
            self.scheduler.load_state_dict(optim_state["scheduler"])
            if self.scaler is not None and "scaler" in optim_state:
                self.scaler.load_state_dict(optim_state["scaler"])
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint file {ckpt_dir / 'optim.pt'} does not fit this optimizer "
                                  f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        return load_extra(ckpt_dir, self.dist.rank)

    # ------------------------------------------------------------ accounting

    def local_state_bytes(self) -> dict[str, int]:
        def nbytes(ts: Any) -> int:
            return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))

        params = list(self.model.parameters())
        opt = [v for s in self.optimizer.state.values() for v in s.values()] if self.optimizer else []
        return {"params": nbytes(params), "grads": nbytes(p.grad for p in params if p.grad is not None),
                "optimizer": nbytes(opt)}


class SingleStrategy(Strategy):
    """One process, one device (CPU or one GPU)."""

    name = "single"
