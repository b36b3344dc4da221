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
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

import winnow
from winnow.errors import WinnowError
from winnow.pipeline.atomic import atomic_path, fingerprint, sha256_file, write_json
from winnow.pipeline.collate import Featurizer
from winnow.pipeline.faults import fault_point
from winnow.pipeline.layout import RunLayout
from winnow.pipeline.recipe import Recipe
from winnow.pipeline.sources import InputShard, check_unchanged, iter_raw_batches
from winnow.pipeline.steps import RunContext, Step, register_step
from winnow.pipeline.store import ScoreStore, read_parquet, read_provenance


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


def emit_shards(
    recipe: Recipe,
    run_dir: Path,
    shards: list[InputShard],
    feat: Featurizer,
    fingerprints: dict[str, str],
    step_fingerprint: str | None = None,
) -> dict[str, Any]:
    out = recipe.output
    layout = RunLayout(run_dir)
    sel = read_parquet(layout.selection)
    store = ScoreStore(run_dir)
    info = store.rows().select("id", "domain", "label")
    look = sel.join(info, on="id", how="left")
    if out.score_columns:
        look = look.join(store.scores().select(["id"] + out.score_columns), on="id", how="left")
    reserved = {"weight", *out.score_columns}
    dom_rows: dict[str, list[float]] = {}
    lab_rows: dict[str, list[float]] = {}
    input_rows = written = 0
    shard_rows: list[dict[str, Any]] = []
    final = layout.shards
    with atomic_path(final) as tmp:
        tmp.mkdir(parents=True)
        roller = _Roller(tmp, out.shard_max_rows, out.shard_max_bytes)
        try:
            for shard in shards:
                check_unchanged(shard)
                n_shard = 0
                for raw in iter_raw_batches(recipe.data, shard):
                    ids = feat.row_ids(raw, shard.location)
                    n = len(ids)
                    n_shard += n
                    clash = reserved & set(raw)
                    if clash:
                        raise WinnowError(
                            f"{shard.location}: column(s) {', '.join(sorted(clash))} clash with the "
                            f"columns winnow adds; rename them in the data"
                        )
                    j = pl.DataFrame(
                        {"id": ids, "_pos": np.arange(n)}, schema={"id": pl.Utf8, "_pos": pl.Int64}
                    )
                    j = j.join(look, on="id", how="left").sort("_pos")
                    if j["kept"].null_count():
                        missing = j.filter(pl.col("kept").is_null())["id"][0]
                        raise WinnowError(
                            f"{shard.location}: row with id {missing!r} has no selection; the source "
                            f"changed since scoring — rerun `winnow run`"
                        )
                    kept = j["kept"].to_numpy()
                    mask = np.ones(n, dtype=bool) if out.include_pruned else kept
                    weight = np.where(kept, j["weight"].to_numpy(), 0.0)
                    table = pa.Table.from_pydict(raw)
                    idx = np.flatnonzero(mask)
                    table = table.take(pa.array(idx, type=pa.int64()))
                    table = table.append_column("weight", pa.array(weight[idx], type=pa.float64()))
                    for c in out.score_columns:
                        table = table.append_column(c, pa.array(j[c].to_numpy()[idx], type=pa.float64()))
                    roller.write(table)
                    written += len(idx)
                    input_rows += n
                    for d, lab, k, w in zip(
                        j["domain"].to_list(), j["label"].to_list(), kept, weight, strict=True
                    ):
                        dk, lk = "" if d is None else d, "" if lab is None else lab
                        for acc in (
                            dom_rows.setdefault(dk, [0, 0, 0.0]),
                            lab_rows.setdefault(lk, [0, 0, 0.0]),
                        ):
                            acc[0] += 1
                            acc[1] += int(k)
                            acc[2] += float(w)
                shard_rows.append(
                    {
                        "path": shard.location,
                        "sha256": shard.fingerprint if shard.kind != "hub" else None,
                        "rows": n_shard,
                    }
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
