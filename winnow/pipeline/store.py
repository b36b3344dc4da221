"""The score store: parquet keyed by id, one column per score, provenance per file.

`scores/<scorer>.parquet` holds `id`, the scorer's columns (mean over seeds and checkpoints) and
one column per checkpoint named `<column>@s<seed>k<step>`. Provenance (scorer, parameters,
model fingerprint, checkpoints, package version, time) is JSON in the parquet key-value metadata
under `winnow.provenance`. `scores/rows.parquet` describes each example (domain, label, length) for
selection and the report; `scores/previews.parquet` holds the first characters of its text, which the
report alone reads (for a handful of ids), so nothing else pays for them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from winnow.errors import WinnowError
from winnow.pipeline.atomic import atomic_path, json_safe
from winnow.pipeline.layout import RunLayout

PROVENANCE_KEY = b"winnow.provenance"
ROWS = "rows"


def write_parquet(df: pl.DataFrame, path: str | Path, provenance: dict[str, Any] | None = None) -> Path:
    """Write a polars frame atomically, with provenance in the parquet metadata."""
    table = df.to_arrow()
    if provenance is not None:
        meta = dict(table.schema.metadata or {})
        meta[PROVENANCE_KEY] = json.dumps(json_safe(provenance), default=str).encode()
        table = table.replace_schema_metadata(meta)
    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


def sink_parquet(
    lf: pl.LazyFrame, path: str | Path, provenance: dict[str, Any] | None = None, row_group: int = 1 << 16
) -> Path:
    """Write a lazy query's result atomically, batch by batch (polars' streaming engine: the result is
    never held whole), with provenance in the parquet metadata. Row groups hold ``row_group`` rows
    whatever batches the engine gives, so the same rows make the same file."""
    path = Path(path)
    meta = None
    if provenance is not None:
        meta = {PROVENANCE_KEY: json.dumps(json_safe(provenance), default=str).encode()}
    with atomic_path(path) as tmp:
        writer: pq.ParquetWriter | None = None
        buf: list[pa.Table] = []
        held = 0
        try:
            for batch in lf.collect_batches(chunk_size=row_group, engine="streaming"):
                table = batch.to_arrow()
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema.with_metadata(meta), compression="zstd")
                buf.append(table.cast(writer.schema))
                held += table.num_rows
                while held >= row_group:
                    whole = pa.concat_tables(buf)
                    writer.write_table(whole.slice(0, row_group), row_group_size=row_group)
                    buf, held = [whole.slice(row_group)], whole.num_rows - row_group
            if writer is None:  # no rows: an empty file of the query's schema
                empty = lf.head(0).collect().to_arrow()
                pq.write_table(empty.replace_schema_metadata(meta), tmp, compression="zstd")
            elif held:
                writer.write_table(pa.concat_tables(buf), row_group_size=row_group)
        finally:
            if writer is not None:
                writer.close()
    return path


def read_provenance(path: str | Path) -> dict[str, Any] | None:
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(PROVENANCE_KEY)
    return json.loads(raw) if raw else None


def read_parquet(path: str | Path, columns: list[str] | None = None) -> pl.DataFrame:
    """A parquet file (only ``columns`` of it, when given); one line naming the file when it is missing,
    unreadable or lacks a column."""
    path = Path(path)
    if not path.exists():
        raise WinnowError(f"{path}: not found")
    if columns is not None:
        missing = [c for c in columns if c not in read_schema(path).names]
        if missing:
            raise WinnowError(f"{path}: no column {', '.join(map(repr, missing))}")
    try:
        return pl.read_parquet(path, columns=columns)
    except Exception as e:
        raise WinnowError(f"{path}: unreadable parquet ({str(e).splitlines()[0][:200]})") from None


def read_schema(path: str | Path) -> pa.Schema:
    try:
        return pq.read_schema(path)
    except Exception as e:
        raise WinnowError(f"{path}: unreadable parquet ({str(e).splitlines()[0][:200]})") from None


class ScoreStore:
    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir) / "scores"
        self.layout = RunLayout(run_dir)

    def score_files(self) -> list[Path]:
        return self.layout.score_files()

    def write_scores(self, name: str, df: pl.DataFrame, provenance: dict[str, Any]) -> Path:
        if "id" not in df.columns:
            raise ValueError("score frames need an id column")
        return write_parquet(df, self.dir / f"{name}.parquet", provenance)

    def write_rows(self, df: pl.DataFrame) -> Path:
        return write_parquet(df, self.dir / f"{ROWS}.parquet")

    def rows(self, columns: list[str] | None = None) -> pl.DataFrame:
        """rows.parquet, or only ``columns`` of it (the others are never read)."""
        return read_parquet(self.dir / f"{ROWS}.parquet", columns)

    def scores(self) -> pl.DataFrame:
        """All score columns joined on id (rows without a score get null)."""
        frames = [read_parquet(p) for p in self.score_files()]
        if not frames:
            raise WinnowError(f"{self.dir}: no score files; run `winnow run RECIPE` first")
        out = frames[0]
        for f in frames[1:]:
            out = out.join(f, on="id", how="full", coalesce=True)
        return out

    def provenance(self) -> dict[str, dict[str, Any] | None]:
        return {p.stem: read_provenance(p) for p in self.score_files()}


def made_by(run_dir: str | Path, files: list[str], fp: str) -> bool:
    """Whether every file (relative to the run folder) exists and records ``fp`` as its step fingerprint."""
    root = Path(run_dir)
    return all(
        (root / f).exists() and (read_provenance(root / f) or {}).get("step_fingerprint") == fp for f in files
    )


def empty_table_like(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()
