"""The exact speed substitutions: the aligned wide head and the fused GELU, with and without the engine
(winnow/grads/fast_paths.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.grads._harness import (
    causal_loss_alone,
    flat,
    gpt2,
    jiggle,
    reference_grads,
    rel,
    seqs,
    text_batch,
    transformers,
    wide_gpt2,
)
from winnow.grads import GradEngine, per_example_loss, select_parameters


def test_aligned_wide_output_layer_is_exact_and_restored():
    """A tied GPT-2 head of 4100 classes (not a multiple of 64) computed through the zero-padded weight
    (align=True forces it on the CPU) gives the plain per-example gradients; close() restores forward."""
    model = jiggle(wide_gpt2(0), 0).double().eval()
    examples = [torch.randint(1, 4100, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 3, 5)]
    names = list(select_parameters(model, "all"))
    ref = flat(reference_grads(model, names, examples, causal_loss_alone), names)
    batch = text_batch(examples, "right")
    P = None
    for method in ("gram", "direct"):  # gram: the head's Gram over the zero-padded width
        with GradEngine(model, align=True, proj_dim=16, sqnorm_method=method) as eng:
            assert [m for m in eng._patched if isinstance(m, nn.Linear)] == [model.lm_head]
            out = eng.compute(lambda: per_example_loss(model, batch, "causal_lm"), project=True)
            logits = model(input_ids=batch["input_ids"]).logits
            assert logits.shape[-1] == 4100 and logits.stride(-2) == 4160  # the padded product's view
        assert "forward" not in model.lm_head.__dict__
        assert rel(out["sqnorm"].double(), ref.square().sum(1)) < 1e-5
        if method == "gram":  # the same seed for both methods: the same matrix
            P = eng.projection_matrix()
        assert rel(out["proj"].double(), ref @ P.t()) < 1e-5
    with GradEngine(model, align="auto") as eng:
        assert model.lm_head in eng._patched  # patched, but plain F.linear on CPU
    with pytest.raises(ValueError, match="align must be"):
        GradEngine(model, align="always")


def test_fused_gelu_equals_the_models_own_and_is_restored():
    """GPT-2's gelu_new runs as F.gelu(approximate='tanh') while the engine is open: the same function."""
    from winnow.grads.fast_paths import _tanh_gelu

    act = transformers.activations.NewGELUActivation()
    x = torch.linspace(-8, 8, 2001, dtype=torch.float64)
    torch.testing.assert_close(_tanh_gelu(x), act(x), rtol=0, atol=1e-14)
    model = gpt2().double().eval()
    acts = [m for m in model.modules() if isinstance(m, transformers.activations.NewGELUActivation)]
    assert acts
    batch = text_batch(seqs([7, 5, 3], seed=2), "right")
    outs = []
    for fuse in (False, True):
        with GradEngine(model, fuse_activations=fuse, proj_dim=16) as eng:
            assert all(("forward" in m.__dict__) == fuse for m in acts)
            outs.append(eng.compute(lambda: per_example_loss(model, batch, "causal_lm"), project=True))
        assert not any("forward" in m.__dict__ for m in acts)
    for key in ("loss", "sqnorm", "proj"):
        torch.testing.assert_close(outs[1][key], outs[0][key], rtol=1e-10, atol=1e-12)


def test_fast_paths_give_the_same_losses_and_gradients_and_restore():
    from winnow.grads import fast_paths

    model = wide_gpt2(0).double().eval()
    ids = torch.randint(1, 4100, (3, 9))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    outs = []
    for fast in (False, True):
        model.zero_grad(set_to_none=True)
        if fast:
            with fast_paths(model, align=True) as fp:
                assert len(fp.patched) == 2  # the head and the one block's gelu_new
                loss = per_example_loss(model, batch, "causal_lm").sum()
                loss.backward()
        else:
            loss = per_example_loss(model, batch, "causal_lm").sum()
            loss.backward()
        outs.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert not any("forward" in m.__dict__ for m in model.modules())
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-12, atol=1e-12)
    for n in outs[0][1]:
        torch.testing.assert_close(outs[1][1][n], outs[0][1][n], rtol=1e-10, atol=1e-13)
