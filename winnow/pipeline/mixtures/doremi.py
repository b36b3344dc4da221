"""DoReMi (Xie et al. 2023, arXiv:2305.10429, Algorithm 1) over the shared loop.

A reference model is trained first on the reference mixture (``reference``: proportional to the domains'
token counts by default, or uniform), then the proxy with batches drawn uniformly over the training
domains; every step updates the weights from the per-domain excess loss over the reference
(:func:`winnow.selectors.mixture.doremi_excess`, ``clip`` per domain mean by default or per token as the
paper and its code) and trains on the α-weighted per-domain token means. The update rules, and where they
differ from the paper and the authors' code, are in :mod:`winnow.selectors.mixture`.

Defaults for proxy-scale runs, and how they differ from the paper (η = 1, proxy and reference trained for
the same 200k steps, the output averaged over every step):

- ``eta`` 0.3. At η = 1 with a few rows per domain per step the weights swing: on eight domains of real
  text with 16 rows a step, one domain held more than half the weight in 184 of 200 steps and the lead
  changed 12 times (the authors' tracker, doremi#5, reports the same near-one-hot weights); the output was
  then set by where the swings happened to land (a noise domain at 1.63x uniform).
- ``burn_in`` 0.5: the weights stay uniform, and out of the average, for the first half of the proxy's
  steps. A proxy trained from scratch first learns fastest on whatever is easiest, and its excess loss in
  that phase says how fast a domain is learned, not how much is left to learn: on the same corpus the
  noise domain had the largest excess in the first quarter of the run and the smallest afterwards. In
  the paper's 200k steps that phase is a sliver; in a few hundred steps it set the weights.
- ``reference_steps`` twice the proxy's steps. The excess loss assumes a reference near what the data
  allows; a reference trained as long as a small proxy is not, and on noise it keeps an edge the proxy
  can only close by training on noise (noise 0.36x uniform with 400/400 steps, 0.013x with 400/800, same
  corpus and seed).

``excess_ema`` (an exponential moving average of λ before the update) is an option, off by default: it did
not steady the swings at η = 1 (noise 1.23x).
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
    reference_steps: int | None = Field(
        default=None, gt=0, description="doremi: reference model steps (default: twice the proxy's)"
    )
    eta: float = Field(
        default=0.3, gt=0, description="doremi: step size of the exponentiated update (the paper's: 1)"
    )
    clip: Literal["token", "domain"] = Field(
        default="domain",
        description="doremi: clip the excess loss per token (paper, code) or per domain mean",
    )
    smoothing: float = Field(default=1e-3, ge=0, lt=1, description="doremi: mix with uniform")
    burn_in: float = Field(
        default=0.5,
        ge=0,
        lt=1,
        description="doremi: fraction of the proxy's steps before the weights move (left out of the average)",
    )
    excess_ema: float = Field(
        default=0.0, ge=0, lt=1, description="doremi: exponential moving average of the excess loss"
    )


def train_reference(run: MixtureRun, w: np.ndarray):
    """The reference model: ``reference_steps`` steps on batches drawn by the weights ``w`` (over every
    domain), with the proxy's optimiser settings and its own seed (``seed + 1``)."""
    import torch

    from winnow.grads import next_token_losses
    from winnow.pipeline.mixtures.loop import optimizer
    from winnow.pipeline.models import init_model
    from winnow.pipeline.train import lr_lambda

    m = run.config
    n = m.reference_steps or 2 * m.steps
    model = init_model(run.recipe, m.seed + 1, run.tokenizer, None).to(run.device).train()
    opt = optimizer(model, m.lr, m.weight_decay)
    f = lr_lambda(m.warmup_steps, n)
    for step in range(n):
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
            run.progress("reference", step + 1, n)
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
        if step <= self.average_from(run) - 1:
            w_tok = doremi_token_weights(alpha.to(dev), valid, d.to(dev)).to(nll.dtype)
            (nll * w_tok).sum().backward()
            return alpha
        if m.excess_ema:
            ema = st.get("lam_ema")
            lam = lam if ema is None else m.excess_ema * ema + (1 - m.excess_ema) * lam
            st["lam_ema"] = lam
        alpha = doremi_update(alpha, lam.cpu(), m.eta, m.smoothing)
        w_tok = doremi_token_weights(alpha.to(dev), valid, d.to(dev)).to(nll.dtype)
        (nll * w_tok).sum().backward()
        return alpha

    def average_from(self, run: MixtureRun) -> int:
        return int(run.config.burn_in * run.config.steps) + 1

    def close(self, run: MixtureRun) -> None:
        if "fast" in run.state:
            run.state["fast"].close()
