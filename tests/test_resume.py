"""Exact resume: 20 steps straight == 10 steps + resume + 10 steps, bitwise (fp32), for one process
and for DDP on 2 gloo ranks; DDP on 2 ranks == 1 process with the same global batch (within 1e-5);
the ranks never see the same sample.

Dropout is on (0.1) so the test also proves the RNG streams are restored. The schedule is pinned
with optim.decay_steps=20 so the 10-step segment follows the same learning-rate curve.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import TINY, losses_of, read_metrics, run_train, train_in_process

COMMON = (*TINY, "model.dropout=0.1", "optim.decay_steps=20", "optim.warmup_steps=3", "train.ckpt_every=5",
          "train.keep_last=3")


def _model_state(run_dir: Path, step: int) -> dict:
    from train.export import load_full_state_dict

    state, meta = load_full_state_dict(run_dir / "checkpoints" / f"step_{step:07d}")
    assert meta["format"] == "dcp" and meta["step"] == step
    return state


def _assert_same_weights(a: Path, b: Path, step: int) -> None:
    sa, sb = _model_state(a, step), _model_state(b, step)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"weights differ at step {step}: {k}"


DDP = (*TINY, "optim.decay_steps=20", "optim.warmup_steps=3", "train.ckpt_every=5", "train.keep_last=3",
       "strategy=ddp", "train.micro_batch_size=2", "data.num_workers=2")


@pytest.fixture(scope="module")
def ddp_straight(tmp_path_factory) -> Path:
    """20 DDP steps on 2 gloo ranks (2 loader workers each), every sample traced: shared by the
    resume test and the DDP-vs-one-process test (torchrun runs are the slowest tests here)."""
    run_dir = tmp_path_factory.mktemp("ddp") / "straight"
    run_train(run_dir, *DDP, "train.max_steps=20", "train.trace_samples=true", nproc=2)
    return run_dir


def _check_resumed(straight: Path, split: Path) -> None:
    a, b = losses_of(straight), losses_of(split)
    assert len(a) == 20 and len(b) == 20, (a, b)
    assert b[:10] == a[:10]  # same start
    assert b[10:] == a[10:], "resumed losses differ from the straight run"  # bitwise: float repr round-trips
    assert [e["step"] for e in read_metrics(split) if "loss" in e] == list(range(1, 21))  # no duplicate events
    _assert_same_weights(straight, split, 20)
    _assert_same_weights(straight, split, 15)
    assert (split / "checkpoints" / "latest").read_text().strip() == "step_0000020"
    kept = sorted(p.name for p in (split / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert kept == ["step_0000010", "step_0000015", "step_0000020"]  # keep_last=3


@pytest.mark.slow
def test_exact_resume_single_process(tmp_path):
    """Dropout on: the resumed run must also restore the RNG streams. In-process data loading here; the loader
    with 2 worker processes is resumed by the DDP test below (data.num_workers=2 on each rank)."""
    over = (*COMMON, "data.num_workers=0")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train_in_process(straight, *over, "train.max_steps=20")[0] == 0
    assert train_in_process(split, *over, "train.max_steps=10")[0] == 0
    assert train_in_process(split, *over, "train.max_steps=20")[0] == 0  # resume=auto from step 10
    _check_resumed(straight, split)


@pytest.mark.slow
def test_exact_resume_ddp(tmp_path, ddp_straight):
    split = tmp_path / "split"
    run_train(split, *DDP, "train.max_steps=10", nproc=2)
    res = run_train(split, *DDP, "train.max_steps=20", nproc=2)
    assert "resumed from" in res.stdout and "step_0000010" in res.stdout
    _check_resumed(ddp_straight, split)


@pytest.mark.slow
def test_ddp_matches_single_process_and_ranks_are_disjoint(tmp_path, ddp_straight):
    """2 gloo ranks x micro-batch 2 vs 1 process x micro-batch 4: same global batch, same losses."""
    single = tmp_path / "single"
    over = [o for o in DDP if not o.startswith(("strategy=", "train.micro_batch_size=", "data.num_workers="))]
    assert train_in_process(single, *over, "train.micro_batch_size=4", "train.max_steps=20",
                            "train.trace_samples=true")[0] == 0
    a, b = losses_of(single), losses_of(ddp_straight)
    assert len(a) == len(b) == 20
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
    assert a[-1] < a[0] - 0.1  # it learned something, so agreement is not trivial

    def seen(run_dir: Path, rank: int) -> list[tuple[int, str]]:
        rows = [json.loads(line) for line in (run_dir / "trace" / f"rank{rank}.jsonl").read_text().splitlines()]
        return [(r["step"], h) for r in rows for h in r["samples"]]

    r0, r1 = seen(ddp_straight, 0), seen(ddp_straight, 1)
    assert len(r0) == len(r1) == 20 * 2
    assert not {h for _, h in r0} & {h for _, h in r1}, "the two ranks saw the same sample"
    # together they saw exactly the single process's samples, step by step
    one = seen(single, 0)
    for step in range(1, 21):
        both = sorted(h for s, h in r0 + r1 if s == step)
        assert both == sorted(h for s, h in one if s == step), f"step {step}: global batch differs"


@pytest.mark.slow
def test_export_of_a_ddp_checkpoint(tmp_path, ddp_straight):
    """python -m train.export on DDP's step-20 checkpoint (the run above, 2 ranks): the safetensors hold the
    checkpoint's tensors exactly, and transformers' logits equal ours within 1e-5."""
    import transformers
    from safetensors.torch import load_file

    from model import GPT, GPTConfig
    from train.export import export, load_full_state_dict

    src = ddp_straight / "checkpoints" / "step_0000020"
    state, meta = load_full_state_dict(src)
    assert (meta["format"], meta["strategy"], meta["world_size"], meta["step"]) == ("dcp", "ddp", 2, 20)
    out = export(src, tmp_path / "hf")
    exported = load_file(out / "model.safetensors")
    assert torch.equal(exported["transformer.wte.weight"], state["tok_emb.weight"])
    assert torch.equal(exported["transformer.h.1.mlp.c_proj.weight"], state["blocks.1.mlp.down_proj.weight"].T)
    ours = GPT(GPTConfig.from_dict(meta["model_config"]))
    ours.load_state_dict(state)
    x = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        assert (hf(x).logits - ours.eval()(x)).abs().max().item() < 1e-5
    # the trained weights, not the init: step 20 is the DDP run's own, 15 a save earlier differs
    earlier, _ = load_full_state_dict(ddp_straight / "checkpoints" / "step_0000015")
    assert not torch.equal(earlier["tok_emb.weight"], state["tok_emb.weight"])
