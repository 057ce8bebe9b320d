"""The fused, chunked LM head + cross-entropy (model/loss.py, `model(idx, targets=y)`, train.loss_impl=fused):
equal to F.cross_entropy on fp32 logits (loss and every gradient), no [B, T, V] tensor during a training step,
fp16 + GradScaler, FSDP2 on 2 gloo ranks, evaluation, config errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import CountCollectives, build_engine_of, init_gloo, leave_gloo, make_cfg, spawn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import model.loss as model_loss
from train.distributed import DistInfo

FAMILIES = ["gpt2-tiny", "llama-tiny", "gemma-tiny"]  # gemma-tiny: 256K vocabulary, tied, scaled embedding
B, T = 2, 16


def engine_cfg(preset: str, loss_impl: str, precision: str = "fp32", **overrides):
    prec = {"fp32": ("float32", False, False), "bf16": ("bfloat16", True, False),
            "fp16": ("float16", True, True)}[precision]
    return make_cfg(model__preset=preset, train__seq_len=T, train__micro_batch_size=B, train__grad_accum=2,
                    train__device="cpu", train__loss_impl=loss_impl, precision__name=precision,
                    precision__param_dtype=prec[0], precision__autocast=prec[1], precision__grad_scaler=prec[2],
                    optim__grad_clip=0.0, **overrides)


def batches(vocab: int, n: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab, (B, T), generator=g), torch.randint(0, vocab, (B, T), generator=g))
            for _ in range(n)]


def accumulate(engine, data) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Two micro-steps (grad accumulation 2): their losses and every parameter's accumulated gradient."""
    got = [engine.micro_step(x, y, last=i == len(data) - 1).item() for i, (x, y) in enumerate(data)]
    return got, {n: p.grad.clone() for n, p in engine.raw.named_parameters()}


@pytest.mark.parametrize("preset", FAMILIES)
def test_fused_equals_fp32_cross_entropy_with_grad_accum(preset, monkeypatch):
    """Loss and every parameter gradient of the fused path (several chunks per micro-batch) equal
    F.cross_entropy(logits.float()) within 1e-5, over two accumulated micro-batches."""
    results = {}
    for impl in ("fused", "torch"):
        cfg = engine_cfg(preset, impl)
        engine = build_engine_of(cfg, DistInfo(device=torch.device("cpu")))
        vocab = engine.raw.config.vocab_size
        monkeypatch.setattr(model_loss, "CHUNK_ELEMENTS", vocab * 5)  # 5 tokens per chunk: 7 chunks of 32
        results[impl] = accumulate(engine, batches(vocab))
    (fl, fg), (tl, tg) = results["fused"], results["torch"]
    assert fl == pytest.approx(tl, abs=1e-5)
    assert fg.keys() == tg.keys()
    for name in tg:
        err = (fg[name] - tg[name]).abs().max().item()
        assert err <= 1e-5, f"{preset} {name}: max |grad diff| {err:.3g}"
    if preset != "llama-tiny":  # tied: the one shared weight got both the lookup's and the head's gradient
        assert "lm_head.weight" not in fg


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_fused_16bit_matches_torch(precision, monkeypatch):
    """fp16 + GradScaler: finite losses and gradients that match F.cross_entropy on fp32 logits (the
    reference rounds the scaled logits' gradient to fp16, the fused path keeps it fp32 through its matmuls):
    relative error of the whole gradient and the worst element (against the largest gradient) <= 2e-3; the
    step is taken by both and the updated weights agree. bf16 (both round to bf16, in a different order):
    <= 5e-3. Measured: 5.4e-4 / 6.3e-4 (fp16), 4.4e-4 / 4.9e-4 (bf16)."""
    monkeypatch.setattr(model_loss, "CHUNK_ELEMENTS", 96 * 64 * 7)
    out = {}
    for impl in ("fused", "torch"):
        engine = build_engine_of(engine_cfg("gpt2-tiny", impl, precision, model__n_layer=2, model__n_embd=64,
                                            model__n_head=4, model__vocab_size=96 * 64, model__block_size=64),
                                 DistInfo(device=torch.device("cpu")))
        losses, grads = accumulate(engine, batches(96 * 64))
        stats = engine.step()
        out[impl] = losses, grads, stats, [p.detach().clone() for p in engine.raw.parameters()]
    (fl, fg, fs, fp), (tl, tg, ts, tp) = out["fused"], out["torch"]
    assert all(map(torch.isfinite, map(torch.tensor, fl)))
    assert fl == pytest.approx(tl, rel=2e-3)
    assert not fs.skipped and not ts.skipped
    flat_f = torch.cat([fg[n].flatten() for n in tg])
    flat_t = torch.cat([tg[n].flatten() for n in tg])
    assert torch.isfinite(flat_f).all()
    rel = ((flat_f - flat_t).norm() / flat_t.norm()).item()
    worst = max((fg[n] - tg[n]).abs().max().item() for n in tg) / flat_t.abs().max().item()
    print(f"{precision}: relative gradient error {rel:.2e}, worst element {worst:.2e} of the largest gradient")
    tol = 2e-3 if precision == "fp16" else 5e-3
    assert rel <= tol and worst <= tol
    for a, b in zip(fp, tp):  # the updates agree too (AdamW normalises: compare the parameters)
        assert (a - b).abs().max().item() < 1e-3


class LargeTensorWatch(TorchDispatchMode):
    """Records every op output (and, with saved_tensors_hooks, every tensor saved for backward) of at least
    `limit` elements."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit, self.seen = limit, []

    def check(self, t, where):
        if isinstance(t, torch.Tensor) and t.numel() >= self.limit:
            self.seen.append((where, tuple(t.shape)))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self.check(t, str(func))
        return out


def watched_step(impl: str, monkeypatch) -> list:
    V, C = 4096, 16  # B*T = 32 tokens > C: the head weight [V, C] (and its gradient) stays below B*T*V
    monkeypatch.setattr(model_loss, "CHUNK_ELEMENTS", V * 8)
    engine = build_engine_of(engine_cfg("gpt2-tiny", impl, model__n_layer=2, model__n_embd=C, model__n_head=4,
                                        model__vocab_size=V, model__block_size=64),
                             DistInfo(device=torch.device("cpu")))
    (x, y), = batches(V, 1)
    watch = LargeTensorWatch(B * T * V)
    with watch, torch.autograd.graph.saved_tensors_hooks(lambda t: (watch.check(t, "saved"), t)[1], lambda t: t):
        engine.micro_step(x, y, last=True)
        engine.step()
        engine.eval_loss(x, y)
    return watch.seen


def test_no_btv_tensor_during_a_fused_training_step(monkeypatch):
    """No op output and no saved tensor of B x T x V elements in a fused micro-step + optimizer step + eval
    (the chunked_logits path, checked the same way, does make them: the check sees them)."""
    assert watched_step("fused", monkeypatch) == []
    seen = watched_step("chunked_logits", monkeypatch)
    assert any(shape[-1] == 4096 for _, shape in seen), seen


def test_model_targets_path_eval_and_return_hidden():
    from model import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig.from_name("llama-tiny", vocab_size=300)
    model = GPT(cfg)
    x, y = torch.randint(0, 300, (2, 9)), torch.randint(0, 300, (2, 9))
    logits, hidden = model(x, return_hidden=True)
    ref = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    with torch.no_grad():  # evaluation: the chunked loss without gradients
        assert model(x, targets=y).item() == pytest.approx(ref.item(), abs=1e-5)
    loss, h2 = model(x, targets=y, return_hidden=True)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-5) and torch.equal(h2, hidden)
    with pytest.raises(ValueError, match=r"targets \(2, 8\) must have the shape of idx \(2, 9\)"):
        model(x, targets=y[:, :8])


def test_chunk_size_comes_from_a_memory_budget():
    assert model_loss.chunk_tokens(256_000) == (1 << 24) // 256_000 == 65
    assert model_loss.chunk_tokens(50257) == 333
    assert model_loss.chunk_tokens(10**9) == 1


def test_unknown_loss_impl_is_a_one_line_error():
    from train.config import ConfigError, validate

    with pytest.raises(ConfigError) as e:
        validate(make_cfg(train__loss_impl="liger"))
    assert str(e.value) == "train.loss_impl='liger' is not one of fused, chunked_logits, torch"


# ---------------------------------------------------------------- 2 gloo ranks: FSDP2 and ZeRO-3

SMALL = {"model__n_layer": 2, "model__n_embd": 64, "model__n_head": 4, "model__vocab_size": 96, "model__block_size": 64}


def _train_counted(engine, data) -> tuple[torch.Tensor, object, list[int]]:
    """Two micro-steps (grad accumulation 2) and the optimizer step, each under a collective counter: the
    mean micro-step losses over the ranks, the step's stats, and the reducing collectives of each phase."""
    import torch.distributed as dist

    reduces, losses = [], []
    for i, (x, y) in enumerate(data):
        with CountCollectives() as count:
            losses.append(engine.micro_step(x, y, last=i == len(data) - 1).item())
        reduces.append(count.reduces)
    with CountCollectives() as count:
        stats = engine.step()
    reduces.append(count.reduces)
    losses = torch.tensor(losses)
    dist.all_reduce(losses)
    return losses / dist.get_world_size(), stats, reduces


def _sharded_worker(rank, world_size, port, strategy, want):
    init_gloo(rank, world_size, port)

    model_loss.CHUNK_ELEMENTS = 96 * 5  # several chunks per micro-batch
    extra = {"strategy__zero_stage": 3, "strategy__param_persistence_threshold": 0} if strategy == "zero3" else {}
    dist_info = DistInfo(rank=rank, local_rank=rank, world_size=world_size)
    engine = build_engine_of(engine_cfg("gpt2-tiny", "fused", strategy__name=strategy, **extra, **SMALL), dist_info)
    data = [(x[rank:rank + 1], y[rank:rank + 1]) for x, y in batches(96)]  # this rank's half of each micro-batch
    losses, stats, reduces = _train_counted(engine, data)
    _check_against(want, losses, stats, strategy, rank, _gathered_params(engine, strategy))
    if strategy == "fsdp":
        # gradient sync only on the last micro-step, counted: FSDP2 reduce-scatters once per FSDP group (2 blocks +
        # the root) on the last micro-step and never on the first; the optimizer step reduces nothing more
        assert reduces == [0, 3, 0], f"fsdp reducing collectives (first micro-step, last, step): {reduces}"
        # DDP on the same group and data: one all-reduce (one bucket) on the last micro-step, none on the first
        ddp = build_engine_of(engine_cfg("gpt2-tiny", "fused", strategy__name="ddp", **SMALL), dist_info)
        losses, stats, reduces = _train_counted(ddp, data)
        _check_against(want, losses, stats, "ddp", rank, dict(ddp.raw.named_parameters()))
        assert reduces == [0, 1, 0], f"ddp reducing collectives (first micro-step, last, step): {reduces}"
    leave_gloo()


def _gathered_params(engine, strategy: str) -> dict[str, torch.Tensor]:
    if strategy == "fsdp":
        return {n: p.full_tensor() for n, p in engine.raw.named_parameters()}
    import deepspeed

    params = {}
    for n, p in engine.engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            params[n] = p.data.clone()
    return params


def _check_against(want, losses, stats, strategy, rank, params) -> None:
    assert torch.allclose(losses, torch.tensor(want["losses"]), atol=1e-5, rtol=0), (strategy, losses)
    assert abs(float(stats.grad_norm) - want["grad_norm"]) <= 1e-5, (strategy, float(stats.grad_norm))
    assert params.keys() == want["params"].keys()
    for name, p in params.items():
        err = (p.detach() - want["params"][name]).abs().max().item()
        assert err <= 1e-5, f"{strategy} rank {rank} {name}: {err:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "zero3"], ids=["fsdp_and_ddp", "zero3"])
def test_fused_on_2_ranks_equals_one_process(strategy, monkeypatch):
    """2 gloo ranks with the fused loss (the default), micro-batch 1 x grad-accum 2 each: the losses, the
    global gradient norm and the updated weights equal one process on the whole batch with
    F.cross_entropy on fp32 logits, within 1e-5 (tied embeddings: gpt2-tiny). FSDP2 and DDP (on the same
    2-rank group) reduce gradients only on the last micro-step: the reducing collectives are counted."""
    engine = build_engine_of(engine_cfg("gpt2-tiny", "torch", **SMALL), DistInfo(device=torch.device("cpu")))
    losses = [engine.micro_step(x, y, last=i == 1).item() for i, (x, y) in enumerate(batches(96))]
    stats = engine.step()
    want = {"losses": losses, "grad_norm": float(stats.grad_norm),
            "params": {n: p.detach().clone() for n, p in engine.raw.named_parameters()}}
    spawn(_sharded_worker, 2, strategy, want)


# ---------------------------------------------------------------- the planner's model of the fused loss


@pytest.mark.parametrize("impl", ["fused", "chunked_logits"])
@pytest.mark.parametrize("ac,autocast", [("none", False), ("full", False), ("none", True)],
                         ids=["fp32", "fp32-full-ac", "bf16-autocast"])
def test_planner_peak_vs_tracked_tensors(impl, ac, autocast):
    """V = 32000 over 1024 tokens (the head sets the peak): train.plan's activation peak for the chosen
    loss path against torch's own tensor accounting of one micro-step, within 10%."""
    from model import GPT, GPTConfig
    from train.bench import TensorMemoryTracker
    from train.loss import cross_entropy
    from train.parallelize import apply_ac
    from train.plan import activation_bytes, model_shape

    name, Bs, Ts, V = "llama-tiny", 4, 256, 32000
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name(name, vocab_size=V))
    apply_ac(model, ac)
    x, y = torch.randint(0, V, (Bs, Ts)), torch.randint(0, V, (Bs, Ts))
    mode = TensorMemoryTracker(exclude=list(model.parameters()) + list(model.buffers()))
    with mode, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if impl == "fused":
            loss = model(x, targets=y)
        else:
            logits = model(x)
            loss = cross_entropy(logits, y)
            del logits
        loss.backward()
        del loss
    grads = sum(p.grad.numel() * 4 for p in model.parameters())
    s = model_shape(name, Ts, vocab_size=V)
    act = 2 if autocast else 4
    est = activation_bytes(s, Bs, Ts, ac, act=act, resid=4, autocast=autocast, weight_casts=autocast,
                           loss_impl=impl)
    predicted = est.peak(grads, s.root_params * 4)
    print(f"{impl} {ac} autocast={autocast}: predicted {predicted / 2**20:.1f} MiB, tracked {mode.peak / 2**20:.1f} MiB")
    assert predicted == pytest.approx(mode.peak, rel=0.10), (predicted, mode.peak)


def test_bench_runs_the_chosen_loss_path():
    """python -m train.bench builds the trainer's engine with train.loss_impl and says which loss ran; a bad
    value is the config's one-line error (exit 2)."""
    from train.bench import compose_config, run_bench

    base = ["model=gpt2-tiny", "model.n_layer=1", "model.vocab_size=512", "train.micro_batch_size=2",
            "train.seq_len=32", "train.device=cpu"]
    for impl in ("fused", "chunked_logits", "torch"):
        r = run_bench(compose_config([*base, f"train.loss_impl={impl}"]), steps=1, warmup=0,
                      dist=DistInfo(device=torch.device("cpu")))
        assert r["loss_impl"] == impl and math.isfinite(r["loss"])
    with pytest.raises(ValueError, match="train.loss_impl='x' is not one of fused, chunked_logits, torch"):
        compose_config([*base, "train.loss_impl=x"])
