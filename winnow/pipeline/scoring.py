"""Scoring one input shard with every scorer at every proxy checkpoint.

Each checkpoint (seed × step) is loaded once per shard and the shard is streamed through it in
length-sorted batches; one model is in memory at a time. Per checkpoint the scorer's columns are
kept as `<column>@s<seed>k<step>`, and their mean over checkpoints (ignoring NaN) is `<column>`:
the average over seeds and checkpoints that Paul et al. (2021) use for EL2N.

Incremental rescoring. Every example's scores are also kept in a content-keyed cache,
``scores/cache/<fingerprint>/``, where the fingerprint covers everything a score depends on except the
data: the scorers and their parameters, the checkpoints' fingerprints (the model), the tokenizer, the
columns that shape an example and the package version. An example's key is the sha256 of what the model
sees (its token ids or pixels, and its label). When a shard changed (rows appended to a file, say), only
examples whose key is not in the cache are scored; the rest are read back. A changed scorer, model or
tokenizer is a new fingerprint, so everything is scored again.
"""

from __future__ import annotations

import copy
import hashlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

import winnow
from winnow.errors import WinnowError
from winnow.pipeline.atomic import fingerprint
from winnow.pipeline.collate import Example, Featurizer, length_batches
from winnow.pipeline.layout import RunLayout, checkpoint_suffix, parse_checkpoint_column
from winnow.pipeline.models import load_checkpoint, resolve_device
from winnow.pipeline.recipe import Recipe
from winnow.pipeline.sources import InputShard, iter_raw_batches
from winnow.pipeline.steps import Checkpoint, RunContext, ScorePart, Step, progress, register_step
from winnow.pipeline.store import ScoreStore, made_by, read_parquet, write_parquet
from winnow.scorers import get_scorer


def ckpt_suffix(ck: Checkpoint) -> str:
    return checkpoint_suffix(ck.seed, ck.step)


def build_scorers(recipe: Recipe) -> list[Any]:
    return [get_scorer(s.name, **s.params) for s in recipe.scoring.scorers]


def score_fingerprint(
    recipe: Recipe, shard: InputShard, ckpts: list[Checkpoint], tokenizer_fp: str | None
) -> str:
    return fingerprint(
        "score",
        shard.fingerprint,
        recipe.data.model_dump(exclude={"read_batch_size", "source"}),
        recipe.model.max_length,
        [s.model_dump() for s in recipe.scoring.scorers],
        [c.fingerprint for c in ckpts],
        tokenizer_fp,
        winnow.__version__,
    )


def cache_fingerprint(recipe: Recipe, ckpts: list[Checkpoint], tokenizer_fp: str | None) -> str:
    """What every example's scores depend on, apart from the example itself."""
    return fingerprint(
        "score-cache",
        recipe.data.model_dump(exclude={"read_batch_size", "source", "id_column", "domain_column"}),
        recipe.model.max_length,
        [s.model_dump() for s in recipe.scoring.scorers],
        [c.fingerprint for c in ckpts],
        tokenizer_fp,
        winnow.__version__,
    )


def example_key(e: Example) -> str:
    """The cache key of an example: sha256 of what the model sees (features and label)."""
    h = hashlib.sha256()
    f = e.features
    h.update(np.asarray(f, dtype=np.int64 if isinstance(f, list) else None).tobytes())
    h.update(f"|{e.label}".encode())
    return h.hexdigest()[:32]


def _read_cache(layout: RunLayout, cache_fp: str) -> pl.DataFrame | None:
    frames = [read_parquet(f) for f in layout.cache_fragments(cache_fp)]
    if not frames:
        return None
    return pl.concat(frames, how="diagonal_relaxed").unique(subset="key", keep="first", maintain_order=True)


def part_paths(run_dir: Path, shard: InputShard, fp: str) -> tuple[Path, Path]:
    layout = RunLayout(run_dir)
    return layout.score_part(shard.index, fp), layout.rows_part(shard.index, fp)


def loader_workers(recipe: Recipe, device: torch.device) -> int:
    """``scoring.loader_workers`` resolved: auto is min(4, cores - 1) on CUDA, 0 (inline) on CPU."""
    w = recipe.scoring.loader_workers
    if w == "auto":
        return min(4, max(1, (os.cpu_count() or 2) - 1)) if device.type == "cuda" else 0
    return int(w)


def bucket_rows(recipe: Recipe, device: torch.device) -> int:
    """``scoring.bucket_rows`` resolved: auto is 8192 on CUDA, ``data.read_batch_size`` on CPU."""
    b = recipe.scoring.bucket_rows
    if b == "auto":
        return 8192 if device.type == "cuda" else recipe.data.read_batch_size
    return int(b)


def _stream(
    recipe: Recipe, shard: InputShard, feat: Featurizer, workers: int = 0
) -> Iterator[list[tuple[Example, str]]]:
    """The shard's read batches as (example, cache key) pairs, in order. With ``workers`` > 0, threads
    featurize (validate, tokenize, key) up to 2 x ``workers`` read batches ahead of the consumer, each
    with its own copy of the featurizer (a fast tokenizer is not safe to call from two threads at once;
    its Rust encoder runs without the GIL, so the threads tokenize in parallel)."""

    def work(f: Featurizer, raw: dict[str, list], offset: int) -> list[tuple[Example, str]]:
        return [(e, example_key(e)) for e in f.featurize(raw, shard.location, offset)]

    def batches() -> Iterator[tuple[dict[str, list], int]]:
        offset = 0
        for raw in iter_raw_batches(recipe.data, shard):
            n = len(next(iter(raw.values()))) if raw else 0
            yield raw, offset
            offset += n

    if workers <= 0:
        for raw, offset in batches():
            yield work(feat, raw, offset)
        return
    local = threading.local()

    def threaded(raw: dict[str, list], offset: int) -> list[tuple[Example, str]]:
        if not hasattr(local, "feat"):
            local.feat = copy.deepcopy(feat)
        return work(local.feat, raw, offset)

    pending: deque[Future[list[tuple[Example, str]]]] = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="winnow-featurize") as pool:
        try:
            for raw, offset in batches():
                pending.append(pool.submit(threaded, raw, offset))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


def score_shard(
    recipe: Recipe,
    run_dir: Path,
    shard: InputShard,
    ckpts: list[Checkpoint],
    feat: Featurizer,
    fp: str,
    progress: Callable[[int], None] | None = None,
    cache_fp: str | None = None,
) -> ScorePart:
    """Score one shard; write its score and rows parts atomically; return its part (``scored``: examples
    scored now, ``reused``: examples whose scores came from the cache under ``cache_fp``)."""
    scores_path, rows_path = part_paths(run_dir, shard, fp)
    if scores_path.exists() and rows_path.exists():
        n = read_parquet(rows_path).height
        return ScorePart(
            shard.index,
            n,
            RunLayout(run_dir).rel(scores_path),
            RunLayout(run_dir).rel(rows_path),
            skipped=True,
            scored=0,
            reused=n,
        )
    scorers = build_scorers(recipe)
    task = recipe.model.task
    bs = recipe.scoring.batch_size
    t0 = time.time()
    cached = _read_cache(RunLayout(run_dir), cache_fp) if cache_fp else None
    known = set(cached["key"].to_list()) if cached is not None else set()
    rows: dict[str, list] = {"id": [], "domain": [], "label": [], "n_tokens": [], "preview": []}
    keys: list[str] = []
    todo: set[str] = set()  # keys not in the cache: found while the first checkpoint's pass reads the shard
    new_keys: list[str] = []  # keys of the examples scored, in the order every pass scores them
    per_ckpt: dict[str, list[np.ndarray]] = {}
    device = resolve_device(recipe.scoring.device)
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    workers, window = loader_workers(recipe, device), bucket_rows(recipe, device)
    for ci, ck in enumerate(ckpts):
        if ci > 0 and not todo:
            break  # the first pass found nothing new: no other checkpoint needs loading
        model = None  # loaded at the first example that needs scoring
        chunks: dict[str, list[np.ndarray]] = {}
        waiting: list[Example] = []  # examples to score, length-sorted together once `window` are here
        for exs_k in _stream(recipe, shard, feat, workers):
            if ci == 0:
                for e, k in exs_k:
                    rows["id"].append(e.id)
                    rows["domain"].append(e.domain)
                    rows["label"].append(e.label_name)
                    rows["n_tokens"].append(e.n_tokens)
                    rows["preview"].append(e.preview)
                    keys.append(k)
                    if k not in known:
                        todo.add(k)
                        new_keys.append(k)
            waiting.extend(e for e, k in exs_k if k in todo)
            if len(waiting) >= window:
                if model is None:
                    model = _scoring_model(recipe, run_dir / ck.path, device, use_bf16)
                for col, arr in _score_examples(scorers, model, waiting, feat, task, device, bs).items():
                    chunks.setdefault(col + ckpt_suffix(ck), []).append(arr)
                waiting = []
            if progress is not None:
                progress(len(exs_k))
        if waiting:
            if model is None:
                model = _scoring_model(recipe, run_dir / ck.path, device, use_bf16)
            for col, arr in _score_examples(scorers, model, waiting, feat, task, device, bs).items():
                chunks.setdefault(col + ckpt_suffix(ck), []).append(arr)
        for col, arrs in chunks.items():
            per_ckpt[col] = [np.concatenate(arrs)] if arrs else [np.zeros(0)]
        del model
    data: dict[str, Any] = {"key": new_keys}
    base_cols: list[str] = []
    for s in scorers:
        base_cols.extend(getattr(s, "columns", None) or [s.name])
    for col in base_cols:
        mats = [per_ckpt.get(col + ckpt_suffix(ck), [np.full(len(new_keys), np.nan)])[0] for ck in ckpts]
        for ck, m in zip(ckpts, mats, strict=True):
            data[col + ckpt_suffix(ck)] = m.astype(np.float64)
        stack = np.stack(mats) if mats and len(mats[0]) else np.zeros((len(ckpts), 0))
        with np.errstate(all="ignore"):
            counts = np.sum(~np.isnan(stack), axis=0)
            mean = np.where(counts > 0, np.nansum(stack, axis=0) / np.maximum(counts, 1), np.nan)
        data[col] = mean.astype(np.float64)
    order = ["key"] + base_cols + [c for c in data if "@" in c]
    fresh = pl.DataFrame(
        {k: data[k] for k in order}, schema_overrides={"key": pl.Utf8, **{c: pl.Float64 for c in order[1:]}}
    )
    fresh = fresh.unique(subset="key", keep="first", maintain_order=True)
    if cache_fp and fresh.height:
        write_parquet(
            fresh,
            RunLayout(run_dir).cache_fragment(cache_fp, shard.index, fp),
            {"cache_fingerprint": cache_fp},
        )
    have = fresh if cached is None else pl.concat([fresh, cached.select(order)], how="vertical")
    df = (
        pl.DataFrame({"id": rows["id"], "key": keys}, schema={"id": pl.Utf8, "key": pl.Utf8})
        .join(have.unique(subset="key", keep="first"), on="key", how="left", maintain_order="left")
        .drop("key")
    )
    rows_df = pl.DataFrame(
        rows,
        schema={"id": pl.Utf8, "domain": pl.Utf8, "label": pl.Utf8, "n_tokens": pl.Int64, "preview": pl.Utf8},
    )
    scored = sum(1 for k in keys if k in todo)
    prov = {
        "shard": shard.to_dict(),
        "fingerprint": fp,
        "started": round(t0, 3),
        "seconds": round(time.time() - t0, 3),
        "scored": scored,
        "reused": len(keys) - scored,
    }
    write_parquet(rows_df, rows_path)
    write_parquet(df, scores_path, prov)
    return ScorePart(
        shard.index,
        rows_df.height,
        RunLayout(run_dir).rel(scores_path),
        RunLayout(run_dir).rel(rows_path),
        skipped=False,
        scored=scored,
        reused=len(keys) - scored,
    )


def _scoring_model(recipe: Recipe, path: Path, device: torch.device, use_bf16: bool) -> Any:
    """A checkpoint loaded for scoring: on ``device``, in eval mode, bf16 where the GPU has it, compiled
    when ``scoring.compile``."""
    model = load_checkpoint(path, recipe.model.task, recipe.model.trust_remote_code).to(device).eval()
    if use_bf16:
        model = model.to(torch.bfloat16)
    if recipe.scoring.compile and device.type == "cuda":
        getattr(model, model.base_model_prefix, model).compile(dynamic=True)
    return model


def _score_examples(
    scorers: list[Any],
    model: Any,
    exs: list[Example],
    feat: Featurizer,
    task: str,
    device: torch.device,
    bs: int,
) -> dict[str, np.ndarray]:
    """Score examples in length-sorted batches; return columns in the examples' order. On CUDA the
    batches are copied from pinned memory without waiting and the scores stay on the GPU until every
    batch is queued (one copy back at the end), so collating the next batch overlaps the model."""
    n = len(exs)
    pos = {id(e): i for i, e in enumerate(exs)}
    pin = device.type == "cuda"
    parts: dict[str, list[tuple[np.ndarray, torch.Tensor]]] = {}
    for group in length_batches(exs, bs):
        cpu = feat.collate(group)
        batch = {k: (v.pin_memory() if pin else v).to(device, non_blocking=pin) for k, v in cpu.items()}
        idx = np.array([pos[id(e)] for e in group])
        for s in scorers:
            # gradient scorers (GraNd, ...) run their own backward; the rest need no autograd graph
            with torch.set_grad_enabled(bool(getattr(s, "needs_grad", False))):
                res = s.score_batch(model, batch, task)
            for col, t in res.items():
                parts.setdefault(col, []).append((idx, t.detach().float()))
    out: dict[str, np.ndarray] = {}
    for col, got in parts.items():
        arr = out.setdefault(col, np.full(n, np.nan))
        vals = torch.cat([t.reshape(-1) for _, t in got]).cpu().numpy()
        arr[np.concatenate([i for i, _ in got])] = vals
    return out


def _base_column(col: str) -> str:
    parsed = parse_checkpoint_column(col)
    return parsed[0] if parsed else col


def merge_parts(
    recipe: Recipe,
    run_dir: Path,
    parts: list[ScorePart],
    provenance: dict[str, Any],
    step_fingerprint: str | None = None,
) -> dict[str, Any]:
    """Concatenate the shards' parts (in shard order) into scores/<scorer>.parquet and rows.parquet."""
    parts = sorted(parts, key=lambda p: p.shard)
    rows = pl.concat([read_parquet(run_dir / p.rows_file) for p in parts], how="vertical")
    scores = pl.concat([read_parquet(run_dir / p.scores) for p in parts], how="vertical")
    if rows.height == 0:
        raise WinnowError(f"data.source: {recipe.data.source!r} holds no rows")
    n_all = rows.height
    dup = rows.group_by("id").len().filter(pl.col("len") > 1)
    if dup.height and recipe.data.id_column is not None:
        example = dup["id"][0]
        raise WinnowError(
            f"data.id_column {recipe.data.id_column!r}: {dup.height} ids appear more than once "
            f"(e.g. {example!r}); ids must be unique"
        )
    rows = rows.unique(subset="id", keep="first", maintain_order=True)
    scores = scores.unique(subset="id", keep="first", maintain_order=True)
    store = ScoreStore(run_dir)
    written = []
    for spec in recipe.scoring.scorers:
        from winnow.scorers import SCORERS

        cols = getattr(SCORERS[spec.name], "columns", None) or [spec.name]
        keep = ["id"] + [c for c in scores.columns if c in cols or _base_column(c) in cols]
        prov = dict(
            provenance,
            scorer=spec.name,
            params=spec.params,
            columns=cols,
            package_version=winnow.__version__,
            step_fingerprint=step_fingerprint,
        )
        written.append(store.write_scores(spec.name, scores.select(keep), prov))
    written.append(write_parquet(rows, RunLayout(run_dir).rows, {"step_fingerprint": step_fingerprint}))
    for old in store.score_files():  # scores of scorers this recipe no longer runs
        if old not in written and not (
            old == RunLayout(run_dir).influence_scores and recipe.scoring.influence
        ):
            old.unlink()
    return {
        "rows": rows.height,
        "duplicate_rows": n_all - rows.height,
        "files": [RunLayout(run_dir).rel(p) for p in written],
    }


@register_step
class ScoreStep(Step):
    """One input shard through every scorer at every checkpoint (``score``): its score and rows parts."""

    name = "score"
    result = ScorePart

    def fingerprint(
        self, ctx: RunContext, shard: Any = None, ckpts: Any = (), tok_fp: str | None = None
    ) -> str:
        return score_fingerprint(ctx.config, shard, [Checkpoint.of(c) for c in ckpts], tok_fp)

    def run(
        self, ctx: RunContext, fp: str, shard: Any = None, ckpts: Any = (), cache_fp: str | None = None
    ) -> Any:
        recipe = ctx.setup(ctx.threads)
        feat, _, _ = ctx.featurizer()
        sh = InputShard.from_dict(shard)
        bar = progress(f"score {sh.name}", None, "row")
        try:
            part = score_shard(
                recipe,
                ctx.root,
                sh,
                [Checkpoint.of(c) for c in ckpts],
                feat,
                fp,
                progress=bar.update,
                cache_fp=cache_fp,
            )
        finally:
            bar.close()
        return self.dump(part)

    def present(self, ctx: RunContext, result: Any, fp: str) -> bool:
        part = self.load(result)
        return (ctx.root / part.scores).exists() and (ctx.root / part.rows_file).exists()

    def on_cached(self, result: ScorePart) -> ScorePart:
        from dataclasses import replace

        return replace(result, scored=0, reused=result.rows)  # nothing was scored by this run


@register_step
class MergeScoresStep(Step):
    """The shards' parts into the score store (``merge-scores``): ``scores/<scorer>.parquet``, rows."""

    name = "merge-scores"

    def fingerprint(self, ctx: RunContext, parts: Any = ()) -> str:
        return fingerprint("merge", parts_fingerprint([ScorePart.of(p) for p in parts]))

    def run(self, ctx: RunContext, fp: str, parts: Any = (), provenance: Any = None) -> dict[str, Any]:
        return merge_parts(
            ctx.setup(), ctx.root, [ScorePart.of(p) for p in parts], provenance or {}, step_fingerprint=fp
        )

    def present(self, ctx: RunContext, result: Any, fp: str) -> bool:
        return made_by(ctx.root, result["files"], fp)


def parts_fingerprint(parts: list[ScorePart]) -> str:
    """What the merged store depends on: the parts' files (their names carry their fingerprints)."""
    return fingerprint([p.scores for p in parts])
