"""train.bench: the JSON a benchmark run prints, and its FLOPs accounting against model.stats."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from model.config import GPTConfig
from model.stats import count_params, flops_per_token
from train.bench import main, split_overrides

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=gpt2-tiny", "model.vocab_size=512", "model.n_layer=2", "train.micro_batch_size=2",
        "train.seq_len=64"]


@pytest.fixture(scope="module")
def full_ac_result():
    # a real process, as a user runs it: JSON on stdout, the table on stderr
    proc = subprocess.run([sys.executable, "-m", "train.bench", *TINY, "train.activation_checkpointing=full",
                           "bench.steps=2", "bench.warmup=1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "MFU / HFU" in proc.stderr
    return json.loads(proc.stdout)


def test_bench_json_keys_finite_positive(full_ac_result):
    r = full_ac_result
    for key in ("step_time_s", "tokens_per_s", "tokens_per_s_per_device", "flops_per_token", "hfu_flops_per_token",
                "peak_flops", "mfu", "hfu", "peak_memory_bytes"):
        assert isinstance(r[key], (int, float)) and math.isfinite(r[key]) and r[key] > 0, key
    assert len(r["step_times_s"]) == 2 and r["step_time_s"] == pytest.approx(statistics.median(r["step_times_s"]))
    assert r["tokens_per_step"] == 2 * 64
    assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["step_time_s"])
    assert r["peak_flops_source"] == "measured" and r["peak_memory_kind"] == "peak_rss_minus_baseline"
    assert r["state_bytes"]["params"] == 4 * r["n_params"]
    # the trainer's CPU malloc tuning is in effect in the bench too (glibc, no allocator chosen by the user)
    from train.cpu_malloc import _user_chose_allocator

    glibc = sys.platform.startswith("linux") and bool(os.confstr("CS_GNU_LIBC_VERSION"))
    assert r["cpu_malloc_tuned"] is (glibc and not _user_chose_allocator())


def test_bench_flops_equal_model_stats(full_ac_result):
    cfg = GPTConfig.from_name("gpt2-tiny", vocab_size=512, n_layer=2)
    r = full_ac_result
    assert r["flops_per_token"] == flops_per_token(cfg, 64)
    assert r["flops_n"] == count_params(cfg).non_embedding
    # full AC recomputes every block's forward: 2 x block params + 4 L H Q T more per token
    n_blocks = cfg.n_layer * (count_params(cfg).per_block)
    assert r["hfu_flops_per_token"] == r["flops_per_token"] + 2 * n_blocks + 4 * cfg.n_layer * cfg.q_dim * 64
    assert r["hfu"] / r["mfu"] == pytest.approx(r["hfu_flops_per_token"] / r["flops_per_token"])
    assert r["mfu"] == pytest.approx(r["tokens_per_s_per_device"] * r["flops_per_token"] / r["peak_flops"])


@pytest.mark.parametrize("argv,needle", [
    (["bench.steps=0"], "bench.steps=0"),
    (["bench.data=web"], "synthetic"),
    (["bench.foo=1"], "bench.steps"),
    (["strategy=tp"], "tp"),
    (["train.seq_len=0"], "train.seq_len=0"),
])
def test_bench_bad_input_one_line(capsys, argv, needle):
    assert main([*TINY, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err


def test_split_overrides():
    hydra, opts = split_overrides(["model=gpt2-tiny", "bench.steps=5", "bench.data=real"])
    assert hydra == ["model=gpt2-tiny"] and opts == {"steps": 5, "warmup": 3, "data": "real"}


@pytest.mark.slow
def test_bench_tensor_parallel_accounting():
    """torchrun 2 ranks, parallel.tp=2: both ranks read the same batches, so a step is one replica's
    micro-batch of tokens; MFU divides those tokens' model FLOPs by both devices; each rank holds half
    the vocabulary-sharded state (the gathered per-rank bytes), and the dims are in the JSON."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "train.bench", *TINY, "parallel.tp=2", "bench.steps=2", "bench.warmup=1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["parallel"] == {"pp": 1, "dp_replicate": 1, "dp_shard": 1, "tp": 2} and r["world_size"] == 2
    assert r["tokens_per_step"] == 2 * 64  # one data-parallel replica: micro-batch 2 x seq 64
    assert r["tokens_per_s_per_device"] == pytest.approx(r["tokens_per_s"] / 2)
    assert r["mfu"] == pytest.approx(r["tokens_per_s_per_device"] * r["flops_per_token"] / r["peak_flops"])
    per_rank = [s["params"] for s in r["state_bytes_per_rank"]]
    assert sum(per_rank) < 1.1 * 4 * r["n_params"] and max(per_rank) < 0.6 * 4 * r["n_params"], per_rank
