"""GPT: one decoder-only transformer for GPT-2, Falcon, Gemma and Llama, switched by GPTConfig.

Single-device code. Parallelism (activation checkpointing, compile, FSDP2/DDP, DeepSpeed) is applied from outside.
Build on `meta`, then `to_empty(device=...)` + `init_weights()`: a 40B model is never built whole in one process.
"""

from __future__ import annotations

import math
import zlib
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import GPTConfig
from model.loss import fused_linear_cross_entropy

if TYPE_CHECKING:  # pragma: no cover
    from pathlib import Path

# Wrapper names that activation checkpointing / torch.compile / FSDP1 insert into parameter names; stripped so
# every parameter keeps the same init seed however the model is wrapped.
_WRAPPER_TOKENS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


# ---- norms ------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / rms(x) * w, normalised in fp32. offset=True is Gemma's form: scale by (1 + w) with w stored around 0."""

    def __init__(self, dim: int, eps: float, offset: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:  # Gemma multiplies in fp32, then casts
            return (h * (1.0 + self.weight.float())).type_as(x)
        return self.weight * h.type_as(x)  # Llama casts, then multiplies

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}" + (", offset=1" if self.offset else "")


def build_norm(cfg: GPTConfig) -> nn.Module:
    if cfg.norm == "layernorm":
        return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
    return RMSNorm(cfg.n_embd, cfg.norm_eps, offset=cfg.norm_offset)


# ---- rotary positions -------------------------------------------------------------------------


def rope_tables(cfg: GPTConfig, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """cos, sin tables [block_size, head_dim] in fp32, HF's rotate_half layout (frequencies repeated twice)."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=device, dtype=torch.int64).float()
                                          / cfg.head_dim))
    t = torch.arange(cfg.block_size, device=device, dtype=torch.int64).float()
    freqs = torch.outer(t, inv_freq)  # (T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
    return emb.cos(), emb.sin()


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, T, hd); cos/sin (T, hd), or (B, 1, T, hd) for per-sequence positions; cast to x's dtype as HF does."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + _rotate_half(x) * sin


# ---- document masking -------------------------------------------------------------------------


def document_layout(idx: Tensor, eot: int) -> tuple[Tensor, Tensor]:
    """Packed sequences idx (B, T) whose documents end with the token `eot` -> (positions (B, T) that restart at 0
    after every eot, attention mask (B, 1, T, T), True where query t may attend key s: s <= t, same document).

    Derived from the ids themselves, so the loader's (x, y) interface is unchanged: a token right after an eot
    starts a document (the eot belongs to the document it ends)."""
    T = idx.shape[1]
    ar = torch.arange(T, device=idx.device)
    starts = torch.zeros_like(idx, dtype=torch.bool)
    starts[:, 1:] = idx[:, :-1] == eot  # (B, T): a document begins here
    start_of = torch.where(starts, ar, 0).cummax(dim=1).values  # (B, T): where the token's document began
    doc = starts.cumsum(dim=1)  # (B, T): document number within the row
    causal = ar[None, :] <= ar[:, None]  # (T, T)
    mask = (doc[:, :, None] == doc[:, None, :]) & causal  # (B, T, T)
    return ar - start_of, mask.unsqueeze(1)


# ---- KV cache ---------------------------------------------------------------------------------


class LayerKVCache:
    """Preallocated keys/values of one layer, (B, n_kv_head, max_len, head_dim); allocated on first use."""

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def update(self, k: Tensor, v: Tensor, start_pos: int) -> tuple[Tensor, Tensor]:
        B, H, T, D = k.shape
        if self.k is None:
            self.k = k.new_zeros(B, H, self.max_len, D)
            self.v = v.new_zeros(B, H, self.max_len, D)
        end = start_pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; got start_pos={start_pos} + {T} tokens")
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """One LayerKVCache per block."""

    def __init__(self, n_layer: int, max_len: int) -> None:
        self.layers = [LayerKVCache(max_len) for _ in range(n_layer)]


# ---- blocks -----------------------------------------------------------------------------------


class Attention(nn.Module):
    """Causal self-attention with MHA / GQA / MQA (n_kv_head) and optional RoPE, through SDPA."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.dropout = cfg.dropout
        self.q_proj = nn.Linear(cfg.n_embd, cfg.q_dim, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.kv_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.kv_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.q_dim, cfg.n_embd, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, cos: Tensor | None = None, sin: Tensor | None = None,
                kv_cache: LayerKVCache | None = None, start_pos: int = 0, attn_mask: Tensor | None = None) -> Tensor:
        """attn_mask (B, 1, T, T) bool, True = may attend (document masking); None = causal."""
        B, T, _ = x.shape
        # head counts come from the projections' widths, not the config: under tensor parallelism each rank
        # holds a slice of the heads and runs this same code on it
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v, start_pos)  # (B, nkv, start_pos + T, hd)
        mask, causal = None, True
        if attn_mask is not None:  # causal within each document of a packed sequence
            mask, causal = attn_mask, False
        elif start_pos > 0:  # queries sit after cached keys: SDPA's is_causal would align them top-left
            causal = False
            if T > 1:
                S = k.shape[2]
                mask = torch.arange(S, device=x.device)[None, :] <= (start_pos + torch.arange(T, device=x.device))[:, None]
        n_head, n_kv_head = q.shape[1], k.shape[1]
        gqa = n_kv_head != n_head
        if gqa and q.is_cuda and (q.dtype == torch.float32 or mask is not None):
            # fp32 on CUDA (and any mask) rules out the flash kernel and the memory-efficient one lacks GQA:
            # repeat the KV heads rather than let SDPA fall back to the O(T^2)-memory math path
            g = n_head // n_kv_head
            k, v, gqa = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1), False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=gqa,
        )  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, n_head * self.head_dim)
        return self.resid_drop(self.o_proj(y))

    def extra_repr(self) -> str:
        return f"n_head={self.n_head}, n_kv_head={self.n_kv_head}, head_dim={self.head_dim}"


class MLP(nn.Module):
    """gelu: down(gelu(up x)); geglu / swiglu: down(act(gate x) * up x)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.kind = cfg.mlp
        self.approximate = cfg.gelu_approximate
        if cfg.mlp != "gelu":
            self.gate_proj = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "gelu":
            h = F.gelu(self.up_proj(x), approximate=self.approximate)
        elif self.kind == "geglu":
            h = F.gelu(self.gate_proj(x), approximate=self.approximate) * self.up_proj(x)
        else:
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.drop(self.down_proj(h))

    def extra_repr(self) -> str:
        act = "silu" if self.kind == "swiglu" else f"gelu(approximate={self.approximate!r})"
        return f"kind={self.kind!r}, act={act}"


class Block(nn.Module):
    """Pre-norm transformer block: sequential (GPT-2/Llama/Gemma) or parallel attention + MLP (Falcon)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.parallel = cfg.parallel_residual
        self.attn_norm = build_norm(cfg)
        self.attn = Attention(cfg)
        # Falcon-7B: one LN feeds both branches
        self.mlp_norm = None if (cfg.parallel_residual and cfg.shared_attn_norm) else build_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor | None = None, sin: Tensor | None = None,
                kv_cache: LayerKVCache | None = None, start_pos: int = 0, attn_mask: Tensor | None = None) -> Tensor:
        if not self.parallel:
            x = x + self.attn(self.attn_norm(x), cos, sin, kv_cache, start_pos, attn_mask=attn_mask)
            return x + self.mlp(self.mlp_norm(x))
        h = self.attn_norm(x)
        h_mlp = h if self.mlp_norm is None else self.mlp_norm(x)
        return x + (self.mlp(h_mlp) + self.attn(h, cos, sin, kv_cache, start_pos, attn_mask=attn_mask))


class LMHead(nn.Linear):
    """The output projection (an nn.Linear, bias-free). `head(x)` -> logits (B, T, V); `head(x, targets)` -> the
    mean token loss through the fused, chunked head + cross-entropy (model/loss.py), which never holds the
    (B, T, V) logits. The loss runs inside this module's forward so that whatever gathers the module's weight
    around its forward (FSDP2's root unit, DeepSpeed ZeRO-3's module hooks) has gathered it here too."""

    def forward(self, x: Tensor, targets: Tensor | None = None) -> Tensor:
        if targets is None:
            return super().forward(x)
        return fused_linear_cross_entropy(x, self.weight, targets)


def _embedding(num: int, dim: int) -> nn.Embedding:
    """nn.Embedding without its default init: init_weights() sets the values, and normal_() on `meta` goes through
    a Python meta kernel whose first call imports torch._dynamo (seconds of start-up for every run)."""
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim))


# ---- the model --------------------------------------------------------------------------------


class GPT(nn.Module):
    """Token embedding -> n_layer Blocks -> final norm -> LM head. `forward` returns logits, or with `targets` the mean
    token loss through the fused, chunked head + cross-entropy (the training path: no (B, T, V) logits)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        cfg = config
        # Build on meta, then materialise once: no wasted default init, and the global RNG is left untouched, so
        # a plain GPT(cfg) and the meta -> to_empty -> init_weights() path leave the same RNG state behind.
        device = torch.empty(0).device  # honours an enclosing `with torch.device(...)`
        with torch.device("meta"):
            self._build(cfg)
        if device.type != "meta":
            self.to_empty(device=device)
            self.init_weights()

    def _build(self, cfg: GPTConfig) -> None:
        self.tok_emb = _embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = _embedding(cfg.block_size, cfg.n_embd) if cfg.pos == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.norm_f = build_norm(cfg)
        self.lm_head = LMHead(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.pos == "rope":  # rebuilt by init_buffers(); never saved
            self.register_buffer("rope_cos", torch.empty(cfg.block_size, cfg.head_dim), persistent=False)
            self.register_buffer("rope_sin", torch.empty(cfg.block_size, cfg.head_dim), persistent=False)
        else:
            self.rope_cos = self.rope_sin = None

    # ---- initialisation ---------------------------------------------------------------------

    def tie_weights(self) -> None:
        """Re-point lm_head at the token embedding (a device move such as to_empty() can break the tie)."""
        if self.config.tie_embeddings and self.lm_head.weight is not self.tok_emb.weight:
            self.lm_head.weight = self.tok_emb.weight

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the non-persistent RoPE tables, by default on the device of the token embedding."""
        if self.rope_cos is None:
            return
        if device is None:
            device = self.tok_emb.weight.device
        if torch.device(device).type == "meta":
            return
        self.rope_cos, self.rope_sin = rope_tables(self.config, device)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter and rebuild buffers; deterministic given torch's global seed.

        Each parameter draws its full-shape values in fp32 from its own generator, seeded by `torch.initial_seed()`
        and the parameter's name, so the result does not depend on parameter order, on wrappers (activation
        checkpointing, compile) or on the parameter dtype. The global RNG state is not consumed; parameters on
        `meta` are skipped. Weights ~ N(0, init_std); residual output projections (o_proj, down_proj)
        ~ N(0, init_std / sqrt(2 n_layer)); biases 0; norm weights 1 (0 for Gemma's (1 + w) RMSNorm).

        Plain tensors only. Each parameter is written by exactly one `fill_(value)` or one `copy_(full)`, so a
        sharding owner can run this under a torch-function mode that writes each rank's slice instead
        (train/parallel/sharded_init.py: `replay_init`).
        """
        self.tie_weights()
        base_seed = torch.initial_seed()
        for name, p in self.named_parameters():
            if p.is_meta:  # shapes only: nothing to write
                continue
            name = _canonical_name(name)
            kind, value = self._init_rule(name)
            if kind == "const":
                p.fill_(value)
            else:
                p.copy_(_normal_draw(p.shape, value, _param_seed(base_seed, name), p.device))
        self.init_buffers()

    def _init_rule(self, name: str) -> tuple[str, float]:
        cfg = self.config
        if name.endswith(".bias"):
            return "const", 0.0
        if "norm" in name.rsplit(".", 2)[-2]:  # attn_norm / mlp_norm / norm_f weight
            return "const", 0.0 if cfg.norm_offset else 1.0
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            return "normal", cfg.init_std / math.sqrt(2 * cfg.n_layer)
        return "normal", cfg.init_std

    # ---- forward ----------------------------------------------------------------------------

    def embed(self, idx: Tensor, start_pos: int = 0, positions: Tensor | None = None) -> Tensor:
        """Token ids (B, T) -> the first block's input (B, T, C): token embedding (Gemma: times sqrt(d)), learned
        positions (start_pos, start_pos + 1, ... or `positions` (B, T) from `document_layout`), embedding dropout."""
        cfg = self.config
        x = self.tok_emb(idx)  # (B, T, C)
        if cfg.embed_scale:  # Gemma: sqrt(d) rounded to the hidden dtype, as HF does
            x = x * torch.tensor(cfg.n_embd**0.5, dtype=x.dtype, device=x.device)
        if self.pos_emb is not None:
            if positions is None:
                positions = torch.arange(start_pos, start_pos + idx.shape[1], device=idx.device)
            x = x + self.pos_emb(positions)
        return self.drop(x)

    def rope(self, start_pos: int, T: int, positions: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
        """The RoPE cos / sin rows (T, hd) for positions start_pos .. start_pos + T - 1, or (B, 1, T, hd) for
        `positions` (B, T) from `document_layout` (None, None without RoPE)."""
        if self.rope_cos is None:
            return None, None
        if positions is not None:  # per-sequence positions, broadcast over heads
            return self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)
        return self.rope_cos[start_pos:start_pos + T], self.rope_sin[start_pos:start_pos + T]

    def document_layout(self, idx: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """(positions (B, T), attention mask (B, 1, T, T)) of the documents packed in idx when the config sets
        `doc_mask_token`, else (None, None) (plain causal attention, positions 0 .. T-1)."""
        if self.config.doc_mask_token is None:
            return None, None
        return document_layout(idx, self.config.doc_mask_token)

    def forward(self, idx: Tensor, return_hidden: bool = False, *, kv_cache: KVCache | None = None,
                start_pos: int = 0, targets: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """idx (B, T) token ids -> logits (B, T, vocab); with return_hidden also the final-normed hidden (B, T, C).

        With `targets` (B, T) it returns the mean fp32 token loss instead of the logits (with return_hidden:
        (loss, hidden)), computed by the LM head a chunk of tokens at a time (model/loss.py): the logits are never
        materialised, and with gradients enabled the head's gradients are formed in this forward pass."""
        cfg = self.config
        if idx.dim() != 2:
            raise ValueError(f"idx must be token ids of shape (B, T); got shape {tuple(idx.shape)}")
        T = idx.shape[1]
        if start_pos + T > cfg.block_size:
            raise ValueError(f"sequence of {start_pos + T} positions exceeds block_size={cfg.block_size}")
        # document masking applies to training / scoring of packed sequences; a KV-cached generation is one document
        positions, doc_mask = self.document_layout(idx) if kv_cache is None else (None, None)
        x = self.embed(idx, start_pos, positions)
        cos, sin = self.rope(start_pos, T, positions)
        for i, block in enumerate(self.blocks):
            layer_cache = kv_cache.layers[i] if kv_cache is not None else None
            if doc_mask is None:
                x = block(x, cos, sin, layer_cache, start_pos)
            else:
                x = block(x, cos, sin, layer_cache, start_pos, attn_mask=doc_mask)
        x = self.norm_f(x)
        if targets is not None:
            if targets.shape != idx.shape:
                raise ValueError(f"targets {tuple(targets.shape)} must have the shape of idx {tuple(idx.shape)}")
            loss = self.lm_head(x, targets)  # scalar; no (B, T, V) tensor
            return (loss, x) if return_hidden else loss
        logits = self.lm_head(x)  # (B, T, V)
        return (logits, x) if return_hidden else logits

    # ---- generation -------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 *, generator: torch.Generator | None = None, use_cache: bool = True,
                 vocab_limit: int | None = None) -> Tensor:
        """Append max_new_tokens sampled tokens to idx (B, T); temperature 0 = greedy. Uses a KV cache.

        Once the context fills block_size, each step re-reads the last block_size tokens (sliding window), exactly
        what uncached decoding does. `vocab_limit`: only ids below it are ever drawn (a model vocabulary padded
        beyond its tokenizer's, e.g. to a multiple of 128, never emits an id the tokenizer cannot decode).
        """
        if vocab_limit is not None and not 1 <= vocab_limit <= self.config.vocab_size:
            raise ValueError(f"vocab_limit={vocab_limit} must be in [1, vocab_size={self.config.vocab_size}]")
        if idx.dim() != 2 or idx.dtype != torch.long:
            raise ValueError(f"idx must be a LongTensor of shape (B, T); got {tuple(idx.shape)} {idx.dtype}")
        if idx.shape[1] == 0:
            raise ValueError("idx must hold at least one token (shape (B, T) with T >= 1)")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
        if temperature < 0:
            raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
        if top_k is not None and (not isinstance(top_k, int) or top_k <= 0):
            raise ValueError(f"top_k={top_k!r} must be None or a positive integer")
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}); got ids in [{lo}, {hi}]")
        if max_new_tokens == 0:
            return idx
        bs = self.config.block_size
        was_training = self.training
        self.eval()
        try:
            ctx = idx[:, -bs:]
            cache = KVCache(self.config.n_layer, bs) if use_cache else None
            logits = self(ctx, kv_cache=cache)[:, -1]
            pos = ctx.shape[1]
            for step in range(max_new_tokens):
                nxt = sample_next(logits, temperature, top_k, generator, vocab_limit)  # (B, 1)
                idx = torch.cat([idx, nxt], dim=1)
                if step == max_new_tokens - 1:
                    break
                if cache is not None and pos < bs:
                    logits = self(nxt, kv_cache=cache, start_pos=pos)[:, -1]
                    pos += 1
                else:
                    logits = self(idx[:, -bs:])[:, -1]
        finally:
            self.train(was_training)
        return idx

    # ---- Hugging Face interop (model/hf.py) -------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_dir: str | Path, torch_dtype: torch.dtype | str | None = None,
                        device: torch.device | str | None = None, cache_dir: str | Path | None = None,
                        low_cpu_mem_usage: bool = True, revision: str | None = None,
                        local_files_only: bool = False) -> GPT:
        """Load a Hugging Face gpt2 / falcon / gemma / llama checkpoint (local dir, or the Hub when online)."""
        from model.hf import from_pretrained

        return from_pretrained(name_or_dir, torch_dtype=torch_dtype, device=device, cache_dir=cache_dir,
                               low_cpu_mem_usage=low_cpu_mem_usage, revision=revision,
                               local_files_only=local_files_only)

    def save_pretrained(self, save_directory: str | Path, max_shard_size: int | str = "5GB",
                        safe_serialization: bool = True) -> None:
        """Write config.json + (sharded) safetensors that transformers' AutoModelForCausalLM loads."""
        from model.hf import save_pretrained

        save_pretrained(self, save_directory, max_shard_size=max_shard_size, safe_serialization=safe_serialization)


def sample_next(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None,
                vocab_limit: int | None = None) -> Tensor:
    """Next ids (B, 1) from last-position logits (B, V): greedy at temperature 0, else softmax sampling over the
    top_k; ids >= vocab_limit are never drawn."""
    logits = logits.float()  # (B, V)
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits = logits[:, :vocab_limit]
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


# ---- init helpers ---------------------------------------------------------------------------


def _canonical_name(name: str) -> str:
    for tok in _WRAPPER_TOKENS:
        name = name.replace(tok, "")
    return name


def _param_seed(base_seed: int, name: str) -> int:
    return (base_seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def _normal_draw(shape: torch.Size, std: float, seed: int, device: torch.device) -> Tensor:
    """N(0, std) of `shape` in fp32 from a private generator: the same values whatever the parameter's dtype."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return torch.empty(shape, dtype=torch.float32, device=device).normal_(0.0, std, generator=g)
