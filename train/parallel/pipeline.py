"""Pipeline parallelism: the model cut into stages along its blocks, run by a ``torch.distributed.pipelining``
schedule over the ``pp`` dim of the device mesh.

Splitting happens here, not in ``model/``: ``GPTStage`` is a ``GPT`` that builds only its own parts --
the first stage the embedding, the last the final norm and LM head (and, with tied embeddings, both ends
hold the tied weight), every stage a contiguous range of blocks kept under their model-wide indices. So a
stage's parameter names are the whole model's (``blocks.7.attn.q_proj.weight``) and its initial values
the single-process init for the same seed (init is seeded by name); DCP checkpoints reshard between any
``pp`` and one process.

Each stage is then transformed like a whole model, in the fixed order: PP split -> TP/SP -> activation
checkpointing -> compile -> FSDP2 (dp_shard, or HSDP with dp_replicate). ``PipelineEngine`` is the
trainer's ``Engine`` for ``pp > 1``: the trainer's micro-batches of one optimizer step are the pipeline's
microbatches (``parallel.pp_microbatches`` re-splits them), the schedule runs forward + backward of them
all on the last micro-step, and ``step()`` clips on the norm over every stage.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from model.config import GPTConfig
from model.gpt import GPT, Block, LMHead, _embedding, build_norm
from train.loss import torch_cross_entropy
from train.parallel.engine import NativeEngine, _quiet_redistribute

# name -> (torch.distributed.pipelining class, how stages map to ranks, stages per rank: fixed or None = >= 2)
SCHEDULES: dict[str, tuple[str, str, int | None]] = {
    "gpipe": ("ScheduleGPipe", "loop", 1),
    "1f1b": ("Schedule1F1B", "loop", 1),
    "interleaved_1f1b": ("ScheduleInterleaved1F1B", "loop", None),
    "interleaved_zero_bubble": ("ScheduleInterleavedZeroBubble", "loop", None),
    "zero_bubble": ("ScheduleZBVZeroBubble", "v", 2),
}
ZERO_BUBBLE = ("zero_bubble", "interleaved_zero_bubble")


# ---------------------------------------------------------------- the layout (pure functions: no process group)


@dataclass(frozen=True)
class PipelineLayout:
    """Which blocks each stage holds and which pipeline rank runs it, for ``pp`` ranks."""

    pp: int
    schedule: str
    stages_per_rank: int
    n_microbatches: int
    layers: tuple[tuple[int, int], ...]  # per stage: [start, stop) block indices

    @property
    def n_stages(self) -> int:
        return self.pp * self.stages_per_rank

    def rank_of(self, stage: int) -> int:
        """The pipeline rank (pp coordinate) that runs ``stage``: round robin ("loop"), or down and back up ("v":
        rank r holds stages r and 2 pp - 1 - r, so rank 0 holds the first and the last)."""
        if SCHEDULES[self.schedule][1] == "v":
            return stage if stage < self.pp else 2 * self.pp - 1 - stage
        return stage % self.pp

    def stages_of(self, pp_rank: int) -> list[int]:
        return [s for s in range(self.n_stages) if self.rank_of(s) == pp_rank]

    def bubble_fraction(self) -> float:
        return bubble_fraction(self.schedule, self.pp, self.n_microbatches, self.stages_per_rank)


def bubble_fraction(schedule: str, pp: int, n_microbatches: int, stages_per_rank: int = 1) -> float:
    """Idle fraction of a pipeline step with equal stage times: (p - 1) / (v m + p - 1) for GPipe / 1F1B (v = 1)
    and the interleaved schedules (v stages per rank); zero-bubble schedules fill the ramp with weight-gradient
    work, so their ideal bubble is ~0 when forward, input-gradient and weight-gradient times are equal."""
    if pp <= 1:
        return 0.0
    if schedule in ZERO_BUBBLE:
        return 0.0
    v = stages_per_rank if schedule == "interleaved_1f1b" else 1
    return (pp - 1) / (v * n_microbatches + pp - 1)


def split_layers(n_layer: int, n_stages: int, explicit: list[int] | None = None) -> tuple[tuple[int, int], ...]:
    """Contiguous block ranges per stage. Balanced by count with the embedding and the head each weighed as one
    block (the first and last stages get one block fewer when that keeps every stage non-empty); ``explicit``
    gives the block count of every stage instead."""
    if explicit is not None:
        counts = list(explicit)
    else:
        units = n_layer + 2  # embedding + blocks + head
        bounds = [round(k * units / n_stages) for k in range(n_stages + 1)]
        counts = [sum(1 for u in range(bounds[k], bounds[k + 1]) if 1 <= u <= n_layer) for k in range(n_stages)]
        if min(counts) < 1:  # too few blocks to weigh the ends in: by count only
            counts = [n_layer // n_stages + (1 if k < n_layer % n_stages else 0) for k in range(n_stages)]
    out, start = [], 0
    for c in counts:
        out.append((start, start + c))
        start += c
    return tuple(out)


def check_pipeline(pp: int, pcfg, n_layer: int, micro_batch_size: int, grad_accum: int, *,
                   compile: bool = False, fsdp: bool = False) -> PipelineLayout:
    """The layout for ``pp`` ranks, or a ValueError with one line naming the bad value and what is allowed."""
    schedule = pcfg.pp_schedule
    if schedule not in SCHEDULES:
        raise ValueError(f"parallel.pp_schedule={schedule!r} is not one of {', '.join(SCHEDULES)}")
    fixed = SCHEDULES[schedule][2]
    spr = pcfg.pp_stages_per_rank
    if fixed is not None:
        if spr is not None and spr != fixed:
            raise ValueError(f"parallel.pp_stages_per_rank={spr}: parallel.pp_schedule={schedule} runs exactly {fixed} "
                             f"stage(s) per rank")
        spr = fixed
    else:
        spr = 2 if spr is None else spr
        if spr < 2:
            raise ValueError(f"parallel.pp_stages_per_rank={spr}: parallel.pp_schedule={schedule} needs >= 2 stages "
                             f"per rank (use 1f1b or gpipe for one)")
    n_stages = pp * spr
    explicit = pcfg.pp_layers_per_stage
    if explicit is not None:
        explicit = [int(c) for c in explicit]
        if len(explicit) != n_stages or min(explicit) < 1 or sum(explicit) != n_layer:
            raise ValueError(f"parallel.pp_layers_per_stage={explicit} must list {n_stages} block counts >= 1 "
                             f"(pp={pp} x {spr} stage(s) per rank) summing to the model's n_layer={n_layer}")
    elif n_stages > n_layer:
        raise ValueError(f"parallel.pp={pp} with {spr} stage(s) per rank makes {n_stages} stages but the model has "
                         f"{n_layer} blocks; every stage needs at least one (allowed: pp x stages per rank <= {n_layer})")
    if compile and schedule in ZERO_BUBBLE:
        raise ValueError(f"train.compile=true does not combine with parallel.pp_schedule={schedule} (torch's "
                         f"zero-bubble schedules split backward in two, which compiled blocks do not support); use "
                         f"1f1b or interleaved_1f1b")
    if fsdp and schedule in ZERO_BUBBLE:
        raise ValueError(f"parallel.pp_schedule={schedule} does not combine with FSDP2 / HSDP (dp_shard > 1, "
                         f"dp_replicate > 1 or strategy=fsdp|hsdp) in torch's pipelining: the split weight-gradient "
                         f"pass misses FSDP's gradient hooks (measured: gradients differ from one process); use "
                         f"1f1b or interleaved_1f1b with data parallelism")
    rows = micro_batch_size * grad_accum
    m = pcfg.pp_microbatches
    if m is not None:
        problem = _microbatch_problem(schedule, pp, m, rows)
        if problem:
            raise ValueError(f"parallel.pp_microbatches={m}: {problem}")
    else:
        # train.grad_accum (each micro-batch one pipeline microbatch, as Megatron-LM counts them), else the smallest
        # multiple of pp that divides the step's sequences, else one per sequence
        candidates = [grad_accum] + [d for d in range(pp, rows + 1, pp) if rows % d == 0] + [rows]
        m = next((c for c in candidates if c >= pp and not _microbatch_problem(schedule, pp, c, rows)), None)
        if m is None:
            raise ValueError(f"parallel.pp={pp} with pp_schedule={schedule}: the {rows} sequences per optimizer step "
                             f"(train.micro_batch_size={micro_batch_size} x train.grad_accum={grad_accum}) cannot "
                             f"make {pp} or more pipeline microbatches; raise train.grad_accum")
    return PipelineLayout(pp=pp, schedule=schedule, stages_per_rank=spr, n_microbatches=m,
                          layers=split_layers(n_layer, n_stages, explicit))


def _microbatch_problem(schedule: str, pp: int, m: int, rows: int) -> str | None:
    """Why ``m`` pipeline microbatches do not work for ``rows`` sequences per step and this schedule, or None."""
    if m < 1 or rows % m:
        return (f"must divide the {rows} sequences each data-parallel replica runs per optimizer step "
                f"(train.micro_batch_size x train.grad_accum)")
    if schedule != "gpipe" and m < pp:
        return f"pp_schedule={schedule} needs at least pp={pp} microbatches"
    if schedule in ("interleaved_1f1b", "interleaved_zero_bubble") and m % max(1, m // pp):
        return f"pp_schedule={schedule} needs a multiple of max(1, microbatches // pp) = {max(1, m // pp)}"
    return None


# ---------------------------------------------------------------- one stage of the model


class StageBlocks(nn.ModuleDict):
    """A stage's blocks under their model-wide indices (parameter names ``blocks.<i>.*`` as in the whole
    model). Iterating yields the blocks, like the whole model's ``nn.ModuleList``."""

    def __iter__(self):
        return iter(self.values())


class GPTStage(GPT):
    """The blocks ``[start, stop)`` of a ``GPT``, plus the embedding on the first stage and the final norm and
    LM head on the last (a tied embedding weight is held by both ends: the last stage keeps ``tok_emb`` for it).
    ``forward(h, targets=None)``: token ids (first stage) or the previous stage's activations in; activations
    out, or on the last stage the logits, or with ``targets`` the fused head + cross-entropy loss."""

    def __init__(self, config: GPTConfig, layers: tuple[int, int], *, first: bool, last: bool) -> None:
        # plain attributes before nn.Module.__init__: GPT.__init__ calls _build, which reads them
        self.layer_range, self.is_first, self.is_last = layers, first, last
        self.seq_shards = 1  # tensor parallel's sequence shards between stages (set by PipelineEngine)
        super().__init__(config)

    def _build(self, cfg: GPTConfig) -> None:
        tie = cfg.tie_embeddings
        holds_emb = self.is_first or (self.is_last and tie)
        holds_head = self.is_last or (self.is_first and tie)
        self.tok_emb = _embedding(cfg.vocab_size, cfg.n_embd) if holds_emb else None
        self.pos_emb = _embedding(cfg.block_size, cfg.n_embd) if self.is_first and cfg.pos == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = StageBlocks({str(i): Block(cfg) for i in range(*self.layer_range)})
        self.norm_f = build_norm(cfg) if self.is_last else None
        self.lm_head = LMHead(cfg.n_embd, cfg.vocab_size, bias=False) if holds_head else None
        self.tie_weights()
        if cfg.pos == "rope":
            self.register_buffer("rope_cos", torch.empty(cfg.block_size, cfg.head_dim), persistent=False)
            self.register_buffer("rope_sin", torch.empty(cfg.block_size, cfg.head_dim), persistent=False)
        else:
            self.rope_cos = self.rope_sin = None

    def tie_weights(self) -> None:
        if self.tok_emb is not None and self.lm_head is not None:
            super().tie_weights()

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        if device is None:
            device = next(self.parameters()).device
        super().init_buffers(device)

    def forward(self, h: Tensor, targets: Tensor | None = None,  # type: ignore[override]
                doc_ids: Tensor | None = None) -> Tensor:
        """``doc_ids``: the microbatch's token ids (B, T) on every stage under document masking (the config's
        ``doc_mask_token``): each stage derives the same positions and block mask from them as one process."""
        positions, doc_mask = self.document_layout(doc_ids) if doc_ids is not None else (None, None)
        if self.is_first:
            h = self.embed(h, 0, positions)
        cos, sin = self.rope(0, h.shape[1] * (1 if self.is_first else self.seq_shards), positions)
        for block in self.blocks:
            if doc_mask is None:  # the whole model's call (tensor parallel's input plan expects it)
                h = block(h, cos, sin, None, 0)
            else:
                h = block(h, cos, sin, None, 0, attn_mask=doc_mask)
        if not self.is_last:
            return h
        h = self.norm_f(h)
        return self.lm_head(h) if targets is None else self.lm_head(h, targets)


class StageParts(nn.Module):
    """This rank's stages as one module with the whole model's parameter names (``tok_emb``, ``blocks.<i>``,
    ``norm_f``, ``lm_head``): what the optimizer, checkpoints and the gradient norm see. A tied weight held
    twice on one rank (first and last stage of a V schedule) is registered once: ``tied_copies`` lists the
    second holder's modules, refreshed from the first after every update."""

    def __init__(self, stages: list[GPTStage]) -> None:
        super().__init__()
        self.config = stages[0].config
        self.blocks = StageBlocks()
        self.tied_copies: list[tuple[nn.Module, nn.Module]] = []  # (owner module, copy module), not registered
        for stage in stages:
            for name in ("tok_emb", "pos_emb", "norm_f", "lm_head"):
                mod = getattr(stage, name)
                if mod is None:
                    continue
                held = getattr(self, name, None)
                if held is None:
                    setattr(self, name, mod)
                else:  # the tied embedding / head weight, held by the first and the last stage of this rank
                    self.tied_copies.append((held, mod))
            for key, block in stage.blocks.items():
                self.blocks[key] = block

    @torch.no_grad()
    def refresh_tied_copies(self) -> None:
        for owner, copy in self.tied_copies:
            for p_owner, p_copy in zip(owner.parameters(), copy.parameters(), strict=True):
                _local(p_copy).copy_(_local(p_owner))


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


# ---------------------------------------------------------------- point-to-point forward (eval, generation)

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int64)


def send_tensor(t: Tensor, dst: int, group) -> None:
    """Send a tensor whose shape and dtype the receiver does not know: an 8-int header, then the data."""
    header = torch.zeros(8, dtype=torch.int64, device=t.device)
    header[0], header[1] = _DTYPES.index(t.dtype), t.dim()
    header[2:2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
    dist.send(header, dist.get_global_rank(group, dst), group=group)
    dist.send(t.contiguous(), dist.get_global_rank(group, dst), group=group)


def recv_tensor(src: int, group, device: torch.device) -> Tensor:
    header = torch.empty(8, dtype=torch.int64, device=device)
    dist.recv(header, dist.get_global_rank(group, src), group=group)
    shape = [int(s) for s in header[2:2 + int(header[1])]]
    out = torch.empty(shape, dtype=_DTYPES[int(header[0])], device=device)
    dist.recv(out, dist.get_global_rank(group, src), group=group)
    return out


def pipeline_forward(layout: PipelineLayout, stages: dict[int, GPTStage], pp_rank: int, group, x: Tensor,
                     device: torch.device, doc_ids: Tensor | None = None, **last_kwargs) -> Tensor | None:
    """One batch through every stage in order, forward only: each rank runs its stages and passes activations
    to the next stage's rank. Returns the last stage's output where it ran, None on the other pipeline ranks.
    ``doc_ids`` (document masking) goes to every stage, ``last_kwargs`` to the last."""
    h = x
    for s in range(layout.n_stages):
        owner = layout.rank_of(s)
        if owner != pp_rank:
            continue
        if s > 0 and layout.rank_of(s - 1) != pp_rank:
            h = recv_tensor(layout.rank_of(s - 1), group, device)
        stage = stages[s]
        h = stage(h, doc_ids=doc_ids, **last_kwargs) if stage.is_last else stage(h, doc_ids=doc_ids)
        if s + 1 < layout.n_stages and layout.rank_of(s + 1) != pp_rank:
            send_tensor(h, layout.rank_of(s + 1), group)
    return h if layout.rank_of(layout.n_stages - 1) == pp_rank else None


def schedule_class(name: str):
    from torch.distributed.pipelining import schedules

    return getattr(schedules, SCHEDULES[name][0])





# ---------------------------------------------------------------- the engine


class PipelineEngine(NativeEngine):
    """``Engine`` for ``pp > 1``: this rank's stages (TP / AC / compile / FSDP2 applied to each), a
    ``torch.distributed.pipelining`` schedule over them, and everything the trainer needs across stages:
    the loss of the last stage on every rank, the gradient norm over all stages, one fp16 overflow verdict,
    the tied embedding kept equal at both ends, eval and generation by a forward-only pass."""

    def __init__(self, cfg, spec, dist_info) -> None:
        t = cfg.train
        self.layout = check_pipeline(spec.dims.pp, cfg.parallel, spec.gpt_config.n_layer, t.micro_batch_size,
                                     t.grad_accum, compile=bool(t.compile), fsdp=spec.dims.fsdp)
        self._pending: list[tuple[Tensor, Tensor]] = []
        self._poison = False
        super().__init__(cfg, spec, dist_info)
        with torch.device("meta"):
            self.n_params = sum(p.numel() for p in GPT(spec.gpt_config).parameters())
        self._build_schedule()

    # ------------------------------------------------------------ construction

    def _build(self):
        from train.parallel.rng import seed_init, seed_training
        from train.parallel.sharded_init import replay_init
        from train.parallel.tp import apply_tp
        from train.parallelize import apply_ac, apply_compile, apply_fsdp, ensure_process_group

        cfg, t, dims, layout = self.cfg, self.cfg.train, self.dims, self.layout
        ensure_process_group(self.device, cfg.strategy.timeout_s)
        self.pp_group = dims.mesh["pp"].get_group()
        self.pp_rank = dims.coordinate(self.dist.rank)["pp"]
        self.sharded = dims.tp > 1 or dims.fsdp
        seed_init(t.seed)
        self.stages: dict[int, GPTStage] = {}
        for s in layout.stages_of(self.pp_rank):
            with torch.device("meta"):
                stage = GPTStage(self.spec.gpt_config, layout.layers[s], first=s == 0, last=s == layout.n_stages - 1)
            if dims.tp > 1:
                apply_tp(stage, dims.tp_mesh)
                stage.seq_shards = dims.tp
            apply_ac(stage, t.activation_checkpointing)
            if t.compile:
                apply_compile(stage, self.device)
            if dims.fsdp:
                apply_fsdp(stage, dims.fsdp_mesh, param_dtype=self.precision.param_dtype,
                           reduce_dtype=self.precision.reduce_dtype,
                           reshard_after_forward=bool(cfg.strategy.reshard_after_forward), offload_params=False)
            stage.to_empty(device=self.device)
            seed_init(t.seed)
            with torch.no_grad():
                replay_init(stage)  # each rank writes its slice of the single-process init
            self.stages[s] = stage
        parts = StageParts([self.stages[s] for s in sorted(self.stages)])
        if self.spec.init_from is not None:
            self._load_hf_sharded(parts)
        parts.refresh_tied_copies()
        seed_training(t.seed, self.dp_rank)
        return parts, parts

    def _build_schedule(self) -> None:
        from torch.distributed.pipelining import PipelineStage

        layout = self.layout
        pipe_stages = [PipelineStage(self.stages[s], s, layout.n_stages, self.device, group=self.pp_group)
                       for s in sorted(self.stages)]
        cls = schedule_class(layout.schedule)
        first = pipe_stages if SCHEDULES[layout.schedule][2] != 1 else pipe_stages[0]
        self.schedule = cls(first, n_microbatches=layout.n_microbatches, loss_fn=self._loss_fn, scale_grads=True)
        self._no_outputs = "return_outputs" in inspect.signature(self.schedule.step).parameters
        if self.scaler is not None:  # only the last stage scales a loss; every stage unscales its gradients
            self.scaler.scale(torch.zeros((), device=self.device))
        self.has_first = 0 in self.stages
        self.has_last = layout.n_stages - 1 in self.stages
        self._tie_group = None
        if self.spec.gpt_config.tie_embeddings and layout.rank_of(0) != layout.rank_of(layout.n_stages - 1):
            self._tie_group = self._pair_group(layout.rank_of(0), layout.rank_of(layout.n_stages - 1))

    def _pair_group(self, a: int, b: int):
        """The process group of the two pipeline ranks ``a`` and ``b`` in every pipeline (same data / tensor
        coordinates); collective: every rank creates every pair's group, in the same order."""
        mine = None
        stride = self.dist.world_size // self.dims.pp
        for base in range(stride):
            ranks = [a * stride + base, b * stride + base]
            group = dist.new_group(ranks)
            if self.dist.rank in ranks:
                mine = group
        return mine

    def dp_group(self):
        return None if self.dims.dp_size == self.dist.world_size else self.dims.dp_mesh.get_group()

    # ------------------------------------------------------------ training

    @property
    def _fused_loss(self) -> bool:
        # zero-bubble schedules run backward twice over one graph (input, then weight gradients); the fused and
        # chunked losses form their gradients in forward and hand them out once, so the last stage emits logits
        # and torch's cross-entropy runs there (measured: gradients then equal one process's)
        return super()._fused_loss and not self._zero_bubble

    @property
    def _doc_mask(self) -> bool:
        return self.spec.gpt_config.doc_mask_token is not None

    @property
    def _zero_bubble(self) -> bool:
        return self.layout.schedule in ZERO_BUBBLE

    def _loss(self, logits: Tensor, y: Tensor) -> Tensor:
        if self._zero_bubble and not self.tp:
            return torch_cross_entropy(logits, y)
        return super()._loss(logits, y)

    def _loss_fn(self, out: Tensor, target: Tensor) -> Tensor:
        """Per microbatch on the last stage (``out``: the fused loss already, or the logits); what backward
        starts from, so poisoned (a test hook) and scaled (fp16) here. The schedule divides the gradients by the
        number of microbatches (``scale_grads``): their mean, as one process computes it."""
        loss = out if self._fused_loss else self._loss(out, target)
        if isinstance(loss, DTensor):
            loss = loss.full_tensor()
        if self._poison:
            loss = loss * float("nan")
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def micro_step(self, x, y, *, last, poison=False):
        self._pending.append((x, y))
        self._poison = self._poison or poison
        if not last:
            return torch.zeros((), device=self.device)
        x = torch.cat([p[0] for p in self._pending])
        y = torch.cat([p[1] for p in self._pending])
        self._pending.clear()
        losses: list[Tensor] = []  # filled on the last stage's rank: one per microbatch
        for stage in self.stages.values():
            stage.train()
        kwargs = {"targets": y} if self._fused_loss else {}
        if self._doc_mask:  # every stage's microbatch of token ids (the schedule splits kwargs like the input)
            kwargs["doc_ids"] = x
        if self._no_outputs:  # the last stage's outputs are not kept for the caller (logits would be big)
            kwargs["return_outputs"] = False
        with self.precision.autocast_ctx(), self._loss_ctx():
            self.schedule.step(x, target=y, losses=losses, **kwargs)
        self._poison = False
        if losses:
            loss = torch.stack([t.detach().float() for t in losses]).mean()
            if self.scaler is not None:
                loss = loss / self.scaler.get_scale()
        else:
            loss = torch.zeros((), device=self.device)
        dist.all_reduce(loss, op=dist.ReduceOp.SUM, group=self.pp_group)  # only the last stage's rank adds
        return loss

    def skip_update(self, x, y) -> None:
        """A schedule runs only over a whole step's microbatches: the step's gradients on every stage turn NaN
        instead, and step() skips (stage norms summed over the pipeline: NaN on every rank)."""
        for p in self.raw.parameters():
            if p.grad is not None:
                _local(p.grad).fill_(float("nan"))

    def _sync_tied(self) -> None:
        """The tied embedding / head weight lives on the first and the last stage: sum its two gradients so both
        copies take the same update (the single-process gradient is the sum of both uses)."""
        parts: StageParts = self.raw
        for owner, copy in parts.tied_copies:  # both ends on this rank
            for p, q in zip(owner.parameters(), copy.parameters(), strict=True):
                if q.grad is not None:
                    p.grad = q.grad if p.grad is None else p.grad + q.grad
                    q.grad = None
        if self._tie_group is None or not (self.has_first or self.has_last):
            return
        weight = parts.tok_emb.weight
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        dist.all_reduce(_local(weight.grad), group=self._tie_group)

    def _grad_norm(self):
        params = [p for p in self.raw.parameters() if p.grad is not None]
        if self._tie_group is not None and self.has_last and not self.has_first:
            held = self.raw.tok_emb.weight  # the first stage's rank counts the tied weight
            params = [p for p in params if p is not held]
        with _quiet_redistribute():
            if params:
                norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0, foreach=True)
                if isinstance(norm, DTensor):
                    norm = norm.full_tensor()
            else:
                norm = torch.zeros((), device=self.device)
        sq = norm.float() ** 2
        dist.all_reduce(sq, group=self.pp_group)  # the stages' squared norms add up to the model's
        norm = sq.sqrt()
        dist.all_reduce(norm, op=dist.ReduceOp.MAX)  # bitwise one value everywhere: every rank clips alike
        return [p for p in self.raw.parameters() if p.grad is not None], norm

    def step(self):
        self._sync_tied()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
            state = self.scaler._per_optimizer_states[id(self.optimizer)]
            for flag in state["found_inf_per_device"].values():
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # one overflow verdict for every stage and shard
        stats = self._finish_step()
        self.raw.refresh_tied_copies()
        return stats

    # ------------------------------------------------------------ eval and generation

    @torch.no_grad()
    def _forward_eval(self, x, targets=None, doc_ids=None):
        """Forward only through the pipeline; ``doc_ids`` under document masking when scoring (generation is one
        document, as the single-process KV-cached decoder treats it)."""
        for stage in self.stages.values():
            stage.eval()
        try:
            kwargs = {"targets": targets} if targets is not None else {}
            with self.precision.autocast_ctx():
                return pipeline_forward(self.layout, self.stages, self.pp_rank, self.pp_group, x, self.device,
                                        doc_ids=doc_ids, **kwargs)
        finally:
            for stage in self.stages.values():
                stage.train()

    @torch.no_grad()
    def eval_loss(self, x, y):
        doc_ids = x if self._doc_mask else None
        if self._fused_loss:
            loss = self._forward_eval(x, y, doc_ids)
        else:
            logits = self._forward_eval(x, doc_ids=doc_ids)
            loss = None
            if logits is not None:
                with self._loss_ctx():
                    loss = self._loss(logits, y)
        if isinstance(loss, DTensor):
            loss = loss.full_tensor()
        loss = loss.float() if loss is not None else torch.zeros((), device=self.device)
        dist.all_reduce(loss, group=self.pp_group)
        return loss

    def _share_token(self, tok: Tensor | None, like: Tensor) -> Tensor:
        """The last stage's sampled token to every pipeline rank."""
        out = tok if tok is not None else torch.empty_like(like)
        src = dist.get_global_rank(self.pp_group, self.layout.rank_of(self.layout.n_stages - 1))
        dist.broadcast(out, src, group=self.pp_group)
        return out
