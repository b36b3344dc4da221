"""``select.method: dpp``: greedy MAP inference of a determinantal point process over the run's embeddings
(Chen, Zhang, Zhou 2018, "Fast Greedy MAP Inference for Determinantal Point Process to Improve
Recommendation Diversity", Algorithm 1; :mod:`winnow.selectors.dpp`), with an optional quality score and a
cluster-partitioned mode. Options: the recipe section ``select.dpp``."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field

from winnow.pipeline.config import Device, Strict
from winnow.pipeline.selection.registry import Selector, register_selector


class DppConfig(Strict):
    """Greedy MAP DPP selection (Chen et al. 2018) over scoring.embeddings."""

    kernel: Literal["vmf", "cosine", "rbf", "linear"] = "vmf"
    kappa: float = Field(default=10.0, gt=0, description="vmf concentration")
    sigma: float = Field(default=1.0, gt=0, description="rbf width")
    quality: str | None = Field(default=None, description="score column used as relevance (quality)")
    invert_quality: bool = Field(default=False, description="low scores are better (e.g. loss)")
    theta: float = Field(
        default=0.5, ge=0, lt=1, description="quality-diversity trade-off (0: diversity only)"
    )
    eps: float | None = Field(default=None, gt=0, description="stop when the marginal gain falls below this")
    device: Device = "auto"
    clusters: int | None = Field(
        default=None,
        gt=1,
        description="k-means clusters for partitioned greedy "
        "(one cluster on the device at a time; ignores cross-cluster similarity); "
        "None: global greedy",
    )
    cluster_seed: int = Field(default=0, description="seed of the k-means sample and initialisation")


def dpp_select(recipe: Any, run_dir: Any, df: Any) -> tuple[Any, dict[str, Any]]:
    """Greedy MAP DPP selection (Chen et al. 2018, via winnow.selectors.dpp) over the run's embeddings.

    Quality: the `select.dpp.quality` score column, turned into relevance r in [0, 1] by its rank
    (so scales do not matter), then q = exp(theta * r / (2 (1 - theta))) (Chen et al., Sec. 4).
    Returns the kept mask and what the report and manifest show: picks, stop reason, log det of the
    selection and, for comparison, of three seeded random subsets of the same size."""
    import numpy as np
    import polars as pl
    import torch

    from winnow.pipeline.embeddings import load_embeddings
    from winnow.pipeline.models import resolve_device
    from winnow.selectors import budget
    from winnow.selectors.dpp import greedy_map, log_det, quality_from_relevance

    sel, d = recipe.select, recipe.select.dpp
    n = df.height
    k = budget(n, fraction=sel.fraction, count=sel.count)
    dev = resolve_device(d.device)
    # partitioned: the merged float16 file memory-mapped, one cluster at a time read and sent to the device
    # (never all vectors in memory); otherwise every vector on the device, float16 on the way there
    half = d.clusters is not None or dev.type != "cpu"
    X = torch.from_numpy(load_embeddings(run_dir, df["id"].to_list(), np.float16 if half else np.float32))
    if d.clusters is None:
        X = X.to(dev)
    quality = None
    if d.quality is not None:
        s = df[d.quality].cast(pl.Float64).fill_null(np.nan).to_numpy()
        if np.isnan(s).any():
            raise ValueError(f"dpp.quality: {int(np.isnan(s).sum())} rows have no {d.quality!r} score")
        ranks = s.argsort(kind="stable").argsort(kind="stable") / max(1, n - 1)
        r = 1.0 - ranks if d.invert_quality else ranks
        quality = quality_from_relevance(torch.from_numpy(r), d.theta).to(X.device)
    kw = {"kernel": d.kernel, "kappa": d.kappa, "sigma": d.sigma}
    if d.clusters is None:
        res = greedy_map(X, k, quality=quality, eps=d.eps, **kw)
    else:  # X stays on the CPU; one cluster at a time goes to the device
        from winnow.pipeline.clustering import kmeans_assign
        from winnow.selectors.dpp import partitioned_greedy_map

        labels = kmeans_assign(X.numpy(), min(d.clusters, n), seed=d.cluster_seed)
        res = partitioned_greedy_map(X, k, labels, quality=quality, eps=d.eps, device=dev, **kw)
    kept = np.zeros(n, dtype=bool)
    picks = res.picks.numpy()
    kept[picks] = True
    order = np.full(n, -1, dtype=np.int64)  # the greedy's pick order and each pick's gain, per row
    order[picks] = np.arange(len(picks))
    gain = np.full(n, np.nan)
    gain[picks] = res.gains.numpy()
    rng = np.random.default_rng(sel.seed)
    if d.clusters is None:
        rand = (
            [
                log_det(X, torch.from_numpy(rng.choice(n, len(picks), replace=False)), quality=quality, **kw)
                for _ in range(3)
            ]
            if len(picks)
            else []
        )
    else:  # the same figures from the sampled rows only, on the device (X is on the CPU here)
        rand = []
        for _ in range(3 if len(picks) else 0):
            idx = torch.from_numpy(rng.choice(n, len(picks), replace=False))
            rand.append(
                log_det(
                    X[idx].to(dev),
                    torch.arange(len(idx)),
                    quality=None if quality is None else quality[idx].to(dev),
                    **kw,
                )
            )
    logdet = float(res.logdet)
    info = {
        "picks": int(len(picks)),
        "stopped": res.stopped,
        "logdet": None if math.isnan(logdet) else logdet,
        "random_logdet_mean": float(np.mean(rand)) if rand else None,
        "kernel": d.kernel,
        "random_subsets_singular": bool(rand) and not all(np.isfinite(rand)),
    }
    if d.clusters is not None:
        info["clusters"] = int(min(d.clusters, n))
    info["_dpp_rank"], info["_dpp_gain"] = order, gain
    return kept, info


def _check(recipe: Any) -> str | None:
    if recipe.scoring.embeddings is None:
        return "select.method dpp needs scoring.embeddings (model: minilm, a folder, or column)"
    return None


register_selector(
    Selector(
        name="dpp",
        run=lambda ctx: dpp_select(ctx.recipe, ctx.run_dir, ctx.frame),
        budgets=("fraction", "count"),
        stratify=False,
        options=("dpp", DppConfig),
        check=_check,
        scores=lambda sel: [("select.dpp.quality", sel.dpp.quality)],
        doc="a diverse subset of the embeddings (greedy MAP of a DPP)",
    )
)
