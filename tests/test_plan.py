"""train.plan: memory components against hand counts and against what torch actually holds.

Oracles: model.stats.count_params (parameter bytes), autograd's saved tensors (per-block activation
formula, every family, fp32 and bf16 autocast), and TensorMemoryTracker (live tensor bytes at the end
of the forward and the peak through backward, for each AC mode). Tensor parallelism: parameter counts by
hand from each config's shapes, a TP rank's saved tensors emulated in one process (sequence-sharded norms,
all-gathered branch inputs, local-width Linears), and the communication volume by hand.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from model.config import GPTConfig
from model.gpt import GPT, Block, rope_tables
from model.stats import count_params
from train.bench import TensorMemoryTracker
from train.loss import cross_entropy
from train.parallelize import apply_ac
from train.plan import (
    GIB,
    PlanArgs,
    activation_bytes,
    block_saved_bytes_per_token,
    main,
    max_micro_batch,
    memory_bytes,
    model_shape,
    plan,
    recompute_flops_per_token,
    resolve_dims,
    tp_split,
)

TINY = ["gpt2-tiny", "falcon-tiny", "gemma-tiny", "llama-tiny", "falcon-40b-mini"]


@pytest.fixture(scope="module")
def gpt2_shape():
    return model_shape("gpt2-124m", 1024)


def _args(**kw) -> PlanArgs:
    base = {"model": "gpt2-124m", "strategy": "single", "nodes": 1, "gpus": 1, "micro_batch": 1, "seq_len": 1024}
    return PlanArgs(**{**base, **kw})


# ---- state bytes vs count_params -------------------------------------------------------------


@pytest.mark.parametrize("strategy,precision,nodes,gpus,expect", [
    # bytes per parameter (params, grads, optimizer) after sharding, by hand
    ("single", "fp32", 1, 1, (4, 4, 8)),
    ("ddp", "bf16", 1, 8, (4, 4, 8)),
    ("fsdp", "bf16", 2, 8, (4 / 16, 4 / 16, 8 / 16)),
    ("hsdp", "bf16", 2, 8, (4 / 8, 4 / 8, 8 / 8)),  # sharded inside a node, replicated across nodes
    ("zero1", "bf16", 1, 8, (2, 2, 12 / 8)),
    ("zero2", "bf16", 1, 8, (2, 2 / 8, 12 / 8)),
    ("zero3", "bf16", 4, 8, (2 / 32, 2 / 32, 12 / 32)),
])
def test_state_bytes_match_count_params(gpt2_shape, strategy, precision, nodes, gpus, expect):
    n = count_params(GPTConfig.from_name("gpt2-124m")).total
    assert gpt2_shape.n_params == n == 124_439_808
    bd, _, _ = memory_bytes(_args(strategy=strategy, precision=precision, nodes=nodes, gpus=gpus), gpt2_shape)
    assert bd["parameters"] == pytest.approx(n * expect[0])
    assert bd["gradients"] == pytest.approx(n * expect[1])
    assert bd["optimizer_states"] == pytest.approx(n * expect[2])


def test_hsdp_shard_group_spans_nodes(gpt2_shape):
    n = gpt2_shape.n_params
    bd, _, _ = memory_bytes(_args(strategy="hsdp", nodes=4, gpus=8, hsdp_shard=16), gpt2_shape)
    assert bd["optimizer_states"] == pytest.approx(8 * n / 16)
    with pytest.raises(ValueError, match="hsdp_shard=12 must divide the 32 GPUs"):
        _args(strategy="hsdp", nodes=4, gpus=8, hsdp_shard=12).validate()


def test_offload_moves_states_to_cpu(gpt2_shape):
    a = _args(strategy="zero3", nodes=1, gpus=8)
    on, _, off0 = memory_bytes(a, gpt2_shape)
    opt, _, off1 = memory_bytes(dataclasses.replace(a, offload="optimizer"), gpt2_shape)
    par, _, off2 = memory_bytes(dataclasses.replace(a, offload="params"), gpt2_shape)
    assert off0 == 0 and opt["optimizer_states"] == 0 and off1 == pytest.approx(on["optimizer_states"])
    assert par["parameters"] == 0 and off2 == pytest.approx(on["parameters"] + on["optimizer_states"])


# ---- activation formula vs autograd ----------------------------------------------------------


def _saved_activations(block, cfg: GPTConfig, T: int):
    """(cos, sin, seen, pack): the RoPE tables for T tokens (None without RoPE) and a saved-tensor pack hook that
    records in ``seen`` {storage: bytes} every tensor autograd saves that is not a parameter, a RoPE table or
    autocast's bf16 weight copy (accounted separately: autocast_weight_copies)."""
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()}
    param_shapes = {tuple(p.shape) for p in block.parameters() if p.dim() == 2}
    param_shapes |= {s[::-1] for s in param_shapes}  # linear saves the cast weight transposed
    cos = sin = None
    if cfg.pos == "rope":
        cos, sin = (t[:T] for t in rope_tables(cfg))
        weights |= {cos.untyped_storage().data_ptr(), sin.untyped_storage().data_ptr()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        is_weight_cast = t.dtype == torch.bfloat16 and tuple(t.shape) in param_shapes
        if st.data_ptr() not in weights and not is_weight_cast:
            seen.setdefault(st.data_ptr(), st.nbytes())
        return t

    return cos, sin, seen, pack


def _saved_block_bytes(name: str, autocast: bool, B: int, T: int) -> tuple[float, float]:
    """(bytes autograd saves for one block, predicted), weight casts and parameters excluded."""
    cfg = GPTConfig.from_name(name)
    torch.manual_seed(0)
    block = Block(cfg)  # one block only: no vocabulary-sized embedding to build
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(B, T, cfg.n_embd, requires_grad=True)
    cos, sin, seen, pack = _saved_activations(block, cfg, T)

    with (torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
          torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)):
        block(x, cos, sin)
    s = model_shape(name, T)
    act = 2 if autocast else 4
    predicted = block_saved_bytes_per_token(s, act, 4, autocast, B) * B * T
    return float(sum(seen.values())), predicted


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_block_formula_equals_autograd_saved_tensors(name, autocast):
    # B*T = 42 is no weight dimension, so a saved (42, C) input is never mistaken for a weight cast
    measured, predicted = _saved_block_bytes(name, autocast, B=2, T=21)
    # per-block constants (Gemma's (1 + w) vector) are the only thing the per-token formula leaves out
    assert predicted == pytest.approx(measured, rel=0.01), (measured, predicted)


def _tracked(name: str, ac: str, B: int, T: int, vocab: int) -> tuple[int, int, int]:
    """(live bytes after forward, peak through backward, gradient bytes) for one micro-step, fp32."""
    cfg = GPTConfig.from_name(name, vocab_size=vocab)
    torch.manual_seed(0)
    model = GPT(cfg)
    apply_ac(model, ac)
    x = torch.randint(0, vocab, (B, T))
    y = torch.randint(0, vocab, (B, T))
    mode = TensorMemoryTracker(exclude=list(model.parameters()) + list(model.buffers()))
    with mode:
        logits = model(x)
        after_forward = mode.current
        loss = cross_entropy(logits, y)
        del logits  # as the trainer does: the loss holds the logits' gradient
        loss.backward()
        del loss
    grads = sum(p.grad.numel() * 4 for p in model.parameters())
    return after_forward, mode.peak, grads


@pytest.mark.parametrize("ac", ["none", "selective", "full"])
def test_activation_memory_vs_tracked_tensors(ac):
    name, B, T, V = "llama-tiny", 2, 128, 1024
    after_forward, peak, grads = _tracked(name, ac, B, T, V)
    s = model_shape(name, T, vocab_size=V)
    est = activation_bytes(s, B, T, ac, act=4, resid=4, autocast=False)
    forward = est.saved_blocks + est.head_inputs + est.logits
    # everything held at the end of the forward is counted tensor by tensor: equal up to index tensors
    assert forward == pytest.approx(after_forward, rel=0.01), (forward, after_forward)
    grads_root = (s.root_params) * 4
    predicted_peak = est.peak(grads, grads_root)
    # the peak also has per-op backward temporaries we do not model: within 10%
    assert predicted_peak == pytest.approx(peak, rel=0.10), (predicted_peak, peak)


@pytest.mark.parametrize("ac", ["none", "full"])
def test_peak_with_a_large_vocabulary_vs_tracked_tensors(ac):
    """V = 32000 over 1024 tokens: the head (logits, their gradient, the loss's fp32 chunks) sets the peak."""
    name, B, T, V = "llama-tiny", 4, 256, 32000
    _after_forward, peak, grads = _tracked(name, ac, B, T, V)
    s = model_shape(name, T, vocab_size=V)
    est = activation_bytes(s, B, T, ac, act=4, resid=4, autocast=False)
    assert est.logits > est.saved_blocks / 2  # the regime this test is for
    assert est.peak(grads, s.root_params * 4) == pytest.approx(peak, rel=0.01)


def test_full_ac_keeps_only_block_inputs(gpt2_shape):
    none = activation_bytes(gpt2_shape, 2, 1024, "none", 4, 4, False)
    sel = activation_bytes(gpt2_shape, 2, 1024, "selective", 4, 4, False)
    full = activation_bytes(gpt2_shape, 2, 1024, "full", 4, 4, False)
    assert full.saved_blocks == 12 * 2 * 1024 * 768 * 4  # L x B x T x C fp32
    assert none.saved_blocks > sel.saved_blocks > full.saved_blocks


# ---- fit logic --------------------------------------------------------------------------------


def test_memory_monotonic(gpt2_shape):
    def peak(**kw):
        return memory_bytes(_args(**kw), gpt2_shape)[1]

    assert peak(micro_batch=1) < peak(micro_batch=2) < peak(micro_batch=4)
    assert peak(ac="full", micro_batch=8) < peak(ac="selective", micro_batch=8) < peak(ac="none", micro_batch=8)
    # short sequences: the end of backward (all gradients) is the peak, whatever the activations
    assert peak(seq_len=256) <= peak(seq_len=512) < peak(seq_len=1024) < peak(seq_len=2048)
    fsdp = [peak(strategy="fsdp", gpus=g) for g in (1, 2, 4, 8)]
    assert fsdp == sorted(fsdp, reverse=True) and fsdp[-1] < fsdp[0]
    z = [peak(strategy=k, gpus=8, micro_batch=1) for k in ("zero1", "zero2", "zero3")]
    assert z[0] > z[1] > z[2]


def test_max_micro_batch_is_the_boundary(gpt2_shape):
    a = _args(strategy="ddp", gpus=8, gpu_mem_gb=16.0, precision="bf16")
    b = max_micro_batch(a, gpt2_shape)
    assert b >= 1

    def total(mb):
        return memory_bytes(dataclasses.replace(a, micro_batch=mb), gpt2_shape)[1] * (1 + a.frag) + GIB * a.context_gb

    assert total(b) <= 16 * GIB < total(b + 1)
    p = plan(dataclasses.replace(a, micro_batch=b), gpt2_shape)
    assert p.fits and p.max_micro_batch == b
    assert not plan(dataclasses.replace(a, micro_batch=b + 1), gpt2_shape).fits
    tiny = plan(dataclasses.replace(a, gpu_mem_gb=1.5), gpt2_shape)  # states alone exceed 1.5 GiB
    assert not tiny.fits and tiny.max_micro_batch == 0


def test_step_time_from_flops(gpt2_shape):
    p = plan(_args(strategy="ddp", gpus=8, micro_batch=8, mfu=0.5, gpu="h100"), gpt2_shape)
    tokens = 8 * 1024
    assert p.compute_time_s == pytest.approx(tokens * gpt2_shape.flops_per_token / (989e12 * 0.5))
    assert p.tokens_per_s == pytest.approx(8 * tokens / p.step_time_s)
    full = plan(_args(strategy="ddp", gpus=8, micro_batch=8, mfu=0.5, ac="full"), gpt2_shape)
    assert full.hfu_flops_per_token > full.flops_per_token and full.compute_time_s > p.compute_time_s


# ---- CLI --------------------------------------------------------------------------------------


def test_cli_json(capsys):
    assert main(["model=gpt2-tiny", "strategy=fsdp", "gpus=2", "micro_batch=2", "seq_len=128", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("memory_gib", "peak_gib", "fits", "max_micro_batch", "step_time_s", "tokens_per_s"):
        assert key in out
    for key in ("parameters", "gradients", "optimizer_states", "activations", "communication_buffers",
                "fragmentation_margin"):
        assert out["memory_gib"][key] >= 0
    # --flags and key=value are the same thing
    assert main(["--model", "gpt2-tiny", "--strategy", "fsdp", "--gpus", "2", "--micro-batch", "2",
                 "--seq_len=128", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == out


@pytest.mark.parametrize("argv,needle", [
    (["model=gpt5"], "gpt2-124m"),  # names the allowed presets
    (["strategy=tp"], "zero3"),
    (["micro_batch=0"], "micro_batch=0"),
    (["gpus=-2"], "gpus=-2"),
    (["seq_len=4096"], "block_size=1024"),
    (["gpu_mem_gb=0"], "gpu_mem_gb"),
    (["strategy=ddp", "offload=optimizer"], "sharded"),
    (["ac=some"], "full"),
    (["gpu=v100"], "peak_tflops"),
])
def test_cli_bad_input_one_line(capsys, argv, needle):
    assert main(["model=gpt2-124m", "strategy=fsdp", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err


# ---- tensor parallelism (parallel dims) -------------------------------------------------------


def _tp_oracle(cfg: GPTConfig, tp: int) -> tuple[int, int, int]:
    """(sharded, replicated, rank 0's local) parameter counts under TP, by hand from the config's shapes:
    q/k/v/gate/up split by output rows, o/down by input columns (their biases whole), embedding and LM head
    by vocabulary rows, norms and learned positions whole; K/V whole when tp does not divide n_kv_head."""
    C, L, V, f = cfg.n_embd, cfg.n_layer, cfg.vocab_size, cfg.ffn_hidden
    q, kv = cfg.q_dim, cfg.kv_dim
    kv_split = cfg.n_kv_head % tp == 0
    n_in = 1 if cfg.mlp == "gelu" else 2
    norm = 2 * C if cfg.norm == "layernorm" else C
    n_norms = 1 if (cfg.parallel_residual and cfg.shared_attn_norm) else 2
    b = 1 if cfg.bias else 0
    col = (C + b) * (q + n_in * f + (2 * kv if kv_split else 0))  # rows of colwise weights + their biases
    row = q * C + f * C  # o / down weights, split along their inputs
    blk_sharded = col + row
    blk_repl = n_norms * norm + b * 2 * C + (0 if kv_split else 2 * (C + b) * kv)
    vocab = V * C * (1 if cfg.tie_embeddings else 2)
    root_repl = norm + (cfg.block_size * C if cfg.pos == "learned" else 0)
    sharded = L * blk_sharded + vocab
    replicated = L * blk_repl + root_repl
    # rank 0 holds ceil-sized row chunks (DTensor's torch.chunk rule); every split width but V divides tp here
    v0 = -(-V // tp)
    local = L * (blk_sharded // tp + blk_repl) + v0 * C * (1 if cfg.tie_embeddings else 2) + root_repl
    return sharded, replicated, local


@pytest.mark.parametrize("name", TINY + ["llama3-8b", "falcon-40b", "gpt2-124m"])
@pytest.mark.parametrize("tp", [2, 4])
def test_tp_split_counts_every_parameter_once(name, tp):
    cfg = GPTConfig.from_name(name)
    s = model_shape(name, 128)
    split = tp_split(s, tp)
    sharded, replicated, local = _tp_oracle(cfg, tp)
    assert (split.sharded, split.replicated) == (sharded, replicated)
    assert split.sharded + split.replicated == count_params(cfg).total  # each parameter once over the group
    assert sum(split.per_rank) == split.sharded + tp * split.replicated  # what the TP ranks hold together
    assert split.local == max(split.per_rank) == local
    assert split.kv_replicated == (cfg.n_kv_head % tp != 0)
    assert split.vocab_local == -(-cfg.vocab_size // tp)


def test_tp_halves_the_sharded_state_bytes_exactly():
    # llama-tiny: every split width (heads, FFN 448, vocabulary 128256) is even: tp=2 halves exactly
    cfg = GPTConfig.from_name("llama-tiny")
    s = model_shape("llama-tiny", 128)
    sharded, replicated, _ = _tp_oracle(cfg, 2)
    assert sharded % 2 == 0 and replicated == (2 * cfg.n_layer + 1) * cfg.n_embd  # RMSNorm weights, whole
    base = {"model": "llama-tiny", "seq_len": 128, "precision": "fp32"}
    one, _, _ = memory_bytes(PlanArgs(**base, strategy="single", gpus=1), s)
    tp2, _, _ = memory_bytes(PlanArgs(**base, strategy="single", gpus=2, tp=2), s)
    assert one["parameters"] == 4 * (sharded + replicated)
    assert tp2["parameters"] == 4 * (sharded / 2 + replicated)
    assert tp2["gradients"] == 4 * (sharded / 2 + replicated)
    assert tp2["optimizer_states"] == 8 * (sharded / 2 + replicated)
    # FSDP2 then shards each TP rank's parameters over dp_shard only; HSDP's dp_replicate does not divide
    for dims, gpus, shard in (({"dp_shard": 2}, 4, 2), ({"dp_shard": -1}, 8, 4),
                              ({"dp_replicate": 2, "dp_shard": 2}, 8, 2)):
        bd, _, _ = memory_bytes(PlanArgs(**base, strategy="fsdp", gpus=gpus, tp=2, **dims), s)
        assert bd["parameters"] == pytest.approx(4 * (sharded / 2 + replicated) / shard)
        assert bd["optimizer_states"] == pytest.approx(8 * (sharded / 2 + replicated) / shard)


def test_mqa_kv_projections_count_whole_on_every_tp_rank():
    cfg = GPTConfig.from_name("falcon-tiny")  # one K/V head
    s = model_shape("falcon-tiny", 128)
    split = tp_split(s, 4)
    assert split.kv_replicated
    kv = 2 * cfg.n_embd * cfg.kv_dim  # k_proj + v_proj weights (no bias), per block
    norms = 2 * 2 * cfg.n_embd  # two LayerNorms (weight + bias)
    assert split.replicated == cfg.n_layer * (kv + norms) + 2 * cfg.n_embd  # + the final LayerNorm
    with pytest.raises(ValueError, match="tp=6 must divide n_kv_head=4 .* or be a multiple of it"):
        tp_split(model_shape("llama-tiny", 64, n_head=12, n_kv_head=4, head_dim=16), 6)


def _saved_block_bytes_tp(name: str, autocast: bool, B: int, T: int, tp: int, **overrides) -> tuple[float, float]:
    """(bytes autograd saves on one TP rank for one block, predicted) with sequence parallel, emulated in one
    process as train/parallel/tp.py runs it: the norms on this rank's T/tp tokens, each branch all-gathering
    its input (a fresh full-sequence tensor its Linears save), the block's Linears at their local widths (heads
    and FFN columns / tp), and a reduce-scatter back to T/tp tokens. When tp does not divide n_kv_head the K/V
    projections are whole and their output is cut to the one K/V head rank 0's query heads read."""
    cfg = GPTConfig.from_name(name, **overrides)
    kv_split = cfg.n_kv_head % tp == 0
    local = GPTConfig.from_name(name, **overrides, n_head=cfg.n_head // tp, head_dim=cfg.head_dim,
                                n_kv_head=cfg.n_kv_head // tp if kv_split else cfg.n_kv_head,
                                ffn_hidden=cfg.ffn_hidden // tp)
    torch.manual_seed(0)
    block = Block(local)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    if not kv_split:  # ReplicatedKVParallel: a view of rank 0's K/V head
        for proj in (block.attn.k_proj, block.attn.v_proj):
            proj.register_forward_hook(lambda mod, inp, out: out[..., : cfg.head_dim])
    x = torch.randn(B, T // tp, cfg.n_embd, requires_grad=True)  # this rank's sequence shard
    cos, sin, seen, pack = _saved_activations(block, cfg, T)

    def gather(t):  # all-gather over the sequence: a new [B, T, C] tensor
        return torch.cat([t] * tp, dim=1)

    def scatter(t):  # reduce-scatter's output: this rank's T/tp tokens
        return t[:, : T // tp]

    with (torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
          torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)):
        if not block.parallel:
            h = x + scatter(block.attn(gather(block.attn_norm(x)), cos, sin))
            h + scatter(block.mlp(gather(block.mlp_norm(h))))
        else:
            a = block.attn_norm(x)
            m = a if block.mlp_norm is None else block.mlp_norm(x)
            x + (scatter(block.mlp(gather(m))) + scatter(block.attn(gather(a), cos, sin)))
    s = model_shape(name, T, **overrides)
    act = 2 if autocast else 4
    predicted = block_saved_bytes_per_token(s, act, 4, autocast, B, tp, not kv_split) * B * T
    return float(sum(seen.values())), predicted


@pytest.mark.parametrize("name,tp,overrides", [(n, 2, {}) for n in TINY] + [
    ("falcon-tiny", 2, {"shared_attn_norm": True}),  # Falcon-7B's one LN: each branch gathers its own copy
    ("falcon-40b-mini", 4, {}),  # tp=4 over 2 K/V heads: K/V replicated, each rank keeps one head
], ids=[*TINY, "falcon-7b-style", "falcon-40b-mini-tp4"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_tp_block_formula_equals_autograd_saved_tensors(name, tp, overrides, autocast):
    measured, predicted = _saved_block_bytes_tp(name, autocast, B=2, T=44, tp=tp, **overrides)
    assert predicted == pytest.approx(measured, rel=0.01), (measured, predicted)


def test_tp_activations_head_and_block_inputs_are_shards():
    s = model_shape("llama-tiny", 128)
    one = activation_bytes(s, 2, 128, "full", 2, 2, True)
    two = activation_bytes(s, 2, 128, "full", 2, 2, True, split=tp_split(s, 2))
    assert two.block_input == one.block_input / 2  # sequence parallel: T/tp tokens between blocks
    assert two.logits == one.logits / 2  # vocabulary-parallel head: [B, T, V/tp]
    assert two.saved_blocks == one.saved_blocks / 2
    # the vocabulary-parallel loss (F.cross_entropy on fp32 shards under loss_parallel) is not chunked
    assert two.loss_temps == 12 * (s.vocab_size // 2) * 2 * 128


def test_tp_communication_time_by_hand():
    name, B, T, tp = "llama-tiny", 4, 128, 2
    cfg = GPTConfig.from_name(name)
    s = model_shape(name, T)
    _, replicated, local = _tp_oracle(cfg, tp)
    a = PlanArgs(model=name, strategy="fsdp", gpus=4, tp=tp, dp_shard=2, micro_batch=B, seq_len=T, ac="full",
                 grad_accum=3, precision="bf16", gpu="h100", mfu=0.5)
    p = plan(a, s)
    act = B * T * cfg.n_embd * 2  # one bf16 [B, T, C]
    # per block 4 collectives forward, 4 backward, 4 in the recompute; embedding all-reduce (2) + backward
    # all-gather (1), head all-gather + reduce-scatter (2); ring: (tp-1)/tp of the bytes each
    tp_bytes = 3 * (cfg.n_layer * 12 + 5) * act * (tp - 1) / tp + 2 * replicated * 4 * (tp - 1) / tp
    assert p.tp_comm_time_s == pytest.approx(tp_bytes / 300e9)
    # FSDP over dp_shard=2 with one TP rank's parameters: 2 bf16 all-gathers per micro-batch + fp32 reduce-scatter
    assert p.comm_time_s == pytest.approx((2 * 3 * local * 2 + local * 4) * (1 / 2) / 300e9)
    hw = s.flops_per_token + recompute_flops_per_token(s, T, "full")
    assert p.compute_time_s == pytest.approx(3 * B * T * hw / tp / (989e12 * 0.5))
    assert p.step_time_s == pytest.approx(max(p.compute_time_s, p.comm_time_s) + p.tp_comm_time_s)
    assert p.tokens_per_step == 3 * B * T * 2  # two data-parallel ranks; TP ranks share their samples
    # a TP group wider than a node crosses the inter-node network
    wide = plan(dataclasses.replace(a, gpus=1, nodes=2, dp_shard=1), s)  # one GPU per node
    assert wide.tp_comm_time_s == pytest.approx(tp_bytes / 50e9)


@pytest.mark.parametrize("strategy,kw,expect,engine", [
    # (pp, dp_replicate, dp_shard, tp), engine: as train/parallel/dims.py resolves them
    ("ddp", {"gpus": 8}, (1, 8, 1, 1), "ddp"),
    ("ddp", {"gpus": 8, "tp": 2}, (1, 4, 1, 2), "hsdp"),  # DDP cannot hold DTensors: FSDP2 replicates
    ("fsdp", {"gpus": 8, "tp": 2}, (1, 1, 4, 2), "fsdp"),
    ("fsdp", {"nodes": 2, "gpus": 8, "tp": 8, "dp_shard": -1}, (1, 1, 2, 8), "fsdp"),
    ("hsdp", {"nodes": 2, "gpus": 8}, (1, 2, 8, 1), "hsdp"),  # one node shards, nodes replicate
    ("hsdp", {"nodes": 2, "gpus": 8, "tp": 2}, (1, 2, 4, 2), "hsdp"),
    ("fsdp", {"nodes": 2, "gpus": 8, "tp": 2, "dp_replicate": 2}, (1, 2, 4, 2), "hsdp"),
    ("zero2", {"gpus": 8}, (1, 1, 8, 1), "zero2"),
    ("single", {"gpus": 1}, (1, 1, 1, 1), "single"),
    ("single", {"gpus": 4, "tp": 4}, (1, 1, 1, 4), "single"),
    ("single", {"gpus": 4, "tp": 2, "dp_shard": 2}, (1, 1, 2, 2), "fsdp"),  # the trainer's default strategy + dims
])
def test_strategy_shorthands_resolve_to_dims(strategy, kw, expect, engine):
    d = resolve_dims(PlanArgs(strategy=strategy, **kw))
    assert (d.pp, d.dp_replicate, d.dp_shard, d.tp) == expect and d.engine == engine


def test_cli_dims_equal_plan(capsys):
    a = PlanArgs(model="llama-tiny", strategy="fsdp", nodes=1, gpus=4, tp=2, dp_shard=-1, micro_batch=2,
                 seq_len=128, ac="selective")
    want = json.loads(json.dumps(dataclasses.asdict(plan(a))))
    for argv in (["model=llama-tiny", "tp=2", "dp_shard=-1", "gpus=4", "micro_batch=2", "seq_len=128", "ac=selective"],
                 ["--model", "llama-tiny", "--tp", "2", "--dp-shard", "-1", "--gpus", "4", "--micro-batch", "2",
                  "--seq-len", "128", "--ac", "selective"],
                 ["model=llama-tiny", "parallel.tp=2", "parallel.dp_shard=-1", "gpus=4", "micro_batch=2",
                  "seq_len=128", "ac=selective"]):
        assert main([*argv, "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == want
    assert want["dims"] == {"tp": 2, "pp": 1, "dp_replicate": 1, "dp_shard": 2}
    assert want["tp_comm_time_s"] > 0
    assert main(["model=llama-tiny", "tp=2", "gpus=4", "seq_len=128"]) == 0
    out = capsys.readouterr().out
    assert "tp=2 x pp=1 x dp_replicate=1 x dp_shard=2" in out and "tensor-parallel communication" in out


@pytest.mark.parametrize("argv,needles", [
    (["tp=2", "dp_shard=3"], ["= 6 GPUs", "= 8"]),  # both numbers: the dims' product and the world size
    (["tp=2", "dp_replicate=3", "gpus=8"], ["= 6 GPUs", "= 8", "dp_shard=-1 takes the rest"]),
    (["tp=3", "gpus=3"], ["tp=3 must divide n_head=4"]),
    (["strategy=zero3", "tp=2"], ["cannot combine with tp=2", "strategy=fsdp dp_shard=-1 tp=2"]),
    (["strategy=zero1", "tp=2", "gpus=2"], ["DeepSpeed"]),
    (["pp=2", "strategy=zero3"], ["cannot combine with pp=2", "strategy=fsdp"]),  # pp > 1 is planned: see test_plan_pp
    (["strategy=single", "gpus=2"], ["strategy=single runs on one GPU", "= 2", "tp=2"]),
    (["dp_replicate=-1", "dp_shard=-1"], ["at most one"]),
    (["dp_shard=0"], ["dp_shard=0", "-1"]),
    (["tensor_parallel=2"], ["tensor_parallel"]),  # an unknown dim name
    (["tp=two"], ["--tp", "'two'"]),
])
def test_cli_dims_bad_input_one_line(capsys, argv, needles):
    assert main(["model=llama-tiny", "seq_len=128", "gpus=8", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    for needle in needles:
        assert needle in err, (needle, err)
