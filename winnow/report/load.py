"""Reading a run folder (and a previous version of it) for the report, through :class:`RunLayout`.

Only ids, groups, kept, weights and scores are loaded for every row; previews are read for the
handful of example rows (:func:`_previews`). What is missing or unreadable among the optional files
becomes a note that the report shows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq
import yaml

from winnow.errors import WinnowError
from winnow.pipeline.layout import PROVENANCE_KEY, RunLayout, parse_checkpoint_column


@dataclass
class _ScoreTable:
    path: Path
    stem: str
    means: list[str]  # mean columns, as named in the joined frame
    checkpoints: dict[str, list[str]]  # base score name -> its checkpoint columns
    provenance: Any  # parsed JSON, the raw string if it is not JSON, or None


@dataclass
class _Run:
    layout: RunLayout
    frame: pl.DataFrame  # id, kept, weight, domain, label, n_tokens, score columns
    tables: list[_ScoreTable]
    columns: dict[str, dict]  # score column -> {file, base, seed, step}
    rows_path: Path | None
    config_text: str | None = None
    config: dict | None = None  # config.yaml: dump_recipe(recipe)
    manifest: dict | None = None
    run_json: dict | None = None
    selection_provenance: dict | None = None  # selection.parquet's: {select, package_version, ...}
    mixture: Any = None
    notes: list[str] = field(default_factory=list)

    @property
    def dir(self) -> Path:
        return self.layout.root

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


def _provenance(schema: Any) -> Any:
    """A parquet file's provenance: parsed JSON, the raw string if it is not JSON, or None."""
    raw = (schema.metadata or {}).get(PROVENANCE_KEY)
    if raw is None:
        return None
    text = raw.decode("utf-8", "replace")
    try:
        return json.loads(text)
    except ValueError:
        return text


def _load(run_dir: str | Path) -> _Run:
    layout = RunLayout(run_dir)
    root = layout.root
    if not root.is_dir():
        raise _missing(root, "run `winnow run RECIPE` first (it creates the run directory)")
    scores_dir = layout.scores
    if not scores_dir.is_dir():
        raise _missing(scores_dir, "the scoring step of `winnow run RECIPE` writes it; run that first")
    sel_path = layout.selection
    if not sel_path.is_file():
        raise _missing(sel_path, "run `winnow run RECIPE` first (its selection step writes it)")

    notes: list[str] = []
    sel_schema = pq.read_schema(sel_path)
    sel_cols = sel_schema.names
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

    rows_path: Path | None = layout.rows
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
    for path in layout.score_files():
        schema = pq.read_schema(path)
        if "id" not in schema.names:
            notes.append(f"{path} has no `id` column; it is left out.")
            continue
        provenance = _provenance(schema)
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
            parsed = parse_checkpoint_column(col)
            if parsed:
                base, seed, step = parsed
                ckpts.setdefault(base, []).append(name)
                columns[name] = {"file": path.name, "base": base, "seed": seed, "step": step}
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

    run = _Run(layout=layout, frame=frame, tables=tables, columns=columns, rows_path=rows_path, notes=notes)
    sel_prov = _provenance(sel_schema)
    run.selection_provenance = sel_prov if isinstance(sel_prov, dict) else None
    if layout.config.is_file():
        run.config_text = layout.config.read_text(encoding="utf-8", errors="replace")
        try:
            cfg = yaml.safe_load(run.config_text)
            run.config = cfg if isinstance(cfg, dict) else None
        except yaml.YAMLError as exc:
            notes.append(f"config.yaml could not be parsed ({exc.__class__.__name__}); it is shown as text.")
    man = _read_json(layout.manifest, notes)
    run.manifest = man if isinstance(man, dict) else None
    rj = _read_json(layout.run_json, notes)
    run.run_json = rj if isinstance(rj, dict) else None
    run.mixture = _read_json(layout.mixture_json, notes)
    return run


def _previews(run: _Run, ids: list[str]) -> dict[str, str]:
    """id -> preview text from scores/previews.parquet (a run folder of an older winnow: the preview column
    of scores/rows.parquet), read for these ids only."""
    ids = sorted(set(ids))
    path: Path | None = run.layout.previews
    if not path.is_file():
        path = run.rows_path
    if path is None or not ids or "preview" not in pq.read_schema(path).names:
        return {}
    pv = (
        pl.scan_parquet(path)
        .select(pl.col("id").cast(pl.Utf8), pl.col("preview").cast(pl.Utf8))
        .filter(pl.col("id").is_in(ids))
        .collect()
    )
    return {r[0]: r[1] for r in pv.iter_rows() if r[1] is not None}


@dataclass
class _Previous:
    """The previous version of a run: its folder, its selection and its manifest (either may be missing)."""

    dir: Path
    name: str
    selection: pl.DataFrame | None = None  # id, kept_before, weight_before
    manifest: dict | None = None
    notes: list[str] = field(default_factory=list)


def _load_previous(previous: str | Path) -> _Previous:
    """Read a previous version's selection.parquet and manifest.json; what is missing or unreadable becomes a note.

    A version folder freezes these files under the run folder's names (``VERSIONED_FILES``), so it is
    read through a :class:`RunLayout` of its own.
    """
    layout = RunLayout(previous)
    root = layout.root
    prev = _Previous(dir=root, name=root.resolve().name or str(root))
    if not root.is_dir():
        prev.notes.append(
            f"The previous version's folder {root} does not exist: there is nothing to compare with."
        )
        return prev
    sel_path = layout.selection
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
    man_path = layout.manifest
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
