"""Typed (structured) configs behind the Hydra tree in ``conf/``.

Every YAML file in ``conf/`` is merged onto these dataclasses, so a misspelt key or a value of the
wrong type fails in Hydra's composition step, before any work is done. Precedence is Hydra's:
CLI override > experiment YAML > group YAML > the dataclass defaults below.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from train.data.config import DataConfig  # the data engineer's dataclass defines data.* keys


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

    name: str = "single"  # single | ddp | fsdp | zero1 | zero2 | zero3
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
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower on GPU)
    # test hooks (fault injection): the loss of these steps becomes NaN
    fault_nan_steps: list[int] = field(default_factory=list)
    fault_stall_rank: int | None = None  # this rank stalls at step 2 for 3 x strategy.timeout_s (+5 s)
    trace_samples: bool = False  # each rank writes trace/rank<r>.jsonl with hashes of its samples


@dataclass
class RunConfig:
    dir: str = "runs/${now:%Y-%m-%d}/${now:%H-%M-%S}"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    resume: str = "auto"  # auto | none | <checkpoint dir or run dir>


def register_configs() -> None:
    """Register the schema so ``conf/config.yaml`` (``defaults: [base_config, ...]``) is typed."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)


register_configs()
