"""Merge the per-shard score parts into the score store, then select and weight.

Selection reads the store (never the data) and writes `selection.parquet` (id, kept, weight):
the rule in `select` picks the rows, `select.weights` turns a score into training weights
(mean 1 over kept rows, 0 on pruned ones), through the pure functions of `winnow.selectors`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

import winnow
from winnow.errors import WinnowError
from winnow.pipeline.recipe import LOSS_WEIGHT_METHODS, Recipe
from winnow.pipeline.store import ScoreStore, read_parquet, write_parquet
from winnow.selectors import budget, loss_to_weight, random_select, score_to_weight, select


def merge_parts(
    recipe: Recipe,
    run_dir: Path,
    parts: list[dict[str, Any]],
    provenance: dict[str, Any],
    step_fingerprint: str | None = None,
) -> dict[str, Any]:
    """Concatenate the shards' parts (in shard order) into scores/<scorer>.parquet and rows.parquet."""
    parts = sorted(parts, key=lambda p: p["shard"])
    rows = pl.concat([read_parquet(p["rows_file"]) for p in parts], how="vertical")
    scores = pl.concat([read_parquet(p["scores"]) for p in parts], how="vertical")
    if rows.height == 0:
        raise WinnowError(f"data.source: {recipe.data.source!r} holds no rows")
    n_all = rows.height
    dup = rows.group_by("id").len().filter(pl.col("len") > 1)
    if dup.height and recipe.data.id_column is not None:
        example = dup["id"][0]
        raise WinnowError(
            f"data.id_column {recipe.data.id_column!r}: {dup.height} ids appear more than once "
            f"(e.g. {example!r}); ids must be unique"
        )
    rows = rows.unique(subset="id", keep="first", maintain_order=True)
    scores = scores.unique(subset="id", keep="first", maintain_order=True)
    store = ScoreStore(run_dir)
    written = []
    for spec in recipe.scoring.scorers:
        from winnow.scorers import SCORERS

        cols = getattr(SCORERS[spec.name], "columns", None) or [spec.name]
        keep = ["id"] + [c for c in scores.columns if c in cols or c.split("@")[0] in cols]
        prov = dict(
            provenance,
            scorer=spec.name,
            params=spec.params,
            columns=cols,
            package_version=winnow.__version__,
            step_fingerprint=step_fingerprint,
        )
        written.append(store.write_scores(spec.name, scores.select(keep), prov))
    written.append(write_parquet(rows, store.dir / "rows.parquet", {"step_fingerprint": step_fingerprint}))
    for old in store.score_files():  # scores of scorers this recipe no longer runs
        if old not in written and not (old.stem == "influence" and recipe.scoring.influence is not None):
            old.unlink()
    return {"rows": rows.height, "duplicate_rows": n_all - rows.height, "files": [str(p) for p in written]}


def selection_table(recipe: Recipe, run_dir: Path) -> tuple[pl.DataFrame, dict[str, Any] | None]:
    store = ScoreStore(run_dir)
    df = store.rows().select("id", "domain", "label").join(store.scores(), on="id", how="left")
    sel = recipe.select
    n = df.height
    strata = None
    if sel.stratify is not None:
        strata = np.array([("" if v is None else v) for v in df[sel.stratify].to_list()], dtype=object)
    try:
        if sel.method == "all":
            kept = np.ones(n, dtype=bool)
        elif sel.method == "dpp":
            kept, info = dpp_select(recipe, run_dir, df)
        elif sel.method == "random":
            kept = random_select(n, fraction=sel.fraction, count=sel.count, seed=sel.seed, strata=strata)
        else:
            s = df[sel.score].cast(pl.Float64).fill_null(np.nan).to_numpy()
            kept = select(
                s,
                fraction=sel.fraction,
                count=sel.count,
                threshold=sel.threshold,
                keep=sel.keep,
                offset=sel.offset,
                strata=strata,
            )
        w = sel.weights
        wcol = w.score or (sel.score if sel.method == "score" else None)
        if w.method == "uniform" or wcol is None:
            if w.method != "uniform":
                raise ValueError(f"weights.method {w.method!r} needs a score: set select.weights.score")
            ws = np.zeros(n)
        else:
            ws = df[wcol].cast(pl.Float64).fill_null(np.nan).to_numpy()
        if w.method in LOSS_WEIGHT_METHODS:
            weight = loss_to_weight(
                ws,
                kept,
                strategy=w.method,
                temperature=w.temperature,
                delta=w.delta,
                range_quantile=w.range_quantile,
                strata=strata if w.per_stratum else None,
            )
        else:
            weight = score_to_weight(
                ws,
                kept,
                method=w.method,
                temperature=w.temperature,
                clip_min=w.clip_min,
                clip_max=w.clip_max,
                invert=w.invert,
            )
    except ValueError as e:
        raise WinnowError(f"select: {e}") from None
    table = pl.DataFrame({"id": df["id"], "kept": kept, "weight": np.asarray(weight, dtype=np.float64)})
    if sel.method == "dpp":  # pick order (-1: not picked) and marginal gain log d^2 of each pick
        table = table.with_columns(
            pl.Series("dpp_rank", info.pop("_rank")), pl.Series("dpp_gain", info.pop("_gain"))
        )
    info = info if sel.method == "dpp" else ({} if recipe.scoring.embeddings is not None else None)
    if info is not None and kept.any():
        info.update(diversity_of(recipe, run_dir, df, kept))
    return table, info


def diversity_of(
    recipe: Recipe, run_dir: Path, df: pl.DataFrame, kept: np.ndarray, sample: int = 1000
) -> dict[str, Any]:
    """Diversity of the input and of the selection (`isotropic_log_det_distance`, nats per item,
    smaller = more diverse), both on `min(kept, sample)` rows so they compare, with the DPP kernel."""
    import torch

    from winnow.pipeline.embeddings import load_embeddings
    from winnow.selectors.dpp import isotropic_log_det_distance

    d = recipe.select.dpp
    X = torch.from_numpy(load_embeddings(run_dir, df["id"].to_list())).double()
    m = int(min(kept.sum(), sample))
    kw = {"kernel": d.kernel, "kappa": d.kappa, "sigma": d.sigma, "size": m, "seeds": 3}
    return {
        "diversity_sample": m,
        "diversity_input": isotropic_log_det_distance(X, np.arange(df.height), **kw),
        "diversity_selection": isotropic_log_det_distance(X, np.flatnonzero(kept), **kw),
    }


def dpp_select(recipe: Recipe, run_dir: Path, df: pl.DataFrame) -> tuple[np.ndarray, dict[str, Any]]:
    """Greedy MAP DPP selection (Chen et al. 2018, via winnow.selectors.dpp) over the run's embeddings.

    Quality: the `select.dpp.quality` score column, turned into relevance r in [0, 1] by its rank
    (so scales do not matter), then q = exp(theta * r / (2 (1 - theta))) (Chen et al., Sec. 4).
    Returns the kept mask and what the report and manifest show: picks, stop reason, log det of the
    selection and, for comparison, of three seeded random subsets of the same size."""
    import torch

    from winnow.pipeline.embeddings import load_embeddings
    from winnow.pipeline.models import resolve_device
    from winnow.selectors.dpp import greedy_map, log_det, quality_from_relevance

    sel, d = recipe.select, recipe.select.dpp
    n = df.height
    k = budget(n, fraction=sel.fraction, count=sel.count)
    dev = resolve_device(d.device)
    X = torch.from_numpy(load_embeddings(run_dir, df["id"].to_list()))
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
    info["_rank"], info["_gain"] = order, gain
    return kept, info


def write_selection(recipe: Recipe, run_dir: Path, step_fingerprint: str | None = None) -> dict[str, Any]:
    table, dpp = selection_table(recipe, run_dir)
    if recipe.mixture is not None:  # the kept rows' weights carry the learned domain mixture
        from winnow.pipeline.mixture import mixture_weights_for_rows

        doms = ScoreStore(run_dir).rows().select("id", "domain")
        dl = table.select("id").join(doms, on="id", how="left", maintain_order="left")["domain"].to_list()
        w = mixture_weights_for_rows(run_dir, dl, table["kept"].to_numpy())
        table = table.with_columns(
            pl.Series("weight", w, dtype=table["weight"].dtype),
            (pl.col("kept") & pl.Series(w > 0)).alias("kept"),
        )
    write_parquet(
        table,
        run_dir / "selection.parquet",
        {
            "select": recipe.select.model_dump(mode="json"),
            "package_version": winnow.__version__,
            "step_fingerprint": step_fingerprint,
            "dpp": dpp,
        },
    )
    kept = int(table["kept"].sum())
    return {"rows": table.height, "kept": kept, "dpp": dpp}
