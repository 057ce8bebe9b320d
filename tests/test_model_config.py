"""GPTConfig: presets, serialization, and one-line errors for bad input."""

from __future__ import annotations

import json

import pytest

from model import PRESETS, GPTConfig


def test_presets_cover_design() -> None:
    for name in ["gpt2-124m", "gpt2-medium", "gpt2-large", "gpt2-xl", "falcon-7b", "falcon-40b", "gemma-2b",
                 "llama3-8b", "gpt2-tiny", "falcon-tiny", "gemma-tiny", "llama-tiny", "falcon-40b-mini"]:
        assert name in PRESETS
    for name in ["gpt2-tiny", "falcon-tiny", "gemma-tiny", "llama-tiny"]:
        cfg = GPTConfig.from_name(name)
        assert cfg.block_size >= 256 and 64 <= cfg.n_embd <= 128 and cfg.n_layer <= 4
    # tiny presets keep the family's real vocabulary
    assert GPTConfig.from_name("gpt2-tiny").vocab_size == GPTConfig.from_name("gpt2-124m").vocab_size
    assert GPTConfig.from_name("falcon-tiny").vocab_size == GPTConfig.from_name("falcon-40b").vocab_size
    assert GPTConfig.from_name("gemma-tiny").vocab_size == GPTConfig.from_name("gemma-2b").vocab_size
    assert GPTConfig.from_name("llama-tiny").vocab_size == GPTConfig.from_name("llama3-8b").vocab_size
    # falcon-tiny / falcon-40b-mini keep Falcon-40B's geometry style: 16 query heads per KV head, 2 LNs, parallel
    big = GPTConfig.from_name("falcon-40b")
    for name in ["falcon-tiny", "falcon-40b-mini"]:
        c = GPTConfig.from_name(name)
        assert c.n_head // c.n_kv_head == big.n_head // big.n_kv_head == 16
        assert c.parallel_residual and not c.shared_attn_norm


def test_derived_fields_and_overrides() -> None:
    cfg = GPTConfig.from_name("gpt2-124m", n_layer=2, dropout=0.1)
    assert (cfg.n_layer, cfg.dropout, cfg.n_kv_head, cfg.head_dim, cfg.ffn_hidden) == (2, 0.1, 12, 64, 3072)
    g = GPTConfig.from_name("gemma-2b")
    assert (g.head_dim, g.q_dim, g.kv_dim) == (256, 2048, 256)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_dict_round_trip(name: str) -> None:
    cfg = GPTConfig.from_name(name)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert GPTConfig.from_dict(d) == cfg


@pytest.mark.parametrize("kw, field, allowed", [
    ({"n_embd": 100, "n_head": 3}, "n_embd=100", "n_head=3"),
    ({"n_head": 12, "n_kv_head": 5}, "n_head=12", "n_kv_head"),
    ({"norm": "batchnorm"}, "norm='batchnorm'", "layernorm, rmsnorm"),
    ({"mlp": "relu"}, "mlp='relu'", "gelu, geglu, swiglu"),
    ({"pos": "alibi"}, "pos='alibi'", "learned, rope"),
    ({"family": "mistral"}, "family='mistral'", "gpt2, falcon, gemma, llama"),
    ({"gelu_approximate": "fast"}, "gelu_approximate='fast'", "none, tanh"),
    ({"n_layer": 0}, "n_layer=0", "positive integer"),
    ({"dropout": 1.5}, "dropout=1.5", "[0, 1)"),
    ({"shared_attn_norm": True}, "shared_attn_norm=True", "parallel_residual=True"),
])
def test_bad_config_one_line_error(kw: dict, field: str, allowed: str) -> None:
    with pytest.raises(ValueError) as e:
        GPTConfig(**kw)
    msg = str(e.value)
    assert field in msg and allowed in msg and "\n" not in msg


def test_unknown_preset_names_valid_ones() -> None:
    with pytest.raises(ValueError) as e:
        GPTConfig.from_name("gpt5")
    msg = str(e.value)
    assert "'gpt5'" in msg and "gpt2-124m" in msg and "falcon-40b" in msg and "llama-tiny" in msg and "\n" not in msg


def test_unknown_field_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"unknown GPTConfig field\(s\) \['n_layers'\]"):
        GPTConfig.from_name("gpt2-tiny", n_layers=3)
