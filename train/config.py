"""Typed (structured) configs behind the Hydra tree in ``conf/``.

Every YAML file in ``conf/`` is merged onto these dataclasses, so a misspelt key or a value of the
wrong type fails in Hydra's composition step, before any work is done. Precedence is Hydra's:
CLI override > experiment YAML > group YAML > the dataclass defaults below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore

from train.data.config import DataConfig  # the data engineer's dataclass defines data.* keys
from train.ops.profiler import ProfileConfig, validate_profile  # train.profile.*
from train.ops.spike import SpikeConfig, validate_spike  # train.spike.*


@dataclass
class ModelConfig:
    """A named preset from ``model/config.py`` plus optional per-field overrides.

    Every ``GPTConfig`` field is mirrored here as ``Optional`` and defaults to None ("keep the
    preset's value"), so presets stay defined once and ``model.n_layer=2`` works from the CLI.
    """

    preset: str = "gpt2-tiny"
    init_from: str | None = None  # a Hugging Face model dir / Hub id: its config + weights (train/init_from.py)
    family: str | None = None
    n_layer: int | None = None
    n_head: int | None = None
    n_kv_head: int | None = None
    n_embd: int | None = None
    head_dim: int | None = None
    vocab_size: int | None = None
    block_size: int | None = None
    pos: str | None = None
    rope_theta: float | None = None
    norm: str | None = None
    norm_eps: float | None = None
    norm_offset: bool | None = None
    mlp: str | None = None
    gelu_approximate: str | None = None
    ffn_hidden: int | None = None
    parallel_residual: bool | None = None
    shared_attn_norm: bool | None = None
    bias: bool | None = None
    tie_embeddings: bool | None = None
    embed_scale: bool | None = None
    dropout: float | None = None
    init_std: float | None = None

    def overrides(self) -> dict:
        """The GPTConfig fields set here (non-None), to apply on top of the preset."""
        skip = {"preset", "init_from"}
        return {k: v for k, v in vars(self).items() if k not in skip and v is not None}


@dataclass
class StrategyConfig:
    """How the model is spread over processes. ``single`` and ``ddp`` use only the first and last
    few keys; the rest belong to ``fsdp`` and ``zero1|zero2|zero3``."""

    name: str = "single"  # single | ddp | fsdp | zero1 | zero2 | zero3 (shorthands for parallel.* dims)
    offload: str = "none"  # none | optimizer | params
    # FSDP2
    reshard_after_forward: bool = True
    replicate_degree: int = 1  # HSDP: replicas of the sharded group (1 = plain FSDP)
    # DeepSpeed
    zero_stage: int = 0
    ds_config: str | None = None  # path of a DeepSpeed JSON that overrides the generated one
    overlap_comm: bool = True
    prefetch_bucket_size: int = 50_000_000
    param_persistence_threshold: int = 100_000
    max_live_parameters: int = 1_000_000_000
    reduce_bucket_size: int = 500_000_000
    # DDP
    find_unused_parameters: bool = False
    bucket_cap_mb: int = 25
    # process group
    backend: str | None = None  # None: nccl (+gloo for CPU tensors) on CUDA, gloo on CPU
    timeout_s: int = 1800  # a collective hung longer than this ends the run with an error


@dataclass
class ParallelConfig:
    """Parallel dimensions (train/parallel/dims.py). Their product is the world size; null = filled in
    from ``strategy`` (ddp: dp_replicate = all ranks; fsdp: dp_shard = all ranks; hsdp: both). The
    device mesh is ``pp x dp_replicate x dp_shard x tp``, tp innermost (one node)."""

    dp_replicate: int | None = None  # data-parallel replicas (DDP; with dp_shard > 1: HSDP's replicas)
    dp_shard: int | None = None  # FSDP2 shard group; -1 = the rest of the world
    tp: int | None = None  # tensor (+ sequence) parallel degree; must divide n_head
    pp: int | None = None  # pipeline-parallel ranks (train/parallel/pipeline.py)
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved_1f1b | interleaved_zero_bubble | zero_bubble (ZB-V)
    pp_microbatches: int | None = None  # per optimizer step; null = train.grad_accum if >= pp, else a multiple of pp
    pp_stages_per_rank: int | None = None  # virtual stages per rank (interleaved: default 2; zero_bubble: 2)
    pp_layers_per_stage: list[int] | None = None  # explicit blocks per stage; null = balanced (ends weighed in)


@dataclass
class PrecisionConfig:
    """Mixed precision policy. Master weights and optimizer state stay in fp32 for every choice."""

    name: str = "fp32"  # fp32 | bf16 | fp16
    param_dtype: str = "float32"  # compute dtype: autocast dtype (single/DDP), FSDP param_dtype
    reduce_dtype: str = "float32"  # gradient reduction dtype (FSDP / DeepSpeed)
    autocast: bool = False
    grad_scaler: bool = False  # dynamic loss scaling (needed for fp16)


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    min_lr: float = 1e-4  # end of the cosine decay
    warmup_steps: int = 20  # linear warm-up from ~0 to lr
    decay_steps: int | None = None  # length of warm-up + cosine; None = train.max_steps
    weight_decay: float = 0.1  # applied to >= 2-D weights only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    fused: bool | None = None  # None: fused AdamW where the device supports it (CUDA)


@dataclass
class WandbConfig:
    mode: str = "online"  # online | offline | disabled
    project: str = "lmforge"
    entity: str | None = None
    name: str | None = None  # run name; default: the run dir's name
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    init_timeout_s: float = 90.0  # online: how long the start-up may take to reach the W&B server
    fallback: str = "none"  # none (an unreachable server ends the run, exit 2) | offline (continue offline, warn once)


@dataclass
class LoggerConfig:
    name: str = "none"  # none | wandb
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class TrainConfig:
    max_steps: int = 1000
    micro_batch_size: int = 8  # sequences per rank per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    seq_len: int = 128
    seed: int = 1337
    activation_checkpointing: str = "none"  # none | full (every block) | selective (op-level SAC)
    compile: bool = False  # torch.compile each block
    # the training loss: fused (the model's chunked LM head + cross-entropy, no [B, T, V] logits; model/loss.py) |
    # chunked_logits (full logits, then train/loss.py's chunked cross-entropy) | torch (F.cross_entropy on fp32
    # logits). Under tensor parallelism the vocabulary-parallel loss runs whatever this says.
    loss_impl: str = "fused"
    device: str = "auto"  # auto (cuda when present, else cpu) | cpu | cuda
    log_every: int = 10
    eval_every: int = 100  # 0 = only at the start and the end
    eval_steps: int = 20  # val micro-batches per eval
    ckpt_every: int = 0  # 0 = only at the end (and on SIGTERM/SIGUSR1)
    keep_last: int = 2  # complete checkpoints kept in checkpoints/
    sample_every: int = 0  # 0 = only at the end; samples come from rank 0
    sample_tokens: int = 64
    sample_prompt: str = "\n"
    sample_temperature: float = 0.8
    sample_top_k: int | None = 200
    max_nan_skips: int = 3  # consecutive non-finite steps skipped before the run stops
    # hang watchdog (train/ops/watchdog.py): a rank stuck this long in one phase of a step writes its stacks to
    # <run.dir>/hang/rank<N>.txt and the job exits 4, naming the ranks behind; 0 = off
    hang_timeout_s: float = 0.0
    straggler_ratio: float = 2.0  # name a rank whose step time is this x the median (every log_every); 0 = off
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower on GPU)
    # test hooks (fault injection): the loss of these steps becomes NaN
    fault_nan_steps: list[int] = field(default_factory=list)
    fault_stall_rank: int | None = None  # this rank stalls at step 2 for 3 x strategy.timeout_s (+5 s)
    fault_error_step: int | None = None  # an unexpected ValueError after this step (an internal error: exit 1)
    fault_enospc_steps: list[int] = field(default_factory=list)  # saving at these steps hits "no space left"
    fault_slow_rank: int | None = None  # this rank sleeps train.fault_slow_s in every step (a straggler)
    fault_slow_s: float = 0.0
    fault_corrupt_samples: list[int] = field(default_factory=list)  # [a, b): steps drawing these global samples
    # get wrong targets (a loss spike)
    trace_samples: bool = False  # each rank writes trace/rank<r>.jsonl with hashes of its samples
    spike: SpikeConfig = field(default_factory=SpikeConfig)  # the loss-spike guard (train/ops/spike.py)
    profile: ProfileConfig = field(default_factory=ProfileConfig)  # torch.profiler traces (train/ops/profiler.py)


@dataclass
class CheckpointConfig:
    """How checkpoints are written (where and how often: ``train.ckpt_every``, ``train.keep_last``)."""

    # DCP async_save: stage the state to CPU memory, write it in a background thread while training goes on (at most
    # one in flight; `latest` moves only to complete checkpoints). DeepSpeed writes its own format synchronously.
    async_save: bool = False


@dataclass
class RunConfig:
    dir: str = "runs/${now:%Y-%m-%d}/${now:%H-%M-%S}"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    resume: str = "auto"  # auto | none | <checkpoint dir or run dir>


# ---------------------------------------------------------------- validation and resolution


class ConfigError(ValueError):
    """A config value that cannot work (one-line message naming the key, the value and what is allowed)."""


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def validate(cfg) -> None:
    """Value checks that the type system cannot express (no I/O beyond stat, no compute)."""
    t = cfg.train
    for key in ("max_steps", "micro_batch_size", "grad_accum", "seq_len", "log_every"):
        v = t[key]
        _check(v >= 1, f"train.{key}={v} must be an integer >= 1")
    for key in ("eval_every", "eval_steps", "ckpt_every", "sample_every", "sample_tokens", "keep_last"):
        _check(t[key] >= 0, f"train.{key}={t[key]} must be >= 0")
    _check(t.max_nan_skips >= 1, f"train.max_nan_skips={t.max_nan_skips} must be >= 1")
    _check(t.hang_timeout_s >= 0, f"train.hang_timeout_s={t.hang_timeout_s} must be >= 0 (0 turns the watchdog off)")
    _check(t.straggler_ratio == 0 or t.straggler_ratio > 1,
           f"train.straggler_ratio={t.straggler_ratio} must be > 1 (or 0 to turn straggler detection off)")
    profile_problem = validate_profile(t.profile)
    _check(profile_problem is None, profile_problem or "")
    spike_problem = validate_spike(t.spike)
    _check(spike_problem is None, spike_problem or "")
    from train.parallelize import AC_MODES

    _check(t.activation_checkpointing in AC_MODES,
           f"train.activation_checkpointing={t.activation_checkpointing!r} is not one of {', '.join(AC_MODES)}")
    _check(t.device in ("auto", "cpu", "cuda"), f"train.device={t.device!r} is not one of auto, cpu, cuda")
    from train.loss import LOSS_IMPLS

    _check(t.loss_impl in LOSS_IMPLS, f"train.loss_impl={t.loss_impl!r} is not one of {', '.join(LOSS_IMPLS)}")
    o = cfg.optim
    _check(o.lr > 0, f"optim.lr={o.lr} must be > 0")
    _check(0 <= o.min_lr <= o.lr, f"optim.min_lr={o.min_lr} must be in [0, optim.lr={o.lr}]")
    _check(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
           f"optim.betas={list(o.betas)} must be two numbers in [0, 1)")
    _check(o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip} must be >= 0 (0 disables clipping)")
    _check(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0")
    _check(cfg.logger.name in ("none", "wandb"), f"logger.name={cfg.logger.name!r} is not one of none, wandb")
    _check(cfg.logger.wandb.mode in ("online", "offline", "disabled"),
           f"logger.wandb.mode={cfg.logger.wandb.mode!r} is not one of online, offline, disabled")
    _check(cfg.logger.wandb.fallback in ("none", "offline"),
           f"logger.wandb.fallback={cfg.logger.wandb.fallback!r} is not one of none, offline")
    _check(cfg.logger.wandb.init_timeout_s > 0, f"logger.wandb.init_timeout_s={cfg.logger.wandb.init_timeout_s} must be > 0")
    _check(cfg.precision.name in ("fp32", "bf16", "fp16"),
           f"precision.name={cfg.precision.name!r} is not one of fp32, bf16, fp16")
    from train.parallel import STRATEGIES

    s = cfg.strategy
    _check(s.name in STRATEGIES, f"strategy.name={s.name!r} is not one of {', '.join(STRATEGIES)}")
    _check(s.timeout_s >= 1, f"strategy.timeout_s={s.timeout_s} must be >= 1")
    _check(s.offload in ("none", "optimizer", "params"),
           f"strategy.offload={s.offload!r} is not one of none, optimizer, params")
    if s.name in ("fsdp", "hsdp"):
        _check(s.offload in ("none", "params"), f"strategy.offload={s.offload!r} is not supported by strategy=fsdp; "
               f"allowed: none, params (params offloads parameters, gradients and optimizer state)")


@dataclass(frozen=True)
class RunSpec:
    """What the config resolves to, computed once before any work and never written back into ``cfg``:
    the model, the parallel layout, the tokenizer, where the weights start from."""

    gpt_config: Any  # model.GPTConfig
    dims: Any  # train.parallel.ParallelDims
    tokenizer: str  # data.tokenizer, or the tokenizer of model.init_from's checkpoint
    init_from: Path | None = None  # model.init_from as a local Hugging Face dir (None: random init)

    def resolved_config(self, cfg) -> dict:
        """``cfg`` as a plain dict with the resolved values filled in (what config.yaml records)."""
        from omegaconf import OmegaConf

        out = OmegaConf.to_container(cfg, resolve=True)
        out["data"]["tokenizer"] = self.tokenizer
        if self.init_from is not None:
            out["model"]["init_from"] = str(self.init_from)
        out["parallel"].update(self.dims.as_dict())
        return out


def build_gpt_config(cfg) -> tuple[Any, Path | None]:
    """(the model config, model.init_from as a local dir or None): the named preset with the non-None
    ``model.*`` fields applied, or the Hugging Face checkpoint's architecture."""
    from omegaconf import OmegaConf

    from model import GPTConfig

    mc = OmegaConf.to_object(cfg.model)
    seq_len = cfg.train.seq_len
    if mc.init_from is not None:  # the architecture is the Hugging Face checkpoint's (train/init_from.py)
        from train.init_from import hf_gpt_config

        gpt, model_dir = hf_gpt_config(mc)
        _check(seq_len <= gpt.block_size,
               f"train.seq_len={seq_len} exceeds block_size={gpt.block_size} of model.init_from="
               f"{mc.init_from!r}; use train.seq_len<={gpt.block_size}")
        return gpt, Path(model_dir)
    gpt = GPTConfig.from_name(mc.preset, **mc.overrides())
    _check(seq_len <= gpt.block_size,
           f"train.seq_len={seq_len} exceeds the model's block_size={gpt.block_size} "
           f"(model={mc.preset}); use train.seq_len<={gpt.block_size} or model.block_size=...")
    return gpt, None


def _tokenizer_name(cfg, gpt_config, init_from: Path | None) -> str:
    """``data.tokenizer``, or with ``model.init_from`` and no explicit choice the checkpoint's tokenizer."""
    if init_from is None:
        return cfg.data.tokenizer
    from hydra.core.hydra_config import HydraConfig

    from train.init_from import resolve_tokenizer

    explicit = cfg.data.tokenizer != "gpt2"  # not the default; on the CLI even "gpt2" counts as a choice
    if HydraConfig.initialized():
        explicit = explicit or any(o.lstrip("+~").split("=", 1)[0] == "data.tokenizer"
                                   for o in HydraConfig.get().overrides.task)
    return resolve_tokenizer(cfg.data.tokenizer, explicit, init_from, gpt_config)


def resolve(cfg, world_size: int) -> RunSpec:
    """Validate ``cfg`` and resolve it for ``world_size`` ranks (no process group, no run dir, no compute).
    Raises ValueError with one line naming the bad value and what is allowed."""
    from train.parallel.dims import ParallelDims
    from train.parallel.tp import check_tp_divides

    validate(cfg)
    gpt, init_from = build_gpt_config(cfg)
    dims = ParallelDims.resolve(cfg.strategy.name, cfg.parallel, world_size, int(cfg.strategy.replicate_degree))
    if dims.pp > 1:
        from train.parallel.pipeline import check_pipeline

        check_pipeline(dims.pp, cfg.parallel, gpt.n_layer, cfg.train.micro_batch_size, cfg.train.grad_accum,
                       compile=bool(cfg.train.compile), fsdp=dims.fsdp)
    if dims.tp > 1:
        check_tp_divides(gpt.n_head, gpt.n_kv_head, dims.tp)
        _check(cfg.train.seq_len % dims.tp == 0, f"train.seq_len={cfg.train.seq_len} must be a multiple of "
               f"parallel.tp={dims.tp} (sequence parallel splits every sequence over the tensor-parallel ranks)")
    tokenizer = _tokenizer_name(cfg, gpt, init_from)
    if cfg.data.document_mask:  # attention stops at the tokenizer's end-of-text token (model/gpt.py doc_mask_token)
        import dataclasses

        from train.data.tokenizer import document_mask_token

        gpt = dataclasses.replace(gpt, doc_mask_token=document_mask_token(tokenizer, gpt.vocab_size))
    return RunSpec(gpt_config=gpt, dims=dims, tokenizer=tokenizer, init_from=init_from)


def register_configs() -> None:
    """Register the schema so ``conf/config.yaml`` (``defaults: [base_config, ...]``) is typed."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)


register_configs()
