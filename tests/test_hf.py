"""GPT.from_pretrained / save_pretrained against transformers: dirs written by transformers load with equal logits,
our dirs load in AutoModelForCausalLM with equal logits, sharding, .bin files, dtypes, and one-line errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from model import GPT, GPTConfig
from model.hf import parse_size
from model.hf_convert import config_to_hf

transformers.logging.set_verbosity_error()
V = 512

FAMILIES = {
    "gpt2": ("gpt2-tiny", {}),
    "falcon-40b-style": ("falcon-tiny", {}),
    "falcon-7b-style": ("falcon-tiny", {"n_head": 4, "n_kv_head": 1, "shared_attn_norm": True}),
    "gemma": ("gemma-tiny", {}),
    "llama": ("llama-tiny", {}),
}


def config(family: str, **kw) -> GPTConfig:
    preset, over = FAMILIES[family]
    return GPTConfig.from_name(preset, vocab_size=V, n_layer=2, **{**over, **kw})


def hf_model(cfg: GPTConfig, seed: int = 0) -> transformers.PreTrainedModel:
    d = config_to_hf(cfg)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(d.pop("model_type"), **d)).eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


X = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_from_transformers_dir_and_back(family: str, tmp_path: Path) -> None:
    cfg = config(family)
    hf = hf_model(cfg)
    hf.save_pretrained(tmp_path / "hf")
    ours = GPT.from_pretrained(tmp_path / "hf")
    assert ours.config == cfg and not ours.training
    with torch.no_grad():
        ref = hf(X).logits
        assert max_diff(ours(X), ref) <= 1e-5
    # ours -> save_pretrained -> transformers, starting from different weights
    torch.manual_seed(1)
    fresh = GPT(cfg).eval()
    fresh.save_pretrained(tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(back).__name__ == type(hf).__name__
    with torch.no_grad():
        out = fresh(X)
        assert max_diff(out, back(X).logits) <= 1e-5
        assert max_diff(out, ref) > 1e-3


def test_sharded_round_trip(tmp_path: Path) -> None:
    cfg = config("llama")
    torch.manual_seed(2)
    ours = GPT(cfg).eval()
    ours.save_pretrained(tmp_path / "s", max_shard_size="150KB")
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and all((tmp_path / "s" / f).is_file() for f in shards)
    assert not (tmp_path / "s" / "model.safetensors").exists()
    for f in shards:  # each shard respects the limit unless it holds a single larger tensor
        t = load_file(tmp_path / "s" / f)
        assert len(t) == 1 or sum(v.numel() * v.element_size() for v in t.values()) <= 150_000
    back = GPT.from_pretrained(tmp_path / "s")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    with torch.no_grad():
        ref = ours(X)
        assert torch.equal(back(X), ref)
        assert max_diff(hf(X).logits, ref) <= 1e-5
    # transformers' own sharded output loads too
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    with torch.no_grad():
        assert max_diff(GPT.from_pretrained(tmp_path / "hf")(X), ref) <= 1e-5
    # re-saving unsharded into the same dir leaves no stale shards behind
    ours.save_pretrained(tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["config.json", "model.safetensors"]


def test_pytorch_model_bin(tmp_path: Path) -> None:
    cfg = config("gpt2")
    hf = hf_model(cfg)
    d = tmp_path / "bin"
    hf.config.save_pretrained(d)
    sd = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    torch.save(sd, d / "pytorch_model.bin")
    with torch.no_grad():
        assert max_diff(GPT.from_pretrained(d)(X), hf(X).logits) <= 1e-5
    # and our own .bin output (safe_serialization=False), sharded
    ours = GPT.from_pretrained(d)
    ours.save_pretrained(tmp_path / "bin2", safe_serialization=False, max_shard_size="300KB")
    assert (tmp_path / "bin2" / "pytorch_model.bin.index.json").is_file()
    with torch.no_grad():
        assert torch.equal(GPT.from_pretrained(tmp_path / "bin2")(X), ours(X))


def test_dtypes(tmp_path: Path) -> None:
    cfg = config("gemma")
    hf = hf_model(cfg)
    hf.save_pretrained(tmp_path / "fp32")
    bf = GPT.from_pretrained(tmp_path / "fp32", torch_dtype=torch.bfloat16)
    assert {p.dtype for p in bf.parameters()} == {torch.bfloat16}
    hf_bf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ours_logits, ref = bf(X), hf_bf(X).logits
    assert ours_logits.dtype == torch.bfloat16
    assert max_diff(ours_logits, ref) <= 0.02 * ref.float().abs().max().item()  # bf16 rounding only
    assert {p.dtype for p in GPT.from_pretrained(tmp_path / "fp32").parameters()} == {torch.float32}
    # "auto" = the checkpoint's dtype
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    auto = GPT.from_pretrained(tmp_path / "bf16", torch_dtype="auto")
    assert {p.dtype for p in auto.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in GPT.from_pretrained(tmp_path / "bf16", torch_dtype="float16").parameters()} == {
        torch.float16}
    with pytest.raises(ValueError, match="torch_dtype='int4' is not supported"):
        GPT.from_pretrained(tmp_path / "bf16", torch_dtype="int4")


def test_low_cpu_mem_usage_off_is_equal(tmp_path: Path) -> None:
    cfg = config("falcon-40b-style")
    hf_model(cfg).save_pretrained(tmp_path)
    a = GPT.from_pretrained(tmp_path)
    b = GPT.from_pretrained(tmp_path, low_cpu_mem_usage=False)
    assert a.lm_head.weight is a.tok_emb.weight and b.lm_head.weight is b.tok_emb.weight
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- bad input: one line, nothing partial ------------------------------------------------------------


def one_line_error(fn, *args, **kw) -> str:
    with pytest.raises(ValueError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.fixture
def llama_dir(tmp_path: Path) -> Path:
    d = tmp_path / "llama"
    hf_model(config("llama")).save_pretrained(d, max_shard_size="200KB")
    return d


def test_unsupported_model_type(llama_dir: Path) -> None:
    cfg = json.loads((llama_dir / "config.json").read_text())
    (llama_dir / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral"}))
    msg = one_line_error(GPT.from_pretrained, llama_dir)
    assert "model_type='mistral'" in msg and "gpt2, falcon, gemma, llama" in msg


def test_alibi_falcon_is_rejected(tmp_path: Path) -> None:
    hf_model(config("falcon-7b-style")).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "alibi": True}))
    assert "alibi=True cannot be represented" in one_line_error(GPT.from_pretrained, tmp_path)


def test_missing_shard(llama_dir: Path) -> None:
    shard = sorted(llama_dir.glob("model-*.safetensors"))[1]
    shard.unlink()
    msg = one_line_error(GPT.from_pretrained, llama_dir)
    assert f"missing shard file {shard.name}" in msg


def test_shape_mismatch_names_tensor(llama_dir: Path) -> None:
    cfg = json.loads((llama_dir / "config.json").read_text())
    (llama_dir / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 512}))
    msg = one_line_error(GPT.from_pretrained, llama_dir)
    assert re.search(r"shape mismatch for model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.weight in model-\d+", msg)
    assert "448" in msg and "512" in msg


def test_missing_and_unexpected_keys(tmp_path: Path) -> None:
    cfg = config("llama")
    hf = hf_model(cfg)
    hf.config.save_pretrained(tmp_path)
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    save_file({k: v for k, v in sd.items() if "layers.1.mlp.up_proj" not in k}, tmp_path / "model.safetensors")
    msg = one_line_error(GPT.from_pretrained, tmp_path)
    assert "missing keys" in msg and "model.layers.1.mlp.up_proj.weight" in msg
    save_file({**sd, "model.layers.0.extra.weight": torch.zeros(2)}, tmp_path / "model.safetensors")
    msg = one_line_error(GPT.from_pretrained, tmp_path)
    assert "unexpected keys" in msg and "model.layers.0.extra.weight" in msg


def test_missing_config_and_weights(tmp_path: Path) -> None:
    assert "no config.json" in one_line_error(GPT.from_pretrained, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(config("gpt2"))))
    assert "no weights in" in one_line_error(GPT.from_pretrained, tmp_path)
    assert "does not exist" in one_line_error(GPT.from_pretrained, tmp_path / "nope" / "x" / "y")


def test_hub_name_offline_is_one_line(tmp_path: Path) -> None:
    msg = one_line_error(GPT.from_pretrained, "lmforge-test/not-a-real-model", cache_dir=tmp_path,
                         local_files_only=True)
    assert "'lmforge-test/not-a-real-model' is not a local directory and could not be fetched" in msg


def test_save_validates_before_writing(tmp_path: Path) -> None:
    m = GPT(GPTConfig.from_name("gpt2-tiny", vocab_size=V, n_layer=1, mlp="swiglu"))
    assert "needs mlp='gelu'" in one_line_error(m.save_pretrained, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    good = GPT(config("gpt2"))
    assert "max_shard_size='lots'" in one_line_error(good.save_pretrained, tmp_path / "out", max_shard_size="lots")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_save_keeps_other_files(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{}")
    GPT(config("gpt2")).save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("10kb") == 10_000
    assert parse_size(123) == 123
