"""Training-loop numerics on CPU, single process (in-process runs of ``train.main.run``):
gradient accumulation, activation checkpointing, AMP (fp16 + GradScaler, bf16), non-finite losses,
the learning-rate schedule and the optimizer's parameter groups."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from helpers import TINY, losses_of, read_metrics, train_in_process

FP32 = (*TINY, "train.max_steps=6", "optim.warmup_steps=2")


def _losses(tmp_path, name: str, *over: str) -> list[float]:
    code, run_dir = train_in_process(tmp_path / name, *FP32, *over)
    assert code == 0
    return losses_of(run_dir)


def _close(a: list[float], b: list[float], tol: float = 1e-5) -> float:
    assert len(a) == len(b) and a, (a, b)
    diff = max(abs(x - y) for x, y in zip(a, b))
    assert diff < tol, f"max |diff| {diff:.3g} >= {tol}: {a} vs {b}"
    return diff


def test_grad_accum_equals_bigger_micro_batch(tmp_path):
    """4 micro-steps of 1 sequence == 1 micro-step of 4 (the loss is normalised once per step)."""
    a = _losses(tmp_path, "accum", "train.grad_accum=4", "train.micro_batch_size=1")
    b = _losses(tmp_path, "big", "train.grad_accum=1", "train.micro_batch_size=4")
    _close(a, b)
    assert a[-1] < a[0]


@pytest.fixture(scope="module")
def no_ac_losses(tmp_path_factory) -> list[float]:
    code, run_dir = train_in_process(tmp_path_factory.mktemp("ac") / "none", *FP32,
                                     "train.activation_checkpointing=none", "model.dropout=0.1")
    assert code == 0
    return losses_of(run_dir)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_matches_none(tmp_path, mode, no_ac_losses):
    ac = _losses(tmp_path, mode, f"train.activation_checkpointing={mode}", "model.dropout=0.1")
    _close(no_ac_losses, ac)  # dropout on: recomputation must replay the same masks


def test_apply_ac_keeps_names_saves_memory_and_selective_skips_matmul_recompute():
    """AC wraps block.forward in place: state-dict keys are unchanged; both modes keep fewer
    tensors alive for backward than none (saved-tensor hooks); full recomputes the block's
    matmuls in backward, selective keeps them (matmul count in backward, via a dispatch mode)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from model import GPT, GPTConfig
    from train.parallelize import apply_ac

    cfg = GPTConfig.from_name("gpt2-tiny", n_layer=2, n_embd=64, n_head=2, vocab_size=256)
    x = torch.randint(0, 256, (2, 64))

    class CountMM(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
                self.n += 1
            return func(*args, **(kwargs or {}))

    def measure(mode: str) -> tuple[int, int, list[str]]:
        torch.manual_seed(0)
        m = GPT(cfg)
        apply_ac(m, mode)
        saved = 0

        def pack(t):
            nonlocal saved
            saved += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = m(x).sum()
        counter = CountMM()
        with counter:
            loss.backward()
        return saved, counter.n, list(m.state_dict())

    none_saved, none_mm, keys = measure("none")
    full_saved, full_mm, keys_full = measure("full")
    sel_saved, sel_mm, keys_sel = measure("selective")
    assert keys == keys_full == keys_sel
    assert full_saved < none_saved and sel_saved < none_saved, (full_saved, sel_saved, none_saved)
    assert sel_mm == none_mm < full_mm, (none_mm, sel_mm, full_mm)
    with pytest.raises(ValueError, match="train.activation_checkpointing='some'"):
        apply_ac(GPT(cfg), "some")


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_trains_on_cpu(tmp_path, precision):
    code, run_dir = train_in_process(tmp_path / precision, *TINY, f"precision={precision}", "train.max_steps=16",
                                     "optim.lr=3e-3", "optim.warmup_steps=2")
    assert code == 0
    losses = losses_of(run_dir)
    assert len(losses) == 16 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3, losses  # it learns
    if precision == "fp16":  # the GradScaler state travels with the checkpoint
        sched = torch.load(run_dir / "checkpoints" / "step_0000016" / "sched.pt", weights_only=True)
        assert sched["scaler"]["scale"] > 0


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_is_on_and_fp16_scaler_skips_and_halves(precision, dtype):
    """Mixed precision really runs: inside a training micro-step the blocks' matmul outputs have the 16-bit
    dtype (fp32 under precision=fp32), the losses differ from fp32 but stay close (3e-2 bf16, 5e-3 fp16); under fp16 an
    injected NaN makes the GradScaler skip that step and halve its scale."""
    from helpers import make_cfg

    from train.config import resolve
    from train.distributed import DistInfo
    from train.parallel import build_engine

    def run(name: str, keys: dict) -> tuple[list, list, list]:
        cfg = make_cfg(model__n_layer=2, model__vocab_size=512, train__seq_len=32, train__micro_batch_size=4,
                       train__device="cpu", optim__warmup_steps=2, **keys)
        engine = build_engine(cfg, resolve(cfg, 1), DistInfo())
        seen: list[torch.dtype] = []
        engine.raw.blocks[0].mlp.up_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        g = torch.Generator().manual_seed(0)
        losses, scales = [], []
        for step in range(5):
            xy = (torch.randint(0, 512, (4, 1), generator=g) + torch.arange(33)) % 512
            losses.append(float(engine.micro_step(xy[:, :-1], xy[:, 1:], last=True, poison=step == 2)))
            stats = engine.step()
            scales.append((stats.skipped, engine.scaler.get_scale() if engine.scaler is not None else None))
        return seen, losses, scales

    p = {"bf16": {"precision__name": "bf16", "precision__param_dtype": "bfloat16", "precision__autocast": True},
         "fp16": {"precision__name": "fp16", "precision__param_dtype": "float16", "precision__autocast": True,
                  "precision__grad_scaler": True}}[precision]
    seen, losses, scales = run(precision, p)
    seen32, losses32, _ = run("fp32", {})
    assert set(seen) == {dtype} and set(seen32) == {torch.float32}
    tol = 3e-2 if precision == "bf16" else 5e-3
    for step in (0, 1, 3, 4):
        assert losses[step] != losses32[step] and abs(losses[step] - losses32[step]) < tol, (step, losses, losses32)
    assert [s[0] for s in scales] == [False, False, True, False, False]
    if precision == "fp16":
        assert scales[2][1] == scales[1][1] / 2 and scales[3][1] == scales[2][1]


def test_nan_steps_are_skipped_then_training_continues(tmp_path, caplog):
    code, run_dir = train_in_process(tmp_path / "skip", *FP32, "train.max_steps=8", "train.fault_nan_steps=[3,4]",
                                     "train.max_nan_skips=3")
    assert code == 0
    events = [e for e in read_metrics(run_dir) if "loss" in e]
    assert [e["step"] for e in events] == list(range(1, 9))
    bad = {e["step"] for e in events if e["loss"] is None}
    assert bad == {3, 4}  # the skipped steps log null, the others a finite loss
    assert all(math.isfinite(e["loss"]) for e in events if e["step"] not in bad)
    assert any("step 3: non-finite" in r.getMessage() for r in caplog.records)
    # the skipped updates did not touch the weights: they are finite
    from train.export import load_full_state_dict

    state, _ = load_full_state_dict(run_dir / "checkpoints" / "step_0000008")
    assert state and all(torch.isfinite(t).all() for t in state.values())


def test_schedule_and_param_groups():
    from model import GPT, GPTConfig
    from train.optim import lr_at, param_groups

    lrs = [lr_at(s, 1e-3, 1e-4, 10, 100) for s in range(120)]
    assert lrs[0] == pytest.approx(1e-3 / 11) and lrs[9] == pytest.approx(1e-3 * 10 / 11)
    assert lrs[10] == pytest.approx(1e-3)  # top of the cosine
    assert lrs[55] == pytest.approx(1e-4 + 0.5 * 9e-4)  # half way down
    assert lrs[100] == lrs[119] == pytest.approx(1e-4)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))  # monotone decay

    m = GPT(GPTConfig.from_name("gpt2-tiny", n_layer=1, vocab_size=128))
    decay, no_decay = param_groups(m, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    n = sum(p.numel() for p in m.parameters())
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == n  # tied weight counted once
