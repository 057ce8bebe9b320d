"""The LM head and the cross-entropy in one pass over chunks of tokens: the [B, T, V] logits never exist.

`fused_linear_cross_entropy(hidden [N, C], weight [V, C], targets [N])` is the mean token loss of
`hidden @ weight.T`. With gradients enabled it walks the tokens a chunk at a time: the chunk's logits
[c, V] -> fp32 log-softmax -> its loss and (softmax - one_hot) / N -> the chunk's gradient w.r.t. its
hidden states (into a [N, C] buffer) and its share of the weight's gradient (summed in fp32 into a
[V, C] buffer) -> the chunk is dropped. Backward only scales the two buffers by the incoming gradient
(the loss scale, 1 / grad_accum). So what the loss keeps is the hidden states' gradient (C wide) and
the head weight's gradient (a parameter gradient that backward would produce anyway); the V-wide
numbers of one chunk are the only V-wide tensors alive (one fp32 [c, V] buffer, plus its 16-bit
logits / gradient copies where the compute dtype is 16-bit).

Compute dtype: autocast's dtype when autocast is on (as `F.linear` would use), else the weight's
(FSDP2's MixedPrecisionPolicy hands over 16-bit weights). Under bf16 the matmuls run in bf16 (as
autograd's would); under fp16 the gradients are formed in fp32 and rounded to fp16 only after the loss
scale has multiplied them in backward ((softmax - one_hot) / N underflows fp16 before the scale can
save it), as train/loss.py does for the full logits.

Single-device code: it reads the weight it is handed. The model calls it from its LM head's forward
(model/gpt.py `LMHead`), so FSDP2's and DeepSpeed ZeRO-3's hooks have gathered the weight.
"""

from __future__ import annotations

import torch
from torch import Tensor

# fp32 elements of one chunk's V-wide buffer: 16 M = 64 MiB (train/loss.py uses the same budget)
CHUNK_ELEMENTS = 1 << 24


def chunk_tokens(vocab_size: int, budget: int | None = None) -> int:
    """Tokens per chunk: one chunk's fp32 [c, V] buffer holds at most `budget` (CHUNK_ELEMENTS) numbers."""
    return max(1, (CHUNK_ELEMENTS if budget is None else budget) // vocab_size)


def compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype `F.linear(hidden, weight)` would compute in here (autocast's, else the operands')."""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunk_stats(z: Tensor, t: Tensor) -> Tensor:
    """z: fp32 logits [c, V], overwritten with softmax(z); returns the chunk's summed NLL (fp32 scalar)."""
    z.sub_(z.amax(dim=1, keepdim=True))
    picked = z.gather(1, t).sum()  # shifted target logits
    z.exp_()
    s = z.sum(dim=1, keepdim=True)  # [c, 1]
    nll = s.log().sum() - picked
    z.div_(s)  # softmax
    return nll


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int, dtype: torch.dtype) -> Tensor:
        n = hidden.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        fp16 = dtype == torch.float16
        # fp16: gradients and their matmuls in fp32 until the loss scale has multiplied them (see the module doc)
        grad_dtype = torch.float32 if fp16 else dtype
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)  # [V, C] compute-dtype copy (no copy when it already is)
            w_grad = weight.to(torch.float32) if fp16 else w  # the weight the gradient matmul reads
            grad_h = torch.empty(hidden.shape, dtype=grad_dtype, device=hidden.device) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for lo in range(0, n, chunk):
                h = hidden[lo:lo + chunk].to(dtype)  # [c, C]
                t = targets[lo:lo + chunk, None]  # [c, 1]
                logits = h @ w.t()  # [c, V] in the compute dtype
                z = logits if logits.dtype == torch.float32 else logits.float()  # fp32 [c, V]
                del logits
                total += _chunk_stats(z, t)
                z.scatter_add_(1, t, torch.full(t.shape, -1.0, device=z.device)).mul_(1.0 / n)  # dlogits, fp32
                g = z if grad_dtype == torch.float32 else z.to(grad_dtype)  # [c, V]
                del z
                if need_h:
                    torch.mm(g, w_grad, out=grad_h[lo:lo + chunk])  # [c, C]
                if need_w:
                    if g.dtype == torch.float32:
                        grad_w.addmm_(g.t(), h.float())  # [V, C] += [V, c] @ [c, C]
                    else:
                        grad_w.add_(g.t() @ h)  # a 16-bit [V, C] product per chunk, summed in fp32
                del g, h
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total / n

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        # the buffers are used once (the graph is not retained), so they are scaled in place
        gh = grad_h.mul_(grad_out.to(grad_h.dtype)).to(h_dtype) if grad_h is not None else None
        gw = grad_w.mul_(grad_out.float()).to(w_dtype) if grad_w is not None else None
        return gh, gw, None, None, None


def fused_linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor,
                               chunk: int | None = None) -> Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets` (every target a valid class) without
    ever holding the [N, V] logits. hidden [..., C], weight [V, C], targets [...]; fp32 result.

    With gradients enabled they are computed here, chunk by chunk (see the module doc); without, only the
    loss, in chunks too (evaluation never holds full logits either). `chunk`: tokens per chunk
    (default: `chunk_tokens(V)`, a fixed memory budget)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    if t.numel() != h.shape[0]:
        raise ValueError(f"targets {tuple(targets.shape)} do not match hidden states {tuple(hidden.shape)}")
    dtype = compute_dtype(hidden, weight)
    chunk = chunk or chunk_tokens(weight.shape[0])
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _FusedLinearCrossEntropy.apply(h, weight, t, chunk, dtype)
    with torch.no_grad(), torch.autocast(h.device.type, enabled=False):
        w = weight.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for lo in range(0, h.shape[0], chunk):
            logits = h[lo:lo + chunk].to(dtype) @ w.t()  # [c, V]
            total += _chunk_stats(logits.float(), t[lo:lo + chunk, None])
        return total / h.shape[0]
