"""GPU checks of the sharded strategies (skipped without CUDA): bf16 fsdp and zero3 on NCCL with one
GPU against the single-GPU run, and a Falcon-40B-width (d=8192) block stack step under both.
Step time, memory and MFU of the wide step are printed (pytest -s) for the notes."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_losses_close, char_run, corpus_overrides, losses_by_step

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GPU = {"CUDA_VISIBLE_DEVICES": "0"}
BF16 = ["precision=bf16", "train.device=cuda", "train.max_steps=20", "train.micro_batch_size=4"]


def _gpu_run(f, name, overrides, model=None):
    run_dir = f.getbasetemp() / "sharded_runs" / name
    char_run(run_dir, [*corpus_overrides(f), *overrides], 1, env=GPU, model=model)
    return run_dir


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_bf16_on_one_gpu_matches_single_gpu(tmp_path_factory, strategy):
    """World size 1 on NCCL: a sharded strategy is the single-GPU run up to bf16 rounding."""
    single = losses_by_step(_gpu_run(tmp_path_factory, "gpu_single", [*BF16, "strategy=single"]))
    got = losses_by_step(_gpu_run(tmp_path_factory, f"gpu_{strategy}", [*BF16, f"strategy={strategy}"]))
    assert single[20] < single[1] - 0.5
    assert_losses_close(got, single, range(1, 21), 5e-2)


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_falcon_40b_width_block_stack_step(tmp_path_factory, strategy):
    """Two Falcon-40B blocks at full width (d=8192, 128 q / 8 kv heads), seq 2048, bf16, full AC."""
    model = ["model=falcon-40b", "model.n_layer=2", "model.vocab_size=96"]
    run = _gpu_run(tmp_path_factory, f"gpu_falcon_{strategy}",
                   ["precision=bf16", "train.device=cuda", f"strategy={strategy}", "train.seq_len=2048",
                    "train.micro_batch_size=1", "train.max_steps=4", "train.activation_checkpointing=full",
                    "train.eval_steps=0", "train.sample_tokens=0", "train.ckpt_every=0", "optim.warmup_steps=1"],
                   model=model)
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in events if "loss" in e]
    assert len(steps) == 4 and all(e["loss"] == e["loss"] for e in steps)  # finite (not NaN)
    assert steps[-1]["loss"] < steps[0]["loss"]
    last = steps[-1]
    print(f"\n{strategy} falcon-40b width x2 blocks: {2048 / last['tokens_per_s']:.3f} s/step, "
          f"{last['mem_gb']:.1f} GB, MFU {last['mfu']:.1%}")
