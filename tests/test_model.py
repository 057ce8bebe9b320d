"""GPT numerics: causality, GQA grouping, RoPE/attention against a hand-written reference, KV-cache generation,
deterministic meta-safe init, FLOPs against torch's FLOP counter, and the seed notebooks' shapes."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from model import GPT, GPTConfig
from model.gpt import apply_rope, rope_tables
from model.stats import count_params, flops_per_token

TINY = ["gpt2-tiny", "falcon-tiny", "gemma-tiny", "llama-tiny"]
V = 512  # shrunk vocabulary: these tests don't involve the tokenizer


def tiny(name: str, **kw) -> GPTConfig:
    return GPTConfig.from_name(name, vocab_size=V, n_layer=2, **kw)


def build(cfg: GPTConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg).eval()


@pytest.mark.parametrize("name", TINY)
def test_causal(name: str) -> None:
    m = build(tiny(name))
    x = torch.randint(0, V, (2, 12))
    y = x.clone()
    y[:, 7] = (y[:, 7] + 1) % V
    with torch.no_grad():
        a, b = m(x), m(y)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=0)
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-4  # the change is visible from position 7 on


def _reference_attention(m: GPT, x: torch.Tensor) -> torch.Tensor:
    """Explicit softmax((q k^T) / sqrt(d) + causal mask) v, k/v heads repeated per group; pre-norm blocks."""
    cfg = m.config
    B, T = x.shape
    h = m.tok_emb(x) * (math.sqrt(cfg.n_embd) if cfg.embed_scale else 1.0)
    if m.pos_emb is not None:
        h = h + m.pos_emb.weight[:T]
    cos, sin = rope_tables(cfg)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for blk in m.blocks:
        a = blk.attn_norm(h)
        q = blk.attn.q_proj(a).view(B, T, cfg.n_head, cfg.head_dim).transpose(1, 2)
        k = blk.attn.k_proj(a).view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        v = blk.attn.v_proj(a).view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        if cfg.pos == "rope":
            q, k = apply_rope(q, cos[:T], sin[:T]), apply_rope(k, cos[:T], sin[:T])
        g = cfg.n_head // cfg.n_kv_head
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(cfg.head_dim)
        att = s.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        att = blk.attn.o_proj(att.transpose(1, 2).reshape(B, T, -1))
        if cfg.parallel_residual:
            mlp_in = a if blk.mlp_norm is None else blk.mlp_norm(h)
            h = h + att + blk.mlp(mlp_in)
        else:
            h = h + att
            h = h + blk.mlp(blk.mlp_norm(h))
    return m.lm_head(m.norm_f(h))


@pytest.mark.parametrize("name", TINY)
def test_matches_reference_attention(name: str) -> None:
    m = build(tiny(name))
    x = torch.randint(0, V, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(m(x), _reference_attention(m, x), rtol=1e-5, atol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads() -> None:
    gqa = build(tiny("llama-tiny", n_head=8, n_kv_head=2))
    mha = build(tiny("llama-tiny", n_head=8, n_kv_head=8))
    sd = gqa.state_dict()
    g = 8 // 2
    for i in range(2):
        for p in "kv":
            w = sd[f"blocks.{i}.attn.{p}_proj.weight"]  # (n_kv * hd, C)
            sd[f"blocks.{i}.attn.{p}_proj.weight"] = w.view(2, -1, w.shape[1]).repeat_interleave(g, 0).reshape(-1, w.shape[1])
    mha.load_state_dict(sd)
    x = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(gqa(x), mha(x), rtol=1e-5, atol=1e-5)


def test_gqa_with_n_kv_head_equal_n_head_is_mha() -> None:
    a = build(tiny("llama-tiny", n_kv_head=None))
    b = build(tiny("llama-tiny", n_kv_head=4))
    assert a.config.n_kv_head == 4 == a.config.n_head
    x = torch.randint(0, V, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
        torch.testing.assert_close(a(x), _reference_attention(a, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", TINY)
def test_cached_generation_equals_uncached_greedy(name: str) -> None:
    m = build(tiny(name, block_size=12))
    prompt = torch.randint(0, V, (2, 5))
    # 12 new tokens run past block_size=12: the sliding window must behave like uncached decoding
    cached = m.generate(prompt, 12, temperature=0)
    uncached = m.generate(prompt, 12, temperature=0, use_cache=False)
    assert cached.shape == (2, 17)
    assert torch.equal(cached, uncached)
    # the first new token is the argmax of a plain forward
    assert torch.equal(cached[:, 5], m(prompt)[:, -1].argmax(-1))


def test_sampling_top_k_and_seeded() -> None:
    m = build(tiny("gpt2-tiny"))
    prompt = torch.randint(0, V, (1, 4))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = m.generate(prompt, 8, temperature=1.0, top_k=1, generator=g1)
    assert torch.equal(a, m.generate(prompt, 8, temperature=0))  # top_k=1 is greedy
    b1 = m.generate(prompt, 8, temperature=1.5, top_k=20, generator=g2)
    b2 = m.generate(prompt, 8, temperature=1.5, top_k=20, generator=torch.Generator().manual_seed(3))
    assert torch.equal(b1, b2)


@pytest.mark.parametrize("kw, msg", [
    ({"max_new_tokens": -1}, "max_new_tokens=-1"),
    ({"max_new_tokens": 2, "temperature": -0.5}, "temperature=-0.5"),
    ({"max_new_tokens": 2, "top_k": 0}, "top_k=0"),
])
def test_generate_bad_input(kw: dict, msg: str) -> None:
    m = build(tiny("gpt2-tiny"))
    with pytest.raises(ValueError, match=msg):
        m.generate(torch.zeros(1, 2, dtype=torch.long), **kw)


def test_too_long_sequence_is_a_clear_error() -> None:
    m = build(tiny("gpt2-tiny", block_size=8))
    with pytest.raises(ValueError, match="exceeds block_size=8"):
        m(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(B, T\); got shape \(9,\)"):
        m(torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 512\); got ids in \[0, 600\]"):
        m.generate(torch.tensor([[0, 600]]), 1)


@pytest.mark.gpu
@pytest.mark.parametrize("name", TINY)
def test_cuda_bf16_matches_fp32_and_cached_generation(name: str) -> None:
    m = build(tiny(name)).cuda()
    x = torch.randint(0, V, (2, 64), device="cuda")
    with torch.no_grad():
        ref = m(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = m(x)
    assert (low.float() - ref).abs().max().item() <= 0.05 * ref.abs().max().item()
    prompt = x[:, :5]
    assert torch.equal(m.generate(prompt, 20, temperature=0), m.generate(prompt, 20, temperature=0, use_cache=False))


# ---- initialisation --------------------------------------------------------------------------


def test_init_deterministic_and_meta_path_equal() -> None:
    cfg = tiny("gemma-tiny")
    a, b, c = build(cfg, 0), build(cfg, 0), build(cfg, 1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["blocks.0.attn.q_proj.weight"], sc["blocks.0.attn.q_proj.weight"])
    with torch.device("meta"):
        m = GPT(cfg)
    assert m.tok_emb.weight.is_meta
    m.to_empty(device="cpu")
    torch.manual_seed(0)
    m.init_weights()
    assert m.lm_head.weight is m.tok_emb.weight  # tie restored after to_empty
    assert all(torch.equal(sa[k], v) for k, v in m.state_dict().items())
    torch.testing.assert_close(m.rope_cos, a.rope_cos, rtol=0, atol=0)


def test_init_independent_of_wrappers_and_order() -> None:
    """Names inside activation-checkpoint / compile wrappers map to the same seed as the plain model."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    cfg = tiny("llama-tiny")
    plain = build(cfg, 5)
    torch.manual_seed(5)
    with torch.device("meta"):
        m = GPT(cfg)
    for i, blk in enumerate(m.blocks):
        m.blocks[i] = checkpoint_wrapper(blk)
    m.to_empty(device="cpu")
    torch.manual_seed(5)
    m.init_weights()
    assert "_checkpoint_wrapped_module" in next(n for n, _ in m.named_parameters() if n.startswith("blocks"))
    for (n1, p1), (_, p2) in zip(plain.named_parameters(), m.named_parameters()):
        assert torch.equal(p1, p2), n1


def test_init_distribution() -> None:
    cfg = GPTConfig.from_name("gpt2-tiny", vocab_size=4096, n_layer=8)
    m = build(cfg)
    std = cfg.init_std
    assert abs(m.tok_emb.weight.std().item() - std) < 0.02 * std * 5
    resid = m.blocks[0].attn.o_proj.weight.std().item()
    assert abs(resid - std / math.sqrt(2 * 8)) < 0.05 * resid
    assert torch.all(m.blocks[0].attn.q_proj.bias == 0) and torch.all(m.blocks[0].attn_norm.weight == 1)
    g = build(tiny("gemma-tiny"))
    assert torch.all(g.blocks[0].attn_norm.weight == 0)  # Gemma stores w of (1 + w) around 0


def test_init_does_not_consume_global_rng() -> None:
    torch.manual_seed(0)
    GPT(tiny("gpt2-tiny"))
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))


# ---- FLOPs and parameter counts -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "falcon-tiny", "gemma-tiny"])
def test_flops_per_token_matches_flop_counter(name: str) -> None:
    """Counted fwd+bwd matmul FLOPs (SDPA in its math form) == formula minus the non-matmul (bias/norm) params."""
    cfg = tiny(name)
    m = build(cfg)
    B, T = 2, 32
    x = torch.randint(0, V, (B, T))
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        m(x).float().sum().backward()
    vector_params = sum(p.numel() for p in m.parameters() if p.dim() == 1)  # biases and norms: no matmul FLOPs
    assert counter.get_total_flops() == (flops_per_token(cfg, T) - 6 * vector_params) * B * T


@pytest.mark.parametrize("name", sorted(__import__("model").PRESETS))
def test_count_params_matches_meta_model(name: str) -> None:
    cfg = GPTConfig.from_name(name)
    with torch.device("meta"):
        m = GPT(cfg)
    c = count_params(cfg)
    assert c.total == sum(p.numel() for p in m.parameters())
    assert c.per_block == sum(p.numel() for p in m.blocks[0].parameters())
    lookup = (0 if cfg.tie_embeddings else m.tok_emb.weight.numel()) + (m.pos_emb.weight.numel() if m.pos_emb else 0)
    assert c.non_embedding == c.total - lookup


# ---- seed notebooks (000: "Falcon-like" 1024/24/16, 003/004: GPT-2 124M) ---------------------------


def test_seed_gpt2_124m_logits_shape() -> None:
    m = build(GPTConfig.from_name("gpt2-124m"))
    batch = torch.tensor([[6109, 3626, 6100, 345], [6109, 1110, 6622, 257]])  # "Every effort moves you", ...
    with torch.no_grad():
        logits = m(batch)
    assert logits.shape == (2, 4, 50257)
    assert torch.isfinite(logits).all()


def test_seed_gpt2_medium_tree_and_hidden() -> None:
    with torch.device("meta"):
        m = GPT(GPTConfig.from_name("gpt2-medium"))
        logits, hidden = m(torch.zeros(2, 4, dtype=torch.long), return_hidden=True)
    tree = repr(m)
    assert "(0-23): 24 x Block(" in tree
    assert "n_head=16, n_kv_head=16, head_dim=64" in tree
    assert "Linear(in_features=1024, out_features=1024" in tree and "LayerNorm((1024,)" in tree
    assert logits.shape == (2, 4, 50257) and hidden.shape == (2, 4, 1024)


def test_hidden_is_final_normed_state() -> None:
    m = build(tiny("llama-tiny"))
    x = torch.randint(0, V, (2, 6))
    with torch.no_grad():
        logits, hidden = m(x, return_hidden=True)
    torch.testing.assert_close(logits, m.lm_head(hidden))
    assert hidden.shape == (2, 6, 128)


def test_rope_relative_property() -> None:
    """q.k after RoPE depends on the position offset only."""
    cfg = tiny("llama-tiny")
    cos, sin = rope_tables(cfg)
    q, k = torch.randn(1, 1, 1, cfg.head_dim), torch.randn(1, 1, 1, cfg.head_dim)

    def dot(i: int, j: int) -> float:
        return (apply_rope(q, cos[i:i + 1], sin[i:i + 1]) * apply_rope(k, cos[j:j + 1], sin[j:j + 1])).sum().item()

    assert dot(7, 3) == pytest.approx(dot(104, 100), rel=1e-4)
    assert dot(7, 3) != pytest.approx(dot(7, 5), rel=1e-4)
