"""The scoring feed: one input shard's read batches featurized (:class:`FeatBatch`), in order, ahead of
the thread that launches the model's kernels.

Featurizing a read batch (validation, ids, previews, tokenizing, cache keys) is Python per row, under
the interpreter lock. Three ways to do it (``scoring.loader_workers``, ``scoring.loader``):

- inline (0 workers): in the scoring thread, between batches; the device waits while it runs.
- threads: W threads, each with its own copy of the featurizer (a fast tokenizer is not safe to call
  from two threads at once). They start at once and share memory, but they share the interpreter lock
  with the scoring thread: every torch call releases the lock and must win it back, and a featurizing
  thread that holds it can make the kernel launches wait (up to a switch interval, 5 ms, each time).
- processes: W worker processes that live as long as the run (:func:`prewarm` starts them while the proxy
  trains, :func:`release_pools` ends them), each
  holding one featurizer, handed to it once when it starts. A reader thread in the scoring process reads
  the shard's Arrow batches (C++, the lock released) and hands each one, as Arrow IPC bytes, to a
  worker, which converts it to Python and featurizes it; the batch comes back as numpy arrays, Arrow
  tables and two lists of strings. Nothing per row runs in the scoring process. Workers start from a
  forkserver with the featurizing modules imported (spawn where there is none), never forked from a
  process that holds CUDA or Prefect's threads.

On CUDA ``scoring.loader: auto`` is processes: on the H200 a steady 12,500-row shard took 2.7-3.0 s
with them against 3.3-5.0 s with threads (RESULTS, "the scoring feed", run 5).

Until 2026-12 the processes were a DataLoader per shard: each shard started its own workers, and each
worker imported transformers to unpickle the tokenizer and opened the shard itself, ~25 s a shard.
"""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from winnow.errors import WinnowError
from winnow.pipeline.background import ahead
from winnow.pipeline.collate import FeatBatch, Featurizer
from winnow.pipeline.recipe import Recipe
from winnow.pipeline.sources import InputShard, iter_arrow_batches, iter_striped_batches, python_batch


def stream(
    recipe: Recipe, shard: InputShard, feat: Featurizer, workers: int = 0, kind: str = "threads"
) -> Iterator[FeatBatch]:
    """The shard's read batches featurized, in order: inline (``workers`` 0), or by ``workers`` threads
    or processes (``kind``), up to two read batches each ahead of the consumer."""
    if workers <= 0:
        for offset, raw in iter_striped_batches(recipe.data, shard, 1, 0):
            yield FeatBatch.of(feat.featurize(raw, shard.location, offset))
    elif kind == "threads":
        yield from _threaded(recipe, shard, feat, workers)
    else:
        yield from _processes(recipe, shard, feat, workers)


def _in_order(jobs: Iterator[Future], depth: int) -> Iterator[Any]:
    """The jobs' results in order, the jobs made by a reader thread up to ``depth`` ahead (opening and
    reading the shard overlap the consumer's own work); leaving early cancels the jobs not taken."""
    reader = ahead(jobs, depth, "winnow-read", on_drop=lambda f: f.cancel())
    try:
        for job in reader:
            yield job.result()
    finally:
        reader.close()


def _threaded(recipe: Recipe, shard: InputShard, feat: Featurizer, workers: int) -> Iterator[FeatBatch]:
    local = threading.local()

    def work(raw: dict[str, list], offset: int) -> FeatBatch:
        if not hasattr(local, "feat"):
            local.feat = copy.deepcopy(feat)
        return FeatBatch.of(local.feat.featurize(raw, shard.location, offset))

    with ThreadPoolExecutor(workers, thread_name_prefix="winnow-featurize") as pool:
        jobs = (pool.submit(work, raw, off) for off, raw in iter_striped_batches(recipe.data, shard, 1, 0))
        yield from _in_order(jobs, 2 * workers)


# -- processes -------------------------------------------------------------------------------------
_worker_feat: Featurizer | None = None  # in a worker process: the featurizer it was started with


def _worker_start(feat: Featurizer) -> None:
    # one thread each: the processes are the parallelism (a Rust tokenizer's own pool would oversubscribe)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    import torch

    torch.set_num_threads(1)
    global _worker_feat
    _worker_feat = feat  # the parent's own featurizer, handed over by multiprocessing when the worker starts


def _worker_featurize(
    payload: bytes, features: Any, recipe: Recipe, shard: InputShard, offset: int
) -> FeatBatch:
    import pyarrow as pa

    assert _worker_feat is not None
    table = pa.ipc.open_stream(payload).read_all()
    raw = python_batch(recipe.data, shard, table, features)
    return FeatBatch.of(_worker_feat.featurize(raw, shard.location, offset))


def _ipc(table: Any) -> bytes:
    """An Arrow table as IPC stream bytes (a sliced table's own rows only, unlike pickling its buffers)."""
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def _context() -> Any:
    import multiprocessing as mp

    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(
        ["winnow.pipeline.feed", "winnow.pipeline.collate", "datasets", "tokenizers", "transformers"]
    )
    return ctx


class _Pool:
    """W featurizing processes for one featurizer (``key``: its :meth:`Featurizer.identity`)."""

    def __init__(self, key: str, feat: Featurizer, workers: int):
        self.key, self.workers = key, workers
        self.ex = ProcessPoolExecutor(
            workers, mp_context=_context(), initializer=_worker_start, initargs=(feat,)
        )

    def close(self) -> None:
        self.ex.shutdown(wait=True, cancel_futures=True)


_pool: _Pool | None = None
_pool_lock = threading.Lock()


def _pool_for(feat: Featurizer, workers: int) -> _Pool:
    """The run's featurizing processes: the ones already started when they hold this featurizer (shard
    after shard, checkpoint after checkpoint), else new ones (the old ones ended)."""
    global _pool
    key = feat.identity()
    with _pool_lock:
        if _pool is not None and (_pool.key != key or _pool.workers != workers):
            _pool.close()
            _pool = None
        if _pool is None:
            _pool = _Pool(key, feat, workers)
        return _pool


def _worker_ready() -> int:
    return os.getpid()


def prewarm(feat: Featurizer, workers: int) -> threading.Thread:
    """Start the run's featurizing processes in a background thread, while the proxy trains: the
    forkserver's imports and each worker's copy of the tokenizer (~3-8 s on the H200) are then done when
    the first shard is scored, instead of that shard waiting for them. An error here is left to the
    score tasks, which start the processes themselves and report it."""

    def start() -> None:
        try:
            pool = _pool_for(feat, workers)
            for _ in range(workers):  # one job each: the executor starts a process per job it cannot place
                pool.ex.submit(_worker_ready)
        except Exception:  # noqa: BLE001  (the score tasks meet it again and say what it is)
            pass

    t = threading.Thread(target=start, name="winnow-feed-prewarm", daemon=True)
    t.start()
    return t


def release_pools() -> None:
    """End the featurizing processes (the end of a run's scoring)."""
    global _pool
    with _pool_lock:
        if _pool is not None:
            _pool.close()
            _pool = None


def _processes(recipe: Recipe, shard: InputShard, feat: Featurizer, workers: int) -> Iterator[FeatBatch]:
    pool = _pool_for(feat, workers)
    jobs = (
        pool.ex.submit(_worker_featurize, _ipc(table), features, recipe, shard, offset)
        for offset, table, features in iter_arrow_batches(recipe.data, shard)
    )
    try:
        yield from _in_order(jobs, 2 * workers)
    except BrokenProcessPool:
        release_pools()
        raise WinnowError(
            f"{shard.location}: a featurizing process died (out of memory?); "
            "rerun to resume, or set scoring.loader: threads"
        ) from None
