"""The model's gradient from the factors (grad_coeffs, group_coeffs) and group sums in bf16 factors
(winnow/grads/accumulators.py)."""

from __future__ import annotations

import pytest
import torch

from tests.grads._harness import gpt2, llama, seqs, text_batch, wide_gpt2
from winnow.grads import GradEngine, per_example_loss


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_grad_coeffs_give_the_weighted_batch_gradient(arch):
    """compute(grad_coeffs=f) adds sum_b c_b grad_b to .grad, with c chosen from this step's group Gram:
    equal to autograd's gradient of sum_b c_b loss_b (float64), in one backward."""
    model = (gpt2 if arch == "gpt2" else llama)().double()
    examples = seqs([9, 4, 7, 2, 6, 5], seed=8)
    batch = text_batch(examples, "right")
    groups = torch.tensor([0, 1, 0, 2, 1, 2])
    seen = {}

    def coeffs(out):  # e.g. DoGE: weights from the group Gram of this very step
        gram = out["group_gram"].double()
        w = torch.softmax(gram.sum(1) / gram.diagonal().sum(), 0)
        seen["w"] = w
        return w[groups]

    model.zero_grad(set_to_none=True)
    with GradEngine(model, check=False) as eng:
        eng.compute(
            lambda: per_example_loss(model, batch, "causal_lm"),
            sqnorm=False,
            groups=groups,
            grad_coeffs=coeffs,
        )
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    c = seen["w"][groups]
    (per_example_loss(model, batch, "causal_lm") * c).sum().backward()
    for n, p in model.named_parameters():
        # relative to the largest entry: Llama computes its rotary embedding in fp32 even in a float64 model
        assert float((got[n] - p.grad).abs().max()) <= 1e-6 * float(p.grad.abs().max()) + 1e-15, n
    with pytest.raises(ValueError, match="grad_coeffs must return"):
        with GradEngine(model) as eng:
            eng.compute(
                lambda: per_example_loss(model, batch, "causal_lm"), grad_coeffs=lambda out: torch.ones(2)
            )


@pytest.mark.parametrize(
    "order,wide",
    [("sorted", False), ("shuffled", False), ("sorted", True), ("equal", False), ("equal", True)],
)
def test_group_coeffs_give_the_group_weighted_gradient(order, wide, monkeypatch):
    """compute(group_coeffs=f) adds sum_c a_c S_c to .grad from the kept group sums, with a chosen from this
    step's Gram: equal (float64) to autograd's gradient of sum_b a_{group(b)} loss_b, and its Gram equals
    the per-example path's, whether or not the batch is ordered by group; ``wide``: a tied 4100-word head
    that the engine aligns (padded output gradient, group sums over the padded rows)."""
    model = wide_gpt2(3).double().eval() if wide else gpt2().double()
    examples = seqs([9, 4, 7, 2, 6, 5, 8], seed=9)
    batch = text_batch(examples, "right")
    groups = torch.tensor(
        {"sorted": [0, 0, 1, 1, 1, 3, 3], "shuffled": [1, 0, 3, 1, 0, 3, 1], "equal": [0, 0, 0, 1, 1, 1, 2]}[
            order
        ]
    )
    C = 4  # group 2 is empty ("equal": every group present with as many examples: one batched product)
    if order == "equal":
        examples, groups, C = examples[:6], torch.tensor([0, 0, 1, 1, 2, 2]), 3
        batch = text_batch(examples, "right")
    seen = {}
    from winnow.grads import kernels as ge

    dims, mm = [], ge._mm_acc
    monkeypatch.setattr(ge, "_mm_acc", lambda a, b, acc: dims.append(a.dim()) or mm(a, b, acc))

    def coeffs(out):
        gram = out["group_gram"].double()
        a = torch.softmax(gram.sum(1) / gram.diagonal().sum(), 0)
        seen["a"], seen["gram"] = a, gram
        return a

    model.zero_grad(set_to_none=True)
    with GradEngine(model, check=False, align=True) as eng:
        out = eng.compute(
            lambda: per_example_loss(model, batch, "causal_lm"),
            sqnorm=False,
            groups=groups,
            num_groups=C,
            group_coeffs=coeffs,
        )
        ref_gram = eng.compute(
            lambda: per_example_loss(model, batch, "causal_lm"), sqnorm=False, groups=groups, num_groups=C
        )["group_gram"].double()
    torch.testing.assert_close(seen["gram"], ref_gram, rtol=1e-10, atol=1e-14)
    assert set(dims) == ({3} if order == "equal" else {2})  # batched products exactly when groups are equal
    torch.testing.assert_close(out["group_coeffs"].double(), seen["a"], rtol=1e-6, atol=0)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    (per_example_loss(model, batch, "causal_lm") * seen["a"][groups]).sum().backward()
    for n, p in model.named_parameters():
        assert float((got[n] - p.grad).abs().max()) <= 1e-9 * float(p.grad.abs().max()) + 1e-15, n
    with GradEngine(model) as eng:
        with pytest.raises(ValueError, match="group_coeffs must return"):
            eng.compute(
                lambda: per_example_loss(model, batch, "causal_lm"),
                groups=groups,
                group_coeffs=lambda out: torch.ones(7),
            )
        with pytest.raises(ValueError, match="needs groups"):
            eng.compute(
                lambda: per_example_loss(model, batch, "causal_lm"), group_coeffs=lambda out: torch.ones(2)
            )


def test_group_sums_in_bf16_factors_stay_close_to_fp32():
    """factor_dtype='input' under bf16 autocast: the group Gram from bf16 factors (fp32 accumulation) is
    within bf16 rounding of the fp32-factor Gram; the gradient from group_coeffs likewise."""
    torch.manual_seed(0)
    model = gpt2().eval()
    batch = text_batch(seqs([7, 5, 3, 6, 8, 4], seed=5), "right")
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    res = {}
    for fd in ("fp32", "input"):
        model.zero_grad(set_to_none=True)
        with (
            GradEngine(model, check=False, factor_dtype=fd) as eng,
            torch.autocast("cpu", dtype=torch.bfloat16),
        ):
            out = eng.compute(
                lambda: per_example_loss(model, batch, "causal_lm"),
                sqnorm=False,
                groups=groups,
                group_coeffs=lambda out: torch.tensor([0.5, 0.3, 0.2]),
            )
        res[fd] = (
            out["group_gram"].double(),
            torch.cat([p.grad.flatten() for p in model.parameters()]).double(),
        )
    g32, g16 = res["fp32"][0], res["input"][0]
    assert float((g16 - g32).norm() / g32.norm()) < 0.02
    d32, d16 = res["fp32"][1], res["input"][1]
    assert float((d16 - d32).norm() / d32.norm()) < 0.02
