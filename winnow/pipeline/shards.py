"""Shards out: the selected rows, streamed from the source again, with their weights.

Shards are parquet files `data-00000-of-000NN.parquet` holding the source's original columns plus
`weight` (and any score columns the recipe asks for), capped by rows and by bytes. They are
written into a temporary folder, numbered once the total is known, hashed, and the folder is
renamed to `shards/` in one step; `manifest.json` follows, also atomically. The manifest's
proportions are each domain's share of the total weight, in the forms
`datasets.interleave_datasets(probabilities=...)` and MosaicML `Stream(proportion=...)` take.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import winnow
from winnow.errors import WinnowError
from winnow.pipeline.atomic import atomic_path, fingerprint, sha256_file, tmp_name, write_json
from winnow.pipeline.collate import Featurizer
from winnow.pipeline.faults import fault_point
from winnow.pipeline.layout import RunLayout
from winnow.pipeline.recipe import Recipe
from winnow.pipeline.sources import (
    InputShard,
    check_columns,
    check_unchanged,
    iter_arrow_batches,
    python_batch,
)
from winnow.pipeline.steps import RunContext, Step, register_step
from winnow.pipeline.store import read_provenance, read_schema, sink_parquet


class _Roller:
    """Writes tables into numbered parquet files, starting a new one at the row or byte cap. Rows are
    written in row groups of up to ``group_rows`` (a read batch of 512 rows would make a file of 512-row
    groups, slow for every reader of the shards)."""

    def __init__(self, folder: Path, max_rows: int, max_bytes: int, group_rows: int = 1 << 16):
        self.folder, self.max_rows, self.max_bytes, self.group_rows = folder, max_rows, max_bytes, group_rows
        self.files: list[Path] = []
        self.writer: pq.ParquetWriter | None = None
        self.schema: pa.Schema | None = None
        self.rows = self.bytes = 0
        self.pending: list[pa.Table] = []
        self.pending_rows = 0

    def _open(self, schema: pa.Schema) -> None:
        self.close()
        path = self.folder / f"part-{len(self.files):05d}.parquet"
        self.files.append(path)
        self.writer = pq.ParquetWriter(path, schema, compression="zstd")
        self.schema, self.rows, self.bytes = schema, 0, 0

    def _flush(self) -> None:
        if self.pending:
            assert self.writer is not None
            self.writer.write_table(pa.concat_tables(self.pending), row_group_size=self.group_rows)
            self.pending, self.pending_rows = [], 0

    def write(self, table: pa.Table) -> None:
        while table.num_rows:
            if self.writer is None or self.rows >= self.max_rows or self.bytes >= self.max_bytes:
                self._open(self.schema if self.schema is not None else table.schema)
            if table.schema != self.schema:
                try:
                    table = table.cast(self.schema)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
                    self._open(table.schema)  # a new shard for a schema that cannot be cast
            per_row = max(1, table.nbytes // max(1, table.num_rows))
            room = min(self.max_rows - self.rows, max(1, (self.max_bytes - self.bytes) // per_row))
            head, table = table.slice(0, room), table.slice(room)
            self.pending.append(head)
            self.pending_rows += head.num_rows
            if self.pending_rows >= self.group_rows:
                self._flush()
            self.rows += head.num_rows
            self.bytes += head.nbytes

    def close(self) -> None:
        if self.writer is not None:
            self._flush()
            self.writer.close()
            self.writer = None


class _Lookup:
    """The emit lookup (shard, id, kept, weight, domain, label, score columns), in source order, read
    back in runs of any length as the source's batches come."""

    def __init__(self, path: Path):
        self.batches = pq.ParquetFile(path).iter_batches(batch_size=1 << 16)
        self.buf: list[pa.RecordBatch] = []
        self.have = 0

    def take(self, n: int) -> pa.Table:
        while self.have < n:
            b = next(self.batches, None)
            if b is None:
                break
            self.buf.append(b)
            self.have += b.num_rows
        t = pa.Table.from_batches(self.buf) if self.buf else None  # slices below copy nothing
        if t is None or t.num_rows < n:
            raise WinnowError(
                "emit: the source has more rows than when its ids were read; rerun `winnow run`"
            )
        head, rest = t.slice(0, n), t.slice(n)
        self.buf, self.have = rest.to_batches(), rest.num_rows
        return head

    def exhausted(self) -> bool:
        return self.have == 0 and next(self.batches, None) is None


_IDS_SCHEMA = pa.schema([("shard", pa.int32()), ("id", pa.string())])


def _check_batch(recipe: Recipe, shard: InputShard, names: list[str]) -> None:
    """A read batch's columns: those the recipe names, none that winnow adds."""
    clash = {"weight", *recipe.output.score_columns} & set(names)
    if clash:
        raise WinnowError(
            f"{shard.location}: column(s) {', '.join(sorted(clash))} clash with the "
            f"columns winnow adds; rename them in the data"
        )
    extra = [recipe.data.domain_column] if shard.domain is not None and recipe.data.domain_column else []
    check_columns(recipe.data, [*names, *extra], shard.location)


def _batch_ids(
    recipe: Recipe, shard: InputShard, feat: Featurizer, table: pa.Table, features: Any
) -> list[str]:
    """The ids of one Arrow read batch: its id column alone made Python values (decoded as the scoring
    feed decodes it), hashed as :meth:`Featurizer.row_ids` hashes it."""
    cols = feat.id_columns()
    sub_features = None
    if features is not None:
        from datasets import Features

        sub_features = Features({c: features[c] for c in cols if c in features})
    return feat.ids_of(python_batch(recipe.data, shard, table.select(cols), sub_features), shard.location)


def _with_domain(recipe: Recipe, shard: InputShard, table: pa.Table) -> pa.Table:
    """A ``data.source: {domain: source}`` shard's rows get their domain as a column (as the feed's)."""
    col = recipe.data.domain_column
    if shard.domain is None or col is None:
        return table
    if col in table.column_names:
        table = table.drop_columns([col])
    return table.append_column(col, pa.array([shard.domain] * table.num_rows, type=pa.string()))


def _read_ids(recipe: Recipe, shards: list[InputShard], feat: Featurizer, path: Path) -> None:
    """Every row's id, with its shard, to ``path``, in source order: for a store without
    ``scores/order.parquet`` (merged by a winnow before it)."""
    with pq.ParquetWriter(path, _IDS_SCHEMA, compression="zstd") as w:
        for si, shard in enumerate(shards):
            check_unchanged(shard)
            for _, table, features in iter_arrow_batches(recipe.data, shard):
                _check_batch(recipe, shard, table.column_names)
                ids = _batch_ids(recipe, shard, feat, table, features)
                w.write_table(
                    pa.Table.from_arrays(
                        [pa.array(np.full(len(ids), si, dtype=np.int32)), pa.array(ids, type=pa.string())],
                        schema=_IDS_SCHEMA,
                    )
                )


def _order_current(layout: RunLayout) -> bool:
    """Whether ``scores/order.parquet`` is the one the store's current merge wrote."""
    if not layout.order.exists() or not layout.rows.exists():
        return False
    try:
        mine = (read_provenance(layout.order) or {}).get("step_fingerprint")
        rows = (read_provenance(layout.rows) or {}).get("step_fingerprint")
    except Exception:  # noqa: BLE001  (unreadable: emit reads the ids from the source instead)
        return False
    return mine is not None and mine == rows


def _stat(shard: InputShard) -> tuple[int, int] | None:
    if shard.kind != "file":
        return None
    st = os.stat(shard.location)
    return st.st_size, st.st_mtime_ns


def _join(recipe: Recipe, layout: RunLayout, ids: Path, out: Path) -> None:
    """Every row of the source (``ids``, in source order) joined with its selection, domain, label and
    score columns: one streaming hash join over parquet (polars), written to ``out`` in source order."""
    cols = recipe.output.score_columns
    for path, need in (
        (layout.selection, ["id", "kept", "weight"]),
        (layout.rows, ["id", "domain", "label"]),
    ):
        missing = [c for c in need if c not in read_schema(path).names]
        if missing:
            raise WinnowError(f"{path}: no column {', '.join(map(repr, missing))}; rerun `winnow run`")
    look = (
        pl.scan_parquet(layout.selection)
        .select("id", "kept", "weight")
        .join(pl.scan_parquet(layout.rows).select("id", "domain", "label"), on="id", how="left")
    )
    if cols:
        files = layout.score_files()
        if not files:
            raise WinnowError(f"{layout.scores}: no score files; run `winnow run RECIPE` first")
        found: dict[str, Path] = {}
        for f in files:
            for c in read_schema(f).names:
                if c in cols and c not in found:
                    found[c] = f
        for c in cols:
            if c not in found:
                raise WinnowError(f"output.score_columns: no score column {c!r} in {layout.scores}")
        for f in sorted(set(found.values())):
            want = [c for c in cols if found[c] == f]
            look = look.join(pl.scan_parquet(f).select(["id", *want]), on="id", how="left")
    plan = pl.scan_parquet(ids).join(look, on="id", how="left", maintain_order="left")
    sink_parquet(plan.select(["shard", "id", "kept", "weight", "domain", "label", *cols]), out)


def _group_table(lookup: Path, column: str) -> dict[str, list[float]]:
    """{group: [input rows, kept rows, weight sum]} over every row of the source."""
    g = (
        pl.scan_parquet(lookup)
        .group_by(pl.col(column).fill_null(""))
        .agg(
            pl.len().alias("n"),
            pl.col("kept").cast(pl.Int64).sum().alias("k"),
            pl.when(pl.col("kept")).then(pl.col("weight")).otherwise(0.0).sum().alias("w"),
        )
        .collect(engine="streaming")
    )
    return {r[0]: [int(r[1]), int(r[2]), float(r[3])] for r in g.iter_rows()}


def emit_shards(
    recipe: Recipe,
    run_dir: Path,
    shards: list[InputShard],
    feat: Featurizer,
    fingerprints: dict[str, str],
    step_fingerprint: str | None = None,
) -> dict[str, Any]:
    """The selected rows, streamed from the source again, into ``shards/`` and ``manifest.json``.

    Out of core, one pass over the source: merge-scores wrote every row's shard and id in source order
    (``scores/order.parquet``); one streaming join of those ids with the selection and the store gives every
    row its kept flag, weight, domain, label and score columns, in source order, on disk (``_join``); then
    the source's Arrow read batches are taken (never made Python values) with the joined rows alongside.
    An input file's bytes are checked against its sha256 before it is read and its size and mtime after,
    so its ids need not be hashed again; rows of other sources (Arrow folders, the Hub) are hashed and
    checked against the joined ids batch by batch. A store merged before ``order.parquet`` existed has its
    ids read from the source first (``_read_ids``). Memory is set by the read batch and the join's hash
    table of the selection, never by a lookup per batch (the implementation before joined each 512-row
    batch against the whole selection: quadratic in rows)."""
    out = recipe.output
    layout = RunLayout(run_dir)
    input_rows = written = 0
    final = layout.shards
    scratch = tmp_name(layout.root / "emit-scratch")
    scratch.mkdir(parents=True)
    shard_rows: list[dict[str, Any]] = []
    try:
        if _order_current(layout):
            ids_path = layout.order
        else:
            ids_path = scratch / "ids.parquet"
            _read_ids(recipe, shards, feat, ids_path)
        lookup = scratch / "lookup.parquet"
        _join(recipe, layout, ids_path, lookup)
        missing = (
            pl.scan_parquet(lookup).filter(pl.col("kept").is_null()).select("shard", "id").head(1).collect()
        )
        if missing.height:
            raise WinnowError(
                f"{shards[missing['shard'][0]].location}: row with id {missing['id'][0]!r} has no selection; "
                f"the source changed since scoring — rerun `winnow run`"
            )
        dom_rows = _group_table(lookup, "domain")
        lab_rows = _group_table(lookup, "label")
        with atomic_path(final) as tmp:
            tmp.mkdir(parents=True)
            roller = _Roller(tmp, out.shard_max_rows, out.shard_max_bytes)
            rows = _Lookup(lookup)
            try:
                for si, shard in enumerate(shards):
                    check_unchanged(shard)
                    before, n_shard = _stat(shard), 0
                    for _, table, features in iter_arrow_batches(recipe.data, shard):
                        _check_batch(recipe, shard, table.column_names)
                        j = rows.take(table.num_rows)
                        shard_col = j.column("shard")
                        if pc.min(shard_col).as_py() != si or pc.max(shard_col).as_py() != si:
                            raise WinnowError(
                                f"{shard.location}: has other rows than when it was scored; rerun `winnow run`"
                            )
                        if (
                            before is None
                            and _batch_ids(recipe, shard, feat, table, features) != j.column("id").to_pylist()
                        ):
                            raise WinnowError(
                                f"{shard.location}: changed while its shards were written; rerun `winnow run`"
                            )
                        table = _with_domain(recipe, shard, table)
                        kept = j.column("kept").to_numpy(zero_copy_only=False).astype(bool)
                        mask = np.ones(len(kept), dtype=bool) if out.include_pruned else kept
                        weight = np.where(kept, j.column("weight").to_numpy(zero_copy_only=False), 0.0)
                        idx = np.flatnonzero(mask)
                        table = table.take(pa.array(idx, type=pa.int64()))
                        table = table.append_column("weight", pa.array(weight[idx], type=pa.float64()))
                        for c in out.score_columns:
                            v = j.column(c).to_numpy(zero_copy_only=False).astype(np.float64)
                            table = table.append_column(c, pa.array(v[idx], type=pa.float64()))
                        roller.write(table)
                        written += len(idx)
                        n_shard += len(kept)
                    if before is not None and _stat(shard) != before:
                        raise WinnowError(
                            f"{shard.location}: changed while its shards were written; rerun `winnow run`"
                        )
                    input_rows += n_shard
                    shard_rows.append(
                        {
                            "path": shard.location,
                            "sha256": shard.fingerprint if shard.kind != "hub" else None,
                            "rows": n_shard,
                        }
                    )
                if not rows.exhausted():
                    raise WinnowError(
                        "emit: the source has fewer rows than when its ids were read; rerun `winnow run`"
                    )
            finally:
                roller.close()
            if written == 0:
                raise WinnowError("select: the selection keeps no rows; nothing to write")
            total = len(roller.files)
            shard_list = []
            for i, p in enumerate(roller.files):
                name = f"data-{i:05d}-of-{total:05d}.parquet"
                os.replace(p, tmp / name)
                meta = pq.read_metadata(tmp / name)
                shard_list.append(
                    {
                        "path": f"shards/{name}",
                        "rows": meta.num_rows,
                        "bytes": (tmp / name).stat().st_size,
                        "sha256": sha256_file(tmp / name),
                    }
                )
            columns = pq.read_schema(tmp / f"data-00000-of-{total:05d}.parquet").names
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    def table_of(acc: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
        tot = sum(v[2] for v in acc.values()) or 1.0
        return {
            k: {
                "input_rows": int(v[0]),
                "kept_rows": int(v[1]),
                "weight_sum": round(v[2], 6),
                "proportion": v[2] / tot,
            }
            for k, v in sorted(acc.items())
        }

    domains = table_of(dom_rows) if recipe.data.domain_column else {}
    labels = table_of(lab_rows) if recipe.data.label_column else {}
    names = [k for k in domains if domains[k]["weight_sum"] > 0]
    manifest = {
        "winnow_version": winnow.__version__,
        "run": recipe.name,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "recipe_fingerprint": fingerprints["recipe"],
        "input": {"fingerprint": fingerprints["input"], "source": recipe.data.source, "shards": shard_rows},
        "model": {
            "task": recipe.model.task,
            "fingerprint": fingerprints["model"],
            "source": recipe.model.path or "config",
        },
        "scorers": [s.model_dump(mode="json") for s in recipe.scoring.scorers],
        "selector": recipe.select.model_dump(mode="json"),
        "counts": {
            "input_rows": input_rows,
            "kept_rows": int(sum(v[1] for v in dom_rows.values())),
            "pruned_rows": input_rows - int(sum(v[1] for v in dom_rows.values())),
            "written_rows": written,
        },
        "domains": domains,
        "labels": labels,
        "interleave": {"names": names, "probabilities": [domains[k]["proportion"] for k in names]},
        "mosaic_streams": [{"name": k, "proportion": domains[k]["proportion"]} for k in names],
        "shards": shard_list,
        "columns": columns,
        "weight_column": "weight",
        "step_fingerprint": step_fingerprint,
    }
    dpp = (read_provenance(layout.selection) or {}).get("dpp")
    if dpp:
        manifest["diversity"] = dpp
    write_json(layout.manifest, manifest)
    return {"shards": len(shard_list), "written_rows": written, "input_rows": input_rows}


def check_shards(run_dir: Path, step_fingerprint: str | None = None) -> bool:
    """True when manifest.json (of this step fingerprint) and every shard it lists exist, sizes intact."""
    import json

    m = RunLayout(run_dir).manifest
    if not m.exists():
        return False
    try:
        man = json.loads(m.read_text())
    except json.JSONDecodeError:
        return False
    if step_fingerprint is not None and man.get("step_fingerprint") != step_fingerprint:
        return False
    return all(
        (run_dir / s["path"]).exists() and (run_dir / s["path"]).stat().st_size == s["bytes"]
        for s in man.get("shards", [])
    )


@register_step
class EmitStep(Step):
    """The selected rows, streamed from the source again with their weights (``emit``): ``shards/`` and
    ``manifest.json``. ``fingerprints``: the recipe's, the input's and the model's, for the manifest."""

    name = "emit"

    def fingerprint(self, ctx: RunContext, select_fp: str = "", fingerprints: Any = None) -> str:
        # where the run folder is (output.dir) is not what it holds: a moved folder's outputs stay current
        return fingerprint("emit", select_fp, ctx.config.output.model_dump(exclude={"dir"}), fingerprints)

    def run(self, ctx: RunContext, fp: str, fingerprints: Any = None, **_: Any) -> dict[str, Any]:
        fault_point("emit")
        recipe = ctx.setup()
        feat, _, _ = ctx.featurizer()
        return emit_shards(
            recipe, ctx.root, ctx.input_shards(), feat, fingerprints or {}, step_fingerprint=fp
        )

    def present(self, ctx: RunContext, result: Any, fp: str) -> bool:
        return check_shards(ctx.root, fp)
