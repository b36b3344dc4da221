"""DoGE (Fan, Pagliardini, Jaggi 2023, arXiv:2310.15393, Algorithm 1, as its public code computes it) over
the shared loop: batches drawn uniformly over the training domains plus the target domains; ONE batched
backward gives, through the per-example gradient engine, the Gram matrix of the domains' mean-token
gradients and the model's update Σ_i α_i g_i with the weights updated on this very step
(``GradEngine.compute(groups=..., group_coeffs=...)``). Without ``target_domains`` the target is universal
(every training domain). The rule and its differences from paper and code: :mod:`winnow.selectors.mixture`.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator

from winnow.pipeline.mixtures.base import MixtureCommon, MixtureMethod, MixtureRun, register


class DoGEConfig(MixtureCommon):
    method: Literal["doge"]
    mu: float | Literal["auto"] = Field(
        default="auto",
        description="doge: Bregman step parameter; auto: the paper's 0.05 scaled to this proxy's learning-rate "
        "schedule (the same sum of lr_t / mu as the authors' 10,000-step run)",
    )
    w_min: float = Field(default=0.0, description="doge: score clip, lower (times the lr)")
    w_max: float = Field(default=5.0, description="doge: score clip, upper (times the lr)")
    smoothing_doge: float = Field(default=0.0, ge=0, lt=1, description="doge: mix with uniform")

    @field_validator("mu")
    @classmethod
    def _positive(cls, v: float | str) -> float | str:
        if v != "auto" and not (isinstance(v, (int, float)) and v > 0):
            raise ValueError(f"mixture.mu must be > 0 or 'auto', got {v!r}")
        return v


def _paper_lr(step: int) -> float:
    """The learning rate of the authors' DoGE proxy at ``step`` (config/doge*.json: 5e-4, 500 warm-up steps,
    cosine to 1e-4 at step 10,000)."""
    peak, end, warm, total = 5e-4, 1e-4, 500, 10_000
    if step < warm:
        return peak * (step + 1) / warm
    p = (step - warm) / (total - warm)
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * p))


# sum over the authors' run of lr_t / mu (mu = 0.05): how far, in log-weight per unit of score, their
# weights could travel in all
PAPER_BUDGET = sum(_paper_lr(t) for t in range(10_000)) / 0.05


def resolve_mu(m: DoGEConfig) -> float:
    """``mu``, or with ``auto`` the mu that gives this proxy's schedule the paper's sum of lr_t / mu: a
    200-step proxy at lr 3e-3 moves its weights as far in all as the authors' 10,000 steps at 5e-4."""
    if m.mu != "auto":
        return float(m.mu)
    from winnow.pipeline.train import lr_lambda

    f = lr_lambda(m.warmup_steps, m.steps)
    return sum(m.lr * f(t) for t in range(m.steps)) / PAPER_BUDGET


def engine_step(run: MixtureRun, which: list[int], update) -> None:
    """Draw a batch uniformly over the domains ``which`` and take the engine's one backward: the group
    sums are the domains' mean-token gradients (per-example losses scaled by each example's share of its
    domain's tokens); ``update(G, present)`` turns their Gram matrix (every domain, float64) into the
    weights over the training domains and returns them; the model's gradient becomes Σ_i α_i g_i."""
    import torch

    from winnow.grads import per_example_loss

    m, dev = run.config, run.device
    exs, dom = run.sampler.draw(run.sampler.uniform_counts(m.batch_size, which))
    batch = run.batch(exs)
    ntok = (batch["attention_mask"][:, :-1] * batch["attention_mask"][:, 1:]).sum(1).double()
    C = len(run.names)
    per_dom = torch.zeros(C, dtype=torch.float64, device=dev).index_add_(0, dom.to(dev), ntok)
    scale = (ntok / per_dom[dom.to(dev)].clamp_min(1)).float()
    present = torch.tensor([bool(per_dom[i] > 0) for i in run.train_ids])

    def coeffs(out: dict) -> torch.Tensor:
        alpha = update(out["group_gram"].double().cpu(), present)
        full = torch.zeros(C, dtype=torch.float64)  # target domains: no training weight
        full[run.train_ids] = alpha
        return full

    model = run.model
    with run.amp():
        run.state["engine"].compute(
            lambda: per_example_loss(model, batch, "causal_lm") * scale,
            sqnorm=False,
            groups=dom.to(dev),
            num_groups=C,
            group_coeffs=coeffs,
        )


def open_engine(run: MixtureRun) -> None:
    from winnow.grads import GradEngine

    # bf16 factors under autocast (fp32 sums): the group products cost what a weight gradient does
    run.state["engine"] = GradEngine(run.model, params="all", check=False, factor_dtype="input")


def close_engine(run: MixtureRun) -> None:
    if "engine" in run.state:
        run.state["engine"].close()


@register
class DoGE(MixtureMethod):
    name = "doge"
    config = DoGEConfig
    trains = True

    def setup(self, run: MixtureRun) -> None:
        run.state["mu"] = resolve_mu(run.config)
        open_engine(run)

    def step(self, run: MixtureRun, step: int, alpha, lr: float):
        from winnow.selectors.mixture import doge_update

        m, tr, tg = run.config, run.train_ids, run.target_ids
        state = {"alpha": alpha}

        def update(G, present):
            dots = G[tr][:, tg].sum(1) if tg else None
            state["alpha"], _ = doge_update(
                state["alpha"],
                G[tr][:, tr],
                lr,
                target_dots=dots,
                mu=run.state["mu"],
                w_min=m.w_min,
                w_max=m.w_max,
                smoothing=m.smoothing_doge,
                present=present,
            )
            return state["alpha"]

        engine_step(run, tr + tg, update)
        return state["alpha"]

    def close(self, run: MixtureRun) -> None:
        close_engine(run)
