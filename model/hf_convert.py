"""Config and state-dict maps between lmforge's GPT and Hugging Face's gpt2 / falcon / gemma / llama layouts.

Our parameter names: tok_emb, pos_emb, blocks.{i}.{attn_norm, attn.{q,k,v,o}_proj, mlp_norm,
mlp.{gate,up,down}_proj}, norm_f, lm_head. RoPE uses HF's rotate_half convention, so q/k need no permutation.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from model.config import GPTConfig

SUPPORTED_MODEL_TYPES = ("gpt2", "falcon", "gemma", "llama")

# keys some HF checkpoints carry that are buffers, not parameters (causal masks, rotary caches)
_IGNORED_HF_KEYS = re.compile(r"(\.attn\.bias|\.attn\.masked_bias|\.rotary_emb\.inv_freq)$")

_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
_FALCON_ALIASES = ("RefinedWebModel", "RefinedWeb")


# ---- config ------------------------------------------------------------------------------------


def _get(d: dict[str, Any], *names: str, default: Any = None) -> Any:
    for n in names:
        if d.get(n) is not None:
            return d[n]
    return default


def _rope_theta(d: dict[str, Any], model_type: str, default: float) -> float:
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling")
    rope_type = params.get("rope_type") or (scaling or {}).get("rope_type") or (scaling or {}).get("type")
    if rope_type not in (None, "default"):
        raise ValueError(f"{model_type} config has rope scaling type {rope_type!r}; only plain RoPE ('default') "
                         "is supported")
    return float(params.get("rope_theta", d.get("rope_theta", default)))


def _gelu_approx(act: str, field: str, model_type: str) -> str:
    if act in _TANH_GELUS:
        return "tanh"
    if act == "gelu":
        return "none"
    raise ValueError(f"{model_type} config {field}={act!r} is not supported; allowed: gelu, "
                     f"{', '.join(_TANH_GELUS)}")


def config_from_hf(d: dict[str, Any]) -> GPTConfig:
    """A GPTConfig equal in architecture to the HF config dict (config.json contents)."""
    mt = d.get("model_type")
    if mt in _FALCON_ALIASES:  # Falcon's original remote-code configs: RefinedWebModel (7B), RefinedWeb (40B)
        d = {**d, "new_decoder_architecture": mt == "RefinedWeb",
             "num_kv_heads": d.get("num_kv_heads", d.get("n_head_kv"))}
        mt = "falcon"
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type={mt!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if mt == "gpt2":
        if d.get("add_cross_attention"):
            raise ValueError("gpt2 config add_cross_attention=True cannot be represented (decoder-only models only)")
        if d.get("scale_attn_by_inverse_layer_idx"):
            raise ValueError("gpt2 config scale_attn_by_inverse_layer_idx=True cannot be represented")
        if d.get("scale_attn_weights", True) is False:
            raise ValueError("gpt2 config scale_attn_weights=False cannot be represented")
        n_embd = d.get("n_embd", 768)
        return GPTConfig(
            family="gpt2", n_layer=d.get("n_layer", 12), n_head=d.get("n_head", 12), n_embd=n_embd,
            vocab_size=d.get("vocab_size", 50257), block_size=d.get("n_positions", 1024), pos="learned",
            norm="layernorm", norm_eps=d.get("layer_norm_epsilon", 1e-5), mlp="gelu",
            gelu_approximate=_gelu_approx(d.get("activation_function", "gelu_new"), "activation_function", mt),
            ffn_hidden=d.get("n_inner") or 4 * n_embd, bias=True,
            tie_embeddings=d.get("tie_word_embeddings", True), dropout=float(d.get("resid_pdrop", 0.0) or 0.0),
        )
    if mt == "falcon":
        if d.get("alibi"):
            raise ValueError("falcon config alibi=True cannot be represented (lmforge supports RoPE Falcons only)")
        n_embd = _get(d, "hidden_size", "n_embed", default=4544)
        n_head = _get(d, "num_attention_heads", "n_head", default=71)
        new_arch = bool(d.get("new_decoder_architecture", False))
        if new_arch:
            n_kv = d.get("num_kv_heads") or n_head
            parallel = True
            shared = d.get("num_ln_in_parallel_attn") == 1
        else:
            n_kv = 1 if d.get("multi_query", True) else n_head
            parallel = bool(d.get("parallel_attn", True))
            shared = parallel
        return GPTConfig(
            family="falcon", n_layer=_get(d, "num_hidden_layers", "n_layer", default=32), n_head=n_head,
            n_kv_head=n_kv, n_embd=n_embd, vocab_size=d.get("vocab_size", 65024),
            block_size=d.get("max_position_embeddings") or 2048, pos="rope",
            rope_theta=_rope_theta(d, mt, 10000.0), norm="layernorm", norm_eps=d.get("layer_norm_epsilon", 1e-5),
            mlp="gelu", gelu_approximate=_gelu_approx(d.get("activation", "gelu"), "activation", mt),
            ffn_hidden=d.get("ffn_hidden_size") or 4 * n_embd, parallel_residual=parallel,
            shared_attn_norm=shared, bias=bool(d.get("bias", False)),
            tie_embeddings=d.get("tie_word_embeddings", True),
        )
    if mt == "gemma":
        act = _get(d, "hidden_activation", "hidden_act", default="gelu_pytorch_tanh")
        approx = "tanh" if act == "gelu" else _gelu_approx(act, "hidden_act", mt)  # HF reads Gemma's "gelu" as tanh
        return GPTConfig(
            family="gemma", n_layer=d.get("num_hidden_layers", 28), n_head=d.get("num_attention_heads", 16),
            n_kv_head=d.get("num_key_value_heads") or d.get("num_attention_heads", 16),
            n_embd=d.get("hidden_size", 3072), head_dim=d.get("head_dim", 256), vocab_size=d.get("vocab_size", 256000),
            block_size=d.get("max_position_embeddings", 8192), pos="rope", rope_theta=_rope_theta(d, mt, 10000.0),
            norm="rmsnorm", norm_eps=d.get("rms_norm_eps", 1e-6), norm_offset=True, mlp="geglu",
            gelu_approximate=approx, ffn_hidden=d.get("intermediate_size", 24576),
            bias=bool(d.get("attention_bias", False)), tie_embeddings=d.get("tie_word_embeddings", True),
            embed_scale=True,
        )
    # llama
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"llama config hidden_act={d['hidden_act']!r} is not supported; allowed: silu")
    if bool(d.get("mlp_bias", False)) != bool(d.get("attention_bias", False)):
        raise ValueError("llama config with mlp_bias != attention_bias cannot be represented (one `bias` switch)")
    n_embd, n_head = d.get("hidden_size", 4096), d.get("num_attention_heads", 32)
    return GPTConfig(
        family="llama", n_layer=d.get("num_hidden_layers", 32), n_head=n_head,
        n_kv_head=d.get("num_key_value_heads") or n_head, n_embd=n_embd, head_dim=d.get("head_dim") or n_embd // n_head,
        vocab_size=d.get("vocab_size", 32000), block_size=d.get("max_position_embeddings", 2048), pos="rope",
        rope_theta=_rope_theta(d, mt, 10000.0), norm="rmsnorm", norm_eps=d.get("rms_norm_eps", 1e-6),
        mlp="swiglu", ffn_hidden=d.get("intermediate_size", 11008), bias=bool(d.get("attention_bias", False)),
        tie_embeddings=d.get("tie_word_embeddings", False),
    )


def _require(cfg: GPTConfig, **expected: Any) -> None:
    for k, v in expected.items():
        if getattr(cfg, k) != v:
            raise ValueError(f"family={cfg.family!r} in Hugging Face format needs {k}={v!r}; got {getattr(cfg, k)!r}")


def _falcon_layout(cfg: GPTConfig) -> str:
    """How Falcon fuses q/k/v: 'grouped' (new_decoder_architecture), 'multi_query' (7B) or 'interleaved'."""
    if cfg.parallel_residual and not cfg.shared_attn_norm:
        return "grouped"
    if cfg.n_kv_head == 1:
        return "multi_query"
    if cfg.n_kv_head == cfg.n_head:
        return "interleaved"
    if cfg.parallel_residual:  # shared LN with GQA: new architecture with num_ln_in_parallel_attn=1
        return "grouped"
    raise ValueError(f"family='falcon' with sequential blocks needs n_kv_head 1 or {cfg.n_head} (n_head); "
                     f"got n_kv_head={cfg.n_kv_head}")


def config_to_hf(cfg: GPTConfig) -> dict[str, Any]:
    """config.json contents for the HF model of cfg.family; ValueError if cfg has no HF equivalent."""
    if cfg.family == "gpt2":
        _require(cfg, pos="learned", norm="layernorm", mlp="gelu", parallel_residual=False, n_kv_head=cfg.n_head,
                 head_dim=cfg.n_embd // cfg.n_head, bias=True, embed_scale=False)
        return {
            "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
            "n_positions": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
            "n_inner": cfg.ffn_hidden, "activation_function": "gelu_new" if cfg.gelu_approximate == "tanh" else "gelu",
            "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.dropout, "tie_word_embeddings": cfg.tie_embeddings,
            "bos_token_id": 50256, "eos_token_id": 50256,
        }
    if cfg.family == "falcon":
        _require(cfg, pos="rope", norm="layernorm", mlp="gelu", head_dim=cfg.n_embd // cfg.n_head,
                 embed_scale=False)
        layout = _falcon_layout(cfg)
        d = {
            "model_type": "falcon", "architectures": ["FalconForCausalLM"], "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.n_embd, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "num_kv_heads": cfg.n_kv_head, "layer_norm_epsilon": cfg.norm_eps, "bias": cfg.bias, "alibi": False,
            "new_decoder_architecture": layout == "grouped", "multi_query": layout == "multi_query",
            "parallel_attn": cfg.parallel_residual, "ffn_hidden_size": cfg.ffn_hidden,
            "activation": "gelu" if cfg.gelu_approximate == "none" else "gelu_pytorch_tanh",
            "max_position_embeddings": cfg.block_size,
            "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "tie_word_embeddings": cfg.tie_embeddings, "hidden_dropout": cfg.dropout,
            "attention_dropout": cfg.dropout, "bos_token_id": 11, "eos_token_id": 11,
        }
        if layout == "grouped":
            d["num_ln_in_parallel_attn"] = 1 if cfg.shared_attn_norm else 2
        return d
    if cfg.family in ("gemma", "llama"):
        gemma = cfg.family == "gemma"
        _require(cfg, pos="rope", norm="rmsnorm", norm_offset=gemma, mlp="geglu" if gemma else "swiglu",
                 parallel_residual=False, embed_scale=gemma)
        d = {
            "model_type": cfg.family, "architectures": ["GemmaForCausalLM" if gemma else "LlamaForCausalLM"],
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd, "intermediate_size": cfg.ffn_hidden,
            "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
            "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "attention_bias": cfg.bias, "attention_dropout": cfg.dropout,
            "tie_word_embeddings": cfg.tie_embeddings,
        }
        if gemma:
            d["hidden_act"] = "gelu_pytorch_tanh" if cfg.gelu_approximate == "tanh" else "gelu"
        else:
            d.update(hidden_act="silu", mlp_bias=cfg.bias)
        return d
    raise ValueError(f"family={cfg.family!r} has no Hugging Face mapping; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")


# ---- state dict ---------------------------------------------------------------------------------


def _block_names(cfg: GPTConfig) -> dict[str, str]:
    """Per-block simple renames: our suffix -> HF suffix (fused / transposed tensors handled separately)."""
    if cfg.family == "gpt2":
        return {"attn_norm": "ln_1", "mlp_norm": "ln_2"}
    if cfg.family == "falcon":
        names = {"attn.o_proj": "self_attention.dense", "mlp.up_proj": "mlp.dense_h_to_4h",
                 "mlp.down_proj": "mlp.dense_4h_to_h"}
        if cfg.parallel_residual and not cfg.shared_attn_norm:
            names.update(attn_norm="ln_attn", mlp_norm="ln_mlp")
        else:
            names.update(attn_norm="input_layernorm", mlp_norm="post_attention_layernorm")
        return names
    return {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
            **{f"attn.{p}_proj": f"self_attn.{p}_proj" for p in "qkvo"},
            **{f"mlp.{p}_proj": f"mlp.{p}_proj" for p in ("gate", "up", "down")}}


def _prefix(cfg: GPTConfig) -> str:
    return "transformer." if cfg.family in ("gpt2", "falcon") else "model."


def _top_names(cfg: GPTConfig) -> dict[str, str]:
    p = _prefix(cfg)
    if cfg.family == "gpt2":
        return {"tok_emb": p + "wte", "pos_emb": p + "wpe", "norm_f": p + "ln_f", "lm_head": "lm_head"}
    if cfg.family == "falcon":
        return {"tok_emb": p + "word_embeddings", "norm_f": p + "ln_f", "lm_head": "lm_head"}
    return {"tok_emb": p + "embed_tokens", "norm_f": p + "norm", "lm_head": "lm_head"}


def _fuse_falcon_qkv(q: Tensor, k: Tensor, v: Tensor, cfg: GPTConfig) -> Tensor:
    layout, hd, nkv = _falcon_layout(cfg), cfg.head_dim, cfg.n_kv_head
    rest = q.shape[1:]  # (in_features,) for weights, () for biases
    if layout == "multi_query":
        return torch.cat([q, k, v], dim=0)
    if layout == "interleaved":  # per head: q, k, v
        parts = [t.reshape(cfg.n_head, 1, hd, *rest) for t in (q, k, v)]
        return torch.cat(parts, dim=1).reshape(-1, *rest)
    g = cfg.n_head // nkv  # grouped: per KV group, its g query heads then k then v
    qg = q.reshape(nkv, g, hd, *rest)
    return torch.cat([qg, k.reshape(nkv, 1, hd, *rest), v.reshape(nkv, 1, hd, *rest)], dim=1).reshape(-1, *rest)


def _split_falcon_qkv(w: Tensor, cfg: GPTConfig) -> tuple[Tensor, Tensor, Tensor]:
    layout, hd, nkv = _falcon_layout(cfg), cfg.head_dim, cfg.n_kv_head
    rest = w.shape[1:]
    if layout == "multi_query":
        return w[: cfg.q_dim], w[cfg.q_dim: cfg.q_dim + hd], w[cfg.q_dim + hd:]
    if layout == "interleaved":
        t = w.reshape(cfg.n_head, 3, hd, *rest)
        return tuple(t[:, i].reshape(-1, *rest) for i in range(3))  # type: ignore[return-value]
    g = cfg.n_head // nkv
    t = w.reshape(nkv, g + 2, hd, *rest)
    return t[:, :g].reshape(-1, *rest), t[:, g].reshape(-1, *rest), t[:, g + 1].reshape(-1, *rest)


def state_dict_to_hf(sd: dict[str, Tensor], cfg: GPTConfig) -> dict[str, Tensor]:
    """Our state dict -> HF parameter names and layouts (includes lm_head.weight even when tied, as HF does)."""
    config_to_hf(cfg)  # validates that the family can represent cfg
    out: dict[str, Tensor] = {}
    top, blk, pre = _top_names(cfg), _block_names(cfg), _prefix(cfg)
    for name, t in sd.items():
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", name)
        if m is None:
            mod, kind = name.rsplit(".", 1)
            if mod not in top:
                raise ValueError(f"unexpected parameter {name!r} for family {cfg.family!r}")
            out[f"{top[mod]}.{kind}"] = t
            continue
        i, mod, kind = m.groups()
        hp = f"{pre}h.{i}." if cfg.family in ("gpt2", "falcon") else f"{pre}layers.{i}."
        if cfg.family == "gpt2" and mod.startswith(("attn.", "mlp.")):
            if mod in ("attn.k_proj", "attn.v_proj"):
                continue  # fused with q below
            if mod == "attn.q_proj":
                qkv = torch.cat([sd[f"blocks.{i}.attn.{p}_proj.{kind}"] for p in "qkv"], dim=0)
                out[f"{hp}attn.c_attn.{kind}"] = qkv.t() if kind == "weight" else qkv  # Conv1D stores (in, out)
                continue
            hf_mod = {"attn.o_proj": "attn.c_proj", "mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj"}[mod]
            out[f"{hp}{hf_mod}.{kind}"] = t.t() if kind == "weight" else t
            continue
        if cfg.family == "falcon" and mod in ("attn.q_proj", "attn.k_proj", "attn.v_proj"):
            if mod == "attn.q_proj":
                q, k, v = (sd[f"blocks.{i}.attn.{p}_proj.{kind}"] for p in "qkv")
                out[f"{hp}self_attention.query_key_value.{kind}"] = _fuse_falcon_qkv(q, k, v, cfg)
            continue
        if mod not in blk:
            raise ValueError(f"unexpected parameter {name!r} for family {cfg.family!r}")
        out[f"{hp}{blk[mod]}.{kind}"] = t
    return out


def normalize_hf_key(name: str, cfg: GPTConfig) -> str | None:
    """The canonical HF name of a checkpoint key (adds the `transformer.`/`model.` prefix that the original gpt2
    files lack); None for buffers that are not parameters (attn.bias masks, rotary inv_freq)."""
    if _IGNORED_HF_KEYS.search(name):
        return None
    pre = _prefix(cfg)
    return name if name.startswith((pre, "lm_head.")) else pre + name


def hf_param_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every HF parameter name of cfg's model and its shape (lm_head.weight included even when tied)."""
    from model.gpt import GPT

    with torch.device("meta"):
        sd = GPT(cfg).state_dict()
    return {k: tuple(v.shape) for k, v in state_dict_to_hf(sd, cfg).items()}


def state_dict_from_hf(sd: dict[str, Tensor], cfg: GPTConfig) -> dict[str, Tensor]:
    """HF state dict -> ours. Tolerates a missing `transformer.` prefix (original gpt2 files), buffers such as
    attn.bias, and a missing lm_head.weight when embeddings are tied. Unknown keys are an error.
    Works on a subset of the keys too (one shard at a time)."""
    config_to_hf(cfg)
    pre = _prefix(cfg)
    inv_top = {v: k for k, v in _top_names(cfg).items()}
    inv_blk = {v: k for k, v in _block_names(cfg).items()}
    out: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for name, t in sd.items():
        key = normalize_hf_key(name, cfg)
        if key is None:
            continue
        mod, kind = key.rsplit(".", 1)
        if mod in inv_top:
            out[f"{inv_top[mod]}.{kind}"] = t
            continue
        m = re.fullmatch(re.escape(pre) + r"(?:h|layers)\.(\d+)\.(.+)", mod)
        if m is None:
            unexpected.append(name)
            continue
        i, sub = m.groups()
        ours = f"blocks.{i}."
        if cfg.family == "gpt2" and sub in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            w = t.t().contiguous() if kind == "weight" else t
            if sub == "attn.c_attn":
                q, k, v = w.split([cfg.q_dim, cfg.kv_dim, cfg.kv_dim], dim=0)
                for p, x in zip("qkv", (q, k, v)):
                    out[f"{ours}attn.{p}_proj.{kind}"] = x.contiguous()
            else:
                ours_mod = {"attn.c_proj": "attn.o_proj", "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}
                out[f"{ours}{ours_mod[sub]}.{kind}"] = w
            continue
        if cfg.family == "falcon" and sub == "self_attention.query_key_value":
            for p, x in zip("qkv", _split_falcon_qkv(t, cfg)):
                out[f"{ours}attn.{p}_proj.{kind}"] = x.contiguous()
            continue
        if sub in inv_blk:
            out[f"{ours}{inv_blk[sub]}.{kind}"] = t
        else:
            unexpected.append(name)
    if unexpected:
        raise ValueError(f"unexpected keys for a {cfg.family} checkpoint: {_short(unexpected)}")
    if cfg.tie_embeddings and "tok_emb.weight" in out:
        out.setdefault("lm_head.weight", out["tok_emb.weight"])
    return out


def _short(names: list[str], n: int = 5) -> str:
    head = ", ".join(names[:n])
    return head + (f" ... ({len(names)} in all)" if len(names) > n else "")
