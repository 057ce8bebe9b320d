"""`python -m model.inspect`: numbers against count_params and transformers, shapes of seed 002's Gemma-2B
breakdown, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from helpers import run_measured

from model import GPTConfig
from model.hf_convert import config_to_hf
from model.inspect import main
from model.stats import count_params, flops_per_token

transformers.logging.set_verbosity_error()
ROOT = Path(__file__).resolve().parents[1]


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def hf_meta_count(d: dict) -> int:
    d = dict(d)
    cfg = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    with torch.device("meta"):
        return sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(cfg).parameters())


def test_gemma_2b_json_matches_transformers(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_main(capsys, "gemma-2b", "--json", "--seq-len", "2048")
    assert rc == 0
    info = json.loads(out)
    assert {"name", "n_params", "n_params_non_embedding", "bytes", "flops_per_token"} <= info.keys()
    cfg = GPTConfig.from_name("gemma-2b")
    n = hf_meta_count(config_to_hf(cfg))
    assert info["name"] == "gemma-2b" and info["n_params"] == n == 2_506_172_416
    assert info["bytes"] == {"fp32": 4 * n, "bf16": 2 * n, "fp16": 2 * n, "int8": n}
    assert info["n_params_non_embedding"] == count_params(cfg).non_embedding
    assert info["flops_per_token"] == flops_per_token(cfg, 2048)
    assert info["training_bytes_adamw_mixed"] == 16 * n


def test_gemma_2b_text_breakdown(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_main(capsys, "gemma-2b")
    assert rc == 0
    # seed 002's breakdown: embedding 256000x2048, q 2048x2048, k/v 2048x256, MLP 2048x16384, down 16384x2048
    assert "(0-17): 18 x Block(" in out and "(k_proj): Linear(in_features=2048, out_features=256, bias=False)" in out
    lines = {ln.split()[0] + " " + ln.split()[1]: ln for ln in out.splitlines() if ln.startswith("  ") and
             len(ln.split()) > 4}
    assert "256000 x 2048" in lines["token embedding"]
    assert "2048 x 2048" in lines["attention query"]
    assert "2048 x 256" in lines["attention key"] and "2048 x 256" in lines["attention value"]
    assert "2048 x 16384" in lines["MLP gate"] and "16384 x 2048" in lines["MLP down"]
    assert "2,506,172,416" in out and "110,104,576" in out  # total, per block
    assert "16 B/param" in out and "FLOPs per token" in out


# model.inspect falcon-40b's peak RSS bound: measured 220 MiB, what `import torch, model` alone takes; one of
# falcon-40b's MLP matrices (8192 x 32768) is 1 GiB in fp32 and its embedding 2 GiB, so a run that materialized
# any weight would pass it
INSPECT_RSS_BOUND = 768 * 2**20


def test_falcon_40b_on_meta_in_seconds() -> None:
    """Runs on the meta device: its own peak RSS (wait4's rusage of that one process) stays under
    INSPECT_RSS_BOUND, and the parameter count is transformers' for the real Falcon-40B config."""
    rc, out, err, peak_rss = run_measured([sys.executable, "-m", "model.inspect", "falcon-40b", "--json"],
                                          timeout=120, cwd=ROOT)
    assert rc == 0, err
    assert peak_rss < INSPECT_RSS_BOUND, f"peak RSS {peak_rss / 2**20:.0f} MiB >= {INSPECT_RSS_BOUND / 2**20:.0f} MiB"
    info = json.loads(out)
    real = {"model_type": "falcon", "alibi": False, "bias": False, "hidden_size": 8192, "layer_norm_epsilon": 1e-5,
            "multi_query": True, "new_decoder_architecture": True, "num_attention_heads": 128,
            "num_hidden_layers": 60, "num_kv_heads": 8, "parallel_attn": True, "vocab_size": 65024}
    assert info["n_params"] == hf_meta_count(real)
    assert info["bytes"]["bf16"] == 2 * info["n_params"]


def test_hf_dir_is_inspected_like_its_preset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = GPTConfig.from_name("llama3-8b")
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(cfg)))
    rc, out, _ = run_main(capsys, str(tmp_path), "--json", "--seq-len", "1024")
    assert rc == 0
    assert json.loads(out)["n_params"] == 8_030_261_248


def test_unknown_preset_exit_2_one_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "model.inspect", "gpt5"], cwd=ROOT, check=False, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    err = proc.stderr.strip()
    assert "\n" not in err and "'gpt5'" in err and "gpt2-124m" in err and "llama-tiny" in err


@pytest.mark.parametrize("seq", ["0", "4096"])
def test_bad_seq_len(seq: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run_main(capsys, "gpt2-124m", "--seq-len", seq)
    assert rc == 2 and out == ""
    assert f"--seq-len {seq} must be in 1..1024" in err and err.count("\n") == 1
