"""The content-keyed score cache, one compacted file per input shard, and its garbage collection.

``scores/cache/<fp16>/shard-<id12>.parquet`` holds ``key`` (what the model sees, hashed: see
``collate.example_key``) and every score column, for exactly the examples that input shard held when it
was last scored under the cache fingerprint ``fp`` (the scorers, the checkpoints, the tokenizer, the
example columns, the package version). ``id12`` names the shard by what it reads (kind, location,
arrow part, domain), not by its position among the input's files, so a file added in front of it does
not move it. A shard's scoring task reads its own file alone, so its memory is set by the shard's rows,
never by the cache's; an example that moved to another input file is scored again there.

After every rescoring the shard's file is rewritten with the shard's current examples (the new scores
plus the entries it reused; entries of rows that left the shard are dropped): compaction per shard.
``collect_garbage`` then removes what no kept run refers to: cache folders of other fingerprints than
the current run's and the ones the run folder's versions record (``version.json``'s
``cache_fingerprint``), shard files of inputs the current run no longer reads, and fragments in the
layout older winnow wrote (``frag-*.parquet``, one per scoring that found new rows, never compacted).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import polars as pl

from winnow.pipeline.layout import VERSION_FILE, RunLayout
from winnow.pipeline.sources import InputShard
from winnow.pipeline.store import read_parquet, write_parquet


def shard_cache_id(shard: InputShard) -> str:
    """The name of a shard's cache file: what it reads, not where it sits in the input's order."""
    what = json.dumps([shard.kind, shard.location, shard.part, shard.domain])
    return hashlib.sha256(what.encode()).hexdigest()[:12]


def read_shard_cache(layout: RunLayout, cache_fp: str, shard: InputShard) -> pl.DataFrame | None:
    """The cached scores of the examples this shard held when it was last scored (None: none)."""
    path = layout.shard_cache(cache_fp, shard_cache_id(shard))
    return read_parquet(path) if path.exists() else None


def write_shard_cache(layout: RunLayout, cache_fp: str, shard: InputShard, entries: pl.DataFrame) -> Path:
    """Replace the shard's cache file by ``entries`` (``key`` unique, score columns), atomically."""
    return write_parquet(
        entries,
        layout.shard_cache(cache_fp, shard_cache_id(shard)),
        {"cache_fingerprint": cache_fp, "shard": shard.to_dict()},
    )


def referenced_fingerprints(layout: RunLayout) -> set[str]:
    """The cache fingerprints the run folder's versions record."""
    out = set()
    for _, d in layout.versions():
        try:
            fp = json.loads((d / VERSION_FILE).read_text()).get("cache_fingerprint")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(fp, str):
            out.add(fp[:16])
    return out


def collect_garbage(layout: RunLayout, cache_fp: str, shards: list[InputShard]) -> list[str]:
    """Remove cache files no kept run refers to (see the module's docstring); returns what went, relative
    to the run folder."""
    root = layout.score_cache_root
    if not root.is_dir():
        return []
    keep = referenced_fingerprints(layout) | {cache_fp[:16]}
    live = {layout.shard_cache(cache_fp, shard_cache_id(s)).name for s in shards}
    gone = []
    for d in sorted(root.iterdir()):
        if not d.is_dir():
            continue
        if d.name not in keep:
            shutil.rmtree(d, ignore_errors=True)
            gone.append(layout.rel(d))
            continue
        for f in sorted(d.glob("*.parquet")):
            legacy = f.name.startswith("frag-")
            stale = d.name == cache_fp[:16] and f.name.startswith("shard-") and f.name not in live
            if legacy or stale:
                f.unlink(missing_ok=True)
                gone.append(layout.rel(f))
    return gone
