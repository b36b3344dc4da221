"""The per-example losses and the chunked next-token NLL (winnow/grads/losses.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.grads._harness import gpt2, seqs, text_batch
from winnow.grads import per_example_loss


def test_per_example_loss_matches_the_models_own_loss():
    model = gpt2()
    examples = seqs([7, 3, 5], seed=4)
    for side in ("right", "left"):
        batch = text_batch(examples, side)
        with torch.no_grad():
            got = per_example_loss(model, batch, "causal_lm")
            want = torch.stack([model(input_ids=s[None], labels=s[None]).loss for s in examples])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_token_nll_equals_cross_entropy_with_its_gradient():
    """The chunked next-token NLL the engine's causal-LM loss uses, against F.cross_entropy (float64)."""
    from winnow.grads import token_nll

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 6, 11, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(0, 11, (5, 5), generator=g)
    ref = F.cross_entropy(x[:, :-1].reshape(-1, 11), y.reshape(-1), reduction="none").view(5, 5)
    for chunk in (1, 55, 10_000):  # one example per chunk (rows rounded up), two, all
        torch.testing.assert_close(token_nll(x, y, chunk_elements=chunk), ref, rtol=0, atol=1e-12)
    w = torch.randn(5, 5, dtype=torch.float64, generator=g)
    (gx,) = torch.autograd.grad((token_nll(x, y, chunk_elements=55) * w).sum(), x)
    (rx,) = torch.autograd.grad((ref * w).sum(), x)
    torch.testing.assert_close(gx, rx, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: token_nll(t, y, chunk_elements=55), (x,))
    xb = x.detach().bfloat16().requires_grad_()  # low precision logits: fp32 math, gradient in bf16
    out = token_nll(xb, y)
    assert out.dtype == torch.float32
    torch.testing.assert_close(
        out,
        F.cross_entropy(xb[:, :-1].float().reshape(-1, 11), y.reshape(-1), reduction="none").view(5, 5),
        rtol=1e-6,
        atol=1e-6,
    )
    (gb,) = torch.autograd.grad(out.sum(), xb)
    assert gb.dtype == torch.bfloat16 and bool((gb[:, -1] == 0).all())
    with pytest.raises(ValueError, match="targets must have shape"):
        token_nll(x, y[:, :-1])
