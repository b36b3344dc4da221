"""The streamed influence merge (memory-mapped parts, blocks of a few rows) gives what the plain whole-array
computation gives: scores, the held-out AUROC, exact top-k neighbours and the merged features."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import torch

from tests.conftest import tiny_recipe
from winnow.pipeline import influence as inf
from winnow.pipeline.atomic import save_npy
from winnow.pipeline.layout import PROVENANCE_KEY, RunLayout
from winnow.pipeline.recipe import Recipe
from winnow.pipeline.steps import FeaturePart, WeightedCheckpoint
from winnow.pipeline.store import write_parquet
from winnow.scorers.influence import (
    gradient_similarity,
    heldout_target_auroc,
    influence_scores,
    mean_direction,
    self_influence,
)


def _units(rng, c, n, k):
    x = rng.standard_normal((c, n, k)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=2, keepdims=True)).astype(np.float16)


def _part(run, role, shard, units, ids, doms, rng, C):
    layout = RunLayout(run)
    vec, meta = layout.influence_part(role, shard, "f" * 12)
    cols = {"id": ids, "domain": doms, "preview": [f"text of {i}" for i in ids]}
    for c in range(C):
        cols[f"norm@{c}"] = rng.uniform(0.5, 2.0, len(ids)).tolist()
        cols[f"sqnorm@{c}"] = rng.uniform(0.5, 4.0, len(ids)).tolist()
    save_npy(vec, units)
    write_parquet(pl.DataFrame(cols), meta, {"fingerprint": "x"})
    return FeaturePart(shard, role, layout.rel(vec), layout.rel(meta), rows=len(ids))


def test_streamed_merge_equals_the_whole_array_reference(corpus, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    C, k, run = 3, 24, tmp_path / "run"
    r = tiny_recipe(corpus, run)
    r["scoring"]["influence"] = {"target": "x/*.jsonl", "proj_dim": k, "neighbours": 4, "device": "cpu"}
    recipe = Recipe.model_validate(r)
    sizes = [13, 1, 20]
    parts, all_ids, all_doms, all_units = [], [], [], []
    for s, n in enumerate(sizes):
        ids = [f"r{s}-{i}" for i in range(n)]
        if s == 2:
            ids[3], ids[7] = "r0-5", "r2-0"  # repeats: the first occurrence counts, the others are dropped
        doms = [["code", "prose", None][(i + s) % 3] for i in range(n)]
        u = _units(rng, C, n, k)
        parts.append(_part(run, "train", s, u, ids, doms, rng, C))
        all_ids += ids
        all_doms += doms
        all_units.append(u)
    tu = _units(rng, C, 9, k)
    tdoms = ["a", "b", "a", "a", "b", "c", "a", "b", "c"]
    tparts = [_part(run, "target", 0, tu, [f"t{i}" for i in range(9)], tdoms, rng, C)]
    ick = [WeightedCheckpoint(0, 10 * (i + 1), f"ck{i}", f"fp{i}", w) for i, w in enumerate([0.5, 1.0, 0.25])]
    monkeypatch.setattr(inf, "MERGE_BLOCK_BYTES", 4 * (C * k + 18) * 3)  # three rows a block
    got = inf.merge_influence(recipe, run, parts, tparts, ick, "step-fp")

    # the reference: every array whole, the scorers' own functions, a brute-force top-k
    metas = [pl.read_parquet(run / p.meta) for p in parts]
    meta = pl.concat(metas).with_row_index("_i").unique(subset="id", keep="first", maintain_order=True)
    keep = meta["_i"].to_numpy()
    units = np.concatenate(all_units, axis=1)[:, keep]
    tmeta = pl.read_parquet(run / tparts[0].meta)
    w = [c.weight for c in ick]
    train = [torch.from_numpy(units[i]) for i in range(C)]
    target = [torch.from_numpy(tu[i]) for i in range(C)]
    names = sorted(set(tdoms))
    sub = torch.tensor([names.index(d) for d in tdoms])
    doms = ["" if d is None else d for d in meta["domain"].to_list()]
    dn = sorted(set(doms))
    groups = torch.tensor([dn.index(d) for d in doms])
    norms = [torch.tensor(meta[f"norm@{i}"].to_numpy()) for i in range(C)]
    tn = [torch.tensor(tmeta[f"norm@{i}"].to_numpy()) for i in range(C)]
    want = {
        "influence": influence_scores(train, target, w, sub),
        "self_influence": self_influence([torch.tensor(meta[f"sqnorm@{i}"].to_numpy()) for i in range(C)], w),
        "gradsim_target": gradient_similarity(
            train, [mean_direction(target[i].float(), tn[i]) for i in range(C)]
        ),
        "gradsim_domain": gradient_similarity(
            train, [mean_direction(train[i].float(), norms[i], groups, len(dn)) for i in range(C)], groups
        ),
    }
    scores = pl.read_parquet(run / "scores" / "influence.parquet")
    assert scores["id"].to_list() == meta["id"].to_list() and got["rows"] == len(keep) == sum(sizes) - 2
    for col, ref in want.items():
        np.testing.assert_allclose(scores[col].to_numpy(), ref.double().numpy(), rtol=1e-5, atol=1e-6)
    prov = json.loads(pq.read_schema(run / "scores" / "influence.parquet").metadata[PROVENANCE_KEY])
    assert abs(prov["heldout_target_auroc"] - heldout_target_auroc(train, target, w, sub)) < 1e-9
    # neighbours: each target's 4 best training rows by sum_i w_i <train_i, target_i>, exactly
    pair = sum(w[i] * units[i].astype(np.float32) @ tu[i].astype(np.float32).T for i in range(C))
    nb = pl.read_parquet(run / "influence" / "neighbours.parquet")
    assert nb.height == 9 * 4
    ids = meta["id"].to_list()
    for t in range(9):
        mine = nb.filter(pl.col("target_id") == f"t{t}").sort("rank")
        best = np.argsort(-pair[:, t], kind="stable")[:4]
        assert mine["id"].to_list() == [ids[j] for j in best]
        np.testing.assert_allclose(mine["influence"].to_numpy(), pair[best, t], rtol=1e-5)
        assert mine["preview"].to_list() == [f"text of {ids[j]}" for j in best]
        assert set(mine["subtask"]) == {tdoms[t]}
    feats = np.load(run / "influence" / "features.npy")
    assert feats.dtype == np.float16 and np.array_equal(feats, units.transpose(1, 0, 2))
    assert pl.read_parquet(run / "influence" / "ids.parquet")["id"].to_list() == ids
