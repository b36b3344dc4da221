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
examples whose key is not in that shard's cache file are scored; the rest are read back. A changed
scorer, model or tokenizer is a new fingerprint, so everything is scored again. The cache's layout,
compaction and garbage collection: ``score_cache.py``; the merge of the parts: ``score_merge.py``.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch

import winnow
from winnow.grads import checks
from winnow.pipeline.atomic import fingerprint, tmp_name
from winnow.pipeline.collate import (
    ROWS_SCHEMA,
    Columns,
    Featurizer,
    collate_columns,
    length_groups,
)
from winnow.pipeline.feed import stream
from winnow.pipeline.layout import RunLayout, checkpoint_suffix
from winnow.pipeline.models import load_checkpoint, resolve_device
from winnow.pipeline.recipe import Recipe
from winnow.pipeline.score_cache import read_shard_cache, write_shard_cache
from winnow.pipeline.sources import InputShard
from winnow.pipeline.steps import Checkpoint, RunContext, ScorePart, Step, progress, register_step
from winnow.pipeline.store import write_parquet
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


def part_paths(run_dir: Path, shard: InputShard, fp: str) -> tuple[Path, Path]:
    layout = RunLayout(run_dir)
    return layout.score_part(shard.index, fp), layout.rows_part(shard.index, fp)


REUSE_BYTES = 1 << 30
"""A shard's featurized examples (token ids, lengths, labels) up to this size are kept from the first
checkpoint's pass for the others, instead of reading and tokenizing the shard once per checkpoint."""


def loader_workers(recipe: Recipe, device: torch.device) -> int:
    """``scoring.loader_workers`` resolved: auto is min(8, cores / 2) processes on CUDA, 0 (inline) on CPU."""
    w = recipe.scoring.loader_workers
    if w == "auto":
        return max(1, min(8, (os.cpu_count() or 2) // 2)) if device.type == "cuda" else 0
    return int(w)


def loader_kind(recipe: Recipe, device: torch.device) -> str:
    """``scoring.loader`` resolved: auto is processes on CUDA (RESULTS, "the scoring feed", run 5: 2.7-3.0 s
    a steady 12,500-row shard against 3.3-5.0 s with threads, once cuDNN attention is out of the way),
    threads elsewhere."""
    kind = recipe.scoring.loader
    if kind == "auto":
        return "processes" if device.type == "cuda" else "threads"
    return kind


def attention_kernels(recipe: Recipe, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """``scoring.sdpa_backends`` as a context: the kernels torch's ``scaled_dot_product_attention`` may
    pick while a window is scored. auto leaves cuDNN out on CUDA: its plans are built per batch shape
    and cached per thread (``thread_local`` in ATen's ``cudnn/MHA.cpp``), 50-100 ms for each new shape,
    which a one-pass scoring of dynamic lengths meets shard after shard (RESULTS, "the scoring feed");
    mem-efficient attention takes the same padded, masked batches without a plan. The choice is torch's
    global setting for as long as the context lasts (another task's model in those seconds sees it too)."""
    return sdpa_backends(recipe.scoring.sdpa_backends, device)


def sdpa_backends(want: Any, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """``want`` (a recipe's ``sdpa_backends``: auto, torch or a list of names) as torch's sdpa_kernel context."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if want == "torch" or (want == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    names = ["flash", "efficient", "math"] if want == "auto" else list(want)
    kinds = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }
    return sdpa_kernel([kinds[n] for n in names])


AUTO_BATCH_TOKENS = 16384
"""``scoring.batch_tokens: auto`` on CUDA: on the H200, 10^6 rows of EL2N scored at 0.82 of the same-batched
kernel and 94.6% GPU (707k real tokens/s) with it, against 0.68 and 74% (506k) at 64 rows a batch, where
the host's launches and Python per batch set the pace (RESULTS, run 9)."""


def batch_tokens(recipe: Recipe, device: torch.device, scorers: list[Any]) -> int:
    """``scoring.batch_tokens`` resolved: auto is :data:`AUTO_BATCH_TOKENS` on CUDA when no scorer needs
    gradients (their memory grows with the rows a batch), 0 (``batch_size`` rows a batch) otherwise; always
    0 for images (they have no tokens)."""
    b = recipe.scoring.batch_tokens
    if recipe.model.task == "image_classification":
        return 0
    if b == "auto":
        grads = any(getattr(s, "needs_grad", False) for s in scorers)
        return AUTO_BATCH_TOKENS if device.type == "cuda" and not grads else 0
    return int(b)


def bucket_rows(recipe: Recipe, device: torch.device) -> int:
    """``scoring.bucket_rows`` resolved: auto is 8192 on CUDA, ``data.read_batch_size`` on CPU."""
    b = recipe.scoring.bucket_rows
    if b == "auto":
        return 8192 if device.type == "cuda" else recipe.data.read_batch_size
    return int(b)


def score_shard(
    recipe: Recipe,
    run_dir: Path,
    shard: InputShard,
    ckpts: list[Checkpoint],
    feat: Featurizer,
    fp: str,
    progress: Callable[[int], None] | None = None,
    cache_fp: str | None = None,
    slot: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
) -> ScorePart:
    """Score one shard; write its score and rows parts atomically; return its part (``scored``: examples
    scored now, ``reused``: examples whose scores came from the cache under ``cache_fp``). ``slot``: the
    GPU slot each checkpoint's pass holds from its first launch to its last result (``gpu_slot``), so that
    the cache read and the first window's featurizing before it, and the frames and files after it,
    overlap another task's scoring."""
    scores_path, rows_path = part_paths(run_dir, shard, fp)
    if scores_path.exists() and rows_path.exists():
        n = pq.read_metadata(rows_path).num_rows
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
    t0 = time.time()
    # this shard's own compacted cache file, never the whole cache (winnow/pipeline/score_cache.py)
    cached = read_shard_cache(RunLayout(run_dir), cache_fp, shard) if cache_fp else None
    known = set(cached["key"].to_list()) if cached is not None else set()
    rows_out = _RowsWriter(rows_path)  # the rows (previews included) go to disk batch by batch
    ids: list[str] = []
    keys: list[str] = []
    todo: set[str] = set()  # keys not in the cache: found while the first checkpoint's pass reads the shard
    new_keys: list[str] = []  # keys of the examples scored, in the order every pass scores them
    per_ckpt: dict[str, list[np.ndarray]] = {}
    device = resolve_device(recipe.scoring.device)
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    workers, window = loader_workers(recipe, device), bucket_rows(recipe, device)
    kept: list[Columns] | None = [] if len(ckpts) > 1 else None
    # seconds from the start to: the first featurized batch, each pass's GPU slot (got once its first window
    # is featurized), last launch and its one wait for the device (a shard's fixed costs, against its kernel
    # time: RESULTS, runs 8-9)
    marks: dict[str, float] = {}
    held = 0
    try:
        for ci, ck in enumerate(ckpts):
            if ci > 0 and not todo:
                break  # the first pass found nothing new: no other checkpoint needs loading
            pas = _CheckpointPass(recipe, run_dir / ck.path, scorers, feat, device, use_bf16, window, slot)
            # on an accelerator the input checks of the whole pass are evaluated once, at its end
            with checks.deferred() if device.type != "cpu" else contextlib.nullcontext():
                try:
                    if kept is not None and ci > 0:
                        for cols in kept:  # the first pass's examples, featurized once (see REUSE_BYTES)
                            pas.add(cols)
                    else:
                        for fb in stream(recipe, shard, feat, workers, loader_kind(recipe, device)):
                            marks.setdefault("first_batch", time.time() - t0)
                            if ci == 0:
                                rows_out.write(fb.rows)
                                ids.extend(fb.ids)
                                keys.extend(fb.keys)
                                for k in fb.keys:
                                    if k not in known:
                                        todo.add(k)
                                        new_keys.append(k)
                            take = np.fromiter(
                                (i for i, k in enumerate(fb.keys) if k in todo), dtype=np.int64
                            )
                            if len(take):
                                cols = fb.columns if len(take) == len(fb.keys) else fb.columns.take(take)
                                pas.add(cols)
                                if ci == 0 and kept is not None:
                                    kept.append(cols)
                                    held += cols.nbytes
                                    if held > REUSE_BYTES:
                                        kept = None  # too large to hold: later passes read the shard again
                            if progress is not None:
                                progress(len(fb.keys))
                    marks[f"streamed@{ci}"] = time.time() - t0
                    got = pas.finish()
                    marks[f"finished@{ci}"] = time.time() - t0
                finally:
                    pas.release()
                if pas.slot_at is not None:
                    marks[f"slot@{ci}"] = pas.slot_at - t0
            chunks = {col + ckpt_suffix(ck): arrs for col, arrs in got.items()}
            for col, arrs in chunks.items():
                per_ckpt[col] = [np.concatenate(arrs)] if arrs else [np.zeros(0)]
            del pas
    except BaseException:
        rows_out.abort()
        raise
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
    have = fresh if cached is None else pl.concat([fresh, cached.select(order)], how="vertical")
    key_df = pl.DataFrame({"id": ids, "key": keys}, schema={"id": pl.Utf8, "key": pl.Utf8})
    have = have.unique(subset="key", keep="first").join(key_df.select("key").unique(), on="key", how="semi")
    if cache_fp and (fresh.height or cached is None or cached.height != have.height):
        # compacted: exactly the entries this shard's rows use now
        write_shard_cache(RunLayout(run_dir), cache_fp, shard, have.sort("key"))
    df = key_df.join(have, on="key", how="left", maintain_order="left").drop("key")
    scored = sum(1 for k in keys if k in todo)
    prov = {
        "shard": shard.to_dict(),
        "fingerprint": fp,
        "started": round(t0, 3),
        "seconds": round(time.time() - t0, 3),
        "marks": {k: round(v, 3) for k, v in marks.items()},
        "scored": scored,
        "reused": len(keys) - scored,
    }
    rows_out.close()
    write_parquet(df, scores_path, prov)
    return ScorePart(
        shard.index,
        len(ids),
        RunLayout(run_dir).rel(scores_path),
        RunLayout(run_dir).rel(rows_path),
        skipped=False,
        scored=scored,
        reused=len(keys) - scored,
    )


class _CheckpointPass:
    """One checkpoint's pass over a shard: the examples to score gathered ``window`` rows at a time and
    queued window by window (length-sorted inside a window). Nothing waits for the device before ``finish``:
    the scores stay there until one copy back at the end of the pass (the caller defers the scorers' input
    checks over the same span, ``winnow.grads.checks``), so the host reads, collates and launches window
    k + 1 while the device computes window k. The model comes from :func:`_scoring_model` at the first
    window and goes back to the kept ones at ``release``; ``slot`` (a GPU slot) is held over the same span."""

    def __init__(
        self,
        recipe: Recipe,
        path: Path,
        scorers: list[Any],
        feat: Featurizer,
        device: torch.device,
        use_bf16: bool,
        window: int,
        slot: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    ):
        self.recipe, self.path, self.scorers, self.feat = recipe, path, scorers, feat
        self.device, self.use_bf16, self.window = device, use_bf16, window
        self.slot, self.held = slot, contextlib.ExitStack()
        self.slot_at: float | None = None  # when the slot was got
        self.model: Any = None
        self.waiting: list[Columns] = []
        self.n_waiting = 0
        self.windows: list[tuple[int, dict[str, list[tuple[np.ndarray, torch.Tensor]]]]] = []

    def add(self, cols: Columns) -> None:
        self.waiting.append(cols)
        self.n_waiting += len(cols)
        if self.n_waiting >= self.window:
            self._score()

    def finish(self) -> dict[str, list[np.ndarray]]:
        """Every column's scores, window by window, in the order the examples were added (the one wait for
        the device)."""
        if self.waiting:
            self._score()
        chunks: dict[str, list[np.ndarray]] = {}
        for n, parts in self.windows:
            for col, got in parts.items():
                arr = np.full(n, np.nan)
                vals = torch.cat([t.reshape(-1) for _, t in got]).cpu().numpy()
                arr[np.concatenate([i for i, _ in got])] = vals
                chunks.setdefault(col, []).append(arr)
        self.windows = []
        return chunks

    def release(self) -> None:
        """The model back to the kept ones, then the slot (whether the pass finished or failed)."""
        try:
            if self.model is not None:
                _release_model(self._key(), self.model)
                self.model = None
        finally:
            self.held.close()

    def _key(self) -> tuple[Any, ...]:
        return _model_key(self.recipe, self.path, self.device, self.use_bf16)

    def _score(self) -> None:
        if self.model is None:
            if self.slot is not None and self.slot_at is None:
                self.held.enter_context(self.slot())  # before the model: a kept one is the slot holder's
                self.slot_at = time.time()
            self.model = _scoring_model(self.recipe, self.path, self.device, self.use_bf16)
            self.scorers = _scorers_for(self.model, self.recipe, self.scorers)
        cols = Columns.concat(self.waiting)
        self.waiting, self.n_waiting = [], 0
        r = self.recipe
        with attention_kernels(r, self.device):
            parts = _score_columns(
                self.scorers,
                self.model,
                cols,
                self.feat,
                r.model.task,
                self.device,
                r.scoring.batch_size,
                r.scoring.pad_multiple,
                batch_tokens(r, self.device, self.scorers),
            )
        self.windows.append((len(cols), parts))


class _RowsWriter:
    """A shard's rows part (id, domain, label, n_tokens, preview) written batch by batch under a temporary
    name, renamed onto its path by ``close`` (``abort`` removes it): the scoring task never holds the
    shard's previews."""

    SCHEMA = ROWS_SCHEMA

    def __init__(self, path: Path):
        self.path, self.tmp = path, tmp_name(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = pq.ParquetWriter(self.tmp, self.SCHEMA, compression="zstd")

    def write(self, rows: pa.Table) -> None:
        self.writer.write_table(rows)

    def close(self) -> None:
        self.writer.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.writer.close()
        self.tmp.unlink(missing_ok=True)


MODEL_CACHE_BYTES = 8 << 30
"""Scoring models kept loaded between shards (one process scores every shard with the same checkpoints):
up to this many bytes of parameters, least recently used first out; one is always kept."""

_models: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
_models_lock = threading.Lock()
# the scorers each kept model was scored with, by the scorer specs' fingerprint (see _scorers_for)
_model_scorers: weakref.WeakKeyDictionary[Any, dict[str, list[Any]]] = weakref.WeakKeyDictionary()


def _model_key(recipe: Recipe, path: Path, device: torch.device, use_bf16: bool) -> tuple[Any, ...]:
    """What a kept scoring model is found by: its checkpoint folder (immutable once written), device,
    precision and compilation."""
    return (str(path), str(device), use_bf16, recipe.scoring.compile)


def _scoring_model(recipe: Recipe, path: Path, device: torch.device, use_bf16: bool) -> Any:
    """A checkpoint loaded for scoring: on ``device``, in eval mode, bf16 where the GPU has it, compiled
    when ``scoring.compile``. Taken from the models kept since an earlier shard when there (each is lent
    to one pass at a time: gradient scorers hook into the model), loaded otherwise."""
    key = _model_key(recipe, path, device, use_bf16)
    with _models_lock:
        model = _models.pop(key, None)
    if model is not None:
        return model
    model = load_checkpoint(path, recipe.model.task, recipe.model.trust_remote_code).to(device).eval()
    if use_bf16:
        model = model.to(torch.bfloat16)
    if recipe.scoring.compile and device.type == "cuda":
        getattr(model, model.base_model_prefix, model).compile(dynamic=True)
    return model


def _release_model(key: tuple[Any, ...], model: Any) -> None:
    """A pass's model back to the kept ones (a checkpoint folder is immutable once written, so its path
    names its weights)."""

    def size(m: Any) -> int:
        return sum(p.numel() * p.element_size() for p in m.parameters())

    with _models_lock:
        _models[key] = model
        _models.move_to_end(key)
        while len(_models) > 1 and sum(size(m) for m in _models.values()) > MODEL_CACHE_BYTES:
            _, old = _models.popitem(last=False)
            _model_scorers.pop(old, None)


def _scorers_for(model: Any, recipe: Recipe, fresh: list[Any]) -> list[Any]:
    """The scorers that scored with this kept model before (same scorer specs), else ``fresh``, kept with it:
    a gradient scorer's engine (its hooks on the model, the first batch's consistency check) is then made
    once per model and run, not once per shard. A model is lent to one pass at a time, so are its scorers."""
    key = fingerprint([s.model_dump(mode="json") for s in recipe.scoring.scorers])
    with _models_lock:
        return _model_scorers.setdefault(model, {}).setdefault(key, fresh)


def release_models() -> None:
    """Forget the scoring models kept between shards, and their scorers (the end of a run's scoring)."""
    with _models_lock:
        _models.clear()
        _model_scorers.clear()


def _score_columns(
    scorers: list[Any],
    model: Any,
    cols: Columns,
    feat: Featurizer,
    task: str,
    device: torch.device,
    bs: int,
    multiple: int = 1,
    tokens: int = 0,
) -> dict[str, list[tuple[np.ndarray, torch.Tensor]]]:
    """Queue the examples' batches, length-sorted (``bs`` rows a batch, or ``tokens`` padded tokens: see
    :func:`length_groups`), through the scorers; return each column's (positions, scores) per batch, the
    scores still on ``device``. Batches are copied from pinned memory without waiting, and a batch without
    padding carries no mask to test."""
    accel = device.type != "cpu"
    parts: dict[str, list[tuple[np.ndarray, torch.Tensor]]] = {}
    for idx in length_groups(cols.lengths, bs, tokens, multiple):
        cpu = collate_columns(cols, idx, task, feat.pad_id, multiple=multiple)
        batch = {k: (v.pin_memory() if accel else v).to(device, non_blocking=accel) for k, v in cpu.items()}
        for s in scorers:
            # gradient scorers (GraNd, ...) run their own backward; the rest need no autograd graph
            with torch.set_grad_enabled(bool(getattr(s, "needs_grad", False))):
                res = s.score_batch(model, batch, task)
            for col, t in res.items():
                parts.setdefault(col, []).append((idx, t.detach().float()))
    return parts


@register_step
class ScoreStep(Step):
    """One input shard through every scorer at every checkpoint (``score``): its score and rows parts."""

    name = "score"
    result = ScorePart
    own_slot = True  # the GPU slot around each pass's device span only (gpu_slot)

    def device(self, ctx: RunContext) -> str:
        return ctx.config.scoring.device

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
                slot=lambda: self.slot(ctx),
            )
        finally:
            bar.close()
        return self.dump(part)

    def present(self, ctx: RunContext, result: Any, fp: str) -> bool:
        """The part's files, or (once merged, its files removed) the store holding it whole."""
        from winnow.pipeline.score_merge import is_absorbed

        part = self.load(result)
        on_disk = (ctx.root / part.scores).exists() and (ctx.root / part.rows_file).exists()
        return on_disk or is_absorbed(ctx.config, ctx.layout, part)

    def on_cached(self, result: ScorePart) -> ScorePart:
        from dataclasses import replace

        return replace(result, scored=0, reused=result.rows)  # nothing was scored by this run
