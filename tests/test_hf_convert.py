"""Parity with transformers: config + state-dict maps both directions, and exact parameter counts of the big presets
against transformers models built on `meta` from the real HF configs (values written here; nothing from the Hub)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers

from model import GPT, GPTConfig
from model.hf_convert import config_from_hf, config_to_hf, state_dict_from_hf, state_dict_to_hf

transformers.logging.set_verbosity_error()
V = 512  # vocabulary shrunk for speed


def hf_model(d: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    d = dict(d)
    cfg = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


CASES = {
    "gpt2-tiny": {},
    "falcon-tiny": {},  # new_decoder_architecture, GQA 16:1, two LNs
    "falcon-40b-mini": {"n_layer": 1},  # grouped layout with 2 KV groups
    "gemma-tiny": {},
    "llama-tiny": {},
    # Falcon-7B style: multi-query, one shared LN, parallel attention
    "falcon-7b-style": {"base": "falcon-tiny", "n_kv_head": 1, "n_head": 4, "shared_attn_norm": True},
    # falcon-rw style (RoPE): MHA interleaved q/k/v, sequential blocks, biases
    "falcon-seq-mha": {"base": "falcon-tiny", "n_kv_head": 4, "n_head": 4, "parallel_residual": False,
                       "bias": True},
    "llama-bias-untied-mha": {"base": "llama-tiny", "n_kv_head": 4, "bias": True},
}


def case_config(case: str) -> GPTConfig:
    kw = dict(CASES[case])
    base = kw.pop("base", case)
    kw.setdefault("n_layer", 2)
    return GPTConfig.from_name(base, vocab_size=V, **kw)


@pytest.mark.parametrize("case", list(CASES))
def test_parity_both_directions(case: str) -> None:
    cfg = case_config(case)
    hf = hf_model(config_to_hf(cfg))
    assert config_from_hf(hf.config.to_dict()) == cfg
    x = torch.randint(0, V, (2, 16))
    # HF -> ours
    ours = GPT(cfg).eval()
    ours.load_state_dict(state_dict_from_hf(hf.state_dict(), cfg))
    with torch.no_grad():
        ref = hf(x).logits
        assert (ours(x) - ref).abs().max().item() <= 1e-5
    # ours -> HF (fresh random weights on our side)
    torch.manual_seed(1)
    ours2 = GPT(cfg).eval()
    hf.load_state_dict(state_dict_to_hf(ours2.state_dict(), cfg))  # strict: every HF key produced
    with torch.no_grad():
        out = ours2(x)
        assert (out - hf(x).logits).abs().max().item() <= 1e-5
        assert (out - ref).abs().max().item() > 1e-3  # the weights really changed


def test_round_trip_is_identity() -> None:
    for case in CASES:
        cfg = case_config(case)
        sd = GPT(cfg).state_dict()
        back = state_dict_from_hf(state_dict_to_hf(sd, cfg), cfg)
        assert back.keys() == sd.keys()
        assert all(torch.equal(back[k], sd[k]) for k in sd), case


def test_original_gpt2_checkpoint_keys() -> None:
    """The original gpt2 files have no `transformer.` prefix and carry attn.bias mask buffers."""
    cfg = GPTConfig.from_name("gpt2-tiny", vocab_size=V, n_layer=1)
    hf_sd = state_dict_to_hf(GPT(cfg).state_dict(), cfg)
    legacy = {k.removeprefix("transformer."): v for k, v in hf_sd.items() if k != "lm_head.weight"}
    legacy["h.0.attn.bias"] = torch.ones(1, 1, 8, 8)
    ours = state_dict_from_hf(legacy, cfg)
    assert torch.equal(ours["lm_head.weight"], ours["tok_emb.weight"])
    with pytest.raises(ValueError, match=r"unexpected keys for a gpt2 checkpoint: transformer.h.0.attn.rotary"):
        state_dict_from_hf({**hf_sd, "transformer.h.0.attn.rotary.weight": torch.zeros(1)}, cfg)


# ---- exact parameter counts against transformers on meta --------------------------------------------

REAL_HF_CONFIGS: dict[str, dict[str, Any]] = {
    "gpt2-124m": {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024,
                  "vocab_size": 50257, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5},
    "gpt2-medium": {"model_type": "gpt2", "n_embd": 1024, "n_layer": 24, "n_head": 16, "n_positions": 1024,
                    "vocab_size": 50257, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5},
    "gpt2-large": {"model_type": "gpt2", "n_embd": 1280, "n_layer": 36, "n_head": 20, "n_positions": 1024,
                   "vocab_size": 50257, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5},
    "gpt2-xl": {"model_type": "gpt2", "n_embd": 1600, "n_layer": 48, "n_head": 25, "n_positions": 1024,
                "vocab_size": 50257, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5},
    "falcon-7b": {"model_type": "falcon", "alibi": False, "bias": False, "hidden_size": 4544,
                  "layer_norm_epsilon": 1e-5, "multi_query": True, "new_decoder_architecture": False,
                  "num_attention_heads": 71, "num_hidden_layers": 32, "parallel_attn": True, "vocab_size": 65024},
    "falcon-40b": {"model_type": "falcon", "alibi": False, "bias": False, "hidden_size": 8192,
                   "layer_norm_epsilon": 1e-5, "multi_query": True, "new_decoder_architecture": True,
                   "num_attention_heads": 128, "num_hidden_layers": 60, "num_kv_heads": 8, "parallel_attn": True,
                   "vocab_size": 65024},
    "gemma-2b": {"model_type": "gemma", "vocab_size": 256000, "hidden_size": 2048, "intermediate_size": 16384,
                 "num_hidden_layers": 18, "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 256,
                 "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "hidden_act": "gelu",
                 "rope_theta": 10000.0},
    "llama3-8b": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                  "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                  "tie_word_embeddings": False, "hidden_act": "silu"},
}
KNOWN = {"gpt2-124m": 124_439_808, "gpt2-medium": 354_823_168, "gemma-2b": 2_506_172_416, "llama3-8b": 8_030_261_248}


@pytest.mark.parametrize("name", list(REAL_HF_CONFIGS))
def test_param_count_equals_transformers(name: str) -> None:
    d = dict(REAL_HF_CONFIGS[name])
    hf_cfg = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg)
        ours = GPT(GPTConfig.from_name(name))
    n_hf = sum(p.numel() for p in hf.parameters())
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours == n_hf
    if name in KNOWN:
        assert n_ours == KNOWN[name]
    # the preset is exactly what the real HF config describes
    assert config_from_hf(REAL_HF_CONFIGS[name]) == GPTConfig.from_name(name)
    # and every HF tensor name/shape is produced by our map
    hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    ours_shapes = {k: tuple(v.shape) for k, v in state_dict_to_hf(ours.state_dict(), ours.config).items()}
    assert ours_shapes == hf_shapes


def test_original_falcon_remote_code_configs() -> None:
    """tiiuae's first config.json files (model_type RefinedWebModel / RefinedWeb, short key names)."""
    old_7b = {"model_type": "RefinedWebModel", "hidden_size": 4544, "n_head": 71, "n_layer": 32, "multi_query": True,
              "parallel_attn": True, "bias": False, "alibi": False, "vocab_size": 65024, "layer_norm_epsilon": 1e-5}
    old_40b = {"model_type": "RefinedWeb", "hidden_size": 8192, "n_head": 128, "n_head_kv": 8, "n_layer": 60,
               "parallel_attn": True, "bias": False, "alibi": False, "vocab_size": 65024,
               "layer_norm_epsilon": 1e-5}
    assert config_from_hf(old_7b) == GPTConfig.from_name("falcon-7b")
    assert config_from_hf(old_40b) == GPTConfig.from_name("falcon-40b")


@pytest.mark.parametrize("d, msg", [
    ({"model_type": "mistral"}, "unsupported model_type='mistral'; supported: gpt2, falcon, gemma, llama"),
    ({"model_type": "falcon", "alibi": True}, "alibi=True cannot be represented"),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope scaling type 'llama3'"),
    ({"model_type": "gpt2", "activation_function": "relu"}, "activation_function='relu' is not supported"),
    ({"model_type": "llama", "hidden_act": "gelu"}, "hidden_act='gelu' is not supported; allowed: silu"),
])
def test_unrepresentable_hf_config(d: dict, msg: str) -> None:
    with pytest.raises(ValueError) as e:
        config_from_hf(d)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_config_without_hf_equivalent() -> None:
    cfg = GPTConfig.from_name("gpt2-tiny", mlp="swiglu")
    with pytest.raises(ValueError, match="family='gpt2' in Hugging Face format needs mlp='gelu'; got 'swiglu'"):
        config_to_hf(cfg)
