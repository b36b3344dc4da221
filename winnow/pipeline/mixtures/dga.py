"""Dynamic Gradient Alignment (Fan, Grangier, Ablin 2024, arXiv:2410.02498) over the shared loop, online:
batches are drawn by the current weights (the run trains its model on the mixture it is learning); every
``update_every`` steps a batch holding every training domain and the target gives the alignments
<g_i, g_target> from the engine's group Gram (one backward, as DoGE's) and the EMA-smoothed exponentiated
update (:func:`winnow.selectors.mixture.dga_update`, where our reading of the paper is stated)."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from winnow.pipeline.mixtures.base import MixtureCommon, MixtureMethod, MixtureRun, register
from winnow.pipeline.mixtures.doge import close_engine, engine_step, open_engine


class DGAConfig(MixtureCommon):
    method: Literal["dga"]
    update_every: int = Field(default=10, gt=0, description="dga: steps between weight updates")
    eta_dga: float | None = Field(
        default=None, gt=0, description="dga: step size (default 1 / mean |alignment|)"
    )
    beta: float = Field(default=0.9, ge=0, lt=1, description="dga: EMA factor of the weights")


@register
class DGA(MixtureMethod):
    name = "dga"
    config = DGAConfig
    trains = True
    default_output = "final"

    def check(self, run: MixtureRun) -> str | None:
        return (
            None if run.target_ids else "mixture.method dga aligns with a target: set mixture.target_domains"
        )

    def setup(self, run: MixtureRun) -> None:
        open_engine(run)
        run.state["alpha_hat"] = None

    def step(self, run: MixtureRun, step: int, alpha, lr: float):
        from winnow.grads import next_token_losses
        from winnow.selectors.mixture import dga_update

        m, tr, tg = run.config, run.train_ids, run.target_ids
        if run.state["alpha_hat"] is None:
            run.state["alpha_hat"] = alpha.clone()
        if (step - 1) % m.update_every == 0:
            state = {"alpha": alpha}

            def update(G, present):
                dots = G[tr][:, tg].sum(1)
                state["alpha"], run.state["alpha_hat"] = dga_update(
                    state["alpha"], run.state["alpha_hat"], dots, eta=m.eta_dga, beta=m.beta
                )
                return state["alpha"]

            engine_step(run, tr + tg, update)
            return state["alpha"]
        # between updates: train on the current mixture
        full = np.zeros(len(run.names))
        full[tr] = alpha.numpy()
        exs, _ = run.sampler.draw(run.sampler.weighted_counts(m.batch_size, full))
        batch = run.batch(exs)
        with run.amp():
            nll, valid = next_token_losses(run.model, batch)
        ((nll * valid).sum() / valid.sum().clamp_min(1)).backward()
        return alpha

    def close(self, run: MixtureRun) -> None:
        close_engine(run)
