"""The engine's LESS features: P vec(Γ(grad_b)) with Γ the per-example Adam update direction, against
the plain reference: per-example autograd gradients (float64 model), the formula applied elementwise,
the dense projection matrix."""

from __future__ import annotations

import torch

from tests.grads._harness import RTOL, K, _note, flat, rel_rows, text_batch
from winnow.grads import AdamUpdate, GradEngine, per_example_loss


def _moments(ref: dict[str, torch.Tensor], seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, r in ref.items():
        shape = r.shape[1:]
        scale = float(r.abs().mean()) + 1e-6
        m = torch.randn(shape, generator=g, dtype=torch.float64) * scale
        v = (torch.randn(shape, generator=g, dtype=torch.float64) * scale) ** 2
        out[n] = (m, v)
    return out


def test_adam_update_features_match_the_plain_formula(causal_cases):
    for arch in ("gpt2", "llama"):
        model, examples, ref = causal_cases[arch]
        batch = text_batch(examples, "right")
        mom = _moments(ref, seed=4)
        with GradEngine(model, "all", proj_dim=K, proj_seed=5) as eng:
            pre = {n: AdamUpdate(mom[n][0].float(), mom[n][1].float()) for n in eng.param_names}
            out = eng.compute(
                lambda m=model, b=batch: per_example_loss(m, b, "causal_lm"),
                sqnorm=False,
                project=True,
                precondition=pre,
            )
            P = eng.projection_matrix()
            names = eng.param_names
        gam = {}
        for n in names:
            m, v = mom[n]
            g = ref[n]
            gam[n] = (0.9 * m + 0.1 * g) / (0.999 * v + 0.001 * g * g + 1e-8).sqrt()
        want = flat(gam, names) @ P.t()
        err = _note(f"{arch}: Adam-update projection", rel_rows(out["proj"], want))
        assert err <= 10 * RTOL, err
        # not the linear map of the gradient: the example's own g^2 is in the denominator
        lin = (
            flat(
                {n: (0.9 * mom[n][0] + 0.1 * ref[n]) / (0.999 * mom[n][1] + 1e-8).sqrt() for n in names},
                names,
            )
            @ P.t()
        )
        assert rel_rows(lin, want) > 1e-3
