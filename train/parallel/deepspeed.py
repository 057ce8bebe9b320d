"""`strategy=zero1|zero2|zero3`: DeepSpeed ZeRO behind the trainer's one seam (``Engine``), over the
data-parallel ranks only (tensor / pipeline parallelism are native: train/parallel/).

The DeepSpeed config is generated from the Hydra config (batch sizes, clipping, precision, ZeRO
stage, offload, bucket/prefetch knobs); `strategy.ds_config=<file.json>` overrides any key of it.
Our own AdamW param groups and warm-up/cosine schedule are used, so the numerics equal the other
strategies'. Under ZeRO-3 the model is constructed inside `deepspeed.zero.Init` (each module's
parameters are partitioned as soon as they exist) and initialized one gathered parameter at a time,
so no rank holds the full model.

Works under `torchrun` and under the `deepspeed` launcher (launch/deepspeed.sh); world size 1 runs
too (a 1-rank group is created). ZeRO checkpoints resume on the same world size only; `python -m
train.export` consolidates them to one state dict.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from train.checkpoint import CheckpointError, torch_load
from train.loss import cross_entropy, torch_cross_entropy
from train.parallel.engine import Engine, StepStats, nbytes
from train.parallel.rng import seed_init, seed_training
from train.parallel.sharded_init import replay_init
from train.parallelize import apply_ac, ensure_process_group

log = logging.getLogger(__name__)

ZERO_STAGES = (1, 2, 3)
DS_TAG = "ds"  # DeepSpeed writes its files under <checkpoint>/ds/
SCHED_FILE = "sched.pt"


def zero_stage_of(cfg) -> int:
    """The ZeRO stage: `strategy.zero_stage`, which must agree with `strategy.name` (zero1/2/3)."""
    s = cfg.strategy
    from_name = int(s.name[4:]) if s.name.startswith("zero") and s.name[4:].isdigit() else None
    stage = int(s.zero_stage) if s.zero_stage else from_name
    if stage not in ZERO_STAGES:
        raise ValueError(f"strategy.zero_stage={s.zero_stage} is not one of {', '.join(map(str, ZERO_STAGES))}")
    if from_name is not None and stage != from_name:
        raise ValueError(f"strategy.zero_stage={stage} contradicts strategy={s.name}; use strategy=zero{stage}")
    return stage


def load_ds_overrides(path: str) -> dict:
    """Read a user ds_config JSON: one-line errors for a missing file or malformed JSON (with position)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"strategy.ds_config={path}: no such file")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"strategy.ds_config={path}: malformed JSON at line {e.lineno} column {e.colno}: "
                         f"{e.msg}") from None
    except UnicodeDecodeError:
        raise ValueError(f"strategy.ds_config={path}: not a UTF-8 text file") from None
    if not isinstance(data, dict):  # a bad config value: ValueError is what train.main reports as one line
        raise ValueError(  # noqa: TRY004
            f"strategy.ds_config={path}: must hold a JSON object, not {type(data).__name__}")
    return data


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_ds_config(cfg, world_size: int, device_type: str = "cpu") -> dict:
    """The DeepSpeed config for this run (validated); user overrides from `strategy.ds_config` applied."""
    s, t, p = cfg.strategy, cfg.train, cfg.precision
    stage = zero_stage_of(cfg)
    allowed = ("none", "optimizer", "params") if stage == 3 else ("none", "optimizer")
    if s.offload not in allowed:
        raise ValueError(f"strategy.offload={s.offload!r} is not supported with ZeRO stage {stage}; allowed: "
                         f"{', '.join(allowed)}" + ("" if stage == 3 else " (params needs strategy=zero3)"))
    if p.name not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision={p.name!r} is not one of fp32, bf16, fp16")
    if t.compile:
        raise ValueError(f"train.compile=true is not supported with strategy={s.name} (DeepSpeed runs eager); "
                         f"use strategy=fsdp or ddp to compile")
    pin = device_type == "cuda"
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": bool(s.overlap_comm),
                            "reduce_bucket_size": int(s.reduce_bucket_size), "contiguous_gradients": True}
    if stage == 3:
        zero.update({"stage3_prefetch_bucket_size": int(s.prefetch_bucket_size),
                     "stage3_param_persistence_threshold": int(s.param_persistence_threshold),
                     "stage3_max_live_parameters": int(s.max_live_parameters),
                     "stage3_gather_16bit_weights_on_model_save": False})
    if s.offload in ("optimizer", "params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if s.offload == "params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    ds = {
        "train_micro_batch_size_per_gpu": int(t.micro_batch_size),
        "gradient_accumulation_steps": int(t.grad_accum),
        "train_batch_size": int(t.micro_batch_size) * int(t.grad_accum) * int(world_size),
        "gradient_clipping": float(cfg.optim.grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": p.name == "bf16"},
        "fp16": {"enabled": p.name == "fp16", "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                 "hysteresis": 2, "min_loss_scale": 1},
        "zero_allow_untested_optimizer": True,  # our torch AdamW
        "zero_force_ds_cpu_optimizer": False,  # offload on CPU-only machines keeps torch AdamW
        "steps_per_print": 1 << 30,  # the trainer logs
        "wall_clock_breakdown": False,
    }
    if s.ds_config:
        ds = _merge(ds, load_ds_overrides(s.ds_config))
        zs = ds.get("zero_optimization", {}).get("stage")
        if zs != stage:
            raise ValueError(f"strategy.ds_config={s.ds_config}: zero_optimization.stage={zs} contradicts "
                             f"strategy={s.name} (stage {stage})")
        want = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world_size
        if ds.get("train_batch_size") != want:
            raise ValueError(f"strategy.ds_config={s.ds_config}: train_batch_size={ds.get('train_batch_size')} "
                             f"must equal micro batch x grad accum x world size = {want}")
    return ds


def validate_deepspeed_config(cfg, world_size: int = 1) -> None:
    """Everything that can be checked before launch (no DeepSpeed import, no compute)."""
    build_ds_config(cfg, world_size)


def param_groups_zero(model: nn.Module, weight_decay: float) -> list[dict]:
    """train.optim's grouping (decay on >= 2-D weights), reading ZeRO-3's real shapes (`ds_shape`)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class DeepSpeedEngine(Engine):
    format = "deepspeed"

    def __init__(self, cfg, spec, dist_info) -> None:
        super().__init__(cfg, spec, dist_info)
        self.stage = zero_stage_of(cfg)
        self.ds_config = build_ds_config(cfg, dist_info.world_size, dist_info.device.type)
        self._build()

    # ------------------------------------------------------------ construction

    def _build(self) -> None:
        import deepspeed

        from model import GPT
        from train.optim import build_scheduler

        cfg, gpt_config = self.cfg, self.spec.gpt_config
        ensure_process_group(self.device, cfg.strategy.timeout_s)  # world size 1 needs a group too
        # DeepSpeed reads these even when the group exists (plain `python -m train` sets none of them)
        for key, value in (("RANK", self.dist.rank), ("LOCAL_RANK", self.dist.local_rank),
                           ("WORLD_SIZE", self.dist.world_size)):
            os.environ.setdefault(key, str(value))
        if self.device.type == "cpu":
            # DeepSpeed's comm backend JIT-compiles its shared-memory kernel on first use (about a minute on CPU);
            # it serves only inference_all_reduce, which training never calls (its all_reduce is the process
            # group's), so the build is skipped; ops.__compatible_ops__ is the table build_shm_op() consults
            compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
            if isinstance(compatible, dict):
                compatible["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)
        seed_init(cfg.train.seed)
        if self.stage == 3:
            remote = "cpu" if cfg.strategy.offload == "params" else None
            with deepspeed.zero.Init(config_dict_or_path=self.ds_config, remote_device=remote,
                                     pin_memory=self.device.type == "cuda" and remote is not None):
                model = GPT(gpt_config)  # parameters partitioned module by module as they are created
            seed_init(cfg.train.seed)
            with torch.no_grad():
                replay_init(model)  # gathers one parameter at a time: the single-process values
            if self.spec.init_from is not None:  # model.init_from: HF weights instead
                self._load_hf_weights(model)
        else:
            model = self._init_whole()  # replicated parameters (ZeRO-1/2 shard only the optimizer)
        apply_ac(model, cfg.train.activation_checkpointing)  # compile is rejected for DeepSpeed
        o = cfg.optim
        groups = param_groups_zero(model, o.weight_decay)
        if cfg.strategy.offload != "none" and self.device.type == "cuda":
            from deepspeed.ops.adam import DeepSpeedCPUAdam  # vectorized AdamW on the CPU copy

            optimizer = DeepSpeedCPUAdam(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, adamw_mode=True)
        else:
            fused = o.fused if o.fused is not None else self.device.type == "cuda"
            optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                          fused=bool(fused) and cfg.strategy.offload == "none")
        # the schedule stays ours (stepped in step()), so lr(step) is the same function in every layout
        self.scheduler = build_scheduler(optimizer, o, cfg.train.max_steps)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                 config=self.ds_config, dist_init_required=False)
        self.n_params = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())
        self.loss_scaling = cfg.precision.name == "fp16"  # DeepSpeed's fp16 block scales the loss dynamically
        seed_training(cfg.train.seed, self.dp_rank)

    def _load_hf_weights(self, model: nn.Module) -> None:
        """ZeRO-3: rank 0 reads the Hugging Face checkpoint (one full copy, on CPU); each parameter is
        gathered, overwritten on rank 0 and re-partitioned from it."""
        import deepspeed

        from train.init_from import load_hf_model

        full = (load_hf_model(self.spec.gpt_config, self.spec.init_from, torch.device("cpu")).state_dict()
                if self.dist.is_main else {})
        with torch.no_grad():
            for name, p in model.named_parameters():
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    if self.dist.is_main:
                        p.data.copy_(full[name])

    # ------------------------------------------------------------ training

    def micro_step(self, x, y, *, last, poison=False):
        self.engine.train()
        impl = self.cfg.train.loss_impl
        if impl == "fused":  # the model's chunked head + loss: ZeRO-3 gathers the head in its module hooks
            loss = self.engine(x, targets=y)
        else:
            logits = self.engine(x)  # [B, T, V]
            loss = cross_entropy(logits, y) if impl == "chunked_logits" else torch_cross_entropy(logits, y)
            del logits  # the loss holds the logits' gradient; the logits themselves are not needed again
        if poison:
            loss = loss * float("nan")
        self.engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself
        if not last:
            self.engine.step()  # not a boundary: only advances DeepSpeed's micro-step counter
        return loss.detach() / self.cfg.train.grad_accum

    def step(self):
        assert self.engine.is_gradient_accumulation_boundary(), "micro_step(last=True) must precede step()"
        lr = self.scheduler.get_last_lr()[0]
        self.engine.step()  # reduce, unscale, clip (gradient_clipping), optimizer step, zero grads
        norm = self.engine.get_global_grad_norm()
        norm = torch.as_tensor(float(norm) if norm is not None else float("nan"))
        overflow = bool(getattr(self.optimizer, "overflow", False))
        self.scheduler.step()
        return StepStats(norm, overflow or not bool(torch.isfinite(norm)), lr)

    @torch.no_grad()
    def _forward_eval(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        was_training = self.engine.training
        self.engine.eval()
        try:
            return self.engine(x) if targets is None else self.engine(x, targets=targets)
        finally:
            self.engine.train(was_training)

    def eval_loss(self, x, y):
        if self.cfg.train.loss_impl == "fused":  # chunk by chunk, without the logits
            return self._forward_eval(x, y)
        return torch.nn.functional.cross_entropy(self._forward_eval(x).float().flatten(0, 1), y.flatten())

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, *, temperature, top_k, generator, vocab_limit):
        """Uncached steps on every rank (ZeRO-3 gathers each layer collectively): identical ids everywhere."""
        from model.gpt import sample_next

        block = self.spec.gpt_config.block_size
        out = idx
        for _ in range(max_new_tokens):
            logits = self._forward_eval(out[:, -block:])[:, -1]  # [1, V]
            out = torch.cat([out, sample_next(logits, temperature, top_k, generator, vocab_limit)], dim=1)
        return out if self.dist.is_main else None

    # ------------------------------------------------------------ checkpoints (format "deepspeed")

    def meta(self):
        return {**super().meta(), "zero_stage": self.stage, "ds_tag": DS_TAG}

    def save(self, ckpt_dir, dcp_save=None):
        """Collective: DeepSpeed's model/optimizer partitions under <ckpt>/ds/, the schedule beside them. Always
        synchronous (``dcp_save`` is ignored): DeepSpeed writes its own format, not DCP."""
        ckpt_dir = Path(ckpt_dir)
        self.engine.save_checkpoint(str(ckpt_dir), tag=DS_TAG, save_latest=False)
        if self.dist.is_main:
            torch.save({"scheduler": self.scheduler.state_dict()}, ckpt_dir / SCHED_FILE)

    def load(self, ckpt_dir, meta):
        ckpt_dir = Path(ckpt_dir)
        name = self.cfg.strategy.name
        if meta["format"] != self.format:
            raise CheckpointError(f"checkpoint {ckpt_dir} has format {meta['format']!r} (strategy={meta['strategy']}); "
                                  f"strategy={name} resumes only format 'deepspeed' checkpoints")
        if meta.get("zero_stage") != self.stage or meta["world_size"] != self.dist.world_size:
            raise CheckpointError(
                f"checkpoint {ckpt_dir} was saved with ZeRO stage {meta.get('zero_stage')} on {meta['world_size']} "
                f"rank(s); strategy={name} on {self.dist.world_size} rank(s) cannot resume it (DeepSpeed "
                f"partitions are per stage and world size; python -m train.export consolidates it)")
        load_path, _ = self.engine.load_checkpoint(str(ckpt_dir), tag=meta.get("ds_tag", DS_TAG),
                                                   load_optimizer_states=True, load_lr_scheduler_states=False)
        if load_path is None:
            raise CheckpointError(f"checkpoint {ckpt_dir}: DeepSpeed files under {DS_TAG}/ are missing")
        self.scheduler.load_state_dict(torch_load(ckpt_dir / SCHED_FILE)["scheduler"])

    # ------------------------------------------------------------ accounting

    def state_bytes(self):
        """This rank's bytes. `params`: the compute copy (ZeRO-3: its partition); `optimizer`: AdamW
        moments; `master`: the fp32 master partition ZeRO keeps beside the compute copy."""
        params = list(self.engine.module.parameters())
        compute = sum(nbytes([p.ds_tensor]) if hasattr(p, "ds_tensor") else nbytes([p]) for p in params)
        base = getattr(self.optimizer, "optimizer", self.optimizer)  # DeepSpeed wraps our AdamW
        # ZeRO-3 / ZeRO-1,2 keep the fp32 master partitions here (stage 3 detaches them from
        # base.param_groups between steps)
        master = (getattr(self.optimizer, "fp32_partitioned_groups_flat", None)
                  or getattr(self.optimizer, "single_partition_of_fp32_groups", None)
                  or [p for g in base.param_groups for p in g["params"]])
        moments = [v for s in base.state.values() for k, v in s.items() if k != "step"]
        return {"params": compute, "grads": nbytes(p.grad for p in params if p.grad is not None),
                "optimizer": nbytes(moments), "master": nbytes(master)}
