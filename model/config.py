"""GPTConfig: one serializable config that switches every GPT-2 / Falcon / Gemma / Llama variant, plus presets.

Fields hold names and numbers only (no classes), so a config round-trips through YAML / JSON / Hydra.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

FAMILIES = ("gpt2", "falcon", "gemma", "llama")
POS_KINDS = ("learned", "rope")
NORM_KINDS = ("layernorm", "rmsnorm")
MLP_KINDS = ("gelu", "geglu", "swiglu")
GELU_APPROX = ("none", "tanh")


@dataclass
class GPTConfig:
    """Architecture of one decoder-only transformer.

    Derived fields (`n_kv_head`, `head_dim`, `ffn_hidden`) may be left as None and are filled in by
    `__post_init__`, so every consumer sees plain ints.
    """

    family: str = "gpt2"
    """Which Hugging Face layout the weights map to: "gpt2" | "falcon" | "gemma" | "llama"."""
    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Query heads per attention layer."""
    n_kv_head: int | None = None
    """Key/value heads: == n_head is MHA, 1 is MQA, anything dividing n_head is GQA. None = n_head."""
    n_embd: int = 768
    """Residual stream width (hidden size)."""
    head_dim: int | None = None
    """Width of one attention head. None = n_embd // n_head (Gemma sets it explicitly: 256)."""
    vocab_size: int = 50257
    """Rows of the token embedding and columns of the logits."""
    block_size: int = 1024
    """Longest sequence the model supports (learned position table / RoPE table length)."""
    pos: str = "learned"
    """Position encoding: "learned" (absolute table, GPT-2) | "rope" (rotary, HF rotate_half convention)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm: str = "layernorm"
    """Normalization: "layernorm" (always with bias, as GPT-2 / Falcon) | "rmsnorm"."""
    norm_eps: float = 1e-5
    """Epsilon inside every norm."""
    norm_offset: bool = False
    """Gemma's RMSNorm: scale by (1 + w), with w stored zero-centred (initialised to 0)."""
    mlp: str = "gelu"
    """Feed-forward: "gelu" (up, act, down) | "geglu" (gelu(gate) * up, Gemma) | "swiglu" (silu(gate) * up, Llama)."""
    gelu_approximate: str = "tanh"
    """GELU form used by "gelu"/"geglu": "tanh" (GPT-2's gelu_new, Gemma) | "none" (exact erf, Falcon)."""
    ffn_hidden: int | None = None
    """Inner width of the feed-forward. None = 4 * n_embd."""
    parallel_residual: bool = False
    """Falcon: x + attn(ln(x)) + mlp(ln(x)) instead of two sequential residual branches."""
    shared_attn_norm: bool = False
    """With parallel_residual: one LayerNorm feeds both branches (Falcon-7B); False = two (Falcon-40B)."""
    bias: bool = True
    """Biases on the linear layers (attention and MLP; the LM head never has one)."""
    tie_embeddings: bool = True
    """The LM head reuses the token embedding matrix."""
    embed_scale: bool = False
    """Gemma: multiply token embeddings by sqrt(n_embd) (in the hidden dtype, as HF does)."""
    dropout: float = 0.0
    """Dropout on embeddings, attention probabilities and residual branches (training only)."""
    init_std: float = 0.02
    """Std of the normal init of every weight matrix; residual output projections use init_std / sqrt(2 n_layer)."""
    doc_mask_token: int | None = None
    """Document masking of packed sequences: the end-of-text id. A token after it starts a new document: attention
    does not cross that boundary and positions (learned or RoPE) restart at 0. None = plain causal attention."""

    def __post_init__(self) -> None:
        _choice("family", self.family, FAMILIES)
        _choice("pos", self.pos, POS_KINDS)
        _choice("norm", self.norm, NORM_KINDS)
        _choice("mlp", self.mlp, MLP_KINDS)
        _choice("gelu_approximate", self.gelu_approximate, GELU_APPROX)
        for name in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size"):
            _positive_int(name, getattr(self, name))
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        _positive_int("n_kv_head", self.n_kv_head)
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ValueError(
                    f"n_embd={self.n_embd} must be divisible by n_head={self.n_head} (or set head_dim explicitly)"
                )
            self.head_dim = self.n_embd // self.n_head
        _positive_int("head_dim", self.head_dim)
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"n_head={self.n_head} must be divisible by n_kv_head={self.n_kv_head} "
                f"(allowed n_kv_head: divisors of {self.n_head})"
            )
        if self.ffn_hidden is None:
            self.ffn_hidden = 4 * self.n_embd
        _positive_int("ffn_hidden", self.ffn_hidden)
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even with pos='rope'")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta={self.rope_theta} must be > 0")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps={self.norm_eps} must be > 0")
        if self.norm_offset and self.norm != "rmsnorm":
            raise ValueError(f"norm_offset=True needs norm='rmsnorm' (got norm={self.norm!r})")
        if self.shared_attn_norm and not self.parallel_residual:
            raise ValueError("shared_attn_norm=True needs parallel_residual=True (one LN feeding both branches)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.init_std <= 0:
            raise ValueError(f"init_std={self.init_std} must be > 0")
        if self.doc_mask_token is not None and (isinstance(self.doc_mask_token, bool) or not isinstance(
                self.doc_mask_token, int) or not 0 <= self.doc_mask_token < self.vocab_size):
            raise ValueError(f"doc_mask_token={self.doc_mask_token!r} must be a token id in [0, "
                             f"vocab_size={self.vocab_size}) or None")

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> GPTConfig:
        """The preset `name` (see PRESETS), with fields replaced by `overrides`."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        """Inverse of to_dict; unknown keys are an error (a typo must not be silently ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig field(s) {unknown}; valid fields: {', '.join(sorted(known))}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of names and numbers (YAML / JSON serializable)."""
        return dataclasses.asdict(self)

    @property
    def q_dim(self) -> int:
        """Width of all query heads together (n_head * head_dim)."""
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of all key (or value) heads together (n_kv_head * head_dim)."""
        return self.n_kv_head * self.head_dim


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of: {', '.join(allowed)}")


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer")


# ---- presets ----------------------------------------------------------------------------------
# Each preset is data: field overrides on the GPTConfig defaults. The comment above each names its source.

_GPT2 = {"family": "gpt2", "vocab_size": 50257, "block_size": 1024, "pos": "learned", "norm": "layernorm",
         "norm_eps": 1e-5, "mlp": "gelu", "gelu_approximate": "tanh", "bias": True, "tie_embeddings": True}
_FALCON = {"family": "falcon", "vocab_size": 65024, "block_size": 2048, "pos": "rope", "rope_theta": 10000.0,
           "norm": "layernorm", "norm_eps": 1e-5, "mlp": "gelu", "gelu_approximate": "none", "bias": False,
           "tie_embeddings": True, "parallel_residual": True}
_GEMMA = {"family": "gemma", "vocab_size": 256000, "block_size": 8192, "pos": "rope", "rope_theta": 10000.0,
          "norm": "rmsnorm", "norm_eps": 1e-6, "norm_offset": True, "mlp": "geglu", "gelu_approximate": "tanh",
          "bias": False, "tie_embeddings": True, "embed_scale": True}
_LLAMA = {"family": "llama", "vocab_size": 128256, "block_size": 8192, "pos": "rope", "rope_theta": 500000.0,
          "norm": "rmsnorm", "norm_eps": 1e-5, "mlp": "swiglu", "bias": False, "tie_embeddings": False}

PRESETS: dict[str, dict[str, Any]] = {
    # https://huggingface.co/openai-community/gpt2/blob/main/config.json
    "gpt2-124m": dict(_GPT2, n_layer=12, n_head=12, n_embd=768),
    # https://huggingface.co/openai-community/gpt2-medium/blob/main/config.json (seed 000's "Falcon-like" 1024/24/16)
    "gpt2-medium": dict(_GPT2, n_layer=24, n_head=16, n_embd=1024),
    # https://huggingface.co/openai-community/gpt2-large/blob/main/config.json
    "gpt2-large": dict(_GPT2, n_layer=36, n_head=20, n_embd=1280),
    # https://huggingface.co/openai-community/gpt2-xl/blob/main/config.json
    "gpt2-xl": dict(_GPT2, n_layer=48, n_head=25, n_embd=1600),
    # https://huggingface.co/tiiuae/falcon-7b/blob/main/config.json (multi_query, one shared LN, parallel_attn)
    "falcon-7b": dict(_FALCON, n_layer=32, n_head=71, n_kv_head=1, n_embd=4544, shared_attn_norm=True),
    # https://huggingface.co/tiiuae/falcon-40b/blob/main/config.json (new_decoder_architecture: 8 KV groups, 2 LNs)
    "falcon-40b": dict(_FALCON, n_layer=60, n_head=128, n_kv_head=8, n_embd=8192, shared_attn_norm=False),
    # https://huggingface.co/google/gemma-2b/blob/main/config.json
    "gemma-2b": dict(_GEMMA, n_layer=18, n_head=8, n_kv_head=1, n_embd=2048, head_dim=256, ffn_hidden=16384),
    # https://huggingface.co/meta-llama/Meta-Llama-3-8B/blob/main/config.json
    "llama3-8b": dict(_LLAMA, n_layer=32, n_head=32, n_kv_head=8, n_embd=4096, ffn_hidden=14336),
    # Tiny debug presets: the family's real vocabulary (they train with the real tokenizer), a few narrow layers,
    # block_size 256 so the trainer can use seq_len 256.
    # gpt2-124m scaled down
    "gpt2-tiny": dict(_GPT2, n_layer=4, n_head=4, n_embd=128, block_size=256),
    # falcon-40b's style scaled down: GQA with n_head / n_kv_head = 16, parallel attention, two LayerNorms
    "falcon-tiny": dict(_FALCON, n_layer=4, n_head=16, n_kv_head=1, n_embd=128, shared_attn_norm=False,
                        block_size=256),
    # falcon-40b's head geometry ratio (128 query heads : 8 KV heads = 16 : 1, here 32 : 2), two LNs, parallel
    # attention; small width for the CPU path of the Falcon-40B recipe
    "falcon-40b-mini": dict(_FALCON, n_layer=4, n_head=32, n_kv_head=2, n_embd=512, shared_attn_norm=False,
                            block_size=512),
    # gemma-2b scaled down (MQA, explicit head_dim, 8x FFN, tied + scaled embeddings)
    "gemma-tiny": dict(_GEMMA, n_layer=4, n_head=4, n_kv_head=1, n_embd=128, head_dim=32, ffn_hidden=1024,
                       block_size=256),
    # llama3-8b scaled down (GQA 4:2, FFN 3.5x)
    "llama-tiny": dict(_LLAMA, n_layer=4, n_head=4, n_kv_head=2, n_embd=128, ffn_hidden=448, block_size=256),
}
