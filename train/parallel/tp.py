"""Tensor parallelism with sequence parallelism (DTensor), applied to a plain ``GPT`` in place.

Layout (Megatron-LM's, as torchtitan writes it with ``torch.distributed.tensor.parallel``):

- attention: q/k/v colwise (each rank owns ``n_head / tp`` heads), o rowwise; MLP up (and gate) colwise,
  down rowwise. Rowwise outputs are reduce-scattered over the sequence, so between blocks every rank holds
  ``[B, T / tp, C]``: norms, residual adds and dropout run on sequence shards (sequence parallel), and
  each attention / MLP starts with an all-gather of its normed input.
- GQA / MQA: ``tp`` must divide ``n_head``. When it also divides ``n_kv_head`` the K/V heads are split
  like the query heads; when ``n_kv_head`` divides ``tp`` instead (Falcon-7B has one K/V head) K/V are
  replicated: every rank computes them whole, keeps the K/V heads its query heads read, and their weight
  gradients are summed over the TP group.
- embedding: vocabulary-parallel (rowwise), output replicated so Gemma's sqrt(d) scale, learned
  positions and embedding dropout see whole sequences; the first block takes its sequence shard.
- LM head: vocabulary-parallel (colwise) with the logits left sharded ``[B, T, V / tp]``; the loss is
  computed on the shards (``loss_parallel``), so no rank ever holds ``[B, T, V]``. Tied embeddings stay
  tied (both weights are sharded the same way, over the vocabulary).

Parameter names never change, so checkpoints (DCP) reshard between any TP degree and one process.
Everything here runs on CPU gloo ranks as on NCCL.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)


def check_tp_divides(n_head: int, n_kv_head: int, tp: int, where: str = "parallel.tp") -> None:
    """One-line errors for head counts that a TP degree cannot split."""
    if n_head % tp:
        raise ValueError(f"{where}={tp} must divide the model's n_head={n_head} (each rank owns whole heads); "
                         f"allowed: {', '.join(str(d) for d in range(1, n_head + 1) if n_head % d == 0)}")
    if n_kv_head % tp and tp % n_kv_head:
        raise ValueError(f"{where}={tp} must divide n_kv_head={n_kv_head} (K/V heads split) or be a multiple of "
                         f"it (K/V heads replicated); it is neither")


def _replicate_params(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
    for pname, p in list(module.named_parameters(recurse=False)):
        module.register_parameter(pname, nn.Parameter(distribute_tensor(p, mesh, [Replicate()]),
                                                      requires_grad=p.requires_grad))


def _as_replicated(mod: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
    """The first input as a replicated DTensor (a whole tensor that every rank holds the same)."""
    x = inputs[0]
    return (x if isinstance(x, DTensor) else DTensor.from_local(x, mesh, [Replicate()], run_check=False), *inputs[1:])


class ReplicateParallel(ParallelStyle):
    """Parameters replicated over the TP group, input and output plain (whole) tensors.

    For a module that runs in a replicated region (learned positions): every rank computes the same
    values and receives the same output gradient, so the parameter gradients already agree."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, _replicate_params, input_fn=_as_replicated,
                                 output_fn=lambda mod, out, mesh: out.to_local())


class ReplicatedKVParallel(ParallelStyle):
    """A K or V projection when ``tp`` is a multiple of ``n_kv_head``: weights replicated, the input the
    attention's all-gathered (replicated) activations, the output cut to the K/V heads this rank's query
    heads read. Each rank back-propagates only through its slice, so the output's gradient is a partial
    sum over the TP group and the weight gradient is all-reduced."""

    def __init__(self, n_kv_head: int, head_dim: int) -> None:
        super().__init__()
        self.n_kv_head, self.head_dim = n_kv_head, head_dim

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        tp = device_mesh.size()
        ranks_per_head = tp // self.n_kv_head
        head = device_mesh.get_local_rank() // ranks_per_head  # query heads of rank r read K/V head r // (tp / nkv)
        lo, hi = head * self.head_dim, (head + 1) * self.head_dim

        def output_fn(mod, out, mesh):
            return out.to_local(grad_placements=[Partial()])[..., lo:hi]

        return distribute_module(module, device_mesh, _replicate_params, input_fn=_as_replicated, output_fn=output_fn)


class VocabParallelEmbedding(ParallelStyle):
    """The token embedding split over the vocabulary (``Shard(0)``), looked up locally: each rank embeds the
    ids in its vocabulary range (zeros elsewhere) and one all-reduce sums the partial embeddings into whole
    ``[B, T, C]`` activations on every rank. Done on the local shard (not through DTensor's embedding rule)
    so the weight gradient is computed at its shard's size: DTensor's rule builds a full ``[V, C]``
    gradient first, the size of the unsplit table."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def partition(name, mod, mesh):
            for pname, p in list(mod.named_parameters(recurse=False)):
                mod.register_parameter(pname, nn.Parameter(distribute_tensor(p, mesh, [Shard(0)]),
                                                           requires_grad=p.requires_grad))

        distribute_module(module, device_mesh, partition)
        rows = -(-module.num_embeddings // device_mesh.size())  # torch.chunk's split: the last shard may be short
        first = device_mesh.get_local_rank() * rows

        def forward(ids: torch.Tensor) -> torch.Tensor:
            weight = module.weight.to_local()  # [rows, C]; its gradient arrives as this rank's Shard(0)
            outside = (ids < first) | (ids >= first + weight.shape[0])
            out = torch.nn.functional.embedding((ids - first).masked_fill(outside, 0), weight)
            out = out.masked_fill(outside.unsqueeze(-1), 0.0)  # [B, T, C]: this rank's partial sum
            return DTensor.from_local(out, device_mesh, [Partial()], run_check=False).redistribute(
                device_mesh, [Replicate()]).to_local()

        module.forward = forward  # instance attribute: parameter names and the module tree are unchanged
        return module


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Tensor + sequence parallel over ``tp_mesh`` (1-D), in place, before activation checkpointing,
    compile and FSDP. ``model`` is a plain ``GPT``, usually still on ``meta``."""
    cfg = model.config
    tp = tp_mesh.size()
    check_tp_divides(cfg.n_head, cfg.n_kv_head, tp)
    root = {
        # vocabulary-parallel embedding; whole sequences out (Gemma's scale, positions, dropout are replicated)
        "tok_emb": VocabParallelEmbedding(),
        "norm_f": SequenceParallel(),
        # vocabulary-parallel head: logits stay sharded over the vocabulary for the loss
        "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False),
        "pos_emb": ReplicateParallel(),
    }
    # a pipeline stage (train/parallel/pipeline.py) holds only some of these modules
    parallelize_module(model, tp_mesh, {k: v for k, v in root.items() if getattr(model, k, None) is not None})
    split_kv = cfg.n_kv_head % tp == 0
    kv_style = (lambda: ColwiseParallel()) if split_kv else (lambda: ReplicatedKVParallel(cfg.n_kv_head, cfg.head_dim))
    none4 = (None, None, None, None)  # Block / Attention take (x, cos, sin, kv_cache, start_pos)
    for i, block in enumerate(model.blocks):
        plan = {
            "attn_norm": SequenceParallel(),
            "attn": PrepareModuleInput(input_layouts=(Shard(1), *none4), desired_input_layouts=(Replicate(), *none4)),
            "attn.q_proj": ColwiseParallel(),
            "attn.k_proj": kv_style(),
            "attn.v_proj": kv_style(),
            "attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
        }
        if block.mlp_norm is not None:
            plan["mlp_norm"] = SequenceParallel()
        if hasattr(block.mlp, "gate_proj"):
            plan["mlp.gate_proj"] = ColwiseParallel()
        parallelize_module(block, tp_mesh, plan)
        # the embedding's whole sequences -> this rank's sequence shard (a local slice, no traffic); a later
        # pipeline stage receives sequence shards already
        if i == 0 and getattr(model, "is_first", True):
            parallelize_module(block, tp_mesh, PrepareModuleInput(
                input_layouts=(Replicate(), *none4), desired_input_layouts=(Shard(1), *none4), use_local_output=True))
    model.tie_weights()  # both sides were replaced by DTensor parameters: point the head at the embedding again


def tp_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy of vocabulary-sharded logits (DTensor ``Shard(-1)``); call and backward
    inside ``loss_parallel()``."""
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
