"""Embeddings out of core: vectors written as they come and merged block by block give exactly what the
whole-array merge gives, without holding the vectors; DPP's inputs read the merged file memory-mapped.
The vectors are real data (scikit-learn's digits images, unit rows), the reference a plain numpy merge."""

from __future__ import annotations

import tracemalloc

import numpy as np
import polars as pl
import pytest
import torch

from winnow.pipeline.atomic import npy_rows, read_npy_rows
from winnow.pipeline.embeddings import load_embeddings, merge_embeddings
from winnow.pipeline.layout import RunLayout
from winnow.pipeline.steps import EmbeddingPart
from winnow.pipeline.store import write_parquet


def _digits(reps: int = 1) -> np.ndarray:
    from sklearn.datasets import load_digits

    x = load_digits().data.astype(np.float32)
    x = np.concatenate([x + 0.01 * r for r in range(reps)])  # distinct rows, real images
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def _parts(tmp_path, vecs: np.ndarray, ids: list[str], sizes: list[int]) -> list[EmbeddingPart]:
    layout, parts, a = RunLayout(tmp_path), [], 0
    for s, n in enumerate(sizes):
        vp, ip = layout.embedding_part(s, "f" * 12)
        with npy_rows(vp, np.float16, vecs.shape[1]) as append:
            for b in range(a, a + n, 333):  # written in odd-sized blocks, as batches come
                append(vecs[b : min(a + n, b + 333)])
        write_parquet(pl.DataFrame({"id": ids[a : a + n]}, schema={"id": pl.Utf8}), ip)
        parts.append(EmbeddingPart(s, layout.rel(vp), layout.rel(ip)))
        a += n
    return parts


def test_rows_file_round_trips_and_is_atomic(tmp_path):
    x = _digits()
    path = tmp_path / "v.npy"
    with npy_rows(path, np.float16, x.shape[1]) as append:
        for b in range(0, len(x), 500):
            append(x[b : b + 500])
    assert np.array_equal(np.load(path), x)
    want = np.sort(np.random.default_rng(0).choice(len(x), 300, replace=False))
    blocks = list(read_npy_rows(path, want, block=64))
    assert all(len(b) <= 64 for b in blocks) and np.array_equal(np.concatenate(blocks), x[want])
    with (
        pytest.raises(ValueError, match=r"expected \(rows, 64\)"),
        npy_rows(tmp_path / "w.npy", np.float16, 64) as a,
    ):
        a(x[:10])
        a(x[:10, :8])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.npy"]  # nothing half-written


def test_streamed_merge_is_the_whole_array_merge_without_holding_the_vectors(tmp_path, monkeypatch):
    import winnow.pipeline.embeddings as emb

    monkeypatch.setattr(emb, "MERGE_BLOCK_BYTES", 16 << 10)  # 128 rows of 64: blocks much smaller than parts
    x = _digits(reps=8)  # 14,376 x 64
    n = len(x)
    rng = np.random.default_rng(1)
    ids = [f"r{i}" for i in range(n)]
    for i in rng.choice(n, 2000, replace=False):  # duplicates across and within parts: first one wins
        ids[i] = ids[int(rng.integers(0, n))]
    sizes = [5000, 1, 0, 6000, n - 11001]
    parts = _parts(tmp_path, x, ids, sizes)
    # the reference: every part whole, concatenated, first occurrence of each id
    seen, keep = set(), []
    for i, k in enumerate(ids):
        if k not in seen:
            seen.add(k)
            keep.append(i)
    tracemalloc.start()
    out = merge_embeddings(tmp_path, parts, "fp")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    layout = RunLayout(tmp_path)
    got = np.load(layout.embedding_vectors)
    assert out["rows"] == len(keep) and out["dim"] == 64
    assert np.array_equal(got, x[keep])
    assert pl.read_parquet(layout.embedding_ids)["id"].to_list() == [ids[i] for i in keep]
    assert peak < x.nbytes / 2, (
        f"the merge held {peak} bytes of Python/numpy memory for {x.nbytes} of vectors"
    )


def test_load_gives_the_file_mapped_in_stored_order_and_gathers_any_other(tmp_path):
    x = _digits(reps=2)
    ids = [f"r{i}" for i in range(len(x))]
    merge_embeddings(tmp_path, _parts(tmp_path, x, ids, [1000, len(x) - 1000]), "fp")
    same = load_embeddings(tmp_path, ids, np.float16)
    assert isinstance(same, np.memmap) and np.array_equal(same, x)
    torch.from_numpy(same)  # copy-on-write: writable, so torch takes it without a warning or a copy
    order = np.random.default_rng(2).permutation(len(x))[:777]
    got = load_embeddings(tmp_path, [ids[i] for i in order])
    assert got.dtype == np.float32 and not isinstance(got, np.memmap)
    assert np.array_equal(got, x[order].astype(np.float32))


def test_kmeans_over_the_mapped_file_labels_as_over_memory(tmp_path):
    pytest.importorskip("faiss")
    from winnow.pipeline.clustering import kmeans_assign

    x = _digits(reps=3)
    ids = [f"r{i}" for i in range(len(x))]
    merge_embeddings(tmp_path, _parts(tmp_path, x, ids, [len(x)]), "fp")
    mapped = load_embeddings(tmp_path, ids, np.float16)
    assert np.array_equal(kmeans_assign(mapped, 10, seed=3), kmeans_assign(x.astype(np.float32), 10, seed=3))
