"""Mean token cross-entropy of full logits that computes its gradient in the forward pass, a chunk of tokens
at a time (`train.loss_impl=chunked_logits`; the default `fused` path never forms the full logits at all:
model/loss.py, reached through `model(idx, targets=y)`).

`F.cross_entropy(logits.float(), y)` keeps, per token, the fp32 log-softmax for backward, and backward
adds its gradient and the logits' gradient: about 16 x vocab bytes per token on top of the logits,
more than all twelve blocks of GPT-2 at seq 1024 (docs/performance.md). Here each chunk of tokens is
given an fp32 log-softmax, and (softmax - one_hot) / n_tokens written straight into a
gradient buffer in the logits' dtype (the dtype autograd would hand the LM head anyway; fp32 for fp16
logits, so the loss scale reaches the gradient before it is rounded to fp16). Backward only scales that
buffer by the incoming gradient (the loss scale, 1 / grad_accum). The caller drops its
reference to the logits once the loss is computed (nothing else holds them: a linear layer saves its
input, not its output), so one V-wide tensor per token lives from the loss to the LM head's backward.
"""

from __future__ import annotations

import torch

# train.loss_impl: the model's fused head + loss (model/loss.py), full logits + cross_entropy below, or
# F.cross_entropy on fp32 logits (the plain reference)
LOSS_IMPLS = ("fused", "chunked_logits", "torch")

# fp32 elements of one chunk's log-softmax (and of its upcast logits when they are 16-bit): 16 M = 64 MiB
_CHUNK_ELEMENTS = 1 << 24


class _FusedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        n, _v = logits.shape
        # fp16: the gradient is kept in fp32 until the loss scale has multiplied it (as autograd does),
        # else (softmax - one_hot) / n would underflow fp16 before the scale could save it
        grad = torch.empty_like(logits, dtype=grad_dtype(logits.dtype))
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for lo in range(0, n, chunk):
            t = targets[lo:lo + chunk, None]
            # fp32 log-softmax of the chunk (16-bit logits are upcast first: a second fp32 chunk)
            logp = torch.log_softmax(logits[lo:lo + chunk], dim=1, dtype=torch.float32)  # [c, V]
            total -= logp.gather(1, t).sum()
            probs = logp.exp_().scatter_add_(1, t, torch.full(t.shape, -1.0, device=logp.device))
            torch.mul(probs, 1.0 / n, out=grad[lo:lo + chunk])  # (softmax - one_hot) / n, in grad's dtype
            del logp, probs  # before the next chunk's exist
        ctx.save_for_backward(grad)
        ctx.logits_dtype = logits.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        # the buffer is used once (the graph is not retained), so it is scaled in place
        return grad.mul_(grad_out.to(grad.dtype)).to(ctx.logits_dtype), None, None


def torch_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`train.loss_impl=torch`: `F.cross_entropy` on fp32 logits (keeps the fp32 log-softmax for backward)."""
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits [..., V] against targets [...] (every target a valid class), computed
    in fp32; equals `F.cross_entropy(logits.float().flatten(0, -2), targets.flatten())` up to rounding."""
    flat = logits.reshape(-1, logits.shape[-1])
    t = targets.reshape(-1)
    if t.numel() != flat.shape[0]:
        raise ValueError(f"targets {tuple(targets.shape)} do not match logits {tuple(logits.shape)}")
    if not flat.requires_grad or not torch.is_grad_enabled():
        return torch.nn.functional.cross_entropy(flat.float(), t)
    return _FusedCrossEntropy.apply(flat, t, chunk_tokens(flat.shape[1]))


def grad_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    """dtype of the logits' gradient between the loss and the LM head's backward."""
    return torch.float32 if logits_dtype == torch.float16 else logits_dtype


def chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk of the loss: one chunk's fp32 log-softmax holds _CHUNK_ELEMENTS numbers."""
    return max(1, _CHUNK_ELEMENTS // vocab_size)
