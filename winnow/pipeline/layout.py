"""The run folder's layout: every path winnow writes or reads under ``RUN/``, in one place.

Writers and readers (the flow's steps, the report, ``winnow inspect``, versions) reach the run folder
through :class:`RunLayout`; nobody spells a file name of the run folder anywhere else. The provenance
key of parquet metadata and the per-checkpoint score column format (``<column>@s<seed>k<step>``) live
here too, with the parser the report uses.

::

    RUN/
      config.yaml  run.json                       the recipe as run; the run's identity
      tokenizer-<fp12>/                           a tokenizer trained on the data
      checkpoints/<fp12>/seed-S/step-K/            proxy checkpoints (model.safetensors, state.json, ...)
      scores/<scorer>.parquet  scores/rows.parquet the score store
      scores/previews.parquet                     id, preview: read by the report alone
      scores/order.parquet                        shard, id of every input row in source order: read by emit
      scores/parts/{scores,rows}-<shard>-<fp12>.parquet      per input shard, until merged (then removed)
      scores/cache/<fp16>/shard-<id12>.parquet    content-keyed score cache, one compacted file per shard
      embeddings/{embeddings.npy, ids.parquet, parts/}        select.method dpp
      influence/{features.npy, ids.parquet, neighbours.parquet, parts/}
      mixture.json  mixture_trajectory.parquet  mixture/model  mixture/tokens-<fp12>/   (domains' tokens)
      selection.parquet  shards/  manifest.json  report.html  summary.md
      v0001/ ...                                  frozen versions (version.json, ...)
      .winnow/steps/<step>-<fp>.json              what each finished step returned (JSON, relative paths)
      .winnow/lock                                held (flock) by the run writing the folder
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

PROVENANCE_KEY = b"winnow.provenance"  # parquet key-value metadata: JSON provenance of the file
CHECKPOINT_COLUMN = re.compile(r"^(?P<base>.+)@s(?P<seed>\d+)k(?P<step>\d+)$")
VERSION_NAME = re.compile(r"^v(\d{4,})$")
VERSION_FILE = "version.json"
# what a version folder freezes from the run folder, under the same names (its shards are hard links);
# a version folder is read through a RunLayout of its own
VERSIONED_FILES = ("manifest.json", "selection.parquet", "mixture.json")


def checkpoint_suffix(seed: int, step: int) -> str:
    """``@s<seed>k<step>``: the suffix of a score column computed at one proxy checkpoint."""
    return f"@s{seed}k{step}"


def checkpoint_column(base: str, seed: int, step: int) -> str:
    return base + checkpoint_suffix(seed, step)


def parse_checkpoint_column(name: str) -> tuple[str, int, int] | None:
    """``(base, seed, step)`` of a per-checkpoint score column, or None for any other column."""
    m = CHECKPOINT_COLUMN.match(name)
    return (m["base"], int(m["seed"]), int(m["step"])) if m else None


def version_name(n: int) -> str:
    return f"v{n:04d}"


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run folder (``root``)."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    # -- identity and recipe
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    # -- the steps' records (what a finished step returned; JSON, paths relative to the run folder)
    @property
    def step_records(self) -> Path:
        return self.root / ".winnow" / "steps"

    def step_record(self, step: str, fp: str) -> Path:
        return self.step_records / f"{step}-{fp}.json"

    @property
    def lock(self) -> Path:
        return self.root / ".winnow" / "lock"

    def path(self, rel: str | Path) -> Path:
        """A path recorded relative to the run folder (absolute ones, outside it, are kept)."""
        return self.root / rel

    def rel(self, path: str | Path) -> str:
        """A path inside the run folder as the folder records it: relative, so that the folder can move."""
        return str(Path(path).relative_to(self.root))

    # -- tokenizer and proxy checkpoints
    def tokenizer(self, fp: str) -> Path:
        return self.root / f"tokenizer-{fp[:12]}"

    def trained_tokenizers(self) -> list[Path]:
        return sorted(p for p in self.root.glob("tokenizer-*") if p.is_dir() and ".tmp-" not in p.name)

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, train_fp: str, seed: int, step: int) -> Path:
        return self.checkpoints / train_fp[:12] / f"seed-{seed}" / f"step-{step}"

    # -- the score store
    @property
    def scores(self) -> Path:
        return self.root / "scores"

    def score_file(self, name: str) -> Path:
        return self.scores / f"{name}.parquet"

    @property
    def rows(self) -> Path:
        return self.score_file("rows")

    @property
    def previews(self) -> Path:
        """id, preview (the first 500 characters of each row's text): read by the report alone."""
        return self.score_file("previews")

    @property
    def order(self) -> Path:
        """shard, id of every input row, in source order, repeats included: what emit needs of the source
        besides its rows, so that it reads the source once and hashes nothing (written by merge-scores)."""
        return self.score_file("order")

    def store_files(self) -> list[Path]:
        """The files of the store that are not score files (rows.parquet, previews.parquet)."""
        return [self.rows, self.previews]

    def score_files(self) -> list[Path]:
        """Every score file of the store (not rows, previews or order, not an unfinished write)."""
        return sorted(
            p
            for p in self.scores.glob("*.parquet")
            if p.stem not in ("rows", "previews", "order") and ".tmp-" not in p.name
        )

    @property
    def score_parts(self) -> Path:
        return self.scores / "parts"

    def score_part(self, shard: int, fp: str) -> Path:
        return self.score_parts / f"scores-{shard:05d}-{fp[:12]}.parquet"

    def rows_part(self, shard: int, fp: str) -> Path:
        return self.score_parts / f"rows-{shard:05d}-{fp[:12]}.parquet"

    @property
    def score_cache_root(self) -> Path:
        return self.scores / "cache"

    def score_cache(self, cache_fp: str) -> Path:
        return self.score_cache_root / cache_fp[:16]

    def shard_cache(self, cache_fp: str, shard_id: str) -> Path:
        """One input shard's compacted cache file (``shard_id``: ``score_cache.shard_cache_id``)."""
        return self.score_cache(cache_fp) / f"shard-{shard_id}.parquet"

    # -- embeddings (select.method dpp)
    @property
    def embeddings(self) -> Path:
        return self.root / "embeddings"

    @property
    def embedding_vectors(self) -> Path:
        return self.embeddings / "embeddings.npy"

    @property
    def embedding_ids(self) -> Path:
        return self.embeddings / "ids.parquet"

    def embedding_part(self, shard: int, fp: str) -> tuple[Path, Path]:
        """(vectors .npy, ids .parquet) of one input shard."""
        parts = self.embeddings / "parts"
        return parts / f"emb-{shard:05d}-{fp[:12]}.npy", parts / f"ids-{shard:05d}-{fp[:12]}.parquet"

    # -- influence
    @property
    def influence(self) -> Path:
        return self.root / "influence"

    @property
    def influence_scores(self) -> Path:
        return self.score_file("influence")

    @property
    def influence_features(self) -> Path:
        return self.influence / "features.npy"

    @property
    def influence_ids(self) -> Path:
        return self.influence / "ids.parquet"

    @property
    def neighbours(self) -> Path:
        return self.influence / "neighbours.parquet"

    def influence_part(self, role: str, shard: int, fp: str) -> tuple[Path, Path]:
        """(features .npy, meta .parquet) of one shard; ``role`` is ``train`` or ``target``."""
        tag = "target" if role == "target" else "feat"
        parts = self.influence / "parts"
        return parts / f"{tag}-{shard:05d}-{fp[:12]}.npy", parts / f"{tag}meta-{shard:05d}-{fp[:12]}.parquet"

    # -- mixtures
    @property
    def mixture_json(self) -> Path:
        return self.root / "mixture.json"

    @property
    def mixture_trajectory(self) -> Path:
        return self.root / "mixture_trajectory.parquet"

    @property
    def mixture_model(self) -> Path:
        return self.root / "mixture" / "model"

    def mixture_tokens(self, fp: str) -> Path:
        """The mixture run's rows, tokenized, by domain (mixtures/loop.py, DomainRows)."""
        return self.root / "mixture" / f"tokens-{fp[:12]}"

    # -- selection and outputs
    @property
    def selection(self) -> Path:
        return self.root / "selection.parquet"

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def summary(self) -> Path:
        return self.root / "summary.md"

    # -- versions
    def version(self, n: int) -> Path:
        return self.root / version_name(n)

    def versions(self) -> list[tuple[int, Path]]:
        """``(n, folder)`` of every complete version, in order."""
        out = []
        for d in self.root.glob("v*"):
            m = VERSION_NAME.match(d.name)
            if m and d.is_dir() and (d / VERSION_FILE).exists():
                out.append((int(m.group(1)), d))
        return sorted(out)
