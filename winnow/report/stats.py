"""The report's numbers: counts, cut-offs, per-group and per-score statistics, Spearman agreement
between checkpoints, and the changes since a previous version.

The selector is read where winnow's writers put it: the manifest's ``selector`` (written by
``pipeline/shards.py``), or, before shards are emitted, the ``select`` key of selection.parquet's
provenance (``pipeline/selection.py``); both are ``recipe.select.model_dump(mode="json")``.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any

import numpy as np
import polars as pl

import winnow
from winnow.report.load import _Previous, _Run
from winnow.report.signal import signal_warnings

NO_GROUP = "(none)"  # rows whose domain or label is null
MAX_GROUPS = 20  # domains / labels drawn in a plot or printed in a terminal table
GONE_GROUP = "(not in this run)"  # previous rows whose id is gone: their domain / label is unknown
AGREEMENT_SAMPLE = 1_000_000  # rows used for the Spearman matrices


def _num(x: Any) -> float | None:
    """A JSON-safe float: None for null, NaN and infinities."""
    if x is None:
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _selector_config(run: _Run) -> dict | None:
    """The recipe's ``select`` section as run: the manifest's ``selector``, else selection.parquet's ``select``."""
    for selector in (
        (run.manifest or {}).get("selector"),
        (run.selection_provenance or {}).get("select"),
    ):
        if isinstance(selector, dict):
            return selector
    return None


def _selection_score(run: _Run, selector: dict | None) -> str | None:
    """The score column the plots treat as the selection score: ``select.score``, else the first mean column."""
    score = (selector or {}).get("score")
    if isinstance(score, str) and score in run.columns:
        return score
    means = run.means
    return means[0] if means else None


def _compact(v: Any) -> str:
    """A recipe value in one short line: dicts as {k: v}, unset (None) entries left out."""
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_compact(x)}" for k, x in v.items() if x is not None) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_compact(x) for x in v) + "]"
    return str(v)


def _selector_summary(selector: Any) -> str:
    """The selector in one line: ``key=value`` for every set key of the ``select`` section."""
    if not isinstance(selector, dict):
        return "not recorded (no selector in manifest.json or selection.parquet)"
    return ", ".join(f"{k}={_compact(v)}" for k, v in selector.items() if v is not None) or "{}"


def _cutoff(frame: pl.DataFrame, col: str | None) -> tuple[float | None, str | None]:
    """The score threshold that separates kept from pruned rows, when one does.

    Returns (cut-off, side) where side is "high" (kept rows score at or above it), "low" (at or
    below), "mixed" (no single threshold on this score explains the selection) or None.
    """
    if col is None:
        return None, None
    fin = frame.filter(pl.col(col).is_finite())
    kept = fin.filter(pl.col("kept"))[col]
    pruned = fin.filter(~pl.col("kept"))[col]
    if kept.len() == 0 or pruned.len() == 0:
        return None, None
    kmin, kmax, pmin, pmax = kept.min(), kept.max(), pruned.min(), pruned.max()
    if kmin >= pmax and kmax > pmin:
        return (kmin + pmax) / 2, "high"
    if kmax <= pmin and kmin < pmax:
        return (kmax + pmin) / 2, "low"
    return None, "mixed"


def _group_stats(frame: pl.DataFrame, col: str, manifest_groups: Any) -> dict[str, dict] | None:
    if frame[col].null_count() == frame.height:
        return None
    total_in = frame.height
    total_kept = int(frame["kept"].sum())
    total_w = float(frame.filter(pl.col("kept"))["weight"].sum())
    g = (
        frame.group_by(pl.col(col).fill_null(NO_GROUP).alias("group"))
        .agg(
            input_rows=pl.len(),
            kept_rows=pl.col("kept").sum(),
            weight_sum=pl.col("weight").filter(pl.col("kept")).sum(),
        )
        .sort(["input_rows", "group"], descending=[True, False])
    )
    out: dict[str, dict] = {}
    for r in g.iter_rows(named=True):
        n, k, w = int(r["input_rows"]), int(r["kept_rows"] or 0), float(r["weight_sum"] or 0.0)
        entry = {
            "input_rows": n,
            "kept_rows": k,
            "pruned_rows": n - k,
            "kept_fraction": k / n if n else None,
            "proportion_before": n / total_in if total_in else None,
            "proportion_after": k / total_kept if total_kept else None,
            "weight_sum": w,
            "weight_proportion": w / total_w if total_w else None,
        }
        if isinstance(manifest_groups, dict) and isinstance(manifest_groups.get(r["group"]), dict):
            entry["manifest_proportion"] = _num(manifest_groups[r["group"]].get("proportion"))
        out[r["group"]] = entry
    return out


def _score_stats(frame: pl.DataFrame, col: str) -> dict:
    s = frame[col]
    fin = frame.filter(pl.col(col).is_finite())
    v = fin[col]
    return {
        "rows": frame.height,
        "finite": v.len(),
        "nan": int(s.is_nan().sum() or 0),
        "inf": int(s.is_infinite().sum() or 0),
        "null": s.null_count(),
        "mean": _num(v.mean()),
        "std": _num(v.std()),
        "min": _num(v.min()),
        "p05": _num(v.quantile(0.05, "linear")),
        "median": _num(v.median()),
        "p95": _num(v.quantile(0.95, "linear")),
        "max": _num(v.max()),
        "kept_mean": _num(fin.filter(pl.col("kept"))[col].mean()),
        "pruned_mean": _num(fin.filter(~pl.col("kept"))[col].mean()),
    }


def _spearman(frame: pl.DataFrame, cols: list[str]) -> dict:
    sub = frame.select(cols).filter(pl.all_horizontal([pl.col(c).is_finite() for c in cols]))
    n_complete = sub.height
    sampled = n_complete > AGREEMENT_SAMPLE
    if sampled:
        sub = sub.sample(n=AGREEMENT_SAMPLE, seed=0)
    out: dict[str, Any] = {
        "columns": cols,
        "rows": sub.height,
        "complete_rows": n_complete,
        "sampled": sampled,
        "matrix": None,
    }
    if sub.height < 3:
        return out
    ranks = sub.select([pl.col(c).rank("average").cast(pl.Float64) for c in cols]).to_numpy().T
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = np.corrcoef(ranks)
    corr = np.atleast_2d(corr)
    out["matrix"] = [[_num(x) for x in row] for row in corr.tolist()]
    return out


def _pair_means(agreement: dict, columns: dict[str, dict]) -> dict[str, float | None]:
    m = agreement.get("matrix")
    cols = agreement["columns"]
    buckets: dict[str, list[float]] = {
        "between_seeds_same_step": [],
        "between_steps_same_seed": [],
        "all_pairs": [],
    }
    if m is None:
        return {k: None for k in buckets}
    for i in range(len(cols)):
        for j in range(i + 1, len(cols)):
            v = m[i][j]
            if v is None:
                continue
            a, b = columns.get(cols[i], {}), columns.get(cols[j], {})
            buckets["all_pairs"].append(v)
            if a.get("seed") is None or b.get("seed") is None:
                continue
            if a["step"] == b["step"] and a["seed"] != b["seed"]:
                buckets["between_seeds_same_step"].append(v)
            if a["seed"] == b["seed"] and a["step"] != b["step"]:
                buckets["between_steps_same_seed"].append(v)
    return {k: (sum(v) / len(v) if v else None) for k, v in buckets.items()}


def _first(*values: Any) -> Any:
    for v in values:
        if v not in (None, ""):
            return v
    return None


def _summarize(run: _Run) -> dict:
    """The numbers of the report (the dict :func:`winnow.report.summarize` documents).

    Run details come from the keys winnow writes: the manifest's ``run``, ``created`` and
    ``winnow_version``; before shards are emitted, config.yaml's ``name``, run.json's
    ``winnow_version`` and the score files' ``package_version``, and selection.parquet's mtime.
    """
    frame = run.frame
    man = run.manifest or {}
    selector = _selector_config(run)
    score_col = _selection_score(run, selector)
    cutoff, side = _cutoff(frame, score_col)
    n = frame.height
    kept = int(frame["kept"].sum())
    cfg = run.config or {}
    prov = next((t.provenance for t in run.tables if isinstance(t.provenance, dict)), {}) or {}
    created = _first(man.get("created"))
    if created is None:
        mtime = run.layout.selection.stat().st_mtime
        created = (
            datetime.fromtimestamp(mtime, timezone.utc).isoformat(timespec="seconds")
            + " (mtime of selection.parquet)"
        )
    name = _first(man.get("run"), cfg.get("name"), run.dir.resolve().name)
    version = _first(
        man.get("winnow_version"),
        (run.run_json or {}).get("winnow_version"),
        prov.get("package_version"),
    )
    kept_w = frame.filter(pl.col("kept"))["weight"]
    agreement: dict[str, dict] = {}
    for t in run.tables:
        for base, cols in t.checkpoints.items():
            if len(cols) >= 2:
                a = _spearman(frame, cols)
                a["pairs"] = _pair_means(a, run.columns)
                agreement[base] = a
    if len(run.means) >= 2:
        a = _spearman(frame, run.means)
        a["pairs"] = _pair_means(a, run.columns)
        agreement["between scorers (mean columns)"] = a
    counts_man = man.get("counts") if isinstance(man.get("counts"), dict) else None
    sel_nan = None
    if score_col is not None:
        bad = frame.filter(~pl.col(score_col).is_finite() | pl.col(score_col).is_null())
        sel_nan = {
            "rows": bad.height,
            "kept": int(bad["kept"].sum()),
            "pruned": bad.height - int(bad["kept"].sum()),
        }
    out = {
        "run": {
            "name": str(name),
            "dir": str(run.dir),
            "winnow_version": version,
            "report_version": winnow.__version__,
            "created": str(created),
            "selector": _selector_summary(selector),
            "has_manifest": run.manifest is not None,
        },
        "counts": {
            "input_rows": n,
            "kept_rows": kept,
            "pruned_rows": n - kept,
            "kept_fraction": kept / n if n else None,
        },
        "manifest_counts": counts_man,
        "selection_score": score_col,
        "cutoff": _num(cutoff),
        "cutoff_side": side,
        "selection_score_not_finite": sel_nan,
        "domains": _group_stats(frame, "domain", man.get("domains")) or {},
        "labels": _group_stats(frame, "label", man.get("labels")) or {},
        "scores": {c: {**run.columns[c], **_score_stats(frame, c)} for c in run.columns},
        "weights": {
            "kept_rows": kept_w.len(),
            "min": _num(kept_w.min()),
            "mean": _num(kept_w.mean()),
            "max": _num(kept_w.max()),
            "std": _num(kept_w.std()),
            "sum": _num(kept_w.sum()),
        },
        "agreement": agreement,
        "notes": list(run.notes),
    }
    out["signal"] = signal_warnings(run, out)
    return out


def _changes(run: _Run, prev: _Previous, s: dict) -> dict | None:
    """Rows that entered and left the selection since the previous version, overall and per domain / label.

    entered: kept now and pruned before or new; left: kept before and pruned now or gone. New rows are
    ids of this run that the previous selection lacks; gone rows, ids of the previous selection that
    this run lacks (their domain and label are unknown here: only the previous manifest counts them).
    """
    if prev.selection is None:
        return None
    before = prev.selection
    j = run.frame.join(before, on="id", how="left")
    new = pl.col("kept_before").is_null()
    entered = pl.col("kept") & (new | ~pl.col("kept_before").fill_null(True))
    left = ~pl.col("kept") & pl.col("kept_before").fill_null(False)
    j = j.with_columns(_new=new, _entered=entered, _left=left)
    gone = before.join(run.frame.select("id"), on="id", how="anti")
    count = {
        "rows_before": before.height,
        "kept_before": int(before["kept_before"].sum()),
        "rows_now": j.height,
        "kept_now": int(j["kept"].sum()),
        "kept_both": j.filter(pl.col("kept") & pl.col("kept_before").fill_null(False)).height,
        "entered_pruned_before": j.filter(pl.col("_entered") & ~pl.col("_new")).height,
        "entered_new": j.filter(pl.col("_entered") & pl.col("_new")).height,
        "left_pruned_now": j.filter(pl.col("_left")).height,
        "left_gone": int(gone["kept_before"].sum()),
        "new_rows": j.filter(pl.col("_new")).height,
        "gone_rows": gone.height,
    }
    count["entered"] = count["entered_pruned_before"] + count["entered_new"]
    count["left"] = count["left_pruned_now"] + count["left_gone"]
    notes: list[str] = []
    man = prev.manifest or {}
    groups: dict[str, dict] = {}
    for col, key in (("domain", "domains"), ("label", "labels")):
        if not s[key]:
            continue  # this run has no such groups
        g = pl.col(col).fill_null(NO_GROUP)
        now = dict(j.filter(pl.col("kept")).group_by(g).len().iter_rows())
        ent = dict(j.filter(pl.col("_entered")).group_by(g).len().iter_rows())
        ent_new = dict(j.filter(pl.col("_entered") & pl.col("_new")).group_by(g).len().iter_rows())
        lft = dict(j.filter(pl.col("_left")).group_by(g).len().iter_rows())
        source = "selection"
        was: dict[str, int] = {}
        mg = man.get(key)
        if (
            isinstance(mg, dict)
            and mg
            and all(isinstance(v, dict) and isinstance(v.get("kept_rows"), int) for v in mg.values())
        ):
            was = {(NO_GROUP if k in ("", None) else str(k)): int(v["kept_rows"]) for k, v in mg.items()}
            if sum(was.values()) != count["kept_before"]:
                notes.append(
                    f"The previous manifest.json counts {sum(was.values()):,} kept rows over its {key} but "
                    f"its selection.parquet keeps {count['kept_before']:,}: the {col} shares before are "
                    "counted from the selection instead."
                )
                was = {}
            else:
                source = "manifest"
        if not was:
            was = dict(j.filter(pl.col("kept_before").fill_null(False)).group_by(g).len().iter_rows())
            if count["left_gone"]:
                was[GONE_GROUP] = count["left_gone"]
        tot_was, tot_now = sum(was.values()), sum(now.values())
        names = sorted(set(was) | set(now), key=lambda n: (-(was.get(n, 0) + now.get(n, 0)), n))
        groups[col] = {
            "source": source,
            "rows": {
                n: {
                    "kept_before": was.get(n, 0),
                    "share_before": was.get(n, 0) / tot_was if tot_was else None,
                    "kept_now": now.get(n, 0),
                    "share_now": now.get(n, 0) / tot_now if tot_now else None,
                    "entered": ent.get(n, 0),
                    "entered_new": ent_new.get(n, 0),
                    "left": lft.get(n, 0),
                }
                for n in names
            },
        }
    return {"counts": count, "groups": groups, "notes": notes, "frame": j}
