"""train.loss.cross_entropy (gradient computed in forward, chunk by chunk) against F.cross_entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import train.loss as loss_mod


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_elements", [1 << 24, 97 * 5], ids=["one-chunk", "chunks-of-5"])
def test_loss_and_gradient_equal_torch(monkeypatch, dtype, chunk_elements):
    monkeypatch.setattr(loss_mod, "_CHUNK_ELEMENTS", chunk_elements)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 17, 97, generator=g) * 3).to(dtype).requires_grad_()
    y = torch.randint(0, 97, (3, 17), generator=g)
    ours = loss_mod.cross_entropy(x, y)
    (ours * 0.25).backward()  # a loss scale / grad-accum factor reaches the gradient
    got = x.grad.clone()
    x.grad = None
    ref = F.cross_entropy(x.float().flatten(0, 1), y.flatten())
    (ref * 0.25).backward()
    assert ours.dtype == torch.float32
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    assert got.dtype == dtype
    # fp32: reassociation only; 16-bit: torch rounds its fp32 gradient to the logits' dtype as we do
    tol = 1e-8 if dtype == torch.float32 else 2 ** -8 * x.grad.float().abs().max().item()
    assert (got.float() - x.grad.float()).abs().max().item() <= tol


def test_fp16_gradient_is_scaled_before_it_is_rounded():
    """Under a GradScaler-sized loss scale, small fp16 gradients survive as they do with F.cross_entropy."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(4096, 512, generator=g) * 4).half().requires_grad_()
    y = torch.randint(0, 512, (4096,), generator=g)
    (loss_mod.cross_entropy(x, y) * 65536.0).backward()
    got = x.grad.clone()
    x.grad = None
    (F.cross_entropy(x.float(), y) * 65536.0).backward()
    # (softmax - one_hot) / 4096 rounded to fp16 before scaling would flush most of these to zero
    assert (got != 0).sum().item() == (x.grad != 0).sum().item()
    assert torch.allclose(got.float(), x.grad.float(), rtol=2 ** -10, atol=2 ** -23)  # one fp16 rounding


def test_logits_are_left_unchanged_and_no_grad_path_matches():
    x = torch.randn(8, 50, requires_grad=True)
    y = torch.randint(0, 50, (8,))
    before = x.detach().clone()
    loss_mod.cross_entropy(x, y).backward()
    assert torch.equal(x.detach(), before)
    with torch.no_grad():
        assert loss_mod.cross_entropy(x, y).item() == pytest.approx(F.cross_entropy(x, y).item(), rel=1e-6)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match=r"targets \(3,\) do not match logits \(2, 5, 7\)"):
        loss_mod.cross_entropy(torch.randn(2, 5, 7, requires_grad=True), torch.zeros(3, dtype=torch.long))
