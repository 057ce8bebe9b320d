"""Pre-flight planner: per-GPU memory and step time of model x parallel dims x nodes x GPUs x AC, before launch.

    python -m train.plan model=falcon-40b strategy=fsdp nodes=4 gpus=8 micro_batch=1 seq_len=2048 ac=full
    python -m train.plan model=falcon-40b tp=8 dp_shard=-1 nodes=4 gpus=8 seq_len=2048 ac=full
    python -m train.plan --model gpt2-124m --strategy ddp --json

Parallel dims are the trainer's `parallel.*` group: tp, dp_shard (-1 = the rest of the world),
dp_replicate and pp, with tp x pp x dp_replicate x dp_shard = nodes x gpus; `strategy` stays a
shorthand (ddp = dp_replicate, fsdp = dp_shard, hsdp = both, zero* = DeepSpeed over the data-parallel
dims, never with tp or pp). Under pp > 1 the plan is per pipeline rank (`pipeline_memory`): the
binding memory is the fullest rank's, the step time includes the schedule's bubble and the
point-to-point activation traffic. docs/parallelism.md says how to pick them;

    python -m train.plan model=falcon-40b --search nodes=4 gpus=8

enumerates the layouts (tp, pp, dp_replicate, dp_shard, micro-batch, AC, schedule), drops those that
do not fit and ranks the rest by estimated tokens/s (`search`).

Every figure is an analytic estimate from the model's shape (built on the `meta` device: free for 40B)
and the strategy's storage rules; docs/performance.md states each rule and how it was validated
against measured peaks (benchmarks/plan_vs_measured.py).

Memory model (bytes on one GPU at the step's peak):
  parameters, gradients, optimizer states  the storage of each strategy (table in `_state_bytes_per_param`)
                                           of one tensor-parallel rank's parameters (`tp_split`), divided
                                           by the shard group where the strategy shards it (dp_shard);
  activations                              what autograd saves per token per block for our Block
                                           (counted tensor by tensor, Korthikanti et al. 2022 style
                                           but without the T x T score matrix: SDPA/flash recomputes
                                           it), the LM head's logits/log-softmax, and one recomputed
                                           block under full AC;
  communication buffers                    FSDP: the largest unit gathered twice (current + prefetch)
                                           plus its unsharded gradient; ZeRO: DeepSpeed's buckets;
                                           DDP: gradient buckets (one copy of the gradients);
  fragmentation margin                     a fraction of the above (CUDA caching allocator).
The peak is parameters + optimizer + max(activations at the start of backward, gradients + the
optimizer step's temporaries): gradients are freed (set to None) before the next forward, and they
grow during backward while activations shrink, so the sum of both is never live at once (unless
grad_accum > 1 keeps gradients across micro-batches).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, NoReturn

from model.loss import chunk_tokens as fused_chunk_tokens
from train.loss import LOSS_IMPLS
from train.loss import chunk_tokens as loss_chunk_tokens
from train.metrics import GPU_DATASHEETS
from train.parallel.pipeline import SCHEDULES as _PP_SCHEDULES
from train.parallel.pipeline import ZERO_BUBBLE, PipelineLayout, check_pipeline

STRATEGIES = ("single", "ddp", "fsdp", "hsdp", "zero1", "zero2", "zero3")
OFFLOADS = ("none", "optimizer", "params")
PRECISIONS = ("fp32", "bf16", "fp16")
AC_MODES = ("none", "selective", "full")
OPTIMIZERS = ("fused", "foreach", "forloop")
PP_SCHEDULES = tuple(_PP_SCHEDULES)

# the GPUs whose datasheet carries every precision the planner models (train/metrics.py holds the figures)
GPU_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    key: peaks for key, (_match, peaks) in GPU_DATASHEETS.items() if all(v is not None for v in peaks.values())
}
GIB = 1024**3
# DeepSpeed's defaults (elements) for the buckets it allocates; see
# https://www.deepspeed.ai/docs/config-json/#zero-optimizations-for-fp16-training
DS_REDUCE_BUCKET = 500_000_000
DS_ALLGATHER_BUCKET = 500_000_000
DS_STAGE3_PREFETCH_BUCKET = 50_000_000
DS_STAGE3_MAX_LIVE_PARAMS = 1_000_000_000


@dataclass
class PlanArgs:
    """One planning question; every field has a CLI flag of the same name."""

    model: str = "gpt2-124m"
    strategy: str = "fsdp"
    offload: str = "none"
    nodes: int = 1
    gpus: int = 8
    gpu_mem_gb: float = 80.0
    micro_batch: int = 1
    grad_accum: int = 1
    seq_len: int = 1024
    precision: str = "bf16"
    ac: str = "none"
    mfu: float = 0.4
    gpu: str = "h100"
    peak_tflops: float | None = None  # overrides the GPU table (e.g. a CPU or an unlisted GPU)
    frag: float = 0.05  # fraction of the allocated peak kept as fragmentation margin
    context_gb: float = 1.0  # CUDA context + cuBLAS/NCCL workspaces, outside torch's allocator
    intra_node_gbps: float = 300.0  # GB/s a GPU sustains in an intra-node collective (NVLink busbw)
    inter_node_gbps: float = 50.0  # GB/s per GPU across nodes (one 400 Gb/s NIC per GPU)
    hsdp_shard: int = 0  # hsdp: GPUs in one shard group (0 = one node); replicas = nodes * gpus / hsdp_shard
    # the trainer's parallel.* dims; None = what `strategy` implies (see `resolve_dims`)
    tp: int = 1  # tensor (+ sequence) parallel degree: contiguous ranks, inside a node when it fits
    pp: int = 1  # pipeline parallel degree (train/parallel/pipeline.py); the pp_* fields are the trainer's
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved_1f1b | interleaved_zero_bubble | zero_bubble
    pp_microbatches: int | None = None  # per optimizer step; None = the trainer's default (check_pipeline)
    pp_stages_per_rank: int | None = None  # virtual stages per rank (interleaved: 2 by default; zero_bubble: 2)
    pp_layers_per_stage: list[int] | None = None  # explicit blocks per stage; None = balanced (split_layers)
    dp_replicate: int | None = None  # data-parallel replicas (DDP, or the replicated dim of HSDP)
    dp_shard: int | None = None  # FSDP2 shard group size; -1 = the rest of the world
    optimizer: str = "fused"  # AdamW kernel: fused (no step temporaries) | foreach | forloop (torch's CPU default)
    ddp_bucket_view: bool = False  # DDP(gradient_as_bucket_view=True) shares buckets with the gradients
    loss_impl: str = "fused"  # the trainer's train.loss_impl: fused | chunked_logits | torch (tp > 1: vocab-parallel)

    def validate(self) -> None:
        """One-line ValueError naming the bad value and what is allowed."""
        _choice("strategy", self.strategy, STRATEGIES)
        _choice("offload", self.offload, OFFLOADS)
        _choice("precision", self.precision, PRECISIONS)
        _choice("ac", self.ac, AC_MODES)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("loss_impl", self.loss_impl, LOSS_IMPLS)
        _choice("pp_schedule", self.pp_schedule, PP_SCHEDULES)
        for name in ("nodes", "gpus", "micro_batch", "grad_accum", "seq_len", "tp", "pp"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name}={v!r} must be a positive integer")
        for name in ("gpu_mem_gb", "intra_node_gbps", "inter_node_gbps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be > 0")
        if not 0 < self.mfu <= 1:
            raise ValueError(f"mfu={self.mfu!r} must be in (0, 1]")
        if not 0 <= self.frag < 1:
            raise ValueError(f"frag={self.frag!r} must be in [0, 1)")
        if self.context_gb < 0:
            raise ValueError(f"context_gb={self.context_gb!r} must be >= 0")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ValueError(f"peak_tflops={self.peak_tflops!r} must be > 0")
        if self.peak_tflops is None and self.gpu not in GPU_PEAK_TFLOPS:
            raise ValueError(
                f"gpu={self.gpu!r} is not in the peak table ({', '.join(GPU_PEAK_TFLOPS)}); "
                "pass peak_tflops=<dense TFLOP/s> for another device"
            )
        if self.hsdp_shard < 0 or (self.strategy == "hsdp" and self.hsdp_shard
                                   and (self.nodes * self.gpus) % self.hsdp_shard):
            raise ValueError(f"hsdp_shard={self.hsdp_shard} must divide the {self.nodes * self.gpus} GPUs "
                             "(0 = one node)")
        resolve_dims(self)
        if self.offload != "none" and self.strategy in ("single", "ddp"):
            raise ValueError(f"offload={self.offload} needs a sharded strategy (fsdp, hsdp, zero1-3), not {self.strategy}")
        if self.offload == "params" and self.strategy in ("zero1", "zero2"):
            raise ValueError(f"offload=params needs zero3, fsdp or hsdp (zero1/zero2 keep full parameters), not {self.strategy}")
        if self.offload == "optimizer" and self.strategy in ("fsdp", "hsdp"):
            raise ValueError(
                "offload=optimizer is a DeepSpeed option (zero1-3); FSDP2 offloads parameters, gradients and "
                "optimizer together: use offload=params"
            )


def _choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of: {', '.join(allowed)}")


# ---- parallel dims ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Dims:
    """Resolved parallel degrees, mesh order (pp, dp_replicate, dp_shard, tp): tp innermost = contiguous ranks;
    `engine` is what holds the data-parallel state: single (none), ddp, fsdp / hsdp (FSDP2, HSDP when
    dp_replicate > 1), zero1-3 (DeepSpeed)."""

    pp: int
    dp_replicate: int
    dp_shard: int
    tp: int
    engine: str

    @property
    def dp(self) -> int:
        """Data-parallel ranks (model replicas that see different samples)."""
        return self.dp_replicate * self.dp_shard

    @property
    def world(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.tp

    def as_dict(self) -> dict[str, int]:
        return {"tp": self.tp, "pp": self.pp, "dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard}


def resolve_dims(a: PlanArgs) -> Dims:
    """The parallel dims of `a` as the trainer resolves `parallel.*` (train/parallel/dims.py): dims left
    at None are filled in by the strategy shorthand; one-line ValueError when they do not multiply to
    nodes x gpus.

    Shorthands: single = dp_shard=-1 (only with explicit dims: alone it is one GPU); ddp = dp_replicate=-1;
    fsdp = dp_shard=-1; hsdp = dp_shard=one node's TP groups (hsdp_shard GPUs when given) x dp_replicate=-1;
    zero1-3 = DeepSpeed over dp_shard=-1 (data parallel only: no tp). -1 = the rest of the world. The
    native engine is FSDP2 when strategy is fsdp/hsdp, dp_shard > 1, or tp > 1 or pp > 1 with replicas (DDP
    cannot hold TP's DTensor parameters; under PP data parallelism is FSDP2 / HSDP per stage, as
    train/parallel/dims.py resolves it); else DDP when dp_replicate > 1; else none.
    """
    world = a.nodes * a.gpus
    tp, pp = a.tp, a.pp
    for name in ("dp_replicate", "dp_shard"):
        v = getattr(a, name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < -1 or v == 0):
            raise ValueError(f"{name}={v!r} must be an integer >= 1, or -1 for the rest of the world")
    if a.strategy.startswith("zero") and pp > 1:
        raise ValueError(f"strategy={a.strategy} is DeepSpeed data parallelism and cannot combine with pp={pp}; "
                         f"use the native FSDP2 per stage (strategy=fsdp dp_shard=-1 pp={pp})")
    if a.strategy.startswith("zero") and tp > 1:
        raise ValueError(f"strategy={a.strategy} is DeepSpeed data parallelism and cannot combine with tp={tp}; "
                         f"use the native FSDP2 with tp (strategy=fsdp dp_shard=-1 tp={tp})")
    explicit = a.dp_replicate is not None or a.dp_shard is not None or tp > 1 or pp > 1
    if a.strategy == "single" and not explicit and world != 1:
        raise ValueError(f"strategy=single runs on one GPU but nodes x gpus = {a.nodes} x {a.gpus} = {world}; use "
                         "strategy=ddp|fsdp|hsdp|zero1|zero2|zero3, or set dims (e.g. tp=2)")
    if a.strategy == "hsdp" and a.hsdp_shard and a.dp_shard is not None and a.dp_shard != a.hsdp_shard:
        raise ValueError(f"hsdp_shard={a.hsdp_shard} and dp_shard={a.dp_shard} disagree; give one (dp_shard)")
    defaults = {"ddp": (-1, 1), "hsdp": (-1, a.hsdp_shard or max(1, a.gpus // tp))}.get(a.strategy, (1, -1))
    rep_ = a.dp_replicate if a.dp_replicate is not None else defaults[0]
    shard = a.dp_shard if a.dp_shard is not None else defaults[1]
    if rep_ == -1 and shard == -1:
        raise ValueError("dp_replicate=-1 and dp_shard=-1: at most one dim can take the rest of the world")
    fixed = tp * pp * max(rep_, 1) * max(shard, 1)
    if -1 in (rep_, shard):
        if world % fixed:
            rest = "dp_shard" if shard == -1 else "dp_replicate"
            raise ValueError(f"tp={tp} x pp={pp} x {_fixed_dp(rep_, shard)} = {fixed} GPUs does not divide nodes x "
                             f"gpus = {a.nodes} x {a.gpus} = {world} ({rest}=-1 takes the rest)")
        rep_, shard = (world // fixed, shard) if rep_ == -1 else (rep_, world // fixed)
    product = tp * pp * rep_ * shard
    if product != world:
        raise ValueError(f"tp={tp} x pp={pp} x dp_replicate={rep_} x dp_shard={shard} = {product} GPUs, "
                         f"but nodes x gpus = {a.nodes} x {a.gpus} = {world}")
    if a.strategy.startswith("zero"):
        engine = a.strategy
    elif shard > 1 or a.strategy in ("fsdp", "hsdp") or ((tp > 1 or pp > 1) and rep_ > 1):
        engine = "hsdp" if rep_ > 1 else "fsdp"
    else:
        engine = "ddp" if rep_ > 1 else "single"
    return Dims(pp=pp, dp_replicate=rep_, dp_shard=shard, tp=tp, engine=engine)


def _fixed_dp(rep_: int, shard: int) -> str:
    return f"dp_replicate={rep_}" if rep_ != -1 else f"dp_shard={shard}"


# ---- model shape ------------------------------------------------------------------------------


@dataclass
class ModelShape:
    """What the planner needs from a GPTConfig, counted on a `meta`-device model."""

    name: str
    n_params: int  # every parameter once (tied embeddings once)
    n_params_non_embedding: int  # model.stats' N: everything that takes part in a matmul
    block_params: int  # one transformer block (an FSDP unit)
    root_params: int  # embeddings + final norm + untied LM head (the root FSDP unit)
    largest_param: int  # biggest single tensor (the for-loop AdamW's temporaries are this size)
    flops_per_token: float  # model.stats.flops_per_token (6N + 12 L H Q T)
    n_layer: int
    n_embd: int
    n_head: int
    head_dim: int
    q_dim: int
    kv_dim: int
    ffn_hidden: int
    vocab_size: int
    mlp: str
    norm: str
    norm_offset: bool
    pos: str
    parallel_residual: bool
    shared_attn_norm: bool
    tie_embeddings: bool
    n_kv_head: int = 0
    # (name, shape) of every parameter of one block and of the root (tied: once, as tok_emb.weight); what
    # `tp_split` shards
    block_tensors: tuple[tuple[str, tuple[int, ...]], ...] = ()
    root_tensors: tuple[tuple[str, tuple[int, ...]], ...] = ()


def model_shape(name: str, seq_len: int, **overrides: Any) -> ModelShape:
    """Counts of the preset `name` (with GPTConfig `overrides`), built on the meta device."""
    import torch

    from model.config import GPTConfig
    from model.gpt import GPT
    from model.stats import count_params, flops_per_token

    cfg = GPTConfig.from_name(name, **overrides)
    if seq_len > cfg.block_size:
        raise ValueError(f"seq_len={seq_len} exceeds {name}'s block_size={cfg.block_size}")
    with torch.device("meta"):
        gpt = GPT(cfg)
    unique = {id(p): p for p in gpt.parameters()}.values()
    block = sum(p.numel() for p in gpt.blocks[0].parameters())
    block_tensors = tuple((n, tuple(p.shape)) for n, p in gpt.blocks[0].named_parameters())
    root_tensors = tuple((n, tuple(p.shape)) for n, p in gpt.named_parameters() if not n.startswith("blocks."))
    counts = count_params(cfg)
    return ModelShape(
        name=name, n_params=counts.total, n_params_non_embedding=counts.non_embedding, block_params=block,
        root_params=counts.total - cfg.n_layer * block, largest_param=max(p.numel() for p in unique),
        flops_per_token=float(flops_per_token(cfg, seq_len)), n_layer=cfg.n_layer, n_embd=cfg.n_embd,
        n_head=cfg.n_head, head_dim=cfg.head_dim, q_dim=cfg.q_dim, kv_dim=cfg.kv_dim, ffn_hidden=cfg.ffn_hidden,
        vocab_size=cfg.vocab_size, mlp=cfg.mlp, norm=cfg.norm, norm_offset=cfg.norm_offset, pos=cfg.pos,
        parallel_residual=cfg.parallel_residual, shared_attn_norm=cfg.shared_attn_norm,
        tie_embeddings=cfg.tie_embeddings, n_kv_head=cfg.n_kv_head, block_tensors=block_tensors,
        root_tensors=root_tensors,
    )


# ---- tensor parallelism -----------------------------------------------------------------------

# the trainer's TP plan (Megatron / torchtitan): these Linears are split by output features (heads, FFN
# columns), these by input features; the embedding and the LM head by vocabulary rows; the rest is replicated
_COLWISE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
_ROWWISE = ("o_proj", "down_proj")
_VOCAB = ("tok_emb", "lm_head")


def tp_shard_dim(name: str, kv_replicated: bool) -> int | None:
    """The dimension tensor parallelism splits parameter `name` on, None where every TP rank holds it whole
    (norms, the row-wise layers' biases, learned positions, and K/V projections when tp does not divide n_kv_head)."""
    module, kind = name.split(".")[-2:]
    if module in ("k_proj", "v_proj") and kv_replicated:
        return None
    if module in _COLWISE or module in _VOCAB:
        return 0  # colwise weight [out, in] and its bias; embedding / LM head [V, C]
    if module in _ROWWISE:
        return 1 if kind == "weight" else None  # the bias is added once, after the reduction
    return None


def _chunk(n: int, parts: int, rank: int) -> int:
    """Rows `rank` holds when n rows are split in `parts` (DTensor's torch.chunk rule: ceil-sized, last smaller)."""
    size = -(-n // parts)
    return max(0, min(size, n - rank * size))


@dataclass(frozen=True)
class TPSplit:
    """Parameter counts under tensor parallelism of degree `tp` (tp=1: the whole model)."""

    tp: int
    kv_replicated: bool  # tp does not divide n_kv_head: K/V projections whole on every TP rank
    sharded: int  # model parameters split over the TP group (each counted once)
    replicated: int  # model parameters every TP rank holds whole; sharded + replicated = n_params
    per_rank: tuple[int, ...]  # local parameters of each TP rank
    local: int  # the largest rank's (rank 0: uneven splits give it the ceil)
    local_block: int  # one block on that rank (an FSDP unit)
    local_root: int  # embeddings + final norm + untied LM head on that rank
    local_non_embedding: int  # its share of model.stats' N (every matmul parameter)
    local_largest: int  # its biggest tensor
    vocab_local: int  # LM-head rows (vocabulary entries) on that rank


def tp_split(s: ModelShape, tp: int) -> TPSplit:
    """Split of `s` over `tp` ranks; ValueError when tp does not fit the heads."""
    if s.n_head % tp:
        raise ValueError(f"tp={tp} must divide n_head={s.n_head} of {s.name} (attention heads are split over TP ranks)")
    if s.n_kv_head % tp and tp % s.n_kv_head:
        raise ValueError(f"tp={tp} must divide n_kv_head={s.n_kv_head} of {s.name} or be a multiple of it "
                         "(then the K/V projections are replicated)")
    kv_replicated = s.n_kv_head % tp != 0
    sharded = replicated = 0
    per_rank = [0] * tp
    block_local = [0] * tp
    lookup_local = [0] * tp  # the input lookup tables (not in N): untied token embedding, learned positions
    largest = 0
    for tensors, times, in_block in ((s.block_tensors, s.n_layer, True), (s.root_tensors, 1, False)):
        for name, shape in tensors:
            numel = 1
            for d in shape:
                numel *= d
            dim = tp_shard_dim(name, kv_replicated) if tp > 1 else None
            for r in range(tp):
                local = numel if dim is None else numel // shape[dim] * _chunk(shape[dim], tp, r)
                per_rank[r] += times * local
                if in_block:
                    block_local[r] += local
                is_lookup = name == "pos_emb.weight" or (name == "tok_emb.weight" and not s.tie_embeddings)
                if is_lookup:
                    lookup_local[r] += local
                if r == 0:
                    largest = max(largest, local)
            if dim is None:
                replicated += times * numel
            else:
                sharded += times * numel
    return TPSplit(
        tp=tp, kv_replicated=kv_replicated, sharded=sharded, replicated=replicated, per_rank=tuple(per_rank),
        local=per_rank[0], local_block=block_local[0], local_root=per_rank[0] - s.n_layer * block_local[0],
        local_non_embedding=per_rank[0] - lookup_local[0], local_largest=largest,
        vocab_local=_chunk(s.vocab_size, tp, 0),
    )


# ---- activations ------------------------------------------------------------------------------


def _norm_bytes(s: ModelShape, resid: int, autocast: bool) -> tuple[float, float, bool]:
    """(input bytes, other saved bytes, input is a private copy) per token for one norm.

    LayerNorm saves its input (under autocast an fp32 copy when the stream is 16-bit) and mean/rstd.
    Our RMSNorm computes in fp32: it saves x.float() (a copy when the stream is 16-bit), rstd and the
    normalized x (fp32 with Gemma's (1 + w) offset, else in the stream dtype).
    """
    h = s.n_embd
    if s.norm == "layernorm":
        copy = autocast and resid != 4
        return (4 if copy else resid) * h, 8.0, copy
    return 4.0 * h, 4.0 + (4 * h if s.norm_offset else resid * h), resid != 4


def _norm_output_is_fp32(s: ModelShape, resid: int, autocast: bool) -> bool:
    # autocast runs layer_norm in fp32; RMSNorm returns the stream dtype
    return resid == 4 or (autocast and s.norm == "layernorm")


def _kv_widths(s: ModelShape, tp: int, kv_replicated: bool) -> tuple[float, float]:
    """Widths of the K and V that SDPA saves on one TP rank. Split K/V: kv_dim / tp each. Replicated K/V
    (train/parallel/tp.py ReplicatedKVParallel): each rank computes them whole and keeps the one K/V head its
    query heads read, as a view of the whole output; V is saved as that view (its whole storage stays alive),
    K is rebuilt by RoPE as a fresh one-head tensor (without RoPE it stays a view too)."""
    if not kv_replicated:
        return s.kv_dim / tp, s.kv_dim / tp
    return (s.head_dim if s.pos == "rope" else s.kv_dim), s.kv_dim


def block_saved_bytes_per_token(s: ModelShape, act: int, resid: int, autocast: bool, micro_batch: int,
                                tp: int = 1, kv_replicated: bool = False) -> float:
    """Bytes autograd keeps per token for one Block's backward (no checkpointing), weight casts excluded.

    `act` = bytes of a compute-dtype element, `resid` = bytes of the residual stream (fp32 under
    single/DDP autocast: embeddings and parameters are fp32; 16-bit when the parameters are, as under
    FSDP2's MixedPrecisionPolicy or DeepSpeed). Counted op by op from model/gpt.py's Block
    (tests/test_plan.py checks it against the tensors autograd saves):
      norms     `_norm_bytes`; with parallel residual both norms read the same x (saved once unless
                each makes its own copy)
      linears   their input: the norm output, shared by q/k/v (and gate/up); under autocast an fp32
                norm output is cast once per linear (three 16-bit copies for q, k, v)
      SDPA      q, k, v (k, v at n_kv_head width: enable_gqa), output, fp32 log-sum-exp per head; never
                the T x T matrix. o_proj reads the output in place (no copy)
      RoPE      cos/sin cast to the compute dtype (2 tables of T x head_dim per q and k)
      MLP       gelu: up output (saved by gelu) + gelu output (saved by down);
                gated: gate, act(gate), up, act(gate) * up
    Dropout is taken as 0 (all presets); p > 0 adds masks and disables flash attention.

    Per token of the micro-batch, on one of `tp` tensor-parallel ranks with sequence parallelism (torch's
    SequenceParallel norms + PrepareModuleInput(Replicate) on attention and MLP + colwise/rowwise Linears):
    the norms run on T/tp tokens (their bytes / tp); each branch (attention, MLP) all-gathers its input to
    the full sequence and its Linears save that [B, T, C] tensor (whole: not divided; one gathered copy per
    branch, so Falcon-7B's shared norm output is saved twice); SDPA and the MLP run on n_head/tp heads and
    ffn/tp columns (/ tp; K/V whole when replicated); the RoPE tables cover the full sequence.
    """
    h, f = s.n_embd, s.ffn_hidden
    n_norms = 1 if (s.parallel_residual and s.shared_attn_norm) else 2
    norm_in, norm_other, norm_copy = _norm_bytes(s, resid, autocast)
    n_inputs = 1 if (s.parallel_residual and not norm_copy) else n_norms
    total = (n_inputs * norm_in + n_norms * norm_other) / tp  # sequence parallel: T/tp tokens per rank
    gated = s.mlp != "gelu"
    if autocast and act != 4 and _norm_output_is_fp32(s, resid, autocast):
        total += act * h * (3 + (2 if gated else 1))  # one cast per linear
    else:
        total += act * h * (2 if tp > 1 else n_norms)  # TP: each branch saves its own all-gathered input
    k_w, v_w = _kv_widths(s, tp, kv_replicated)
    total += act * (s.q_dim / tp + k_w + v_w + s.q_dim / tp) + 4 * s.n_head / tp
    if s.pos == "rope" and act != 4:
        total += 4 * act * s.head_dim / micro_batch
    total += act * f * (4 if gated else 2) / tp
    return float(total)


def block_selective_bytes_per_token(s: ModelShape, act: int, resid: int, tp: int = 1,
                                    kv_replicated: bool = False) -> float:
    """Bytes per token one Block holds under train.parallelize's op-level selective AC: its input plus
    the outputs of every matmul (q, k, v, o, up/gate, down) and of SDPA (output + log-sum-exp).

    Under TP + SP: the input is a sequence shard (/ tp), the colwise outputs and SDPA are split by heads
    and columns (/ tp), and the row-wise matmuls' outputs are the full-sequence partial sums before their
    reduce-scatter (whole)."""
    h, f = s.n_embd, s.ffn_hidden
    # the K/V matmul outputs are whole on every rank when replicated
    kv = s.kv_dim if kv_replicated else s.kv_dim / tp
    mm = s.q_dim / tp + 2 * kv + h + (2 if s.mlp != "gelu" else 1) * f / tp + h
    return float(resid * h / tp + act * mm + act * s.q_dim / tp + 4 * s.n_head / tp)


@dataclass
class ActivationEstimate:
    """Bytes of one micro-batch's activations at the moments that can be the step's peak."""

    saved_blocks: float  # kept by all blocks from forward to backward
    head_inputs: float  # token ids, final norm input, LM-head input
    logits: float  # the model's output, freed once the loss has its gradient (0 for the fused loss: never formed)
    loss_temps: float  # chunked_logits: the logits' gradient (same bytes) + one fp32 chunk of the loss;
    # fused: the hidden states' and the head weight's gradients (fp32) + one chunk's V-wide buffers
    recompute_block: float  # one block re-run in backward (AC)
    weight_casts_forward: float  # autocast's 16-bit weight cache, alive until autocast exits
    weight_casts_kept: float  # the part of it saved for backward
    block_input: float  # one block's input (what full AC keeps)
    tied_grad_sum: float  # tied embedding: its lookup gradient and the sum with the LM head's, per grad byte

    def peak(self, grads: float, grads_root: float, grad_bytes: float = 4.0) -> float:
        """Peak bytes from forward through backward, gradients allocated in backward included.

        The loss (train.loss) computes the logits' gradient in its forward, a chunk of tokens at a time,
        and the logits are then dropped: so besides the end of forward the candidates are the loss itself
        (logits + their gradient + one fp32 chunk), the LM head's backward (the logits' gradient next to
        the head's weight gradient), the top block's backward and the end of backward (all gradients;
        with tied embeddings the lookup's dense gradient and its out-of-place sum with the LM head's).
        """
        end_forward = self.saved_blocks + self.head_inputs + self.logits + self.weight_casts_forward
        loss = self.saved_blocks + self.head_inputs + self.logits + self.weight_casts_kept + self.loss_temps
        head_bwd = self.saved_blocks + self.head_inputs + self.logits + self.weight_casts_kept + grads_root
        top_block = (self.saved_blocks - self.block_input + self.recompute_block + self.weight_casts_kept
                     + grads_root)
        bottom = grads + self.block_input + self.tied_grad_sum * grad_bytes
        bottom_block = grads + self.recompute_block + self.block_input
        return max(end_forward, loss, head_bwd, top_block, bottom, bottom_block)


def activation_bytes(s: ModelShape, micro_batch: int, seq_len: int, ac: str, act: int, resid: int,
                     autocast: bool, weight_casts: bool = False, fp16: bool = False,
                     split: TPSplit | None = None, loss_impl: str = "chunked_logits") -> ActivationEstimate:
    """Activation bytes of one micro-batch (micro_batch x seq_len tokens) on one device.

    none       every block's saved tensors (`block_saved_bytes_per_token`);
    selective  every block keeps its input + matmul/SDPA outputs, backward recomputes the pointwise ops;
    full       every block keeps only its input; backward recomputes one block at a time;
    plus the head: the logits (compute dtype), and in the loss their gradient (same dtype; fp32 under
    fp16) and one chunk of fp32 temporaries (train.loss): V-wide tensors that still dominate small models.

    With a tensor-parallel `split` (sequence parallel between blocks): block inputs and the final norm are
    sequence shards (/ tp), the LM head saves its all-gathered full-sequence input, and the logits and their
    gradient are vocabulary shards [B, T, V/tp]. The loss is `F.cross_entropy(logits.float())` under
    `loss_parallel` (train/parallel/engine.py): not chunked, it keeps fp32 temporaries over the whole shard,
    counted as 12 bytes per local vocabulary entry per token beside the logits (the fp32 copy, the shifted
    logits and their exp in forward; the saved log-softmax, the NLL's and the log-softmax's gradients in backward).

    `loss_impl` (train.loss_impl; without TP): `chunked_logits` as above; `torch` = F.cross_entropy(logits.float()),
    12 bytes per vocabulary entry per token beside the logits; `fused` (model/loss.py) never forms the logits: the
    loss holds the hidden states' gradient [B*T, C] (compute dtype; fp32 under fp16), the head weight's gradient
    [V, C] in fp32 (summed chunk by chunk; it becomes the parameter's gradient) and one chunk's V-wide buffers
    (fp32 [c, V]; with 16-bit compute also the 16-bit logits of the chunk, then its 16-bit gradient, and under bf16
    the chunk's 16-bit [V, C] weight-gradient product), plus a 16-bit copy of an fp32 head weight (autocast does not
    cast it: the loss does, for its own duration; an fp16 weight is instead read as fp32 by the gradient matmuls).
    """
    split = split or TPSplit(tp=1, kv_replicated=False, sharded=0, replicated=s.n_params, per_rank=(s.n_params,),
                             local=s.n_params, local_block=s.block_params, local_root=s.root_params,
                             local_non_embedding=s.n_params_non_embedding, local_largest=s.largest_param,
                             vocab_local=s.vocab_size)
    tp, kv_rep = split.tp, split.kv_replicated
    tokens = micro_batch * seq_len
    h, V, L = s.n_embd, split.vocab_local, s.n_layer
    per_block = block_saved_bytes_per_token(s, act, resid, autocast, micro_batch, tp, kv_rep) * tokens
    block_input = resid * h * tokens / tp
    if ac == "none":
        saved, recompute = L * per_block, 0.0
    elif ac == "full":
        saved, recompute = L * block_input, per_block
    elif ac == "selective":
        saved, recompute = L * block_selective_bytes_per_token(s, act, resid, tp, kv_rep) * tokens, per_block
    else:
        raise ValueError(f"ac={ac!r} is not allowed; choose one of: {', '.join(AC_MODES)}")
    norm_in, norm_other, _ = _norm_bytes(s, resid, autocast)
    head_inputs = (8 + (norm_in + norm_other) / tp + act * h) * tokens
    casts_all = casts_kept = 0.0
    if weight_casts:  # autocast over fp32 parameters
        casts_all = 2.0 * split.local_non_embedding  # every matmul weight, cached for the forward
        head_w = V * h
        casts_kept = casts_all if ac == "none" else 2.0 * head_w  # checkpointed blocks recompute theirs
        recompute += 2.0 * split.local_block if ac != "none" else 0.0
    logits = act * V * tokens
    if tp > 1 or loss_impl == "torch":
        # F.cross_entropy on fp32 logits (TP: loss_parallel over the whole vocabulary shard): the fp32
        # log-softmax + two V-wide gradients
        loss_temps = 12.0 * V * tokens
    elif loss_impl == "fused":  # model/loss.py: no logits; gradients formed chunk by chunk in the forward
        c = min(tokens, fused_chunk_tokens(V))
        logits = 0.0
        if act == 4:
            chunk = 4.0 * c * V  # one fp32 [c, V] buffer, every step in place
        else:  # 16-bit logits + their fp32 copy, then the fp32 copy + the 16-bit gradient (fp16: kept fp32)
            chunk = 6.0 * c * V
            if not fp16:
                chunk = max(chunk, 2.0 * c * V + 2.0 * V * h)  # bf16: the chunk's [V, C] weight-gradient product
        head_w = V * h
        if weight_casts:  # fp32 master weight: cast to 16 bits by the loss, not by autocast (no cached copy)
            casts_all, casts_kept = casts_all - 2.0 * head_w, max(0.0, casts_kept - 2.0 * head_w)
            chunk += 2.0 * head_w
        elif fp16 and act != 4:  # a 16-bit weight (FSDP2 / DeepSpeed): read as fp32 by the gradient matmuls
            chunk += 4.0 * head_w
        loss_temps = (4 if fp16 else act) * h * tokens + 4.0 * head_w + chunk
    else:  # train.loss: the logits' gradient + one chunk's fp32 log-softmax (+ the chunk upcast, for 16-bit logits)
        loss_temps = (4 if fp16 else act) * V * tokens + (4.0 if act == 4 else 8.0) * V * min(tokens, loss_chunk_tokens(V))
    return ActivationEstimate(
        saved_blocks=saved, head_inputs=head_inputs, logits=logits,
        loss_temps=loss_temps,
        recompute_block=recompute, weight_casts_forward=casts_all, weight_casts_kept=casts_kept,
        block_input=block_input if ac != "none" else 0.0,
        tied_grad_sum=2.0 * V * h if s.tie_embeddings else 0.0,
    )


def recompute_flops_per_token(s: ModelShape, seq_len: int, ac: str) -> float:
    """Extra forward FLOPs per token that AC recomputes (counted by HFU, not by MFU).

    full re-runs every block's forward: (2 N_blocks + 4 L H Q T); selective re-runs only pointwise ops
    (no matmuls), which we count as 0 FLOPs like the 6N convention does.
    """
    if ac != "full":
        return 0.0
    return float(2 * s.n_layer * s.block_params + 4 * s.n_layer * s.q_dim * seq_len)


# ---- state bytes ------------------------------------------------------------------------------


def _state_bytes_per_param(strategy: str, precision: str) -> dict[str, float]:
    """Bytes per parameter of params / grads / optimizer states, before sharding.

    torch strategies (single, ddp, fsdp, hsdp) keep fp32 parameters (they are the master copy) and fp32
    gradients; mixed precision casts to bf16/fp16 for compute (autocast, or FSDP2's
    MixedPrecisionPolicy on the gathered unit). AdamW adds m and v in fp32.
    DeepSpeed (zero1-3) with bf16/fp16 keeps 16-bit parameters and gradients and an fp32 master copy
    next to m and v (the ZeRO paper's 2 + 2 + 12 bytes).
    """
    if precision == "fp32":
        return {"params": 4.0, "grads": 4.0, "optimizer": 8.0}
    if strategy.startswith("zero"):
        return {"params": 2.0, "grads": 2.0, "optimizer": 12.0}
    return {"params": 4.0, "grads": 4.0, "optimizer": 8.0}


def _shard_factors(engine: str, d: Dims) -> dict[str, int]:
    """What each state is divided by: FSDP2 shards over dp_shard only (HSDP replicates over dp_replicate);
    DeepSpeed partitions over all data-parallel ranks (dp_replicate is 1 for zero*)."""
    shard, world = d.dp_shard, d.dp
    return {
        "single": {"params": 1, "grads": 1, "optimizer": 1},
        "ddp": {"params": 1, "grads": 1, "optimizer": 1},
        "fsdp": {"params": shard, "grads": shard, "optimizer": shard},
        "hsdp": {"params": shard, "grads": shard, "optimizer": shard},
        "zero1": {"params": 1, "grads": 1, "optimizer": world},
        "zero2": {"params": 1, "grads": world, "optimizer": world},
        "zero3": {"params": world, "grads": world, "optimizer": world},
    }[engine]


# ---- the plan ---------------------------------------------------------------------------------


@dataclass
class Plan:
    args: dict[str, Any]
    model: dict[str, Any]
    world_size: int
    dims: dict[str, int]  # resolved tp, pp, dp_replicate, dp_shard
    memory_gib: dict[str, float]  # per-GPU breakdown
    peak_gib: float  # allocated peak + fragmentation margin + context
    capacity_gib: float
    fits: bool
    max_micro_batch: int  # largest micro-batch that fits (0: not even 1)
    cpu_offload_gib_per_node: float
    flops_per_token: float
    hfu_flops_per_token: float
    step_time_s: float
    compute_time_s: float
    comm_time_s: float  # data-parallel collectives, overlapped with compute
    tp_comm_time_s: float  # tensor-parallel collectives, on the critical path (added to the step)
    tokens_per_step: int
    tokens_per_s: float
    peak_tflops: float
    assumptions: list[str] = field(default_factory=list)
    # pipeline parallelism (pp > 1): per pipeline rank, the schedule's bubble and point-to-point time
    pp_stages: list[dict[str, Any]] = field(default_factory=list)
    pp_schedule: str | None = None
    pp_microbatches: int = 0
    pp_stages_per_rank: int = 0
    bubble_fraction: float = 0.0
    p2p_time_s: float = 0.0


def memory_bytes(a: PlanArgs, s: ModelShape) -> tuple[dict[str, float], float, float]:
    """(per-device breakdown in bytes, allocated peak bytes, CPU-offloaded bytes per device).

    Under tensor parallelism every state is counted on one TP rank's parameters (`tp_split`: sharded
    matrices / tp, replicated norms, biases and K/V whole) before the data-parallel sharding.
    """
    d = resolve_dims(a)
    if d.pp > 1:  # the fullest pipeline rank binds
        fullest = max(pipeline_memory(a, s), key=lambda x: x.allocated)
        offloaded = 0.0
        if a.offload == "params" and d.engine in ("fsdp", "hsdp"):
            offloaded = fullest.state
        return fullest.breakdown, fullest.allocated, offloaded
    split = tp_split(s, d.tp)
    engine = d.engine
    per = _state_bytes_per_param(engine, a.precision)
    shard = _shard_factors(engine, d)
    N = split.local
    params = N * per["params"] / shard["params"]
    grads = N * per["grads"] / shard["grads"]
    optim = N * per["optimizer"] / shard["optimizer"]
    grads_root = split.local_root * per["grads"] / shard["grads"]
    offloaded = 0.0
    if a.offload == "optimizer":  # DeepSpeed ZeRO-Offload: master + m + v on CPU, the step runs there
        offloaded += optim
        optim = 0.0
    if a.offload == "params":
        if engine in ("fsdp", "hsdp"):  # FSDP2 CPUOffloadPolicy: sharded params, grads, optimizer on CPU
            offloaded += params + grads + optim
            params = grads = grads_root = optim = 0.0
        else:  # ZeRO-3 offload_param + offload_optimizer
            offloaded += params + optim
            params = optim = 0.0

    low = a.precision != "fp32"
    act_b = 2 if low else 4
    # the trainer autocasts single/DDP/FSDP; FSDP2's MixedPrecisionPolicy and DeepSpeed also cast the
    # parameters, so their residual stream is 16-bit, while single/DDP keep it fp32
    autocast = low and not engine.startswith("zero")
    resid_b = 4 if (not low or engine in ("single", "ddp")) else 2
    acts = activation_bytes(s, a.micro_batch, a.seq_len, a.ac, act_b, resid_b, autocast,
                            weight_casts=low and engine in ("single", "ddp"), fp16=a.precision == "fp16",
                            split=split, loss_impl=a.loss_impl)

    unit = max(split.local_block, split.local_root)
    comm = 0.0
    if engine == "ddp" and not a.ddp_bucket_view:
        comm = N * per["grads"]  # the reducer's buckets hold a second copy of every gradient
    elif engine in ("fsdp", "hsdp"):
        # all-gather output of the current unit and the prefetched next one (compute dtype), plus the
        # unit's unsharded gradient waiting for reduce-scatter (fp32 reduce)
        comm = 2 * unit * act_b + unit * 4
    elif engine in ("zero1", "zero2"):
        comm = min(DS_REDUCE_BUCKET, N) * per["grads"] + min(DS_ALLGATHER_BUCKET, N) * per["params"]
    elif engine == "zero3":
        live = min(DS_STAGE3_MAX_LIVE_PARAMS, max(2 * unit, DS_STAGE3_PREFETCH_BUCKET), N)
        comm = live * per["params"] + min(DS_REDUCE_BUCKET, N) * per["grads"]

    if a.offload != "none" or a.optimizer == "fused":
        opt_temp = 0.0
    elif a.optimizer == "foreach":  # one list of sqrt(v) over the whole (sharded) parameter group
        opt_temp = 4.0 * N / shard["optimizer"]
    else:  # for-loop AdamW: sqrt(v) and its scaled copy for one tensor at a time
        opt_temp = 2 * 4.0 * split.local_largest / shard["optimizer"]

    if engine.startswith("zero"):
        # DeepSpeed keeps its gradient partitions allocated between steps
        fwd_bwd = acts.peak(0.0, 0.0)
        dynamic = max(fwd_bwd, opt_temp)
        allocated = params + grads + optim + comm + dynamic
    else:
        # torch frees .grad (set_to_none) after the step; backward refills it as activations are freed
        unsharded_grad_b = act_b if shard["grads"] > 1 else per["grads"]  # FSDP: the unit's gradient before reduce
        fwd_bwd = acts.peak(grads, grads_root, unsharded_grad_b)
        if a.grad_accum > 1:  # gradients of earlier micro-batches stay allocated
            fwd_bwd = max(fwd_bwd, acts.peak(0.0, 0.0) + grads)
        dynamic = max(fwd_bwd, grads + opt_temp)
        allocated = params + optim + comm + dynamic
    breakdown = {
        "parameters": params,
        "gradients": grads,
        "optimizer_states": optim,
        "activations": acts.peak(0.0, 0.0),
        "communication_buffers": comm,
        "optimizer_step_temporaries": opt_temp,
    }
    return breakdown, allocated, offloaded


# ---- pipeline parallelism ---------------------------------------------------------------------


def pipeline_layout(a: PlanArgs, s: ModelShape, d: Dims | None = None) -> PipelineLayout | None:
    """The trainer's pipeline layout for `a` (train.parallel.pipeline.check_pipeline: the same stages, microbatch
    count and one-line errors), None without pipeline parallelism."""
    d = d or resolve_dims(a)
    if d.pp == 1:
        return None
    pcfg = SimpleNamespace(pp_schedule=a.pp_schedule, pp_microbatches=a.pp_microbatches,
                           pp_stages_per_rank=a.pp_stages_per_rank, pp_layers_per_stage=a.pp_layers_per_stage)
    return check_pipeline(d.pp, pcfg, s.n_layer, a.micro_batch, a.grad_accum, fsdp=d.engine in ("fsdp", "hsdp"))


def in_flight(layout: PipelineLayout, pp_rank: int) -> float:
    """Microbatches whose activations a pipeline rank holds at its peak, in units of all its blocks (a chunk of
    an interleaved schedule is 1/v of them).

    gpipe            all m microbatches (every forward before any backward);
    1f1b             min(m, pp - r) on rank r (its warm-up forwards + the one in steady state);
    interleaved_*    Megatron-LM's warm-up: min(m v, 2 (pp - r - 1) + (v - 1) pp + 1) chunks of 1/v of the
                     rank's blocks (rank 0: about (1 + (pp - 1) / (pp v)) x 1F1B's);
    zero_bubble      (ZB-V) min(m, pp) microbatches on every rank (the V placement balances them).
    """
    pp, m, v = layout.pp, layout.n_microbatches, layout.stages_per_rank
    if layout.schedule == "gpipe":
        return float(m)
    if layout.schedule == "1f1b":
        return float(min(m, pp - pp_rank))
    if layout.schedule == "zero_bubble":
        return float(min(m, pp))
    return min(m * v, 2 * (pp - pp_rank - 1) + (v - 1) * pp + 1) / v


def deferred_weight_grads(layout: PipelineLayout, pp_rank: int) -> int:
    """Microbatches whose weight-gradient pass a zero-bubble schedule defers on rank r (keeping the Linears'
    inputs and output gradients): up to pp - 1 - r, as in ZB-H1; 0 for the other schedules."""
    if layout.schedule not in ZERO_BUBBLE:
        return 0
    return min(layout.n_microbatches, layout.pp - 1 - pp_rank)


def _linear_io_bytes_per_token(s: ModelShape, act: int, tp: int) -> float:
    """Bytes per token of one block's Linear inputs + output gradients (what a deferred weight gradient needs)."""
    h, f = s.n_embd, s.ffn_hidden
    inputs = 2 * h + s.q_dim / tp + f / tp  # gathered q/k/v and MLP inputs, o_proj and down_proj inputs
    outputs = (s.q_dim + 2 * s.kv_dim) / tp + h + (2 if s.mlp != "gelu" else 1) * f / tp + h
    return float(act * (inputs + outputs))


def _root_local(s: ModelShape, split: TPSplit, names: Sequence[str]) -> int:
    """Parameters of the root tensors `names` (prefixes) on TP rank 0."""
    n = 0
    for name, shape in s.root_tensors:
        if name.split(".")[0] in names:
            dim = tp_shard_dim(name, split.kv_replicated) if split.tp > 1 else None
            n += math.prod(shape) if dim is None else math.prod(shape) // shape[dim] * _chunk(shape[dim], split.tp, 0)
    return n


@dataclass
class StageMemory:
    """One pipeline rank's memory (bytes) and what it holds."""

    pp_rank: int
    stages: list[int]
    blocks: int
    first: bool  # holds the embedding
    last: bool  # holds the final norm, the LM head and the loss
    params_local: int  # parameters on this rank (one TP rank's share of its stages)
    breakdown: dict[str, float]
    allocated: float
    in_flight: float  # microbatches of activations held at the peak (units of all its blocks)
    state: float  # parameters + gradients + optimizer states as the engine holds them between steps

    def as_dict(self) -> dict[str, Any]:
        return {"pp_rank": self.pp_rank, "stages": self.stages, "blocks": self.blocks, "first": self.first,
                "last": self.last, "params": self.params_local, "in_flight": self.in_flight,
                "state_gib": self.state / GIB, "allocated_gib": self.allocated / GIB,
                **{f"{k}_gib": v / GIB for k, v in self.breakdown.items()}}


def pipeline_memory(a: PlanArgs, s: ModelShape) -> list[StageMemory]:
    """Per pipeline rank: its stages' parameters (first stage + the embedding; last stage + the final norm and the
    LM head, with tied embeddings its own copy of the tied weight), their gradients and optimizer states (FSDP2
    shards them over dp_shard), and activations: `in_flight` microbatches of its blocks' saved tensors, one
    recomputed block under AC, the LM head's logits and loss buffers for one microbatch on the last stage, the
    deferred weight-gradient inputs of zero-bubble schedules, and torch.distributed.pipelining's receive buffers
    (one per microbatch and virtual stage for activations and for their gradients).

    Under FSDP2 torch's pipelining keeps each stage unsharded from its first backward to the step's last
    (set_reshard_after_backward(False), set_requires_gradient_sync(False)): the gathered compute-dtype
    parameters and fp32 unsharded gradients are live through the schedule."""
    d = resolve_dims(a)
    layout = pipeline_layout(a, s, d)
    assert layout is not None
    split = tp_split(s, d.tp)
    engine, low = d.engine, a.precision != "fp32"
    per = _state_bytes_per_param(engine, a.precision)
    shard = _shard_factors(engine, d)
    act_b = 2 if low else 4
    autocast = low
    resid_b = 4 if (not low or engine in ("single", "ddp")) else 2
    rows = a.micro_batch * a.grad_accum // layout.n_microbatches  # sequences per pipeline microbatch
    tokens = rows * a.seq_len
    n_stages, m = layout.n_stages, layout.n_microbatches
    message = tokens * s.n_embd * resid_b / d.tp  # one stage boundary's activations (sequence shards under TP)
    out = []
    for r in range(d.pp):
        stages = layout.stages_of(r)
        blocks = sum(layout.layers[i][1] - layout.layers[i][0] for i in stages)
        first, last = 0 in stages, n_stages - 1 in stages
        ends = set()
        if first:
            ends |= {"tok_emb", "pos_emb"}
        if last:
            ends |= {"norm_f", "lm_head"} | ({"tok_emb"} if s.tie_embeddings else set())
        root = _root_local(s, split, sorted(ends))
        N = blocks * split.local_block + root
        params = N * per["params"] / shard["params"]
        grads = N * per["grads"] / shard["grads"]
        optim = N * per["optimizer"] / shard["optimizer"]
        state = params + grads + optim
        offloaded = a.offload == "params" and engine in ("fsdp", "hsdp")
        if offloaded:
            params = grads = optim = 0.0
        # activations of one pipeline microbatch through this rank's blocks (and its head, on the last stage)
        s_r = dataclasses.replace(s, n_layer=blocks)
        est = activation_bytes(s_r, rows, a.seq_len, a.ac, act_b, resid_b, autocast, fp16=a.precision == "fp16",
                               split=split, loss_impl=a.loss_impl)
        k = in_flight(layout, r)
        acts = k * est.saved_blocks + est.recompute_block
        if last:
            acts += est.head_inputs + est.logits + est.loss_temps + est.tied_grad_sum * 4
        acts += deferred_weight_grads(layout, r) * blocks * _linear_io_bytes_per_token(s, act_b, d.tp) * tokens
        if low and engine == "single":  # autocast's 16-bit copies of the fp32 weights, alive while in flight
            acts += 2.0 * N
        recv = sum(m * message * ((i > 0) + (i < n_stages - 1)) for i in stages)
        comm = 0.0
        grads_live = grads
        if engine in ("fsdp", "hsdp") and not offloaded:
            gathered = shard["params"] > 1 or low
            comm = N * act_b if gathered else 0.0
            if shard["grads"] > 1:
                grads_live = N * 4.0 + grads  # unsharded fp32 accumulation, then the reduce-scattered shard
        opt_temp = 0.0 if (a.optimizer == "fused" or offloaded) else (
            4.0 * N / shard["optimizer"] if a.optimizer == "foreach" else 2 * 4.0 * split.local_largest)
        allocated = params + optim + comm + recv + max(acts + grads_live, grads + opt_temp)
        breakdown = {"parameters": params, "gradients": grads_live, "optimizer_states": optim, "activations": acts,
                     "communication_buffers": comm, "pipeline_buffers": recv, "optimizer_step_temporaries": opt_temp}
        out.append(StageMemory(pp_rank=r, stages=stages, blocks=blocks, first=first, last=last, params_local=N,
                               breakdown=breakdown, allocated=allocated, in_flight=k, state=state))
    return out


def _pipeline_times(a: PlanArgs, s: ModelShape, d: Dims, layout: PipelineLayout,
                    mem: list[StageMemory]) -> tuple[float, float, float]:
    """(data-parallel seconds per step of the fullest rank, tensor-parallel seconds, point-to-point seconds)."""
    low = a.precision != "fp32"
    pb, gb = (2 if low else 4), 4
    N = max(x.params_local for x in mem)
    comm = 0.0
    if d.dp > 1:
        if d.engine in ("fsdp", "hsdp"):
            # the stage is gathered once per step (kept unsharded through the schedule) and its gradients
            # reduce-scattered once; HSDP all-reduces the shards across replicas
            g, r = d.dp_shard, d.dp_replicate
            comm = (N * pb + N * gb) * (g - 1) / g / _bandwidth(a, d.tp * g) if g > 1 else 0.0
            comm += 2 * (N * gb / g) * (r - 1) / r / _bandwidth(a, d.tp * g * r) if r > 1 else 0.0
        else:
            comm = 2 * N * gb * (d.dp - 1) / d.dp / _bandwidth(a, d.tp * d.dp)
    split = tp_split(s, d.tp)
    blocks = max(x.blocks for x in mem)
    tp_comm = _tp_comm_time(a, dataclasses.replace(s, n_layer=blocks), d, split)
    rows = a.micro_batch * a.grad_accum // layout.n_microbatches
    resid_b = 4 if (not low or d.engine in ("single", "ddp")) else 2
    message = rows * a.seq_len * s.n_embd * resid_b / d.tp
    stride = d.world // d.pp  # ranks between two pipeline neighbours (pp is the outermost mesh dim)
    bw = (a.intra_node_gbps if stride * d.pp <= a.gpus else a.inter_node_gbps) * 1e9
    p2p = 2 * layout.n_microbatches * layout.stages_per_rank * message / bw
    return comm, tp_comm, p2p


def plan(a: PlanArgs, shape: ModelShape | None = None, *, max_batch: bool = True) -> Plan:
    """Answer one planning question (validates `a` first). `max_batch=False` skips the search for the largest
    micro-batch that fits (`max_micro_batch` is then -1)."""
    a.validate()
    s = shape or model_shape(a.model, a.seq_len)
    d = resolve_dims(a)
    split = tp_split(s, d.tp)
    layout = pipeline_layout(a, s, d)
    stages = pipeline_memory(a, s) if layout else []
    breakdown, allocated, offloaded = memory_bytes(a, s)
    margin = a.frag * allocated
    context = a.context_gb * GIB
    peak = allocated + margin + context
    capacity = a.gpu_mem_gb * GIB

    world = a.nodes * a.gpus
    peak_tf = a.peak_tflops if a.peak_tflops is not None else GPU_PEAK_TFLOPS[a.gpu][a.precision]
    tokens_replica = a.micro_batch * a.grad_accum * a.seq_len  # per data-parallel rank (one TP group)
    model_flops = s.flops_per_token
    hw_flops = model_flops + recompute_flops_per_token(s, a.seq_len, a.ac)
    # `mfu` is what the kernels achieve on the model's FLOPs without AC; recompute costs time on top;
    # a TP group shares each token's FLOPs (heads and FFN columns split tp ways)
    compute = tokens_replica * hw_flops / d.tp / (peak_tf * 1e12 * a.mfu)
    bubble = p2p = 0.0
    if layout is None:
        comm = _comm_time(a, s, d, split)
        tp_comm = _tp_comm_time(a, s, d, split)
        # data-parallel traffic overlaps compute (FSDP prefetch, DDP/ZeRO buckets); TP's collectives sit between
        # the matmuls that need their results, so they add to the step
        step = max(compute, comm) + tp_comm
    else:
        # each rank computes its 1/pp of the blocks; the schedule idles a `bubble` fraction of the step;
        # the activations (forward) and their gradients (backward) cross every stage boundary
        comm, tp_comm, p2p = _pipeline_times(a, s, d, layout, stages)
        bubble = layout.bubble_fraction()
        compute = compute / d.pp / (1 - bubble)
        tp_comm = tp_comm / (1 - bubble)
        step = max(compute, comm) + tp_comm + p2p
    b_max = max_micro_batch(a, s) if max_batch else -1

    assumptions = [
        (f"GPU memory {a.gpu_mem_gb} GiB; fragmentation margin {a.frag:.0%} of the allocated peak; "
        f"{a.context_gb} GiB for the CUDA context and library workspaces"),
        (f"step time at MFU {a.mfu:.0%} of {peak_tf:g} TFLOP/s ({a.precision}); AC recompute adds "
        f"{hw_flops / model_flops - 1:.0%} hardware FLOPs"),
        (f"communication overlapped with compute; {a.intra_node_gbps:g} GB/s intra-node, "
        f"{a.inter_node_gbps:g} GB/s per GPU across nodes"),
        f"AdamW (m, v in fp32), {a.optimizer} step",
        *(_pipeline_assumptions(a, d, layout) if layout else []),
        ("activations: SDPA/flash attention (no T x T matrix stored); selective AC = op-level (matmul and "
        "attention outputs saved, pointwise ops recomputed)"),
    ]
    if d.tp > 1:
        kv = ("K/V projections replicated on every TP rank (tp does not divide n_kv_head), gradients summed "
              "over the group" if split.kv_replicated else "K/V projections split by heads")
        assumptions += [
            (f"tp={d.tp} with sequence parallel (torch's SequenceParallel + PrepareModuleInput(Replicate)): "
             "q/k/v/gate/up colwise, o/down rowwise, embedding and LM head split over the vocabulary, the loss "
             "on vocabulary shards (logits [B, T, V/tp]); norms, residual and block inputs on T/tp tokens; "
             f"each branch's Linears save the all-gathered [B, T, C] input; {kv}"),
            (f"TP traffic not overlapped: per block and micro-batch 2 all-gathers + 2 reduce-scatters of "
             f"[B, T, C] in the compute dtype forward, the same in backward and again in AC's recompute, plus "
             f"the embedding's and LM head's; the vocabulary-parallel loss holds 12 bytes per local vocabulary "
             f"entry per token in fp32 (not chunked); over {'NVLink' if _tp_in_node(a, d) else 'the inter-node network'}"),
        ]
    return Plan(
        args=dataclasses.asdict(a),
        model={
            "name": s.name, "n_params": s.n_params, "n_params_non_embedding": s.n_params_non_embedding,
            "block_params": split.local_block, "root_params": split.local_root,
            "tp_local_params": split.local, "tp_sharded_params": split.sharded,
            "tp_replicated_params": split.replicated, "kv_replicated": split.kv_replicated,
        },
        world_size=world,
        dims=d.as_dict(),
        memory_gib={**{k: v / GIB for k, v in breakdown.items()}, "fragmentation_margin": margin / GIB,
                    "cuda_context": context / GIB, "allocated_peak": allocated / GIB},
        peak_gib=peak / GIB,
        capacity_gib=capacity / GIB,
        fits=peak <= capacity,
        max_micro_batch=b_max,
        cpu_offload_gib_per_node=offloaded * a.gpus / GIB,
        flops_per_token=model_flops,
        hfu_flops_per_token=hw_flops,
        step_time_s=step,
        compute_time_s=compute,
        comm_time_s=comm,
        tp_comm_time_s=tp_comm,
        tokens_per_step=tokens_replica * d.dp,
        tokens_per_s=tokens_replica * d.dp / step,
        peak_tflops=peak_tf,
        assumptions=assumptions,
        pp_stages=[x.as_dict() | {"peak_gib": (x.allocated * (1 + a.frag) + context) / GIB,
                                  "fits": x.allocated * (1 + a.frag) + context <= capacity} for x in stages],
        pp_schedule=layout.schedule if layout else None,
        pp_microbatches=layout.n_microbatches if layout else 0,
        pp_stages_per_rank=layout.stages_per_rank if layout else 0,
        bubble_fraction=bubble,
        p2p_time_s=p2p,
    )


def _pipeline_assumptions(a: PlanArgs, d: Dims, layout: PipelineLayout) -> list[str]:
    stride = d.world // d.pp
    where = "NVLink" if stride * d.pp <= a.gpus else "the inter-node network"
    return [
        (f"pp={d.pp} {layout.schedule}, {layout.n_microbatches} microbatches of "
         f"{a.micro_batch * a.grad_accum // layout.n_microbatches} sequences, {layout.stages_per_rank} stage(s) per "
         f"rank, blocks per stage {[b - a_ for a_, b in layout.layers]} (embedding and head weighed as one block "
         f"each); bubble {layout.bubble_fraction():.1%} = (pp - 1) / (v m + pp - 1) (zero-bubble: 0) stretches "
         f"compute and TP traffic"),
        ("in-flight activations per rank r: gpipe all m microbatches, 1f1b min(m, pp - r), interleaved Megatron's "
         "warm-up min(m v, 2 (pp - r - 1) + (v - 1) pp + 1) chunks of 1/v, zero_bubble (ZB-V) min(m, pp) plus the "
         "Linears' inputs and output gradients of min(m, pp - 1 - r) deferred weight-gradient passes; "
         "pipelining's receive buffers: one per microbatch and virtual stage, activations and gradients"),
        ("FSDP2 under PP: each stage stays unsharded from its first backward to the step's last (compute-dtype "
         "parameters + fp32 gradients live), gathered and reduce-scattered once per step"
         if d.engine in ("fsdp", "hsdp") else "no data-parallel sharding of the stages"),
        f"stage-to-stage activations and gradients over {where}, not overlapped (added to the step)",
    ]


def _bandwidth(a: PlanArgs, span: int) -> float:
    """Bytes/s of a collective over a group whose ranks span `span` consecutive GPUs (a mesh dim times the
    dims inside it): NVLink when that fits in one node, else the per-GPU inter-node bandwidth."""
    in_node = span <= a.gpus and a.gpus % span == 0
    return (a.intra_node_gbps if in_node else a.inter_node_gbps) * 1e9


def _tp_in_node(a: PlanArgs, d: Dims) -> bool:
    return d.tp <= a.gpus and a.gpus % d.tp == 0


def _comm_time(a: PlanArgs, s: ModelShape, d: Dims, split: TPSplit) -> float:
    """Seconds of data-parallel collective traffic per optimizer step (ring algorithms: (n-1)/n of the data),
    on one TP rank's parameters (`split.local`) over the data-parallel groups of the mesh."""
    if d.dp == 1:
        return 0.0
    N = split.local
    low = a.precision != "fp32"
    pb, gb = (2 if low else 4), 4  # gathered parameter dtype; gradients reduced in fp32
    if d.engine == "ddp":  # one all-reduce = reduce-scatter + all-gather, over dp_replicate
        r = d.dp_replicate
        return 2 * N * gb * (r - 1) / r / _bandwidth(a, d.tp * r)
    if d.engine == "zero3":
        g = d.dp
        return (2 * a.grad_accum * N * pb + N * gb) * (g - 1) / g / _bandwidth(a, d.tp * g)
    if d.engine in ("fsdp", "hsdp"):
        # all-gather (forward + backward per micro-batch) and reduce-scatter inside the dp_shard group, then
        # (HSDP) an all-reduce of the gradient shards across the dp_replicate replicas
        g, r = d.dp_shard, d.dp_replicate
        shard = (2 * a.grad_accum * N * pb + N * gb) * (g - 1) / g / _bandwidth(a, d.tp * g) if g > 1 else 0.0
        replicas = 2 * (N * gb / g) * (r - 1) / r / _bandwidth(a, d.tp * g * r) if r > 1 else 0.0
        return shard + replicas
    # zero1 / zero2: reduce-scatter gradients, all-gather updated parameters
    frac = (d.dp - 1) / d.dp
    bw = _bandwidth(a, d.tp * d.dp)
    return (N * 2 + N * 2) * frac / bw if low else (N * gb + N * 4) * frac / bw


def tp_collectives_per_micro_batch(s: ModelShape, ac: str) -> int:
    """Collectives of one [B, T, C] activation per micro-batch under TP + sequence parallel.

    Per block: forward all-gathers the attention and MLP inputs and reduce-scatters their outputs (4); backward
    runs the transposes (4); full or selective AC re-runs the forward's (4: the gathered inputs and the
    reduce-scattered outputs are not kept). Plus the vocabulary-parallel embedding (an all-reduce to whole
    sequences forward = 2, as train/parallel/tp.py keeps Gemma's scale and positions replicated; an all-gather
    of the first block's input gradient backward = 1) and the LM head's input (all-gather forward,
    reduce-scatter backward = 2). Counted in ring units: an all-reduce moves what a reduce-scatter plus an
    all-gather do. Without sequence parallel the pairs would be all-reduces: the same bytes.
    """
    per_block = 8 + (4 if ac != "none" else 0)
    return s.n_layer * per_block + 5


def _tp_comm_time(a: PlanArgs, s: ModelShape, d: Dims, split: TPSplit) -> float:
    """Seconds of tensor-parallel collectives per optimizer step (not overlapped with compute)."""
    if d.tp == 1:
        return 0.0
    act_b = 2 if a.precision != "fp32" else 4
    frac = (d.tp - 1) / d.tp
    activation = a.micro_batch * a.seq_len * s.n_embd * act_b  # one [B, T, C] in the compute dtype
    traffic = a.grad_accum * tp_collectives_per_micro_batch(s, a.ac) * activation * frac
    # once per step: gradients of the replicated parameters (norms, row-wise biases, MQA's K/V) all-reduced
    # over the TP group (each rank saw only its tokens or heads); learned positions run replicated: no sync
    positions = sum(math.prod(shape) for name, shape in s.root_tensors if name == "pos_emb.weight")
    traffic += 2 * (split.replicated - positions) * 4 * frac
    return traffic / _bandwidth(a, d.tp)


def max_micro_batch(a: PlanArgs, s: ModelShape, limit: int = 1 << 16) -> int:
    """Largest micro-batch whose peak fits in gpu_mem_gb (0 if even 1 does not); memory grows with B. Under pp a
    micro-batch whose sequences the pipeline's microbatches cannot split (check_pipeline) does not count."""

    # under pp the micro-batches are multiples of `step`: what the pipeline's microbatches split evenly
    step = 1
    if a.pp > 1:
        m = a.pp_microbatches if a.pp_microbatches is not None else (a.pp if a.grad_accum < a.pp else 1)
        step = m // math.gcd(m, a.grad_accum)

    def fits(k: int) -> bool:
        try:
            _, allocated, _ = memory_bytes(dataclasses.replace(a, micro_batch=k * step), s)
        except ValueError:
            return False
        return allocated * (1 + a.frag) + a.context_gb * GIB <= a.gpu_mem_gb * GIB

    if step > 1:
        limit //= step
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:  # invariant: fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * step


# ---- layout search ----------------------------------------------------------------------------


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def search_candidates(a: PlanArgs, s: ModelShape, global_batch: int) -> list[PlanArgs]:
    """Every layout of `a`'s model on its nodes x gpus that the trainer accepts, for `global_batch` sequences per
    optimizer step: tp dividing the GPUs of a node (so TP stays on NVLink) and the heads (`tp_split`'s rule);
    pp dividing the rest with pp <= n_layer; every dp_replicate x dp_shard split of the data-parallel ranks (FSDP2
    / HSDP; DDP when nothing is sharded or split; ZeRO is left out: FSDP2 covers it and it combines with neither
    tp nor pp); every micro-batch dividing a replica's sequences (grad_accum = the rest); ac none / selective /
    full; under pp 1f1b and interleaved_1f1b (gpipe has 1F1B's bubble and more memory), and zero_bubble where no
    FSDP2 wraps the stages (torch's split weight-gradient pass misses FSDP's hooks). Layouts the trainer rejects
    (`resolve_dims`, `check_pipeline`) are skipped."""
    world = a.nodes * a.gpus
    out = []
    for tp in _divisors(a.gpus):
        try:
            tp_split(s, tp)
        except ValueError:
            continue
        for pp in _divisors(world // tp):
            if pp > s.n_layer:
                continue
            dp = world // (tp * pp)
            if global_batch % dp:
                continue
            rows = global_batch // dp
            for rep in _divisors(dp):
                shard = dp // rep
                if tp == 1 and pp == 1 and shard == 1:
                    strategies = ["ddp" if rep > 1 else "single"]
                elif pp > 1 and dp == 1:
                    strategies = ["single"]  # no data parallelism: plain stages (zero_bubble allowed)
                else:
                    strategies = ["fsdp"]
                for strategy in strategies:
                    schedules = ["1f1b"] if pp == 1 else ["1f1b", "interleaved_1f1b"] + (
                        ["zero_bubble"] if strategy == "single" else [])
                    for schedule in schedules:
                        for ac in AC_MODES:
                            for b in _divisors(rows):
                                out.append(dataclasses.replace(
                                    a, strategy=strategy, tp=tp, pp=pp, dp_replicate=rep, dp_shard=shard,
                                    micro_batch=b, grad_accum=rows // b, ac=ac, pp_schedule=schedule,
                                    pp_microbatches=None, pp_stages_per_rank=None, pp_layers_per_stage=None,
                                    hsdp_shard=0, offload="none"))
    return out


def search(a: PlanArgs, s: ModelShape | None = None, global_batch: int | None = None) -> list[Plan]:
    """The layouts of `search_candidates` that fit, fastest first (estimated tokens/s; ties: the smaller peak).
    `global_batch` (sequences per optimizer step) is held fixed so layouts compare at the same optimization;
    default: what pure data parallelism over every GPU runs with `a`'s micro_batch x grad_accum."""
    a.validate()
    s = s or model_shape(a.model, a.seq_len)
    world = a.nodes * a.gpus
    gb = global_batch if global_batch is not None else world * a.micro_batch * a.grad_accum
    if not isinstance(gb, int) or gb < 1:
        raise ValueError(f"global_batch={gb!r} must be a positive integer (sequences per optimizer step)")
    found = []
    for cand in search_candidates(a, s, gb):
        try:
            p = plan(cand, s, max_batch=False)
        except ValueError:  # a layout the trainer rejects (e.g. too few sequences for the pipeline's microbatches)
            continue
        if p.fits:
            found.append(p)
    found.sort(key=lambda p: (-p.tokens_per_s, p.peak_gib))
    return found


def _layout(p: Plan) -> str:
    d, a = p.dims, p.args
    out = f"tp={d['tp']} pp={d['pp']} dp_replicate={d['dp_replicate']} dp_shard={d['dp_shard']}"
    if d["pp"] > 1:
        out += f" {p.pp_schedule}"
    return out + f" micro_batch={a['micro_batch']} grad_accum={a['grad_accum']} ac={a['ac']}"


def explain(found: list[Plan]) -> str:
    """One line: why the first layout of `search` is first."""
    if not found:
        return "nothing fits: use more GPUs, bigger GPUs, a shorter seq_len or a smaller global batch"
    best = found[0]
    d = best.dims
    exposed = max(0.0, best.comm_time_s - best.compute_time_s) + best.tp_comm_time_s + best.p2p_time_s
    why = [f"{best.tokens_per_s:,.0f} tokens/s at {best.peak_gib:.1f} of {best.capacity_gib:.0f} GiB",
           (f"compute {best.compute_time_s:.2f} s of a {best.step_time_s:.2f} s step, {exposed:.2f} s of it exposed "
            f"communication")]
    if d["pp"] > 1:
        why.append(f"pipeline bubble {best.bubble_fraction:.1%}")
    rivals = []
    for name, keep in (("without tp", lambda p: p.dims["tp"] == 1), ("without pp", lambda p: p.dims["pp"] == 1),
                       ("with pp", lambda p: p.dims["pp"] > 1), ("with tp", lambda p: p.dims["tp"] > 1)):
        if keep(best):
            continue
        other = next((p for p in found if keep(p)), None)
        rivals.append(f"the best {name} is {1 - other.tokens_per_s / best.tokens_per_s:.0%} slower" if other
                      else f"nothing {name} fits")
    return f"#1 {_layout(best)}: " + "; ".join(why + rivals[:2])


def format_search(found: list[Plan], a: PlanArgs, global_batch: int, top: int, considered: int) -> str:
    """The ranked table of `search` (the first `top`), then `explain`'s line."""
    lines = [
        (f"{a.model} on {a.nodes} x {a.gpus} GPUs ({a.gpu_mem_gb:g} GiB, {a.gpu}, {a.precision}, MFU {a.mfu:.0%}), "
         f"seq_len={a.seq_len}, global batch {global_batch} sequences: {len(found)} of {considered} layouts fit"),
        (f"{'#':>3} {'tp':>3}{'pp':>4}{'rep':>5}{'shard':>6} {'engine':<7}{'schedule':<17}{'mb':>4}{'ga':>5} "
         f"{'ac':<10}{'peak GiB':>9}{'bubble':>8}{'step s':>8}{'tokens/s':>12}"),
    ]
    for i, p in enumerate(found[:top], 1):
        d, x = p.dims, p.args
        engine = resolve_dims(PlanArgs(**x)).engine
        lines.append(
            f"{i:>3} {d['tp']:>3}{d['pp']:>4}{d['dp_replicate']:>5}{d['dp_shard']:>6} {engine:<7}"
            f"{(p.pp_schedule or '-'):<17}{x['micro_batch']:>4}{x['grad_accum']:>5} {x['ac']:<10}{p.peak_gib:>9.2f}"
            f"{p.bubble_fraction:>8.1%}{p.step_time_s:>8.3f}{p.tokens_per_s:>12,.0f}")
    lines.append(explain(found))
    if found:
        lines.append(f"trainer: {' '.join(trainer_overrides(found[0]))}")
    return "\n".join(lines)


def trainer_overrides(p: Plan) -> list[str]:
    """The `python -m train` overrides that run plan `p`'s layout (the model and data are yours to add)."""
    a, d = p.args, p.dims
    strategy = "fsdp" if a["strategy"] == "hsdp" else a["strategy"]
    out = [f"strategy={strategy}"] + [f"parallel.{k}={d[k]}" for k in ("tp", "pp", "dp_replicate", "dp_shard")]
    if d["pp"] > 1:
        out.append(f"parallel.pp_schedule={p.pp_schedule}")
    return out + [f"train.micro_batch_size={a['micro_batch']}", f"train.grad_accum={a['grad_accum']}",
                  f"train.seq_len={a['seq_len']}", f"train.activation_checkpointing={a['ac']}",
                  f"precision={a['precision']}"]


# ---- CLI --------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage, so a bad option is one `error:` line like any bad value."""

    def error(self, message: str) -> NoReturn:
        raise ValueError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m train.plan",
        description="Per-GPU memory and step-time estimate for model x parallel dims x nodes x GPUs x AC. "
        "Every option is accepted as --key value or key=value (like the trainer's overrides; the trainer's "
        "parallel.tp=2 form too).",
    )
    d = PlanArgs()
    p.add_argument("--model", default=d.model, help="model preset (model/config.py PRESETS)")
    p.add_argument("--strategy", default=d.strategy, help=f"one of {', '.join(STRATEGIES)}")
    p.add_argument("--offload", default=d.offload, help=f"one of {', '.join(OFFLOADS)}")
    p.add_argument("--nodes", type=int, default=d.nodes)
    p.add_argument("--gpus", type=int, default=d.gpus, help="GPUs per node")
    p.add_argument("--gpu_mem_gb", type=float, default=d.gpu_mem_gb, help="memory per GPU, GiB")
    p.add_argument("--micro_batch", type=int, default=d.micro_batch,
                   help="sequences per data-parallel rank (one TP group) per micro-step")
    p.add_argument("--grad_accum", type=int, default=d.grad_accum)
    p.add_argument("--hsdp_shard", type=int, default=d.hsdp_shard, help="hsdp: GPUs per shard group (0: one node)")
    p.add_argument("--tp", type=int, default=d.tp, help="tensor (+ sequence) parallel degree")
    p.add_argument("--pp", type=int, default=d.pp, help="pipeline parallel degree (stages cut along the blocks)")
    p.add_argument("--pp_schedule", default=d.pp_schedule, help=f"one of {', '.join(PP_SCHEDULES)}")
    p.add_argument("--pp_microbatches", type=int, default=None,
                   help="pipeline microbatches per optimizer step (default: the trainer's: grad_accum if >= pp)")
    p.add_argument("--pp_stages_per_rank", type=int, default=None,
                   help="virtual stages per rank (interleaved schedules: 2 by default)")
    p.add_argument("--pp_layers_per_stage", type=_int_list, default=None,
                   help="blocks per stage, comma-separated (default: balanced, embedding and head weighed in)")
    p.add_argument("--dp_replicate", type=int, default=None, help="data-parallel replicas (default: from --strategy)")
    p.add_argument("--dp_shard", type=int, default=None,
                   help="FSDP2 shard group size, -1 = the rest of the world (default: from --strategy)")
    p.add_argument("--seq_len", type=int, default=d.seq_len)
    p.add_argument("--precision", default=d.precision, help=f"one of {', '.join(PRECISIONS)}")
    p.add_argument("--ac", default=d.ac, help=f"activation checkpointing: one of {', '.join(AC_MODES)}")
    p.add_argument("--mfu", type=float, default=d.mfu, help="model FLOPs utilization assumed for step time")
    p.add_argument("--gpu", default=d.gpu, help=f"peak FLOP/s table entry: {', '.join(GPU_PEAK_TFLOPS)}")
    p.add_argument("--peak_tflops", type=float, default=None, help="dense TFLOP/s, overrides --gpu")
    p.add_argument("--frag", type=float, default=d.frag, help="fragmentation margin, fraction of the peak")
    p.add_argument("--context_gb", type=float, default=d.context_gb, help="CUDA context + workspaces, GiB")
    p.add_argument("--intra_node_gbps", type=float, default=d.intra_node_gbps)
    p.add_argument("--inter_node_gbps", type=float, default=d.inter_node_gbps)
    p.add_argument("--optimizer", default=d.optimizer, help=f"AdamW kernel: one of {', '.join(OPTIMIZERS)}")
    p.add_argument("--ddp_bucket_view", action="store_true", help="DDP gradient_as_bucket_view=True")
    p.add_argument("--loss_impl", default=d.loss_impl, help=f"train.loss_impl: one of {', '.join(LOSS_IMPLS)}")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--search", action="store_true",
                   help="rank every layout (tp, pp, dp_replicate, dp_shard, micro-batch, AC, schedule) that fits "
                        "by estimated tokens/s; the dims, micro_batch/grad_accum and ac given are ignored")
    p.add_argument("--top", type=int, default=10, help="--search: rows to print")
    p.add_argument("--global_batch", type=int, default=None,
                   help="--search: sequences per optimizer step, held fixed (default: nodes x gpus x micro_batch x "
                        "grad_accum)")
    return p


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.strip("[]").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def _option(key: str) -> str:
    """gpu-mem-gb -> gpu_mem_gb; the trainer's parallel.dp_shard -> dp_shard."""
    key = key.replace("-", "_")
    return key.removeprefix("parallel.")


def _normalize_argv(argv: Sequence[str]) -> list[str]:
    """key=value -> --key=value (dashes in keys become underscores, e.g. gpu-mem-gb; a `parallel.` prefix
    is dropped, so the trainer's parallel.tp=2 works)."""
    out = []
    for tok in argv:
        if not tok.startswith("-") and "=" in tok:
            k, v = tok.split("=", 1)
            out.append(f"--{_option(k)}={v}")
        elif tok.startswith("--") and not tok.startswith("--help"):
            k, eq, v = tok[2:].partition("=")
            out.append(f"--{_option(k)}{eq}{v}")
        else:
            out.append(tok)
    return out


SEARCH_OPTIONS = ("search", "top", "global_batch")


def parse_args(argv: Sequence[str] | None = None) -> tuple[PlanArgs, bool]:
    args, as_json, _ = parse_cli(argv)
    return args, as_json


def parse_cli(argv: Sequence[str] | None = None) -> tuple[PlanArgs, bool, dict[str, Any]]:
    """(the planning question, --json, the --search options)."""
    ns = _parser().parse_args(_normalize_argv(sys.argv[1:] if argv is None else argv))
    as_json = ns.json
    kw = {k: v for k, v in vars(ns).items() if k != "json" and k not in SEARCH_OPTIONS}
    return PlanArgs(**kw), as_json, {k: getattr(ns, k) for k in SEARCH_OPTIONS}


def format_plan(p: Plan) -> str:
    a = p.args
    m = p.model
    lines = [
        (f"{m['name']}: {m['n_params'] / 1e9:.3f} B params ({m['n_params_non_embedding'] / 1e9:.3f} B non-embedding), "
        f"largest FSDP unit {max(m['block_params'], m['root_params']) / 1e6:.1f} M"
        + (f"; {m['tp_local_params'] / 1e9:.3f} B on each of {p.dims['tp']} TP ranks" if p.dims["tp"] > 1 else "")),
        (f"{a['strategy']} (offload={a['offload']}) on {a['nodes']} x {a['gpus']} GPUs = {p.world_size}: "
        + " x ".join(f"{k}={v}" for k, v in p.dims.items())),
        (f"micro_batch={a['micro_batch']} grad_accum={a['grad_accum']} seq_len={a['seq_len']} "
        f"precision={a['precision']} ac={a['ac']}"),
        "",
        f"{'per-GPU memory':<28}{'GiB':>10}",
    ]
    for k, v in p.memory_gib.items():
        if k != "allocated_peak":
            lines.append(f"  {k.replace('_', ' '):<26}{v:>10.2f}")
    lines += [
        f"  {'peak (allocated)':<26}{p.memory_gib['allocated_peak']:>10.2f}",
        f"  {'peak + margin + context':<26}{p.peak_gib:>10.2f}   of {p.capacity_gib:.1f} GiB: "
        + ("FITS" if p.fits else "DOES NOT FIT"),
        f"  largest micro-batch that fits: {p.max_micro_batch}",
    ]
    if p.cpu_offload_gib_per_node:
        lines.append(f"  CPU memory per node for offload: {p.cpu_offload_gib_per_node:.1f} GiB")
    if p.pp_stages:
        lines += [
            "",
            (f"pipeline: {p.pp_schedule}, {p.pp_microbatches} microbatches, {p.pp_stages_per_rank} stage(s) per rank, "
             f"bubble {p.bubble_fraction:.1%}; per pipeline rank (GiB; the fullest binds):"),
            (f"  {'rank':>4} {'stages':<8}{'blocks':>7}{'holds':>12}{'in flight':>10}{'params':>8}{'grads':>7}"
             f"{'optim':>7}{'acts':>7}{'comm':>7}{'p2p':>6}{'peak':>8}"),
        ]
        for x in p.pp_stages:
            holds = "+".join(n for n, on in (("emb", x["first"]), ("head", x["last"])) if on) or "-"
            lines.append(
                f"  {x['pp_rank']:>4} {','.join(map(str, x['stages'])):<8}{x['blocks']:>7}{holds:>12}"
                f"{x['in_flight']:>10.2f}{x['parameters_gib']:>8.2f}{x['gradients_gib']:>7.2f}"
                f"{x['optimizer_states_gib']:>7.2f}{x['activations_gib']:>7.2f}{x['communication_buffers_gib']:>7.2f}"
                f"{x['pipeline_buffers_gib']:>6.2f}{x['peak_gib']:>8.2f}" + ("" if x["fits"] else "  DOES NOT FIT"))
    lines += [
        "",
        f"FLOPs/token {p.flops_per_token / 1e9:.2f} G (model), {p.hfu_flops_per_token / 1e9:.2f} G (hardware, with AC)",
        (f"step: {p.step_time_s:.3f} s (compute {p.compute_time_s:.3f} s, data-parallel communication "
        f"{p.comm_time_s:.3f} s overlapped, tensor-parallel communication {p.tp_comm_time_s:.3f} s added"
        + (f", pipeline bubble {p.bubble_fraction:.1%} in those, stage-to-stage {p.p2p_time_s:.3f} s added"
           if p.pp_stages else "") + "), "
        f"{p.tokens_per_step} tokens/step, {p.tokens_per_s:,.0f} tokens/s"),
        "",
        "assumptions:",
    ] + [f"  - {x}" for x in p.assumptions]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args, as_json, opts = parse_cli(argv)
        if opts["search"]:
            if opts["top"] < 1:
                raise ValueError(f"top={opts['top']} must be >= 1")
            # the layout fields are what the search varies: validate the rest on a one-GPU-compatible layout
            args = dataclasses.replace(args, strategy="fsdp", tp=1, pp=1, dp_replicate=None, dp_shard=None,
                                       hsdp_shard=0, offload="none")
        args.validate()
        shape = model_shape(args.model, args.seq_len)
        if opts["search"]:
            world = args.nodes * args.gpus
            gb = opts["global_batch"] if opts["global_batch"] is not None else world * args.micro_batch * args.grad_accum
            found = search(args, shape, gb)
            considered = len(search_candidates(args, shape, gb))
        else:
            p = plan(args, shape)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if opts["search"]:
        print(json.dumps([dataclasses.asdict(x) for x in found[:opts["top"]]], indent=2) if as_json
              else format_search(found, args, gb, opts["top"], considered))
        return 1 if not found else 0
    print(json.dumps(dataclasses.asdict(p), indent=2) if as_json else format_plan(p))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
