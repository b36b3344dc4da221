"""Data in: any source `datasets` can read, streamed in batches, never whole in memory.

A source is split into *input shards*, the unit of work of the flows (one Prefect task each):

- local files (`data.source` is a glob or a comma-separated list of globs): one shard per file,
  read with `datasets.load_dataset(<json|parquet|csv>, data_files=[file], streaming=True)`;
  the shard's fingerprint is the sha256 of the file's bytes;
- a `save_to_disk` folder: one shard per arrow file of the chosen split, read memory-mapped;
- a hub id (where the network allows): the streaming dataset's own shards (`n_shards`), read with
  `IterableDataset.shard`; fingerprint from the id, split and shard index (no content hash exists
  before reading, so a changed hub dataset needs `--set data.split=...` or a new run name).

With ``data.source: {domain: source, ...}`` each domain's source is resolved as above and its shards are
tagged with the domain, which is written into every row's ``data.domain_column`` (default ``domain``).

Example ids are the id column when the recipe names one, else the first 20 hex digits of the
sha256 of the example's content (text, token ids or pixels): exact duplicates share an id, and so
a score and a decision.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from winnow.errors import WinnowError
from winnow.pipeline.atomic import fingerprint, sha256_file
from winnow.pipeline.recipe import DataConfig

_EXT_FORMAT = {
    ".jsonl": "json",
    ".json": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".tsv": "csv",
}


@dataclass(frozen=True)
class InputShard:
    index: int
    kind: str  # "file" | "disk" | "hub"
    location: str  # file path, folder, or hub id
    format: str
    fingerprint: str
    part: int = 0  # arrow file / hub shard index
    parts: int = 1
    domain: str | None = None  # set when data.source is {domain: source}: every row gets this domain

    @property
    def name(self) -> str:
        if self.kind == "file":
            return Path(self.location).name
        return f"{Path(self.location).name}#{self.part:05d}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputShard:
        return cls(**d)


def _format_of(path: str, declared: str) -> str:
    if declared in ("json", "parquet", "csv"):
        return declared
    name = path.lower()
    for comp in (".gz", ".bz2", ".xz", ".zst"):
        name = name.removesuffix(comp)
    ext = os.path.splitext(name)[1]
    fmt = _EXT_FORMAT.get(ext)
    if fmt is None:
        raise WinnowError(
            f"{path}: cannot tell the format from the extension {ext or '(none)'!r}; "
            f"set data.format to json, parquet or csv"
        )
    return fmt


def list_shards(data: DataConfig) -> list[InputShard]:
    """Resolve `data.source` into input shards, in a stable order (per-domain sources: in the mapping's
    order, each shard tagged with its domain)."""
    if isinstance(data.source, dict):
        out: list[InputShard] = []
        for name, src in data.source.items():
            try:
                sub = list_shards(data.model_copy(update={"source": src}))
            except WinnowError as e:
                raise WinnowError(str(e).replace("data.source:", f"data.source.{name}:", 1)) from None
            for sh in sub:
                out.append(replace(sh, index=len(out), domain=name))
        return out
    src = data.source.strip()
    if data.format == "hub":
        return _hub_shards(data)
    if data.format == "disk" or (
        os.path.isdir(src)
        and (Path(src) / "dataset_info.json").exists()
        or os.path.isdir(src)
        and (Path(src) / "dataset_dict.json").exists()
    ):
        return _disk_shards(data)
    patterns = [p.strip() for p in src.split(",") if p.strip()]
    files: list[str] = []
    for pat in patterns:
        files.extend(_match(pat, data, single=len(patterns) == 1))
    seen: dict[str, str] = {}
    shards = []
    for f in files:
        real = os.path.realpath(f)
        if real in seen:  # one file reached twice (a symlink, overlapping globs): read once
            continue
        seen[real] = f
        if os.path.getsize(f) == 0:
            raise WinnowError(f"{f}: the file is empty")
        fmt = _format_of(f, data.format)
        shards.append(
            InputShard(index=len(shards), kind="file", location=f, format=fmt, fingerprint=sha256_file(f))
        )
    return shards


def _loop_link(path: str) -> str | None:
    """The first symbolic link on ``path`` that points at one of its own parent folders (a loop that a
    recursive glob walks round until the path is too long), or None."""
    parts = Path(path).parts
    for i in range(1, len(parts)):
        p = os.path.join(*parts[: i + 1])
        if os.path.islink(p) and os.path.isdir(p):
            target = os.path.realpath(p)
            parent = os.path.realpath(os.path.dirname(p) or ".")
            if parent == target or parent.startswith(target.rstrip(os.sep) + os.sep):
                return p
    return None


def _match(pat: str, data: DataConfig, single: bool) -> list[str]:
    """The files one comma-separated part of ``data.source`` names; every part must name at least one,
    and a broken link or a symbolic-link loop is an error, never a silently missing file."""
    path = os.path.expanduser(pat)
    if os.path.isdir(path):
        raise WinnowError(
            f"data.source: {pat} is a folder but not a `save_to_disk` dataset "
            f"(no dataset_info.json); give a glob such as {pat.rstrip('/')}/*.jsonl"
        )
    hits = sorted(glob.glob(path, recursive=True))
    out = []
    for h in hits:
        if os.path.islink(h) and not os.path.exists(h):
            raise WinnowError(f"data.source: {h} is a broken symbolic link (to {os.readlink(h)})")
        loop = _loop_link(h)
        if loop is not None:
            raise WinnowError(
                f"data.source: {pat!r} runs round a symbolic-link loop at {loop} (it points at one of its "
                f"own parent folders); narrow the glob or remove the link"
            )
        if os.path.isfile(h):
            out.append(os.path.abspath(h))
    if not out:
        if single and data.format == "auto" and "/" not in pat and not any(c in pat for c in "*?["):
            raise WinnowError(
                f"data.source: no file matches {pat!r} (for a hub dataset set data.format: hub)"
            )
        what = "no file matches" if not hits else "only folders match"
        raise WinnowError(f"data.source: {what} {pat!r}" + ("" if single else f" (in {data.source!r})"))
    return out


def _disk_shards(data: DataConfig) -> list[InputShard]:
    folder = Path(data.source).expanduser().absolute()
    info = folder / "dataset_dict.json"
    if info.exists():
        splits = json.loads(info.read_text())["splits"]
        if data.split not in splits:
            raise WinnowError(f"{folder}: no split {data.split!r} (has {', '.join(splits)}); set data.split")
        folder = folder / data.split
    state = folder / "state.json"
    if not state.exists():
        raise WinnowError(f"{folder}: not a `save_to_disk` dataset (no state.json)")
    files = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    shards = []
    for i, fname in enumerate(files):
        path = folder / fname
        if not path.exists():
            raise WinnowError(f"{path}: listed in {state} but missing")
        shards.append(
            InputShard(
                index=i,
                kind="disk",
                location=str(folder),
                format="arrow",
                fingerprint=sha256_file(path),
                part=i,
                parts=len(files),
            )
        )
    return shards


def _hub_shards(data: DataConfig) -> list[InputShard]:
    import datasets

    try:
        ds = datasets.load_dataset(data.source, split=data.split, streaming=True)
    except Exception as e:  # offline, missing, private
        raise WinnowError(f"data.source: cannot open hub dataset {data.source!r}: {_first_line(e)}") from None
    n = ds.num_shards
    return [
        InputShard(
            index=i,
            kind="hub",
            location=data.source,
            format="hub",
            fingerprint=fingerprint("hub", data.source, data.split, i, n),
            part=i,
            parts=n,
        )
        for i in range(n)
    ]


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:300]


def _shard_dataset(data: DataConfig, shard: InputShard) -> Any:
    """The datasets object (streaming, or an Arrow file's contiguous part) one input shard is read from."""
    import datasets

    datasets.disable_progress_bars()
    if shard.kind == "file":
        kwargs: dict[str, Any] = {}
        if shard.format == "csv" and shard.location.endswith(".tsv"):
            kwargs["sep"] = "\t"
        return datasets.load_dataset(
            shard.format, data_files=[shard.location], split="train", streaming=True, **kwargs
        )
    if shard.kind == "disk":
        full = datasets.load_from_disk(shard.location)
        return full.shard(num_shards=shard.parts, index=shard.part, contiguous=True)
    ds = datasets.load_dataset(shard.location, split=data.split, streaming=True)
    return ds.shard(num_shards=shard.parts, index=shard.part)


def _with_domain(data: DataConfig, shard: InputShard, batch: dict[str, list], n: int) -> dict[str, list]:
    """A ``data.source: {domain: source}`` shard's rows get their domain as a column."""
    if shard.domain is not None and data.domain_column is not None and batch:
        batch[data.domain_column] = [shard.domain] * n
    return batch


@contextlib.contextmanager
def _reading(shard: InputShard) -> Iterator[None]:
    """Any error but winnow's own, while reading ``shard``, as one line naming the file."""
    where = shard.location if shard.kind != "disk" else f"{shard.location} (arrow file {shard.part})"
    try:
        yield
    except (WinnowError, GeneratorExit):
        raise
    except Exception as e:
        raise WinnowError(f"{where}: cannot be read as {shard.format}: {_first_line(e)}") from None


def iter_raw_batches(
    data: DataConfig, shard: InputShard, batch_size: int | None = None
) -> Iterator[dict[str, list]]:
    """Stream one input shard as column batches (dict of lists)."""
    with _reading(shard):
        for batch in _shard_dataset(data, shard).iter(batch_size=batch_size or data.read_batch_size):
            yield _with_domain(data, shard, dict(batch), len(next(iter(batch.values()))) if batch else 0)


def iter_arrow_batches(
    data: DataConfig, shard: InputShard, batch_size: int | None = None
) -> Iterator[tuple[int, Any, Any]]:
    """The read batches of one shard as Arrow tables, unconverted: (row offset, table, the dataset's
    features). :func:`python_batch` turns one into what :func:`iter_raw_batches` gives, in any process."""
    with _reading(shard):
        ds = _shard_dataset(data, shard)
        offset = 0
        for table in ds.with_format("arrow").iter(batch_size=batch_size or data.read_batch_size):
            yield offset, table, ds.features
            offset += table.num_rows


def python_batch(data: DataConfig, shard: InputShard, table: Any, features: Any) -> dict[str, list]:
    """One Arrow read batch of :func:`iter_arrow_batches` as a column batch of Python values (by datasets'
    formatter, so images decode as in :func:`iter_raw_batches`), with the shard's domain column."""
    from datasets.formatting import PythonFormatter

    with _reading(shard):
        batch = dict(PythonFormatter(features=features).format_batch(table))
    return _with_domain(data, shard, batch, table.num_rows)


def iter_striped_batches(
    data: DataConfig, shard: InputShard, stride: int, phase: int, batch_size: int | None = None
) -> Iterator[tuple[int, dict[str, list]]]:
    """The read batches ``i`` of one shard with ``i % stride == phase``, as (row offset, column batch): the
    same batches as :func:`iter_raw_batches`, for ``stride`` consumers that each featurize one in
    ``stride``. Each reads the whole shard, but as Arrow tables: only its own batches are converted to
    Python."""
    for i, (offset, table, features) in enumerate(iter_arrow_batches(data, shard, batch_size)):
        if i % stride == phase:
            yield offset, python_batch(data, shard, table, features)


def sample_texts(data: DataConfig, shards: list[InputShard], max_rows: int) -> Iterator[str]:
    """Up to ``max_rows`` texts of ``data.text_column``, from every shard in turn (so that every shard, and
    so every domain, is represented): shard i of n gives up to ``ceil(left / (n - i))`` texts from its
    start, ``left`` being what the shards before it did not use, so a short shard's share passes to the
    next. One shard is open at a time: memory is a read batch, however many files the data has (until
    2026-12 every shard was open at once, round-robin: a read buffer per file, ~0.7 GB more at 40 files)."""
    left = max_rows
    for i, shard in enumerate(shards):
        if left <= 0:
            return
        quota, n = -(-left // (len(shards) - i)), 0
        batches = iter_raw_batches(data, shard)
        try:
            for batch in batches:
                for t in batch[data.text_column]:
                    if isinstance(t, str):
                        n += 1
                        yield t
                        if n >= quota:
                            break
                if n >= quota:
                    break
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()  # the shard's reader, now
        left -= n


def content_id(value: Any) -> str:
    """The default example id: the first 20 hex digits of sha256 of the content."""
    h = hashlib.sha256()
    if isinstance(value, str):
        h.update(b"t:" + value.encode("utf-8"))
    elif isinstance(value, bytes | bytearray):
        h.update(b"b:" + bytes(value))
    else:
        h.update(b"j:" + json.dumps(value, separators=(",", ":")).encode())
    return h.hexdigest()[:20]


def check_columns(data: DataConfig, columns: list[str], where: str) -> None:
    wanted = {
        "data.id_column": data.id_column,
        "data.text_column": data.text_column,
        "data.input_ids_column": data.input_ids_column,
        "data.image_column": data.image_column,
        "data.label_column": data.label_column,
        "data.domain_column": data.domain_column,
    }
    for key, col in wanted.items():
        if col is not None and col not in columns:
            raise WinnowError(f"{where}: no column {col!r} ({key}); columns are: {', '.join(columns)}")


def check_unchanged(shard: InputShard) -> None:
    """Stop when an input file's bytes differ from when the run listed (and scored) it: its rows would be
    written under scores of other text, and the manifest would name the old sha256."""
    if shard.kind != "file":
        return
    try:
        now = sha256_file(shard.location)
    except OSError as e:
        raise WinnowError(
            f"{shard.location}: cannot be read again to write the shards ({e.strerror})"
        ) from None
    if now != shard.fingerprint:
        raise WinnowError(
            f"{shard.location}: changed since this run scored it (sha256 {shard.fingerprint[:12]} then, "
            f"{now[:12]} now); rerun `winnow run` to score the new rows"
        )


def shards_fingerprint(shards: list[InputShard], data: DataConfig) -> str:
    cols = data.model_dump(exclude={"read_batch_size"})
    return fingerprint("input", cols, [s.fingerprint for s in shards])
