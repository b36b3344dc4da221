"""The run report: one self-contained ``report.html`` and the terminal summary behind ``winnow inspect``.

Reads a run directory (schema in docs/ARCHITECTURE.md, "The run directory"):

- ``selection.parquet`` (id, kept, weight) and ``scores/`` are required;
- ``scores/<name>.parquet``: id, mean score columns and ``<score>@s<seed>k<step>`` checkpoint columns,
  provenance JSON under the parquet key-value metadata key ``winnow.provenance``;
- ``scores/rows.parquet`` (id, domain, label, n_tokens, preview), ``config.yaml``, ``manifest.json``,
  ``run.json`` and ``mixture.json`` are used when present.

Only ids, groups, kept, weights and scores are loaded for every row; previews are read for the
handful of example rows. Plots are drawn with matplotlib's Agg canvas on ``Figure`` objects (no
pyplot state, so the report can be built from worker threads) and embedded as PNG data URIs. Every
string that comes from the data or the recipe is passed through ``html.escape``.

``write_report(..., previous=FOLDER)`` compares the run with a previous version of it (a folder with
that version's ``selection.parquet`` and ``manifest.json``) in a section "Changes since FOLDER":
rows that entered and left the selection, new and gone rows, kept shares per domain and label
before and after, and examples.
"""

from __future__ import annotations

import base64
import html
import inspect
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import yaml
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

import winnow
from winnow.errors import WinnowError

__all__ = ["write_report", "summarize", "print_summary"]

PROVENANCE_KEY = b"winnow.provenance"
CHECKPOINT_COLUMN = re.compile(r"^(?P<base>.+)@s(?P<seed>\d+)k(?P<step>\d+)$")
NO_GROUP = "(none)"  # rows whose domain or label is null
MAX_GROUPS = 20  # domains / labels drawn in a plot or printed in a terminal table
N_EXAMPLES = 10
N_CHANGE_EXAMPLES = 5  # entered / left rows shown in "Changes since ..."
GONE_GROUP = "(not in this run)"  # previous rows whose id is gone: their domain / label is unknown
AGREEMENT_SAMPLE = 1_000_000  # rows used for the Spearman matrices
MAX_HEATMAP = 30  # checkpoint columns drawn in one heatmap
KEPT_COLOR = "#1f77b4"
PRUNED_COLOR = "#ff7f0e"

_HORIZONTAL_BXP = (
    {"orientation": "horizontal"}
    if "orientation" in inspect.signature(Axes.bxp).parameters
    else {"vert": False}
)


# --------------------------------------------------------------------------------------------------
# loading


@dataclass
class _ScoreTable:
    path: Path
    stem: str
    means: list[str]  # mean columns, as named in the joined frame
    checkpoints: dict[str, list[str]]  # base score name -> its checkpoint columns
    provenance: Any  # parsed JSON, the raw string if it is not JSON, or None


@dataclass
class _Run:
    dir: Path
    frame: pl.DataFrame  # id, kept, weight, domain, label, n_tokens, score columns
    tables: list[_ScoreTable]
    columns: dict[str, dict]  # score column -> {file, base, seed, step}
    rows_path: Path | None
    config_text: str | None = None
    config: dict | None = None
    manifest: dict | None = None
    run_json: dict | None = None
    mixture: Any = None
    notes: list[str] = field(default_factory=list)

    @property
    def means(self) -> list[str]:
        return [c for t in self.tables for c in t.means]


def _missing(path: Path, what: str) -> FileNotFoundError:
    return FileNotFoundError(f"{path} not found: {what}")


def _read_json(path: Path, notes: list[str]) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        notes.append(f"{path.name} could not be read ({exc}); it is left out of this report.")
        return None


def _load(run_dir: str | Path) -> _Run:
    root = Path(run_dir)
    if not root.is_dir():
        raise _missing(root, "run `winnow run RECIPE` first (it creates the run directory)")
    scores_dir = root / "scores"
    if not scores_dir.is_dir():
        raise _missing(scores_dir, "the scoring step of `winnow run RECIPE` writes it; run that first")
    sel_path = root / "selection.parquet"
    if not sel_path.is_file():
        raise _missing(sel_path, "run `winnow run RECIPE` first (its selection step writes it)")

    notes: list[str] = []
    sel_cols = pq.read_schema(sel_path).names
    for need in ("id", "kept"):
        if need not in sel_cols:
            raise WinnowError(
                f"{sel_path} has no `{need}` column (columns: {', '.join(sel_cols)}); "
                "rerun `winnow run RECIPE` to rewrite it"
            )
    frame = pl.read_parquet(sel_path, columns=[c for c in ("id", "kept", "weight") if c in sel_cols])
    frame = frame.with_columns(pl.col("id").cast(pl.Utf8), pl.col("kept").cast(pl.Boolean).fill_null(False))
    if "weight" in frame.columns:
        frame = frame.with_columns(pl.col("weight").cast(pl.Float64).fill_null(0.0))
    else:
        notes.append("selection.parquet has no `weight` column: kept rows are shown with weight 1.")
        frame = frame.with_columns(weight=pl.col("kept").cast(pl.Float64))

    rows_path = scores_dir / "rows.parquet"
    if rows_path.is_file():
        have = pq.read_schema(rows_path).names
        want = [c for c in ("id", "domain", "label", "n_tokens") if c in have]
        if "id" in want:
            rows = pl.read_parquet(rows_path, columns=want).with_columns(pl.col("id").cast(pl.Utf8))
            for c in ("domain", "label"):
                if c in rows.columns:
                    rows = rows.with_columns(pl.col(c).cast(pl.Utf8))
            frame = frame.join(rows.unique("id", keep="first"), on="id", how="left")
        else:
            notes.append(f"{rows_path} has no `id` column: domains, labels and previews are left out.")
            rows_path = None
    else:
        notes.append(f"{rows_path} not found: domains, labels and previews are left out.")
        rows_path = None
    for c, dtype in (("domain", pl.Utf8), ("label", pl.Utf8), ("n_tokens", pl.Int64)):
        if c not in frame.columns:
            frame = frame.with_columns(pl.lit(None, dtype=dtype).alias(c))

    tables: list[_ScoreTable] = []
    columns: dict[str, dict] = {}
    taken = set(frame.columns)
    for path in sorted(scores_dir.glob("*.parquet")):
        if path.name == "rows.parquet" or ".tmp" in path.name:
            continue
        schema = pq.read_schema(path)
        if "id" not in schema.names:
            notes.append(f"{path} has no `id` column; it is left out.")
            continue
        meta = schema.metadata or {}
        raw = meta.get(PROVENANCE_KEY)
        provenance: Any = None
        if raw is not None:
            text = raw.decode("utf-8", "replace")
            try:
                provenance = json.loads(text)
            except ValueError:
                provenance = text
        table = pl.read_parquet(path)
        rename: dict[str, str] = {}
        means: list[str] = []
        ckpts: dict[str, list[str]] = {}
        for col in table.columns:
            if col == "id":
                continue
            if not table.schema[col].is_numeric():
                continue
            name = col if col not in taken else f"{path.stem}.{col}"
            rename[col] = name
            taken.add(name)
            m = CHECKPOINT_COLUMN.match(col)
            if m:
                ckpts.setdefault(m["base"], []).append(name)
                columns[name] = {
                    "file": path.name,
                    "base": m["base"],
                    "seed": int(m["seed"]),
                    "step": int(m["step"]),
                }
            else:
                means.append(name)
                columns[name] = {"file": path.name, "base": col, "seed": None, "step": None}
        # the column named like the file first: it is the scorer's main score
        main = rename.get(path.stem)
        if main in means:
            means = [main] + [c for c in means if c != main]
        table = (
            table.select(["id", *rename])
            .rename(rename)
            .with_columns(pl.col("id").cast(pl.Utf8), *[pl.col(c).cast(pl.Float64) for c in rename.values()])
            .unique("id", keep="first")
        )
        frame = frame.join(table, on="id", how="left")
        tables.append(_ScoreTable(path, path.stem, means, ckpts, provenance))
    if not tables:
        notes.append(f"No score tables in {scores_dir}: score plots are left out.")

    run = _Run(dir=root, frame=frame, tables=tables, columns=columns, rows_path=rows_path, notes=notes)
    cfg_path = root / "config.yaml"
    if cfg_path.is_file():
        run.config_text = cfg_path.read_text(encoding="utf-8", errors="replace")
        try:
            cfg = yaml.safe_load(run.config_text)
            run.config = cfg if isinstance(cfg, dict) else None
        except yaml.YAMLError as exc:
            notes.append(f"config.yaml could not be parsed ({exc.__class__.__name__}); it is shown as text.")
    man = _read_json(root / "manifest.json", notes)
    run.manifest = man if isinstance(man, dict) else None
    rj = _read_json(root / "run.json", notes)
    run.run_json = rj if isinstance(rj, dict) else None
    run.mixture = _read_json(root / "mixture.json", notes)
    return run


@dataclass
class _Previous:
    """The previous version of a run: its folder, its selection and its manifest (either may be missing)."""

    dir: Path
    name: str
    selection: pl.DataFrame | None = None  # id, kept_before, weight_before
    manifest: dict | None = None
    notes: list[str] = field(default_factory=list)


def _load_previous(previous: str | Path) -> _Previous:
    """Read a previous version's selection.parquet and manifest.json; what is missing or unreadable becomes a note."""
    root = Path(previous)
    prev = _Previous(dir=root, name=root.resolve().name or str(root))
    if not root.is_dir():
        prev.notes.append(
            f"The previous version's folder {root} does not exist: there is nothing to compare with."
        )
        return prev
    sel_path = root / "selection.parquet"
    if not sel_path.is_file():
        prev.notes.append(
            f"{sel_path} not found: the rows that entered or left the selection cannot be counted."
        )
    else:
        try:
            cols = pq.read_schema(sel_path).names
            lacking = [c for c in ("id", "kept") if c not in cols]
            if lacking:
                prev.notes.append(
                    f"{sel_path} has no {' or '.join(f'`{c}`' for c in lacking)} column "
                    f"(columns: {', '.join(cols)}): the changes cannot be counted."
                )
            else:
                sel = pl.read_parquet(sel_path, columns=[c for c in ("id", "kept", "weight") if c in cols])
                kept = pl.col("kept").cast(pl.Boolean).fill_null(False)
                weight = (
                    pl.col("weight").cast(pl.Float64).fill_null(0.0)
                    if "weight" in cols
                    else kept.cast(pl.Float64)
                )
                prev.selection = (
                    sel.select(
                        pl.col("id").cast(pl.Utf8), kept.alias("kept_before"), weight.alias("weight_before")
                    )
                    .filter(pl.col("id").is_not_null())
                    .unique("id", keep="first", maintain_order=True)
                )
        except (OSError, ValueError, pl.exceptions.PolarsError) as exc:
            prev.notes.append(
                f"{sel_path} could not be read ({exc.__class__.__name__}: {exc}): "
                "the changes cannot be counted."
            )
    man_path = root / "manifest.json"
    if not man_path.is_file():
        prev.notes.append(
            f"{man_path} not found: the previous version's run details are left out, and its kept "
            "rows per domain and label are counted from its selection.parquet alone."
        )
    else:
        man = _read_json(man_path, prev.notes)
        if man is not None and not isinstance(man, dict):
            prev.notes.append(f"{man_path} is not a JSON object; it is left out of this comparison.")
        prev.manifest = man if isinstance(man, dict) else None
    return prev


# --------------------------------------------------------------------------------------------------
# numbers


def _num(x: Any) -> float | None:
    """A JSON-safe float: None for null, NaN and infinities."""
    if x is None:
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _selector_config(run: _Run) -> Any:
    for src in (run.manifest, run.config):
        if not isinstance(src, dict):
            continue
        for key in ("selector", "selection", "select", "mixture", "optimizer"):
            if src.get(key) not in (None, {}, ""):
                return src[key]
    return None


def _selection_score(run: _Run, selector: Any) -> str | None:
    known = set(run.columns)
    wanted: list[str] = []
    if isinstance(selector, dict):
        for key in ("score", "score_column", "column", "by", "on", "scorer", "metric"):
            v = selector.get(key)
            if isinstance(v, str):
                wanted.append(v)
            elif isinstance(v, dict) and isinstance(v.get("name"), str):
                wanted.append(v["name"])
    scorers = (run.config or {}).get("scorers")
    if isinstance(scorers, list):
        for s in scorers:
            if isinstance(s, str):
                wanted.append(s)
            elif isinstance(s, dict) and isinstance(s.get("name"), str):
                wanted.append(s["name"])
    elif isinstance(scorers, dict):
        wanted.extend(str(k) for k in scorers)
    for w in wanted:
        if w in known:
            return w
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
    if selector is None:
        return "not recorded (no selector in manifest.json or config.yaml)"
    if isinstance(selector, dict):
        name = selector.get("name") or selector.get("type") or selector.get("kind")
        rest = ", ".join(
            f"{k}={_compact(v)}"
            for k, v in selector.items()
            if k not in ("name", "type", "kind") and v is not None
        )
        if name and rest:
            return f"{name} ({rest})"
        return str(name or rest or "{}")
    return str(selector)


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
    frame = run.frame
    man = run.manifest or {}
    selector = _selector_config(run)
    score_col = _selection_score(run, selector)
    cutoff, side = _cutoff(frame, score_col)
    n = frame.height
    kept = int(frame["kept"].sum())
    cfg = run.config or {}
    prov = next((t.provenance for t in run.tables if isinstance(t.provenance, dict)), {}) or {}
    created = _first(man.get("created"), (run.run_json or {}).get("created"), prov.get("created"))
    if created is None:
        mtime = (run.dir / "selection.parquet").stat().st_mtime
        created = (
            datetime.fromtimestamp(mtime, timezone.utc).isoformat(timespec="seconds")
            + " (mtime of selection.parquet)"
        )
    name = _first(
        man.get("run"),
        cfg.get("name"),
        cfg.get("run") if isinstance(cfg.get("run"), str) else None,
        run.dir.resolve().name,
    )
    version = _first(
        man.get("winnow_version"),
        (run.run_json or {}).get("winnow_version"),
        (run.run_json or {}).get("version"),
        prov.get("version"),
        prov.get("winnow_version"),
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
    return {
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


def summarize(run_dir: str | Path) -> dict:
    """The numbers the report shows, as a JSON-able dict.

    Keys: ``run`` (name, dir, winnow_version, report_version, created, selector, has_manifest),
    ``counts`` (input_rows, kept_rows, pruned_rows, kept_fraction), ``manifest_counts`` (as the
    manifest records them, or None), ``selection_score`` (the column the plots treat as the
    selection score), ``cutoff`` / ``cutoff_side`` ("high": kept rows score above it, "low", "mixed"
    or None), ``selection_score_not_finite`` (rows whose selection score is NaN, infinite or
    missing), ``domains`` and ``labels`` ({name: input_rows, kept_rows, pruned_rows, kept_fraction,
    proportion_before, proportion_after, weight_sum, weight_proportion}; empty when the data has
    none; null groups are named "(none)"), ``scores`` ({column: file, base, seed, step, rows,
    finite, nan, inf, null, mean, std, min, p05, median, p95, max, kept_mean, pruned_mean}),
    ``weights`` (of kept rows), ``agreement`` ({score: Spearman matrix between its checkpoint
    columns and pair means}) and ``notes``. NaN statistics are None.

    Raises FileNotFoundError when run_dir, run_dir/scores or run_dir/selection.parquet is missing.
    """
    return _summarize(_load(run_dir))


# --------------------------------------------------------------------------------------------------
# plots


def _plain(s: Any, width: int = 32) -> str:
    """Text for a matplotlib label: shortened, and `$` escaped so it is never parsed as mathtext."""
    s = str(s)
    if len(s) > width:  # keep both ends: names often differ only in their suffix
        head = (width - 1) // 2
        s = s[:head] + "…" + s[len(s) - (width - 1 - head) :]
    return s.replace("$", r"\$")


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96)
    return buf.getvalue()


def _bins(values: np.ndarray, n: int = 50, edge: float | None = None) -> np.ndarray | int:
    """Histogram bin edges; with `edge` (the cut-off) one bin edge falls on it, so no bar mixes both sides."""
    if values.size == 0:
        return 10
    lo, hi = float(values.min()), float(values.max())
    if lo == hi:
        return (
            np.array([lo - 0.5, lo + 0.5])
            if lo == 0
            else np.array([lo - abs(lo) * 0.05, lo + abs(lo) * 0.05])
        )
    nb = min(n, max(5, int(math.sqrt(values.size)) + 1))
    if edge is None or not lo <= edge <= hi:
        return np.linspace(lo, hi, nb + 1)
    width = (hi - lo) / nb
    return edge + width * np.arange(math.floor((lo - edge) / width), math.ceil((hi - edge) / width) + 1)


def _legend(ax: Axes, **kw: Any) -> None:
    """A legend to the right of the axes, where it hides no data."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, **kw)


def _finite(frame: pl.DataFrame, col: str) -> np.ndarray:
    return frame.filter(pl.col(col).is_finite())[col].to_numpy()


def _plot_score_hists(frame: pl.DataFrame, cols: list[str], sel: str | None, cutoff: float | None) -> bytes:
    cols = cols[:6]
    ncol = 1 if len(cols) == 1 else 2
    nrow = math.ceil(len(cols) / ncol)
    fig = Figure(figsize=(9 if ncol == 1 else 11, 3.6 * nrow), layout="constrained")
    axes = fig.subplots(nrow, ncol, squeeze=False).ravel()
    for ax, col in zip(axes, cols, strict=False):
        kept = _finite(frame.filter(pl.col("kept")), col)
        pruned = _finite(frame.filter(~pl.col("kept")), col)
        bins = _bins(np.concatenate([kept, pruned]), edge=cutoff if col == sel else None)
        ax.hist(kept, bins=bins, color=KEPT_COLOR, alpha=0.55, label=f"kept ({kept.size:,})")
        ax.hist(pruned, bins=bins, color=PRUNED_COLOR, alpha=0.55, label=f"pruned ({pruned.size:,})")
        if col == sel and cutoff is not None:
            ax.axvline(cutoff, color="black", linestyle="--", linewidth=1.2, label=f"cut-off {cutoff:.4g}")
        role = " (selection score)" if col == sel else ""
        ax.set_title(_plain(f"{col}{role}: kept vs pruned", 80))
        ax.set_xlabel(_plain(f"{col} (mean over checkpoints)", 80))
        ax.set_ylabel("rows")
        _legend(ax)
        if kept.size + pruned.size == 0:
            ax.text(0.5, 0.5, "no finite scores", ha="center", va="center", transform=ax.transAxes)
    for ax in axes[len(cols) :]:
        ax.set_visible(False)
    return _png(fig)


def _top_groups(stats: dict[str, dict]) -> list[str]:
    return list(stats)[:MAX_GROUPS]  # stats are sorted by input rows, largest first


def _plot_group_boxes(
    frame: pl.DataFrame, group: str, stats: dict[str, dict], col: str, cutoff: float | None
) -> bytes:
    names = _top_groups(stats)
    q = (
        frame.filter(pl.col(col).is_finite())
        .with_columns(pl.col(group).fill_null(NO_GROUP).alias("_g"))
        .filter(pl.col("_g").is_in(names))
        .group_by(["_g", "kept"])
        .agg(
            n=pl.len(),
            lo=pl.col(col).quantile(0.05, "linear"),
            q1=pl.col(col).quantile(0.25, "linear"),
            med=pl.col(col).median(),
            q3=pl.col(col).quantile(0.75, "linear"),
            hi=pl.col(col).quantile(0.95, "linear"),
            mean=pl.col(col).mean(),
        )
    )
    by = {(r["_g"], r["kept"]): r for r in q.iter_rows(named=True)}
    fig = Figure(figsize=(9, 1.4 + 0.42 * len(names)), layout="constrained")
    ax = fig.subplots()
    boxes, positions, colors = [], [], []
    for i, name in enumerate(names):
        for kept, off, color in ((True, -0.18, KEPT_COLOR), (False, 0.18, PRUNED_COLOR)):
            r = by.get((name, kept))
            if r is None:
                continue
            boxes.append(
                {
                    "med": r["med"],
                    "q1": r["q1"],
                    "q3": r["q3"],
                    "whislo": r["lo"],
                    "whishi": r["hi"],
                    "mean": r["mean"],
                    "fliers": [],
                }
            )
            positions.append(i + off)
            colors.append(color)
    if boxes:
        art = ax.bxp(
            boxes,
            positions=positions,
            widths=0.3,
            patch_artist=True,
            showfliers=False,
            showmeans=True,
            meanprops={
                "marker": "D",
                "markersize": 4,
                "markerfacecolor": "white",
                "markeredgecolor": "black",
            },
            medianprops={"color": "black"},
            **_HORIZONTAL_BXP,
        )
        for patch, color in zip(art["boxes"], colors, strict=True):
            patch.set_facecolor(color)
            patch.set_alpha(0.7)
    else:
        ax.text(0.5, 0.5, "no finite scores", ha="center", va="center", transform=ax.transAxes)
    ax.set_yticks(range(len(names)), [f"{_plain(n, 28)} (n={stats[n]['input_rows']:,})" for n in names])
    ax.set_ylim(len(names) - 0.5, -0.5)
    handles = [
        Patch(color=KEPT_COLOR, alpha=0.7, label="kept"),
        Patch(color=PRUNED_COLOR, alpha=0.7, label="pruned"),
    ]
    if cutoff is not None:
        ax.axvline(cutoff, color="black", linestyle="--", linewidth=1.2)
        handles.append(
            Patch(facecolor="none", edgecolor="black", linestyle="--", label=f"cut-off {cutoff:.4g}")
        )
    _legend(ax, handles=handles)
    more = f" ({MAX_GROUPS} largest of {len(stats)})" if len(stats) > len(names) else ""
    ax.set_title(
        _plain(f"{col} by {group}, kept vs pruned{more}", 90)
        + "\nbox: quartiles, whiskers: 5th-95th percentile, ◆: mean"
    )
    ax.set_xlabel(_plain(col, 60))
    ax.set_ylabel(group)
    return _png(fig)


def _plot_group_counts(group: str, stats: dict[str, dict]) -> bytes:
    names = _top_groups(stats)
    y = np.arange(len(names))
    kept = np.array([stats[n]["kept_rows"] for n in names])
    pruned = np.array([stats[n]["pruned_rows"] for n in names])
    fig = Figure(figsize=(11, 1.4 + 0.42 * len(names)), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2, sharey=True)
    ax1.barh(y, kept, color=KEPT_COLOR, label="kept")
    ax1.barh(y, pruned, left=kept, color=PRUNED_COLOR, label="pruned")
    ax1.set_yticks(y, [_plain(n, 32) for n in names])
    ax1.set_ylim(len(names) - 0.5, -0.5)
    ax1.set_xlabel("rows")
    ax1.set_ylabel(group)
    more = f" ({MAX_GROUPS} largest of {len(stats)})" if len(stats) > len(names) else ""
    ax1.set_title(_plain(f"Rows per {group}: kept vs pruned{more}", 90))
    _legend(ax1)
    h = 0.27
    series = (
        ("input (before)", "proportion_before", "#888888"),
        ("kept rows (after)", "proportion_after", KEPT_COLOR),
        ("weight of kept rows (after)", "weight_proportion", "#2ca02c"),
    )
    for k, (label, key, color) in enumerate(series):
        vals = np.array([stats[n][key] or 0.0 for n in names])
        ax2.barh(y + (k - 1) * h, vals, height=h, color=color, label=label)
    ax2.set_xlabel("proportion of all rows / of total weight")
    ax2.set_ylabel(group)
    ax2.set_title(f"Share per {group} before and after selection")
    _legend(ax2)
    return _png(fig)


def _plot_change_shares(group: str, rows: dict[str, dict], prev_name: str) -> bytes:
    """Grouped bars: each group's share of the kept rows in the previous version and in this run."""
    names = list(rows)[:MAX_GROUPS]
    y = np.arange(len(names))
    fig = Figure(figsize=(11, 1.6 + 0.5 * len(names)), layout="constrained")
    ax = fig.subplots()
    h = 0.38
    for k, (label, key, color) in enumerate(
        (
            (f"{_plain(prev_name, 40)} (before)", "share_before", "#888888"),
            ("this run (now)", "share_now", KEPT_COLOR),
        )
    ):
        vals = np.array([rows[n][key] or 0.0 for n in names])
        bars = ax.barh(y + (k - 0.5) * h, vals, height=h, color=color, label=label)
        if len(names) <= 12:
            ax.bar_label(bars, labels=[f"{100 * v:.1f}%" for v in vals], padding=2, fontsize=8)
    ax.set_yticks(y, [_plain(n, 32) for n in names])
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.margins(x=0.12)
    ax.set_xlabel("share of kept rows")
    ax.set_ylabel(group)
    more = f" ({MAX_GROUPS} largest of {len(rows)})" if len(rows) > len(names) else ""
    ax.set_title(_plain(f"Share of kept rows per {group}: {prev_name} vs this run{more}", 100))
    _legend(ax)
    return _png(fig)


def _plot_neighbour_domains(nb: pl.DataFrame) -> bytes:
    """Where each subtask's most influential training examples come from, by domain."""
    counts = (
        nb.with_columns(pl.col("domain").fill_null("(none)"), pl.col("subtask").fill_null("all"))
        .group_by("subtask", "domain")
        .len()
    )
    subtasks = sorted(counts["subtask"].unique().to_list())[:MAX_GROUPS]
    domains = (
        counts.group_by("domain").agg(pl.col("len").sum()).sort("len", descending=True)["domain"].to_list()
    )
    domains = domains[:MAX_GROUPS]
    y = np.arange(len(domains))
    fig = Figure(figsize=(11, 1.6 + 0.42 * len(domains)), layout="constrained")
    ax = fig.subplots()
    h = 0.8 / max(1, len(subtasks))
    for k, st in enumerate(subtasks):
        sub = counts.filter(pl.col("subtask") == st)
        total = max(1, int(sub["len"].sum()))
        by = dict(zip(sub["domain"].to_list(), sub["len"].to_list(), strict=True))
        ax.barh(
            y + (k - (len(subtasks) - 1) / 2) * h,
            [by.get(d, 0) / total for d in domains],
            height=h,
            label=_plain(f"target: {st}", 40),
        )
    ax.set_yticks(y, [_plain(d, 32) for d in domains])
    ax.set_ylim(len(domains) - 0.5, -0.5)
    ax.set_xlabel("share of the target examples' top-k most influential training examples")
    ax.set_ylabel("domain of the training example")
    k = int(nb["rank"].max()) if nb.height else 0
    ax.set_title(f"Domains of each target example's {k} nearest training examples by influence (faiss)")
    _legend(ax)
    return _png(fig)


def _plot_mixture(traj: pl.DataFrame) -> bytes:
    doms = [c for c in traj.columns if c not in ("step", "entropy")][:MAX_GROUPS]
    steps = traj["step"].to_numpy()
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    for d in doms:
        ax1.plot(steps, traj[d].to_numpy(), label=_plain(d, 28))
    ax1.axhline(1 / max(1, len(doms)), color="#888888", linestyle=":", label="uniform")
    ax1.set_xlabel("proxy step")
    ax1.set_ylabel("domain weight")
    ax1.set_title("Mixture weights over training")
    _legend(ax1)
    ax2.plot(steps, traj["entropy"].to_numpy(), color="#444444")
    ax2.axhline(math.log(max(1, len(doms))), color="#888888", linestyle=":", label="uniform (log k)")
    ax2.set_xlabel("proxy step")
    ax2.set_ylabel("entropy of the weights (nats)")
    ax2.set_title("Entropy of the mixture")
    _legend(ax2)
    return _png(fig)


def _mixture_section(run: _Run) -> str | None:
    path = run.dir / "mixture_trajectory.parquet"
    if not path.exists() or run.mixture is None:
        return None
    traj = pl.read_parquet(path)
    mix = run.mixture if isinstance(run.mixture, dict) else {}
    body = [
        _note(
            f"Method: {mix.get('method')}; the weights in mixture.json are the {mix.get('output')} over "
            f"{mix.get('steps')} steps; every kept row of a domain carries weight N·α_d/n_d, so the shards' "
            "weight shares, the interleave probabilities and the Mosaic proportions are the mixture."
        )
    ]
    if traj.height > 1:
        body.append(_img(_plot_mixture(traj), "domain weights and their entropy over the proxy's steps"))
    w = mix.get("weights") or {}
    fin = mix.get("final_weights") or {}
    avg = mix.get("average_weights") or {}
    tok = mix.get("domain_tokens") or {}
    body.append(
        _table(
            ["domain", "weight (output)", "final", "average", "tokens"],
            [[d, w.get(d), fin.get(d), avg.get(d), tok.get(d)] for d in w],
        )
    )
    if mix.get("target_domains"):
        body.append(
            _note(
                "Target domains (held out of training and of the emitted data): "
                + ", ".join(mix["target_domains"])
            )
        )
    return "".join(body)


def _influence_section(run: _Run) -> str | None:
    path = run.dir / "influence" / "neighbours.parquet"
    if not path.exists():
        return None
    nb = pl.read_parquet(path)
    prov = next((t.provenance for t in run.tables if t.stem == "influence"), None)
    body = [
        _note(
            "LESS / TracIn influence: for each training example, the learning-rate-weighted sum over "
            "checkpoints of the cosine between its (Adam-preconditioned, projected) gradient and each "
            "target example's, averaged within a target subtask and maximised over subtasks. "
            "gradsim_target: cosine with the mean target gradient; gradsim_domain: with the mean "
            "gradient of the example's own domain (how typical it is); self_influence: TracIn's "
            "sum of weighted squared gradient norms."
        )
    ]
    if isinstance(prov, dict):
        facts = [
            ["target examples", prov.get("target_rows")],
            ["subtasks", ", ".join(prov.get("subtasks") or [])],
            [
                "checkpoints (step: lr weight)",
                ", ".join(f"{c.get('step')}: {_fmt(c.get('weight'))}" for c in prov.get("checkpoints") or []),
            ],
            ["nearest-neighbour index", prov.get("faiss")],
        ]
        params = prov.get("params") or {}
        facts += [[k, params.get(k)] for k in ("proj_dim", "precondition", "parameters") if k in params]
        body.append(_table(None, [[_Raw(f"<b>{_e(k)}</b>"), v] for k, v in facts], "kv"))
    if nb.height:
        body.append(
            _img(
                _plot_neighbour_domains(nb),
                "share of domains among each target example's most influential training examples",
            )
        )
        body.append("<h3>Most influential training examples of the first target examples</h3>")
        first = nb["target_id"].unique(maintain_order=True).to_list()[:8]
        rows = []
        for t in first:
            part = nb.filter((pl.col("target_id") == t) & (pl.col("rank") <= 3))
            for r in part.iter_rows(named=True):
                rows.append(
                    [
                        r["target_id"] if r["rank"] == 1 else "",
                        _plain(r["target_preview"], 80) if r["rank"] == 1 else "",
                        r["rank"],
                        r["id"],
                        r["domain"],
                        r["influence"],
                        _plain(r["preview"], 120),
                    ]
                )
        body.append(
            _table(["target", "target text", "rank", "training id", "domain", "influence", "text"], rows)
        )
        body.append(_note(f"All {nb.height:,} neighbour rows: influence/neighbours.parquet."))
    return "".join(body)


def _plot_weights(frame: pl.DataFrame) -> bytes:
    w = frame.filter(pl.col("kept") & pl.col("weight").is_finite())["weight"].to_numpy()
    fig = Figure(figsize=(9, 3.4), layout="constrained")
    ax = fig.subplots()
    if w.size:
        ax.hist(w, bins=_bins(w), color=KEPT_COLOR, alpha=0.8)
        ax.axvline(float(w.mean()), color="black", linestyle="--", linewidth=1, label=f"mean {w.mean():.4g}")
        _legend(ax)
    else:
        ax.text(0.5, 0.5, "no kept rows", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(f"Weights of kept rows ({_rows(w.size)})")
    ax.set_xlabel("weight (training loss multiplier)")
    ax.set_ylabel("kept rows")
    return _png(fig)


def _plot_heatmap(name: str, agreement: dict) -> bytes:
    cols = agreement["columns"][:MAX_HEATMAP]
    m = np.array(
        [[np.nan if v is None else v for v in row[: len(cols)]] for row in agreement["matrix"][: len(cols)]]
    )
    k = len(cols)
    size = min(11, 2.5 + 0.55 * k)
    fig = Figure(figsize=(size + 1.2, size), layout="constrained")
    ax = fig.subplots()
    finite = m[np.isfinite(m)]
    vmin = min(0.0, float(finite.min())) if finite.size else 0.0
    im = ax.imshow(m, vmin=vmin, vmax=1.0, cmap="viridis")
    labels = [_plain(c.split("@", 1)[1] if "@" in c else c, 24) for c in cols]
    ax.set_xticks(range(k), labels, rotation=60, ha="right")
    ax.set_yticks(range(k), labels)
    if k <= 14:
        for i in range(k):
            for j in range(k):
                if np.isfinite(m[i, j]):
                    ax.text(
                        j,
                        i,
                        f"{m[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if m[i, j] < (vmin + 1) / 2 else "black",
                    )
    fig.colorbar(im, ax=ax, label="Spearman ρ")
    ax.set_title(_plain(f"{name}: Spearman ρ between checkpoints", 80))
    ax.set_xlabel("checkpoint (s = seed, k = step)" if "@" in cols[0] else "score column")
    ax.set_ylabel("checkpoint (s = seed, k = step)" if "@" in cols[0] else "score column")
    return _png(fig)


# --------------------------------------------------------------------------------------------------
# HTML


class _Raw(str):
    """HTML that is already safe (built here); every other cell is escaped."""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if math.isnan(x):
            return "NaN"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        if x != 0 and (abs(x) >= 1e6 or abs(x) < 1e-3):
            return f"{x:.3e}"
        return f"{x:.4g}"
    return str(x)


def _short(x: float | None) -> str:
    return "–" if x is None else f"{x:.3g}"


def _rows(n: int) -> str:
    return f"{n:,} row" if n == 1 else f"{n:,} rows"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _cell(x: Any) -> str:
    return x if isinstance(x, _Raw) else _e(_fmt(x))


def _table(headers: list[str] | None, rows: list[list[Any]], cls: str = "") -> str:
    head = "<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in headers) + "</tr></thead>" if headers else ""
    body = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    c = f' class="{_e(cls)}"' if cls else ""
    return f"<table{c}>{head}<tbody>{body}</tbody></table>"


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<figure><img alt="{_e(alt)}" src="data:image/png;base64,{data}"></figure>'


def _kv(value: Any, depth: int = 0) -> str:
    """Any JSON value as nested HTML tables, every string escaped."""
    if isinstance(value, dict):
        if not value:
            return "<code>{}</code>"
        rows = "".join(f"<tr><th>{_e(k)}</th><td>{_kv(v, depth + 1)}</td></tr>" for k, v in value.items())
        return f'<table class="kv">{rows}</table>'
    if isinstance(value, list):
        if value and all(isinstance(v, dict) for v in value) and depth < 4:
            keys: list[str] = []
            for v in value:
                keys.extend(k for k in v if k not in keys)
            rows = [
                [
                    _Raw(_kv(v.get(k), depth + 1)) if isinstance(v.get(k), (dict, list)) else v.get(k)
                    for k in keys
                ]
                for v in value
            ]
            return _table(keys, rows)
        return _e(json.dumps(value, default=str))
    if isinstance(value, str):
        return _e(value)
    return _e(_fmt(value))


def _section(anchor: str, title: str, body: str, toc: list[tuple[str, str]]) -> str:
    toc.append((anchor, title))
    return f'<section id="{_e(anchor)}"><h2>{_e(title)}</h2>{body}</section>'


def _note(text: str, kind: str = "note") -> str:
    return f'<p class="{kind}">{_e(text)}</p>'


_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;color:#222;background:#fafafa}
main{max-width:1150px;margin:0 auto;padding:1.5em 2em 4em;background:#fff}
h1{font-size:1.6em;margin:.2em 0}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
h3{margin-top:1.5em}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em}
th,td{border:1px solid #ddd;padding:.25em .55em;text-align:left;vertical-align:top}
thead th{background:#f0f2f5}td{font-variant-numeric:tabular-nums}
table.kv th{background:#f7f7f9;font-weight:600;white-space:nowrap}table.kv td:first-child{white-space:nowrap}
.cards{display:flex;gap:1em;flex-wrap:wrap;margin:1em 0}
.card{border:1px solid #ddd;border-radius:6px;padding:.6em 1.1em;min-width:9em}
.card b{display:block;font-size:1.5em}.card span{color:#666;font-size:.85em}
.kept b{color:#1f77b4}.pruned b{color:#e8650a}
pre{background:#f6f8fa;border:1px solid #e1e4e8;padding:.8em;overflow:auto;font-size:.82em;max-height:40em}
.preview{white-space:pre-wrap;max-height:9em;overflow:auto;display:block;font-family:monospace;font-size:.82em;
max-width:46em;word-break:break-word}
.note{color:#555;font-style:italic}.warn{background:#fff4e5;border-left:4px solid #ff9800;padding:.4em .8em}
nav{background:#f6f8fa;border:1px solid #e1e4e8;padding:.5em 1.2em;display:inline-block}
nav ol{margin:.3em 0;padding-left:1.4em}
figure{margin:.8em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
code{background:#f3f3f3;padding:0 .25em}
"""


def _group_table(stats: dict[str, dict], name: str) -> str:
    if len(stats) <= MAX_GROUPS:
        return _group_rows(stats, name)
    top = dict(list(stats.items())[:MAX_GROUPS])
    return (
        _group_rows(top, name)
        + f"<details><summary>all {len(stats):,} values of {_e(name)}</summary>"
        + _group_rows(stats, name)
        + "</details>"
    )


def _group_rows(stats: dict[str, dict], name: str) -> str:
    has_man = any("manifest_proportion" in s for s in stats.values())
    headers = [
        name,
        "input rows",
        "kept",
        "pruned",
        "kept %",
        "share before",
        "share after (rows)",
        "weight sum",
        "share after (weight)",
    ] + (["manifest proportion"] if has_man else [])
    rows = []
    for g, s in stats.items():
        row = [
            g,
            s["input_rows"],
            s["kept_rows"],
            s["pruned_rows"],
            _pct(s["kept_fraction"]),
            _pct(s["proportion_before"]),
            _pct(s["proportion_after"]),
            s["weight_sum"],
            _pct(s["weight_proportion"]),
        ]
        if has_man:
            row.append(_pct(s.get("manifest_proportion")))
        rows.append(row)
    return _table(headers, rows)


def _previews(run: _Run, ids: list[str]) -> dict[str, str]:
    """id -> preview text from scores/rows.parquet, read for these ids only."""
    ids = sorted(set(ids))
    if run.rows_path is None or not ids or "preview" not in pq.read_schema(run.rows_path).names:
        return {}
    pv = (
        pl.scan_parquet(run.rows_path)
        .select(pl.col("id").cast(pl.Utf8), pl.col("preview").cast(pl.Utf8))
        .filter(pl.col("id").is_in(ids))
        .collect()
    )
    return {r[0]: r[1] for r in pv.iter_rows() if r[1] is not None}


def _examples(run: _Run, col: str | None) -> str:
    frame = run.frame
    if col is None:
        return _note("No score column, so no examples to rank.")
    fin = frame.filter(pl.col(col).is_finite())
    picks: list[tuple[str, pl.DataFrame]] = []
    for kept, label in ((True, "kept"), (False, "pruned")):
        part = fin.filter(pl.col("kept") == kept)
        picks.append(
            (
                f"Highest-scoring {label} rows",
                part.top_k(N_EXAMPLES, by=col).sort([col, "id"], descending=[True, False]),
            )
        )
        picks.append((f"Lowest-scoring {label} rows", part.bottom_k(N_EXAMPLES, by=col).sort([col, "id"])))
    bad = frame.filter(~pl.col(col).is_finite() | pl.col(col).is_null())
    if bad.height:
        picks.append(
            (
                f"Rows whose {col} is NaN, infinite or missing ({bad.height:,}; first {N_EXAMPLES})",
                bad.head(N_EXAMPLES),
            )
        )
    previews = _previews(run, [i for _, p in picks for i in p["id"].to_list()])
    out = []
    for title, part in picks:
        out.append(f"<h3>{_e(title)}</h3>")
        if part.height == 0:
            out.append(_note("none"))
            continue
        rows = []
        for r in part.iter_rows(named=True):
            preview = previews.get(r["id"], "")
            score = r[col] if r[col] is None or not math.isfinite(r[col]) else f"{r[col]:.6g}"
            rows.append(
                [
                    r["id"],
                    r["domain"],
                    r["label"],
                    score,
                    r["weight"],
                    r["n_tokens"],
                    _Raw(f'<div class="preview">{_e(preview)}</div>'),
                ]
            )
        out.append(_table(["id", "domain", "label", col, "weight", "tokens", "preview"], rows))
    return "".join(out)


def _changes_section(run: _Run, prev: _Previous, s: dict) -> str:
    ch = _changes(run, prev, s)
    body = [
        _note(
            f"Compared with the previous version in {prev.dir}. Entered: rows kept now that were pruned "
            "before or are new; left: rows kept before that are pruned now or gone from the data. New rows: "
            "ids of this run that the previous selection does not have; gone rows: the reverse."
        )
    ]
    body.extend(_note(msg, "warn") for msg in prev.notes)
    man = prev.manifest
    if man is not None:
        cur = run.manifest or {}
        pc = man.get("counts") if isinstance(man.get("counts"), dict) else {}
        facts = [
            ["created", man.get("created"), s["run"]["created"]],
            ["winnow version", man.get("winnow_version"), s["run"]["winnow_version"]],
            ["selector", _selector_summary(man.get("selector")), s["run"]["selector"]],
            ["recipe fingerprint", man.get("recipe_fingerprint"), cur.get("recipe_fingerprint")],
            ["input rows", pc.get("input_rows"), s["counts"]["input_rows"]],
            ["kept rows", pc.get("kept_rows"), s["counts"]["kept_rows"]],
        ]
        body.append(
            _table(["", prev.name, "this run"], [[_Raw(f"<b>{_e(k)}</b>"), a, b] for k, a, b in facts])
        )
    if ch is None:
        return "".join(body)
    c = ch["counts"]
    body.append(
        '<div class="cards">'
        f'<div class="card kept"><b>{c["entered"]:,}</b><span>entered the selection<br>'
        f"({c['entered_pruned_before']:,} pruned before, {c['entered_new']:,} new rows)</span></div>"
        f'<div class="card pruned"><b>{c["left"]:,}</b><span>left the selection<br>'
        f"({c['left_pruned_now']:,} pruned now, {c['left_gone']:,} gone)</span></div>"
        f'<div class="card"><b>{c["new_rows"]:,}</b><span>new rows<br>({c["entered_new"]:,} kept)</span></div>'
        f'<div class="card"><b>{c["gone_rows"]:,}</b><span>gone rows<br>({c["left_gone"]:,} were kept)</span></div>'
        f'<div class="card"><b>{c["kept_both"]:,}</b><span>kept in both</span></div></div>'
    )
    body.append(
        _table(
            ["", prev.name, "this run"],
            [
                ["rows", c["rows_before"], c["rows_now"]],
                ["kept rows", c["kept_before"], c["kept_now"]],
            ],
        )
    )
    body.append(
        _table(
            ["change", "rows"],
            [
                ["entered: pruned before, kept now", c["entered_pruned_before"]],
                ["entered: new rows, kept now", c["entered_new"]],
                ["left: kept before, pruned now", c["left_pruned_now"]],
                ["left: kept before, gone from the data", c["left_gone"]],
                ["new rows (kept or pruned)", c["new_rows"]],
                ["gone rows (kept or pruned before)", c["gone_rows"]],
                ["kept in both", c["kept_both"]],
            ],
        )
    )
    body.extend(_note(msg, "warn") for msg in ch["notes"])
    for group, g in ch["groups"].items():
        body.append(f"<h3>Kept rows per {group}, before and after</h3>")
        if not g["rows"]:
            body.append(_note(f"No kept rows before or now: no {group} shares to compare."))
            continue
        src = (
            f"the kept rows before are counted from {prev.name}/manifest.json (rows gone from the data "
            "included)"
            if g["source"] == "manifest"
            else f"the kept rows before are counted from {prev.name}/selection.parquet with this run's {group}s; "
            f"rows gone from the data are shown as {GONE_GROUP}"
        )
        body.append(
            _note(
                f"Share: the {group}'s part of all kept rows; {src}. Entered and left count rows "
                "still in the data (rows gone from the data are in the totals above)."
            )
        )
        body.append(
            _img(
                _plot_change_shares(group, g["rows"], prev.name),
                f"share of kept rows per {group}, {prev.name} vs this run",
            )
        )
        rows = []
        for n, r in g["rows"].items():
            delta = (
                None
                if r["share_before"] is None or r["share_now"] is None
                else f"{100 * (r['share_now'] - r['share_before']):+.1f}"
            )
            rows.append(
                [
                    n,
                    r["kept_before"],
                    _pct(r["share_before"]),
                    r["kept_now"],
                    _pct(r["share_now"]),
                    delta,
                    r["entered"],
                    r["entered_new"],
                    r["left"],
                ]
            )
        body.append(
            _table(
                [
                    group,
                    "kept before",
                    "share before",
                    "kept now",
                    "share now",
                    "change (points)",
                    "entered",
                    "of which new rows",
                    "left (pruned now)",
                ],
                rows,
            )
        )
    col = s["selection_score"]
    j = ch["frame"]
    picks = []
    for flag, what in (("_entered", "entered"), ("_left", "left")):
        part = j.filter(pl.col(flag))
        n_part = part.height
        if col is not None:
            # entered: the highest scores first; left: the lowest first; NaN and null last
            part = part.with_columns(_s=pl.when(pl.col(col).is_finite()).then(pl.col(col)))
            part = part.sort(["_s", "id"], descending=[flag == "_entered", False], nulls_last=True)
            how = f"the {'highest' if flag == '_entered' else 'lowest'} {col} first"
        else:
            part = part.sort("id")
            how = "first ids"
        picks.append((what, n_part, how, part.head(N_CHANGE_EXAMPLES)))
    previews = _previews(run, [i for *_, p in picks for i in p["id"].to_list()])
    for what, n_part, how, part in picks:
        extra = " and still in the data" if what == "left" else ""
        body.append(
            f"<h3>{_e(f'Rows that {what} the selection{extra} ({n_part:,}; {part.height:,} shown, {how})')}"
            "</h3>"
        )
        if part.height == 0:
            body.append(_note("none"))
            continue
        rows = []
        for r in part.iter_rows(named=True):
            status = ("new row" if r["_new"] else "pruned before") if what == "entered" else "pruned now"
            score = (
                "–"
                if col is None
                else (r[col] if r[col] is None or not math.isfinite(r[col]) else f"{r[col]:.6g}")
            )
            rows.append(
                [
                    r["id"],
                    status,
                    r["domain"],
                    r["label"],
                    score,
                    r["weight_before"],
                    r["weight"],
                    r["n_tokens"],
                    _Raw(f'<div class="preview">{_e(previews.get(r["id"], ""))}</div>'),
                ]
            )
        body.append(
            _table(
                [
                    "id",
                    "status",
                    "domain",
                    "label",
                    col or "score",
                    "weight before",
                    "weight now",
                    "tokens",
                    "preview",
                ],
                rows,
            )
        )
    if c["left_gone"]:
        gone_ids = (
            prev.selection.filter(pl.col("kept_before"))
            .join(run.frame.select("id"), on="id", how="anti")["id"]
            .head(N_CHANGE_EXAMPLES)
            .to_list()
        )
        body.append(
            _note(
                f"{_rows(c['left_gone'])} that were kept left because they are gone from the data "
                f"(no text or scores in this run); the first: {', '.join(gone_ids)}"
            )
        )
    return "".join(body)


def _cut_text(cutoff: float | None, side: str | None) -> str:
    if cutoff is not None:
        return f"{_fmt(cutoff)} (kept rows score at or {'above' if side == 'high' else 'below'} it)"
    if side == "mixed":
        return "none: no single threshold on this score separates kept from pruned rows (stratified, banded or random)"
    return "–"


def _render(run: _Run, s: dict, prev: _Previous | None = None) -> str:
    frame = run.frame
    info, counts = s["run"], s["counts"]
    col = s["selection_score"]
    cutoff = s["cutoff"]
    toc: list[tuple[str, str]] = []

    # ---- overview
    cut_text = _cut_text(cutoff, s["cutoff_side"])
    facts = [
        ["run", info["name"]],
        ["run directory", info["dir"]],
        ["winnow version (run)", info["winnow_version"] or "not recorded"],
        ["created", info["created"]],
        ["selector", info["selector"]],
        ["selection score (plotted)", col or "–"],
        ["cut-off", cut_text],
        [
            "report generated",
            f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} by winnow {info['report_version']}",
        ],
    ]
    body = [_table(None, [[_Raw(f"<b>{_e(k)}</b>"), v] for k, v in facts], "kv")]
    n = counts["input_rows"]
    body.append(
        '<div class="cards">'
        f'<div class="card"><b>{n:,}</b><span>input rows</span></div>'
        f'<div class="card kept"><b>{counts["kept_rows"]:,}</b><span>kept '
        f"({_pct(counts['kept_fraction'])})</span></div>"
        f'<div class="card pruned"><b>{counts["pruned_rows"]:,}</b><span>pruned '
        f"({_pct(None if not n else counts['pruned_rows'] / n)})</span></div></div>"
    )
    mc = s["manifest_counts"]
    if mc:
        mism = [
            (k, mc.get(k), counts[k])
            for k in ("input_rows", "kept_rows", "pruned_rows")
            if mc.get(k) is not None and mc.get(k) != counts[k]
        ]
        for k, a, b in mism:
            body.append(
                _note(
                    f"manifest.json records {k} = {a:,} but selection.parquet has {b:,}: "
                    "the manifest may come from an earlier selection.",
                    "warn",
                )
            )
    if not info["has_manifest"]:
        body.append(
            _note(
                "No manifest.json yet (the run has not emitted shards): this report is built from "
                "the scores and the selection alone."
            )
        )
    bad = s["selection_score_not_finite"]
    if bad and bad["rows"]:
        verb = "has" if bad["rows"] == 1 else "have"
        body.append(
            _note(
                f"{_rows(bad['rows'])} {verb} a NaN, infinite or missing {col} "
                f"({bad['kept']:,} kept, {bad['pruned']:,} pruned); plots leave them out.",
                "warn",
            )
        )
    for msg in s["notes"]:
        body.append(_note(msg, "warn"))
    overview = "".join(body)

    # ---- score distributions
    body = []
    if col is None:
        body.append(_note("No score columns found in scores/."))
    else:
        means = [col] + [c for c in run.means if c != col]
        body.append(
            _img(
                _plot_score_hists(frame, means, col, cutoff),
                f"histograms of {', '.join(means[:6])} for kept and pruned rows",
            )
        )
        for group, label in (("domain", "domains"), ("label", "labels")):
            stats = s[label]
            body.append(f"<h3>{_e(col)} per {group}</h3>")
            if not stats:
                body.append(_note(f"The data has no {group} column (all null): nothing to split by."))
            else:
                body.append(
                    _img(
                        _plot_group_boxes(frame, group, stats, col, cutoff),
                        f"box plots of {col} per {group}, kept vs pruned",
                    )
                )
        body.append("<h3>Statistics per score column</h3>")
        body.append(
            _note("NaN, inf and null are counted apart; every other statistic is over finite values.")
        )
        rows = []
        for c, st in s["scores"].items():
            ckpt = "mean" if st["seed"] is None else f"seed {st['seed']}, step {st['step']}"
            rows.append(
                [
                    c,
                    st["file"],
                    ckpt,
                    st["finite"],
                    st["nan"],
                    st["inf"],
                    st["null"],
                    st["mean"],
                    st["std"],
                    st["min"],
                    st["median"],
                    st["max"],
                    st["kept_mean"],
                    st["pruned_mean"],
                ]
            )
        body.append(
            _table(
                [
                    "column",
                    "file",
                    "checkpoint",
                    "finite",
                    "NaN",
                    "inf",
                    "null",
                    "mean",
                    "std",
                    "min",
                    "median",
                    "max",
                    "kept mean",
                    "pruned mean",
                ],
                rows,
            )
        )
    scores_html = "".join(body)

    # ---- kept / pruned per group
    body = []
    for group, label in (("domain", "domains"), ("label", "labels")):
        stats = s[label]
        body.append(f"<h3>Per {group}</h3>")
        if not stats:
            body.append(_note(f"The data has no {group} column (all null)."))
            continue
        body.append(_img(_plot_group_counts(group, stats), f"kept and pruned rows per {group}"))
        body.append(_group_table(stats, group))
    body.append("<h3>Weights of kept rows</h3>")
    w = s["weights"]
    body.append(_img(_plot_weights(frame), "histogram of the weights of kept rows"))
    body.append(
        _table(
            ["kept rows", "min", "mean", "max", "std", "sum"],
            [[w["kept_rows"], w["min"], w["mean"], w["max"], w["std"], w["sum"]]],
        )
    )
    if w["min"] is not None and w["min"] == w["max"]:
        body.append(
            _note(f"Every kept row has weight {_fmt(w['min'])}: the selector prunes without reweighting.")
        )
    groups_html = "".join(body)

    # ---- agreement
    body = [
        _note(
            "Spearman rank correlation between score columns, over rows where every column is finite. "
            "Close to 1: seeds and steps rank the data alike, so the selection does not hinge on one "
            "proxy run. Well below 1: the ranking is noisy; more seeds or later checkpoints help."
        )
    ]
    if not s["agreement"]:
        body.append(_note("Fewer than two checkpoint columns per score: nothing to compare."))
    for name, a in s["agreement"].items():
        body.append(f"<h3>{_e(name)}</h3>")
        if a["matrix"] is None:
            body.append(
                _note(f"Only {_rows(a['rows'])} with finite scores in every column: needs at least 3.")
            )
            continue
        p = a["pairs"]
        sampled = f" (a random sample of {a['rows']:,} of {a['complete_rows']:,})" if a["sampled"] else ""
        body.append(
            _table(
                [
                    "rows used",
                    "mean ρ, all pairs",
                    "mean ρ, seeds at the same step",
                    "mean ρ, steps of the same seed",
                ],
                [
                    [
                        f"{a['rows']:,}{sampled}",
                        p["all_pairs"],
                        p["between_seeds_same_step"],
                        p["between_steps_same_seed"],
                    ]
                ],
            )
        )
        body.append(_img(_plot_heatmap(name, a), f"Spearman correlation heatmap for {name}"))
        short = [c.split("@", 1)[1] if "@" in c else c for c in a["columns"]]
        body.append(
            "<details><summary>values</summary>"
            + _table([""] + short, [[short[i]] + row for i, row in enumerate(a["matrix"])])
            + "</details>"
        )
    agree_html = "".join(body)

    # ---- provenance
    body = []
    for t in run.tables:
        body.append(f"<h3>{_e(t.path.name)}</h3>")
        ckpt_cols = sum(len(v) for v in t.checkpoints.values())
        body.append(_note(f"mean columns: {', '.join(t.means) or '–'}; checkpoint columns: {ckpt_cols}"))
        if t.provenance is None:
            body.append(_note("No winnow.provenance metadata in this file."))
        elif isinstance(t.provenance, (dict, list)):
            body.append(_kv(t.provenance))
            body.append(
                "<details><summary>raw JSON</summary><pre>"
                + _e(json.dumps(t.provenance, indent=2, default=str))
                + "</pre></details>"
            )
        else:
            body.append(f"<pre>{_e(t.provenance)}</pre>")
    body.append("<h3>Recipe (config.yaml)</h3>")
    body.append(
        f"<pre>{_e(run.config_text)}</pre>"
        if run.config_text is not None
        else _note("config.yaml not found.")
    )
    if run.run_json:
        body.append("<h3>run.json</h3>" + _kv(run.run_json))
    prov_html = "".join(body)

    # ---- manifest
    man = run.manifest
    body = []
    if man is None:
        body.append(
            _note(
                "manifest.json not found: the run has not emitted shards yet (the emit step of "
                "`winnow run RECIPE` writes shards/ and manifest.json)."
            )
        )
    else:
        shards = man.get("shards") or []
        body.append(f"<h3>Output shards ({len(shards)})</h3>")
        if shards:
            rows = [
                [sh.get("path"), sh.get("rows"), sh.get("bytes"), str(sh.get("sha256") or "")[:12]]
                for sh in shards
                if isinstance(sh, dict)
            ]
            tot_rows = sum(r[1] for r in rows if isinstance(r[1], int))
            tot_bytes = sum(r[2] for r in rows if isinstance(r[2], int))
            rows.append([_Raw("<b>total</b>"), tot_rows, tot_bytes, ""])
            body.append(_table(["path", "rows", "bytes", "sha256 (prefix)"], rows))
        else:
            body.append(_note("The manifest lists no shards."))
        inter = man.get("interleave")
        body.append("<h3>Interleave probabilities</h3>")
        if isinstance(inter, dict) and inter.get("names"):
            names, probs = inter.get("names") or [], inter.get("probabilities") or []
            body.append(
                _table(
                    ["name", "probability"],
                    [[nm, probs[i] if i < len(probs) else None] for i, nm in enumerate(names)],
                )
            )
            body.append(
                _note("In this order, as datasets.interleave_datasets(probabilities=...) takes them.")
            )
        else:
            body.append(_note("none recorded"))
        if man.get("mosaic_streams"):
            body.append("<h3>Mosaic streams</h3>" + _kv(man["mosaic_streams"]))
        div = man.get("diversity")
        if isinstance(div, dict):
            body.append("<h3>Diversity</h3>" + _kv(div))
            body.append(
                _note(
                    "diversity_input / diversity_selection: log-det distance per item to a maximally "
                    "diverse reference (random directions) of the same size, on diversity_sample rows; "
                    "smaller is more diverse. DPP runs also give logdet, the log det of the selected "
                    "set's kernel, and random_logdet_mean, the same for random subsets of equal size."
                )
            )
        extra = {
            k: man[k]
            for k in (
                "recipe_fingerprint",
                "input",
                "model",
                "scorers",
                "selector",
                "columns",
                "weight_column",
            )
            if k in man
        }
        if isinstance(extra.get("input"), dict) and isinstance(extra["input"].get("shards"), list):
            inp = dict(extra["input"])
            inp["shards"] = [
                {**sh, "sha256": str(sh.get("sha256") or "")[:12]} if isinstance(sh, dict) else sh
                for sh in inp["shards"]
            ]
            extra["input"] = inp
        if extra:
            body.append("<h3>Fingerprints and inputs</h3>" + _kv(extra))
    if run.mixture is not None:
        body.append("<h3>Mixture (mixture.json)</h3>" + _kv(run.mixture))
    man_html = "".join(body)

    infl_html = _influence_section(run)
    mix_html = _mixture_section(run)
    changes_html = _changes_section(run, prev, s) if prev is not None else ""
    sections = "".join(
        [
            _section("changes", f"Changes since {prev.name}", changes_html, toc) if prev is not None else "",
            _section("scores", "Score distributions", scores_html, toc),
            _section("influence", "Influence on the target set", infl_html, toc) if infl_html else "",
            _section("mixture", "Domain mixture", mix_html, toc) if mix_html else "",
            _section("groups", "Kept and pruned per domain and label", groups_html, toc),
            _section("agreement", "Checkpoint agreement", agree_html, toc),
            _section("examples", "Examples", _examples(run, col), toc),
            _section("provenance", "Provenance and recipe", prov_html, toc),
            _section("shards", "Shards and mixture", man_html, toc),
        ]
    )
    nav = (
        "<nav><b>Contents</b><ol>"
        + "".join(f'<li><a href="#{_e(a)}">{_e(t)}</a></li>' for a, t in toc)
        + "</ol></nav>"
    )
    title = f"winnow report: {info['name']}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{_e(title)}</title>'
        f"<style>{_CSS}</style></head><body><main>"
        f"<header><h1>{_e(title)}</h1>{overview}</header>{nav}{sections}"
        "</main></body></html>\n"
    )


def write_report(
    run_dir: str | Path,
    fingerprint: str | None = None,
    *,
    out: str | Path | None = None,
    previous: str | Path | None = None,
) -> Path:
    """Write the report (self-contained: inline CSS, plots as PNG data URIs) and return its path.

    `out` is where it goes (default run_dir/report.html). The file appears atomically: it is written
    as ``<name>.tmp-<pid>`` in the same folder and renamed. Raises FileNotFoundError when run_dir,
    run_dir/scores or run_dir/selection.parquet is missing; manifest.json, config.yaml and
    scores/rows.parquet are optional. `fingerprint`, when given, is recorded in a
    `<meta name="winnow-fingerprint">` tag (the flow's cache check reads it).

    `previous`, a folder holding the previous version's ``selection.parquet`` and ``manifest.json``,
    adds a section "Changes since <its folder name>": rows that entered and left the selection, new
    and gone rows, kept shares per domain and label before and after, and examples. A missing or
    unreadable file there becomes a note in that section.
    """
    run = _load(run_dir)
    prev = _load_previous(previous) if previous is not None else None
    page = _render(run, _summarize(run), prev)
    if fingerprint is not None:
        page = page.replace(
            '<meta charset="utf-8">',
            f'<meta charset="utf-8"><meta name="winnow-fingerprint" content="{_e(fingerprint)}">',
            1,
        )
    dest = Path(out) if out is not None else run.dir / "report.html"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f"{dest.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(page)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


# --------------------------------------------------------------------------------------------------
# terminal


def report_fingerprint(path: str | Path) -> str | None:
    """The fingerprint recorded by `write_report(..., fingerprint=...)`, if any."""
    import re

    try:
        head = Path(path).read_text(encoding="utf-8", errors="replace")[:4096]
    except OSError:
        return None
    m = re.search(r'<meta name="winnow-fingerprint" content="([^"]*)">', head)
    return m.group(1) if m else None


def print_summary(run_dir: str | Path, console: Any = None) -> dict:
    """Print the summary of a run as rich tables (``winnow inspect RUN``) and return summarize()'s dict."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    s = summarize(run_dir)
    con = console if console is not None else Console()
    info, counts = s["run"], s["counts"]

    head = Table(title=Text(f"winnow run {info['name']}"), show_header=False, box=None)
    head.add_column(style="bold")
    head.add_column()
    for k, v in (
        ("directory", info["dir"]),
        ("winnow version", info["winnow_version"] or "not recorded"),
        ("created", info["created"]),
        ("selector", info["selector"]),
        ("selection score", s["selection_score"] or "–"),
        ("cut-off", _cut_text(s["cutoff"], s["cutoff_side"])),
        ("input rows", f"{counts['input_rows']:,}"),
        ("kept rows", f"{counts['kept_rows']:,} ({_pct(counts['kept_fraction'])})"),
        ("pruned rows", f"{counts['pruned_rows']:,}"),
    ):
        head.add_row(k, Text(str(v)))
    bad = s["selection_score_not_finite"]
    if bad and bad["rows"]:
        head.add_row(
            "not finite",
            Text(f"{_rows(bad['rows'])} ({bad['kept']:,} kept, {bad['pruned']:,} pruned)", style="yellow"),
        )
    if not info["has_manifest"]:
        head.add_row("manifest", Text("not written yet (no shards emitted)", style="yellow"))
    con.print(head)

    for key, name in (("domains", "domain"), ("labels", "label")):
        stats = s[key]
        if not stats:
            continue
        t = Table(title=f"per {name}", box=box.SIMPLE_HEAD)
        for h in (name, "input", "kept", "pruned", "kept %", "share before", "share after", "weight share"):
            t.add_column(h, justify="left" if h == name else "right")
        for g, st in list(stats.items())[:MAX_GROUPS]:
            t.add_row(
                Text(g),
                f"{st['input_rows']:,}",
                f"{st['kept_rows']:,}",
                f"{st['pruned_rows']:,}",
                _pct(st["kept_fraction"]),
                _pct(st["proportion_before"]),
                _pct(st["proportion_after"]),
                _pct(st["weight_proportion"]),
            )
        if len(stats) > MAX_GROUPS:
            t.caption = f"{MAX_GROUPS} largest of {len(stats)} {key}"
        con.print(t)

    if s["scores"]:
        t = Table(
            title="score columns",
            box=box.SIMPLE_HEAD,
            caption="NaN: NaN, inf or null; kept / pruned: mean over kept / pruned rows",
        )
        t.add_column("column", no_wrap=True)
        for h in ("finite", "NaN", "mean", "min", "median", "max", "kept", "pruned"):
            t.add_column(h, justify="right", no_wrap=True)
        for c, st in s["scores"].items():
            bad = st["nan"] + st["inf"] + st["null"]
            t.add_row(
                Text(c),
                f"{st['finite']:,}",
                Text(f"{bad:,}", style="yellow" if bad else ""),
                *(_short(st[k]) for k in ("mean", "min", "median", "max", "kept_mean", "pruned_mean")),
            )
        con.print(t)

    if s["agreement"]:
        t = Table(title="checkpoint agreement (Spearman ρ)", box=box.SIMPLE_HEAD)
        for h in ("score", "columns", "rows", "all pairs", "seeds, same step", "steps, same seed"):
            t.add_column(h, justify="left" if h == "score" else "right")
        for name, a in s["agreement"].items():
            p = a["pairs"]
            t.add_row(
                Text(name),
                str(len(a["columns"])),
                f"{a['rows']:,}",
                _fmt(p["all_pairs"]),
                _fmt(p["between_seeds_same_step"]),
                _fmt(p["between_steps_same_seed"]),
            )
        con.print(t)
    for msg in s["notes"]:
        con.print(Text(msg, style="yellow"))
    return s
