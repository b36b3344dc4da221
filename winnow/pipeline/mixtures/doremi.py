"""DoReMi (Xie et al. 2023, arXiv:2305.10429, Algorithm 1) over the shared loop.

A reference model is trained first on the reference mixture (``reference``: proportional to the domains'
token counts by default, or uniform), then the proxy with batches drawn uniformly over the training
domains; every step updates the weights from the per-domain excess loss over the reference
(:func:`winnow.selectors.mixture.doremi_excess`, ``clip`` per domain mean by default or per token as the
paper and its code) and trains on the α-weighted per-domain token means. The update rules, and where they
differ from the paper and the authors' code, are in :mod:`winnow.selectors.mixture`.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from winnow.pipeline.mixtures.base import MixtureCommon, MixtureMethod, MixtureRun, register


class DoReMiConfig(MixtureCommon):
    method: Literal["doremi"]
    reference: Literal["proportional", "uniform"] = Field(
        default="proportional", description="doremi: the reference model's mixture"
    )
    reference_steps: int = Field(default=200, gt=0, description="doremi: reference model steps")
    eta: float = Field(default=1.0, gt=0, description="doremi: step size of the exponentiated update")
    clip: Literal["token", "domain"] = Field(
        default="domain",
        description="doremi: clip the excess loss per token (paper, code) or per domain mean",
    )
    smoothing: float = Field(default=1e-3, ge=0, lt=1, description="doremi: mix with uniform")


def train_reference(run: MixtureRun, w: np.ndarray):
    """The reference model: ``reference_steps`` steps on batches drawn by the weights ``w`` (over every
    domain), with the proxy's optimiser settings and its own seed (``seed + 1``)."""
    import torch

    from winnow.grads import next_token_losses
    from winnow.pipeline.mixtures.loop import optimizer
    from winnow.pipeline.models import init_model
    from winnow.pipeline.train import lr_lambda

    m = run.config
    model = init_model(run.recipe, m.seed + 1, run.tokenizer, None).to(run.device).train()
    opt = optimizer(model, m.lr, m.weight_decay)
    f = lr_lambda(m.warmup_steps, m.reference_steps)
    for step in range(m.reference_steps):
        for gr in opt.param_groups:
            gr["lr"] = m.lr * f(step)
        exs, _ = run.sampler.draw(run.sampler.weighted_counts(m.batch_size, w))
        batch = run.batch(exs)
        with run.amp():
            nll, valid = next_token_losses(model, batch)
        loss = (nll * valid).sum() / valid.sum().clamp_min(1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), m.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if run.progress is not None:
            run.progress("reference", step + 1, m.reference_steps)
    return model.eval()


@register
class DoReMi(MixtureMethod):
    name = "doremi"
    config = DoReMiConfig
    trains = True

    def setup(self, run: MixtureRun) -> None:
        from contextlib import ExitStack

        from winnow.grads import fast_paths
        from winnow.selectors.mixture import static_weights

        m = run.config
        wref = static_weights(run.tokens, "uniform" if m.reference == "uniform" else "proportional").numpy()
        full = np.zeros(len(run.names))
        full[run.train_ids] = wref
        ref = train_reference(run, full)
        fast = ExitStack()  # exact speed substitutions (aligned wide head on CUDA, fused gelu_new)
        fast.enter_context(fast_paths(run.model))
        fast.enter_context(fast_paths(ref))
        run.state.update(ref=ref, fast=fast, lam_prev=None, local={i: j for j, i in enumerate(run.train_ids)})

    def step(self, run: MixtureRun, step: int, alpha, lr: float):
        import torch

        from winnow.grads import next_token_losses
        from winnow.selectors.mixture import doremi_excess, doremi_token_weights, doremi_update

        m, st, dev = run.config, run.state, run.device
        exs, dom = run.sampler.draw(run.sampler.uniform_counts(m.batch_size, run.train_ids))
        d = torch.tensor([st["local"][int(x)] for x in dom])
        batch = run.batch(exs)
        with torch.no_grad(), run.amp():
            ref_nll, _ = next_token_losses(st["ref"], batch)
        with run.amp():
            nll, valid = next_token_losses(run.model, batch)
        k = len(run.train_ids)
        lam = doremi_excess(nll.detach(), ref_nll, valid, d.to(dev), k, st["lam_prev"], clip=m.clip)
        st["lam_prev"] = lam
        alpha = doremi_update(alpha, lam.cpu(), m.eta, m.smoothing)
        w_tok = doremi_token_weights(alpha.to(dev), valid, d.to(dev)).to(nll.dtype)
        (nll * w_tok).sum().backward()
        return alpha

    def close(self, run: MixtureRun) -> None:
        if "fast" in run.state:
            run.state["fast"].close()
