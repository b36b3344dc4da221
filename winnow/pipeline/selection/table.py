"""The selection step: the score store → ``selection.parquet`` (id, kept, weight, and any per-row columns
the selector adds).

Selection reads the store (never the data): the selector that ``select.method`` names picks the rows, the
weight method of ``select.weights`` turns a score into training weights (0 on pruned rows, mean 1 over
kept rows), both found in the registries of :mod:`winnow.pipeline.selection`; a mixture's weights then
replace the weights (``N alpha_d / n_d`` per kept row of domain d).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

import winnow
from winnow.errors import WinnowError
from winnow.pipeline.atomic import fingerprint
from winnow.pipeline.layout import RunLayout
from winnow.pipeline.recipe import Recipe
from winnow.pipeline.selection.registry import SELECTORS, WEIGHTS, SelectContext
from winnow.pipeline.steps import RunContext, Step, register_step
from winnow.pipeline.store import ScoreStore, read_provenance, write_parquet


def selection_table(recipe: Recipe, run_dir: Path) -> tuple[pl.DataFrame, dict[str, Any] | None]:
    store = ScoreStore(run_dir)
    df = store.rows(["id", "domain", "label"]).join(store.scores(), on="id", how="left")
    sel = recipe.select
    n = df.height
    strata = None
    if sel.stratify is not None:
        strata = np.array([("" if v is None else v) for v in df[sel.stratify].to_list()], dtype=object)
    selector, wm = SELECTORS[sel.method], WEIGHTS[sel.weights.method]
    try:
        kept, info = selector.run(SelectContext(recipe, run_dir, df, strata))
        w = sel.weights
        wcol = w.score or (sel.score if sel.method == "score" else None)
        ws = df[wcol].cast(pl.Float64).fill_null(np.nan).to_numpy() if wm.needs_score else np.zeros(n)
        weight = wm.weigh(ws, kept, w, strata)
    except ValueError as e:
        raise WinnowError(f"select: {e}") from None
    table = pl.DataFrame({"id": df["id"], "kept": kept, "weight": np.asarray(weight, dtype=np.float64)})
    # per-row columns of the selector (e.g. DPP's pick order and each pick's marginal gain)
    extra = [k for k in (info or {}) if k.startswith("_")]
    if extra:
        table = table.with_columns([pl.Series(k[1:], info.pop(k)) for k in extra])
    if info is None and recipe.scoring.embeddings is not None:
        info = {}
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
    # float16 as stored (memory-mapped when in the stored order): only the sampled rows are read and cast
    X = torch.from_numpy(load_embeddings(run_dir, df["id"].to_list(), np.float16))
    m = int(min(kept.sum(), sample))
    kw = {"kernel": d.kernel, "kappa": d.kappa, "sigma": d.sigma, "size": m, "seeds": 3}
    return {
        "diversity_sample": m,
        "diversity_input": isotropic_log_det_distance(X, np.arange(df.height), **kw),
        "diversity_selection": isotropic_log_det_distance(X, np.flatnonzero(kept), **kw),
    }


def write_selection(recipe: Recipe, run_dir: Path, step_fingerprint: str | None = None) -> dict[str, Any]:
    table, dpp = selection_table(recipe, run_dir)
    if recipe.mixture is not None:  # the kept rows' weights carry the learned domain mixture
        from winnow.pipeline.mixtures.loop import mixture_weights_for_rows

        doms = ScoreStore(run_dir).rows(["id", "domain"])
        dl = table.select("id").join(doms, on="id", how="left", maintain_order="left")["domain"].to_list()
        w = mixture_weights_for_rows(run_dir, dl, table["kept"].to_numpy())
        table = table.with_columns(
            pl.Series("weight", w, dtype=table["weight"].dtype),
            (pl.col("kept") & pl.Series(w > 0)).alias("kept"),
        )
    write_parquet(
        table,
        RunLayout(run_dir).selection,
        {
            "select": recipe.select.model_dump(mode="json"),
            "package_version": winnow.__version__,
            "step_fingerprint": step_fingerprint,
            "dpp": dpp,
        },
    )
    kept = int(table["kept"].sum())
    warnings = []
    if recipe.select.count is not None and recipe.select.count > table.height:
        warnings.append(
            f"select.count {recipe.select.count} is more than the data's {table.height} rows: every row is kept"
        )
    return {"rows": table.height, "kept": kept, "dpp": dpp, "warnings": warnings}


@register_step
class SelectStep(Step):
    """The recipe's selector and weights over the score store (``select``): ``selection.parquet``."""

    name = "select"

    def fingerprint(self, ctx: RunContext, upstream: Any = ()) -> str:
        """``upstream``: the fingerprints of what selection reads (merged scores, embeddings, influence,
        mixture; None where the recipe has none)."""
        return fingerprint("select", *upstream, ctx.config.select.model_dump())

    def run(self, ctx: RunContext, fp: str, **_: Any) -> dict[str, Any]:
        return write_selection(ctx.setup(), ctx.root, step_fingerprint=fp)

    def present(self, ctx: RunContext, result: Any, fp: str) -> bool:
        p = ctx.layout.selection
        return p.exists() and (read_provenance(p) or {}).get("step_fingerprint") == fp
