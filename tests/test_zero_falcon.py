"""The Falcon-40B recipe (conf/experiment/falcon-40b.yaml: ZeRO-3, full activation checkpointing,
Falcon-40B head geometry, parallel attention, two LayerNorms) rehearsed on CPU with falcon-40b-mini."""

from __future__ import annotations

import json

import pytest
from helpers import assert_losses_close, ckpt, losses_by_step, session_run

pytest.importorskip("deepspeed")

# the recipe, scaled down only where a CPU needs it: depth, vocab (char tokenizer), sequence, precision
# (width 256 keeps falcon-40b-mini's 32 query / 2 KV heads: the same GQA grouping, head_dim 8)
MINI = ["+experiment=falcon-40b", "model=falcon-40b-mini", "model.n_layer=2", "model.n_embd=256", "model.vocab_size=96"]
COMMON = ["precision=fp32", "train.seq_len=32", "train.max_steps=6", "train.grad_accum=1", "optim.warmup_steps=1",
          "optim.lr=1e-3", "train.eval_steps=1", "train.sample_tokens=0"]


def test_falcon_40b_recipe_zero3_matches_single_process(tmp_path_factory):
    single = session_run(tmp_path_factory, "falcon_single", [*COMMON, "strategy=single", "train.micro_batch_size=2"],
                         model=MINI)
    zero3 = session_run(tmp_path_factory, "falcon_zero3", [*COMMON, "train.micro_batch_size=1"], nproc=2, model=MINI)
    want = losses_by_step(single)
    assert want[6] < want[1], "the falcon-mini reference run does not learn"
    assert_losses_close(losses_by_step(zero3), want, range(1, 7), 1e-5)
    cfg = (zero3 / "config.yaml").read_text()
    assert "activation_checkpointing: full" in cfg and "name: zero3" in cfg
    meta = json.loads((ckpt(zero3, 6) / "meta.json").read_text())
    mc = meta["model_config"]
    assert (mc["n_head"] // mc["n_kv_head"], mc["parallel_residual"], mc["shared_attn_norm"]) == (16, True, False)
