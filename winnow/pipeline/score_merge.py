"""The merge-scores step: the shards' score parts into the score store, out of core, then the parts go.

Every output is a lazy query over parquet run by polars' streaming engine and written batch by batch
(``store.sink_parquet``), so memory is set by the batch and the set of ids (for de-duplication), never by
the rows' text:

- ``scores/<scorer>.parquet``: id and the scorer's columns of every part, in shard order;
- ``scores/rows.parquet``: id, domain, label, n_tokens;
- ``scores/previews.parquet``: id, preview (read by the report alone);
- ``scores/order.parquet``: shard, id of every row in source order, repeats kept (read by emit, which
  then reads the source once and hashes nothing).

Rows are de-duplicated by id (the first occurrence kept; with ``data.id_column`` a repeated id is an
error naming it). Each output records in its provenance, under ``parts``, the slice of its rows each
part became (``start``, ``end``; ``rows``: the part's rows before de-duplication; ``whole``: none of the
part's ids was dropped as a repeat of an earlier part's). Each part's score-step timing (``started``,
``seconds``) goes to ``scores/timing.json``, outside the store, whose bytes stay the same on a rerun. Once every output is in place the parts are
removed (``scores/parts/`` held a second copy of the store). A later run whose shard was not rescored
reads that shard's rows back from the store's slice (``absorbed``), so a rerun resumes: a crash after
the outputs were replaced and before the parts were removed leaves parts that are merged again; a part
that is neither on disk nor whole in every output makes its score step run again (its scores come back
from the score cache).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import polars as pl

import winnow
from winnow.errors import WinnowError
from winnow.pipeline.atomic import fingerprint, tmp_name, write_json
from winnow.pipeline.faults import fault_point
from winnow.pipeline.layout import RunLayout, parse_checkpoint_column
from winnow.pipeline.recipe import Recipe
from winnow.pipeline.score_cache import collect_garbage
from winnow.pipeline.sources import InputShard
from winnow.pipeline.steps import RunContext, ScorePart, Step, register_step
from winnow.pipeline.store import made_by, read_provenance, read_schema, sink_parquet

PARTS_KEY = "parts"
ROW_COLUMNS = ["id", "domain", "label", "n_tokens"]
PREVIEW_COLUMNS = ["id", "preview"]


def _base_column(col: str) -> str:
    parsed = parse_checkpoint_column(col)
    return parsed[0] if parsed else col


def _scorer_columns(name: str) -> list[str]:
    from winnow.scorers import SCORERS

    return list(getattr(SCORERS[name], "columns", None) or [name])


def store_outputs(recipe: Recipe, layout: RunLayout) -> list[Path]:
    """The files merge-scores writes for this recipe: one per scorer, rows, previews."""
    return [layout.score_file(s.name) for s in recipe.scoring.scorers] + layout.store_files()


TIMING_FILE = "scores/timing.json"  # each part's score-step timing, outliving the removed parts


def _timing(prov: dict[str, Any]) -> dict[str, Any]:
    """The score step's ``started``, ``seconds`` and ``marks`` (phases, seconds from the start) from a
    part's provenance."""
    return {k: prov[k] for k in ("started", "seconds", "marks") if k in prov}


def _read_timing(path: Path) -> dict[str, Any]:
    """The timing file's {part: {started, seconds, marks}} (empty when missing or unreadable: timing only)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def absorbed_slices(path: Path) -> dict[str, dict[str, Any]]:
    """The parts a merged file holds whole: {part's scores path: {start, end, rows, whole}}."""
    if not path.exists():
        return {}
    try:
        prov = read_provenance(path) or {}
    except Exception:  # noqa: BLE001  (an unreadable file holds nothing usable)
        return {}
    parts = prov.get(PARTS_KEY)
    if not isinstance(parts, list):
        return {}
    return {p["scores"]: p for p in parts if isinstance(p, dict) and p.get("whole") and "scores" in p}


def is_absorbed(recipe: Recipe, layout: RunLayout, part: ScorePart) -> bool:
    """Whether every output of the store holds this part whole (so its removed files are not needed)."""
    return all(part.scores in absorbed_slices(p) for p in store_outputs(recipe, layout))


def _source(
    layout: RunLayout, part: ScorePart, part_file: str, out: Path, columns: list[str] | None
) -> pl.LazyFrame:
    """A part's rows for one output: from its part file while it exists, else the output's own slice."""
    path = layout.path(part_file)
    if path.exists():
        have = read_schema(path).names
        missing = [c for c in (columns or []) if c not in have]
        if missing:
            raise WinnowError(f"{path}: no column {', '.join(map(repr, missing))}")
        return pl.scan_parquet(path).select(columns if columns is not None else have)
    sl = absorbed_slices(out).get(part.scores)
    if sl is None:
        raise WinnowError(
            f"{path}: not found, and {out} does not hold that shard's rows; rerun `winnow run` "
            f"(the shard is scored again, from the score cache)"
        )
    lf = pl.scan_parquet(out).slice(int(sl["start"]), int(sl["end"]) - int(sl["start"]))
    return lf.select(columns) if columns is not None else lf


def _scores_columns(layout: RunLayout, part: ScorePart, out: Path, cols: list[str]) -> list[str]:
    """The columns of the part's scores that belong to one scorer (its columns and their checkpoints)."""
    path = layout.path(part.scores)
    names = read_schema(path).names if path.exists() else read_schema(out).names
    return ["id"] + [c for c in names if c != "id" and (c in cols or _base_column(c) in cols)]


def merge_parts(
    recipe: Recipe,
    run_dir: Path,
    parts: list[ScorePart],
    provenance: dict[str, Any],
    step_fingerprint: str | None = None,
    cache_fp: str | None = None,
    shards: list[InputShard] | None = None,
) -> dict[str, Any]:
    """Merge the shards' parts (in shard order) into the store; remove the parts; collect the score
    cache's garbage (when ``cache_fp`` is given)."""
    layout = RunLayout(run_dir)
    parts = sorted(parts, key=lambda p: p.shard)
    rows_out, previews_out = layout.rows, layout.previews
    # the ids, part by part: repeats, and the slice of the merged rows each part becomes
    ids = pl.concat(
        [
            _source(layout, p, p.rows_file, rows_out, ["id"]).select("id").with_columns(_part=pl.lit(i))
            for i, p in enumerate(parts)
        ]
        or [pl.LazyFrame({"id": [], "_part": []}, schema={"id": pl.Utf8, "_part": pl.Int32})]
    )
    survivors = dict(
        ids.unique(subset="id", keep="first", maintain_order=True)
        .group_by("_part")
        .len()
        .collect(engine="streaming")
        .iter_rows()
    )
    unique_in = dict(
        ids.group_by("_part").agg(pl.col("id").n_unique()).collect(engine="streaming").iter_rows()
    )
    counted = dict(ids.group_by("_part").len().collect(engine="streaming").iter_rows())
    slices, start, n_all = [], 0, 0
    timing: dict[str, dict[str, Any]] = {}
    previous_timing = _read_timing(layout.path(TIMING_FILE))
    for i, p in enumerate(parts):
        kept = int(survivors.get(i, 0))
        on_disk = layout.path(p.rows_file).exists()
        if on_disk:
            n_rows, whole = int(counted.get(i, 0)), kept == int(unique_in.get(i, 0))
            timing[p.scores] = _timing(read_provenance(layout.path(p.scores)) or {})
        else:
            old = absorbed_slices(rows_out)[p.scores]
            n_rows, whole = int(old["rows"]), kept == int(old["end"]) - int(old["start"])
            timing[p.scores] = previous_timing.get(p.scores, {})
        slices.append(
            {
                "scores": p.scores,
                "rows_file": p.rows_file,
                "rows": n_rows,
                "start": start,
                "end": start + kept,
                "whole": whole,
            }
        )
        start += kept
        n_all += n_rows
    if start == 0:
        raise WinnowError(f"data.source: {recipe.data.source!r} holds no rows")
    if recipe.data.id_column is not None and n_all > start:
        dup = ids.group_by("id").len().filter(pl.col("len") > 1).collect(engine="streaming")
        raise WinnowError(
            f"data.id_column {recipe.data.id_column!r}: {dup.height} ids appear more than once "
            f"(e.g. {dup['id'].sort()[0]!r}); ids must be unique"
        )

    def merged(out: Path, part_file: Any, columns: Any) -> pl.LazyFrame:
        frames = [_source(layout, p, part_file(p), out, columns(p)) for p in parts]
        return pl.concat(frames, how="vertical_relaxed").unique(
            subset="id", keep="first", maintain_order=True
        )

    # every output under a temporary name first (they read the current outputs' slices), then in place
    queries: list[tuple[pl.LazyFrame, Path, dict[str, Any]]] = []
    for spec in recipe.scoring.scorers:
        out = layout.score_file(spec.name)
        cols = _scorer_columns(spec.name)
        lf = merged(
            out, lambda p: p.scores, lambda p, out=out, cols=cols: _scores_columns(layout, p, out, cols)
        )
        prov = dict(
            provenance,
            scorer=spec.name,
            params=spec.params,
            columns=cols,
            package_version=winnow.__version__,
            step_fingerprint=step_fingerprint,
            **{PARTS_KEY: slices},
        )
        queries.append((lf, out, prov))
    for out, cols in ((rows_out, ROW_COLUMNS), (previews_out, PREVIEW_COLUMNS)):
        lf = merged(out, lambda p: p.rows_file, lambda p, cols=cols: cols)
        queries.append((lf, out, {"step_fingerprint": step_fingerprint, PARTS_KEY: slices}))
    order = _order_query(layout, parts, slices, step_fingerprint)
    if order is not None:
        queries.append(order)
    else:  # a part's ids in source order are nowhere (a folder of a winnow before this file): emit hashes
        layout.order.unlink(missing_ok=True)
    staged: list[tuple[Path, Path]] = []
    try:
        for lf, out, prov in queries:
            staged.append((sink_parquet(lf, tmp_name(out), prov), out))
        for tmp, out in staged:
            os.replace(tmp, out)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    files = [out for _, out in staged]
    for old in layout.score_files():  # scores of scorers this recipe no longer runs
        if old not in files and not (old == layout.influence_scores and recipe.scoring.influence):
            old.unlink()
    write_json(layout.path(TIMING_FILE), timing)
    fault_point("merge-scores")
    # the parts the store holds whole are a second copy now; a part with rows dropped as repeats of an
    # earlier part's stays (the store could not give it back if that part changed), and so do the others
    whole = {s["scores"] for s in slices if s["whole"]}
    removed = []
    for p in parts:
        if p.scores in whole:
            for f in (p.scores, p.rows_file):
                layout.path(f).unlink(missing_ok=True)
            removed += [p.scores, p.rows_file]
    current = {layout.path(f) for p in parts for f in (p.scores, p.rows_file)}
    if layout.score_parts.is_dir():  # parts of other fingerprints: no step of this run reads them
        for f in layout.score_parts.glob("*.parquet"):
            if f not in current:
                f.unlink(missing_ok=True)
    gone = collect_garbage(layout, cache_fp, shards or []) if cache_fp else []
    return {
        "rows": start,
        "duplicate_rows": n_all - start,
        "files": [layout.rel(p) for p in files],
        "removed_parts": removed,
        "cache_removed": len(gone),
    }


@register_step
class MergeScoresStep(Step):
    """The shards' parts into the score store (``merge-scores``): ``scores/<scorer>.parquet``, rows,
    previews; the parts removed, the score cache's garbage collected."""

    name = "merge-scores"

    def fingerprint(self, ctx: RunContext, parts: Any = ()) -> str:
        return fingerprint("merge", parts_fingerprint([ScorePart.of(p) for p in parts]))

    def run(
        self, ctx: RunContext, fp: str, parts: Any = (), provenance: Any = None, cache_fp: str | None = None
    ) -> dict[str, Any]:
        return merge_parts(
            ctx.setup(),
            ctx.root,
            [ScorePart.of(p) for p in parts],
            provenance or {},
            step_fingerprint=fp,
            cache_fp=cache_fp,
            shards=ctx.input_shards(),
        )

    def present(self, ctx: RunContext, result: Any, fp: str) -> bool:
        """Its files, made by this fingerprint, and the parts they hold whole removed (a run killed between
        the two merges again, and removes them)."""
        gone = all(not ctx.layout.path(f).exists() for f in result.get("removed_parts", []))
        return gone and made_by(ctx.root, result["files"], fp)


def _order_query(
    layout: RunLayout, parts: list[ScorePart], slices: list[dict[str, Any]], step_fingerprint: str | None
) -> tuple[pl.LazyFrame, Path, dict[str, Any]] | None:
    """``scores/order.parquet``: (shard, id) of every row of every part, in shard and source order,
    repeats kept (the rows parts are in source order), with each part's slice in its provenance so that
    a later merge reads an unchanged shard's slice back. None when a part's rows file is gone and the
    current order file does not hold it (then emit reads every row's id from the source, as before)."""
    out = layout.order
    old = absorbed_slices(out)
    if not all(layout.path(p.rows_file).exists() or p.scores in old for p in parts):
        return None
    frames, order_slices, start = [], [], 0
    for p, sl in zip(parts, slices, strict=True):
        frames.append(
            _source(layout, p, p.rows_file, out, ["id"]).select(
                pl.lit(p.shard, pl.Int32).alias("shard"), "id"
            )
        )
        n = int(sl["rows"])
        order_slices.append({"scores": p.scores, "rows": n, "start": start, "end": start + n, "whole": True})
        start += n
    prov = {"step_fingerprint": step_fingerprint, PARTS_KEY: order_slices}
    return pl.concat(frames), out, prov


def parts_fingerprint(parts: list[ScorePart]) -> str:
    """What the merged store depends on: the parts' files (their names carry their fingerprints)."""
    return fingerprint([p.scores for p in parts])
