"""The score store: parquet keyed by id, one column per score, provenance per file.

`scores/<scorer>.parquet` holds `id`, the scorer's columns (mean over seeds and checkpoints) and
one column per checkpoint named `<column>@s<seed>k<step>`. Provenance (scorer, parameters,
model fingerprint, checkpoints, package version, time) is JSON in the parquet key-value metadata
under `winnow.provenance`. `scores/rows.parquet` describes each example (domain, label, length,
preview) for selection and the report.
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


def read_provenance(path: str | Path) -> dict[str, Any] | None:
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(PROVENANCE_KEY)
    return json.loads(raw) if raw else None


def read_parquet(path: str | Path) -> pl.DataFrame:
    path = Path(path)
    if not path.exists():
        raise WinnowError(f"{path}: not found")
    try:
        return pl.read_parquet(path)
    except Exception as e:
        raise WinnowError(f"{path}: unreadable parquet ({str(e).splitlines()[0][:200]})") from None


class ScoreStore:
    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir) / "scores"

    def parts_dir(self) -> Path:
        return self.dir / "parts"

    def score_files(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("*.parquet") if p.stem != ROWS and ".tmp-" not in p.name)

    def write_scores(self, name: str, df: pl.DataFrame, provenance: dict[str, Any]) -> Path:
        if "id" not in df.columns:
            raise ValueError("score frames need an id column")
        return write_parquet(df, self.dir / f"{name}.parquet", provenance)

    def write_rows(self, df: pl.DataFrame) -> Path:
        return write_parquet(df, self.dir / f"{ROWS}.parquet")

    def rows(self) -> pl.DataFrame:
        return read_parquet(self.dir / f"{ROWS}.parquet")

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
