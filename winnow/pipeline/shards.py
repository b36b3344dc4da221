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
import pyarrow.parquet as pq

import winnow
from winnow.errors import WinnowError
from winnow.pipeline.atomic import atomic_path, fingerprint, sha256_file, tmp_name, write_json
from winnow.pipeline.collate import Featurizer
from winnow.pipeline.faults import fault_point
from winnow.pipeline.layout import RunLayout
from winnow.pipeline.recipe import Recipe
from winnow.pipeline.sources import InputShard, check_unchanged, iter_raw_batches
from winnow.pipeline.steps import RunContext, Step, register_step
from winnow.pipeline.store import read_provenance, read_schema, sink_parquet


class _Roller:
    """Writes tables into numbered parquet files, starting a new one at the row or byte cap."""

    def __init__(self, folder: Path, max_rows: int, max_bytes: int):
        self.folder, self.max_rows, self.max_bytes = folder, max_rows, max_bytes
        self.files: list[Path] = []
        self.writer: pq.ParquetWriter | None = None
        self.schema: pa.Schema | None = None
        self.rows = self.bytes = 0

    def _open(self, schema: pa.Schema) -> None:
        self.close()
        path = self.folder / f"part-{len(self.files):05d}.parquet"
        self.files.append(path)
        self.writer = pq.ParquetWriter(path, schema, compression="zstd")
        self.schema, self.rows, self.bytes = schema, 0, 0

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
            assert self.writer is not None
            self.writer.write_table(head)
            self.rows += head.num_rows
            self.bytes += head.nbytes

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class _Lookup:
    """The emit lookup (shard, pos, id, kept, weight, domain, label, score columns), in source order, read
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


_IDS_SCHEMA = pa.schema([("shard", pa.int32()), ("pos", pa.int64()), ("id", pa.string())])


def _read_ids(recipe: Recipe, shards: list[InputShard], feat: Featurizer, path: Path) -> list[dict[str, Any]]:
    """Pass 1: every row's id, with its shard and position, to ``path``; the input shards' rows."""
    reserved = {"weight", *recipe.output.score_columns}
    shard_rows = []
    with pq.ParquetWriter(path, _IDS_SCHEMA, compression="zstd") as w:
        for si, shard in enumerate(shards):
            check_unchanged(shard)
            n_shard = 0
            for raw in iter_raw_batches(recipe.data, shard):
                clash = reserved & set(raw)
                if clash:
                    raise WinnowError(
                        f"{shard.location}: column(s) {', '.join(sorted(clash))} clash with the "
                        f"columns winnow adds; rename them in the data"
                    )
                ids = feat.row_ids(raw, shard.location)
                n = len(ids)
                pos = pa.array(np.arange(n_shard, n_shard + n), type=pa.int64())
                w.write_table(
                    pa.Table.from_arrays(
                        [pa.array(np.full(n, si, dtype=np.int32)), pos, pa.array(ids, type=pa.string())],
                        schema=_IDS_SCHEMA,
                    )
                )
                n_shard += n
            shard_rows.append(
                {
                    "path": shard.location,
                    "sha256": shard.fingerprint if shard.kind != "hub" else None,
                    "rows": n_shard,
                }
            )
    return shard_rows


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
    sink_parquet(plan.select(["shard", "pos", "id", "kept", "weight", "domain", "label", *cols]), out)


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

    Out of core: pass 1 reads every row's id (``_read_ids``); one streaming join of those ids with the
    selection and the store gives every row its kept flag, weight, domain, label and score columns, in
    source order, on disk (``_join``); pass 2 reads the source again and takes the joined rows alongside,
    batch by batch. Memory is set by the read batch and the join's hash table of the selection, never by
    a lookup per batch (the implementation before joined each 512-row batch against the whole
    selection: quadratic in rows)."""
    out = recipe.output
    layout = RunLayout(run_dir)
    input_rows = written = 0
    final = layout.shards
    scratch = tmp_name(layout.root / "emit-scratch")
    scratch.mkdir(parents=True)
    try:
        shard_rows = _read_ids(recipe, shards, feat, scratch / "ids.parquet")
        lookup = scratch / "lookup.parquet"
        _join(recipe, layout, scratch / "ids.parquet", lookup)
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
                for shard in shards:
                    for raw in iter_raw_batches(recipe.data, shard):
                        table = pa.Table.from_pydict(raw)
                        j = rows.take(table.num_rows)
                        ids = feat.row_ids(raw, shard.location)
                        if ids != j.column("id").to_pylist():
                            raise WinnowError(
                                f"{shard.location}: changed while its shards were written; rerun `winnow run`"
                            )
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
                        input_rows += len(kept)
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
