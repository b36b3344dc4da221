"""Influence scoring through the recipe, the flow and the CLI, on real multi-domain text: the target is a
held-out slice of one domain, and the top 5% by influence must come mostly from that domain."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
import torch

from tests.conftest import tiny_recipe, write_recipe
from winnow.cli import main

pytestmark = pytest.mark.usefixtures("prefect_harness")

TARGET_DOMAIN = "prose"


@pytest.fixture(scope="module")
def infl_run(tmp_path_factory):
    from winnow.pipeline.demo import build_demo_corpus

    root = tmp_path_factory.mktemp("infl")
    counts = build_demo_corpus(
        root / "data",
        per_domain=90,
        rows_per_file=45,
        domains=["code", "prose", "licenses"],
        hold_out=(TARGET_DOMAIN, 24),
        hold_out_dir=root / "target",
    )
    r = tiny_recipe(root / "data", root / "run")
    r["model"]["config"].update(n_layer=2, n_head=4, n_embd=64)  # 1 layer x 32 wide reached only 0.58
    r["train"].update(steps=60, seeds=[0], checkpoints=[20, 40, 60])
    r["scoring"]["influence"] = {
        "target": str(root / "target" / "*.jsonl"),
        "proj_dim": 2048,
        "neighbours": 5,
        "batch_size": 16,
    }
    r["select"] = {"method": "score", "score": "influence", "fraction": 0.05, "keep": "highest"}
    recipe = write_recipe(root / "infl.yaml", r)
    assert main(["run", str(recipe)]) == 0
    return root, recipe, counts


def _precision(df: pl.DataFrame, col: str, frac: float = 0.05) -> float:
    n = max(1, round(frac * df.height))
    top = df.drop_nulls(col).sort(col, descending=True).head(n)
    return float((top["domain"] == TARGET_DOMAIN).mean())


def _domain_auroc(df: pl.DataFrame, col: str) -> float:
    """P(a target-domain row scores above another domain's row), ties counted half."""
    from winnow.scorers.influence import auroc

    pos = df.filter(pl.col("domain") == TARGET_DOMAIN)[col].to_numpy()
    neg = df.filter(pl.col("domain") != TARGET_DOMAIN)[col].to_numpy()
    return float(auroc(torch.tensor(pos), torch.tensor(neg)))


def test_top_influence_is_the_target_domain(infl_run, capsys):
    """The statistics asserted are the ones that hold for every training trajectory, not only seed 0's.
    Measured over train seeds 0-4 of this recipe (2026-12-03, 60 steps): influence's domain AUROC over all
    rows 0.835-0.881 (EL2N's 0.555-0.579), precision in the top 10% 0.68-0.80 (EL2N's 0.20-0.24, domain
    share 0.27), in the top 5% (12 rows) 0.75-1.00, held-out target AUROC 0.752-0.908. The top 5% alone is
    12 rows and moves by a row or two with the trajectory: at 120 steps seed 2 gave 0.50."""
    root, _, _ = infl_run
    run = root / "run"
    rows = pl.read_parquet(run / "scores" / "rows.parquet")
    df = rows.join(pl.read_parquet(run / "scores" / "influence.parquet"), on="id").join(
        pl.read_parquet(run / "scores" / "el2n.parquet").select("id", "el2n"), on="id"
    )
    assert df.height == rows.height and df["influence"].is_finite().all()
    base = float((df["domain"] == TARGET_DOMAIN).mean())
    p = {c: _precision(df, c) for c in ("influence", "gradsim_target", "el2n", "self_influence")}
    rng = np.random.default_rng(0)
    n = max(1, round(0.05 * df.height))
    doms = df["domain"].to_numpy()
    rand = float(
        np.mean([(doms[rng.choice(len(doms), n, replace=False)] == TARGET_DOMAIN).mean() for _ in range(200)])
    )
    with capsys.disabled():
        print(
            f"\n[influence] target {TARGET_DOMAIN!r}, {df.height} rows, top {n}: precision influence "
            f"{p['influence']:.2f}, gradsim_target {p['gradsim_target']:.2f}, el2n {p['el2n']:.2f}, "
            f"self_influence {p['self_influence']:.2f}, random {rand:.2f} (domain share {base:.2f})"
        )
    auc = {c: _domain_auroc(df, c) for c in ("influence", "el2n")}
    p10 = {c: _precision(df, c, 0.10) for c in ("influence", "el2n")}
    with capsys.disabled():
        print(
            f"[influence] domain AUROC influence {auc['influence']:.3f}, el2n {auc['el2n']:.3f}; top 10% "
            f"precision influence {p10['influence']:.2f}, el2n {p10['el2n']:.2f}"
        )
    assert auc["influence"] > 0.8 and auc["influence"] > auc["el2n"] + 0.2
    assert p10["influence"] >= 0.6 and p10["influence"] > max(base, p10["el2n"]) + 0.3
    assert p["influence"] > rand + 0.3 and p["influence"] > p["el2n"] + 0.3
    # the selection is the top 5% by influence
    sel = pl.read_parquet(run / "selection.parquet").filter(pl.col("kept"))
    assert sel.height == n
    assert set(sel["id"]) == set(df.sort("influence", descending=True).head(n)["id"])
    # typicality: every example's gradient is closer to its own domain's mean than to the average domain's
    assert float(df["gradsim_domain"].mean()) > 0
    # the signal check: half of the target, scored against the other half, ranks above the training rows
    import pyarrow.parquet as pq

    from winnow.pipeline.layout import PROVENANCE_KEY
    from winnow.report import summarize

    prov = json.loads(pq.read_schema(run / "scores" / "influence.parquet").metadata[PROVENANCE_KEY])
    with capsys.disabled():
        print(f"[influence] held-out target AUROC {prov['heldout_target_auroc']:.3f}")
    assert prov["heldout_target_auroc"] > 0.7  # winnow warns below 0.6
    assert not [m for m in summarize(run)["signal"] if m.startswith("influence")]


def test_neighbours_features_and_report(infl_run):
    root, _, _ = infl_run
    run = root / "run"
    nb = pl.read_parquet(run / "influence" / "neighbours.parquet")
    target_rows = sum(1 for _ in open(root / "target" / "target.jsonl"))
    assert nb.height == target_rows * 5 and nb["rank"].max() == 5
    # ranks are by decreasing influence, and the neighbour's influence equals the pairwise LESS score
    first = nb.filter(pl.col("target_id") == nb["target_id"][0]).sort("rank")
    assert first["influence"].to_list() == sorted(first["influence"].to_list(), reverse=True)
    feats = np.load(run / "influence" / "features.npy")
    ids = pl.read_parquet(run / "influence" / "ids.parquet")["id"].to_list()
    assert feats.dtype == np.float16 and feats.shape[:2] == (len(ids), 3) and feats.shape[2] == 2048
    np.testing.assert_allclose(np.linalg.norm(feats.astype(np.float32), axis=2), 1.0, atol=2e-3)
    html = (run / "report.html").read_text()
    assert "Influence on the target set" in html and "Most influential training examples" in html


def test_features_scored_in_another_process_are_the_same(infl_run):
    """A shard scored in a fresh process (one torch thread) gives the features the flow stored."""
    root, recipe, _ = infl_run
    run = root / "run"
    part = sorted((run / "influence" / "parts").glob("feat-00001-*.npy"))
    assert len(part) == 1
    code = f"""
import json, sys, numpy as np, torch
torch.set_num_threads(1)
from pathlib import Path
from winnow.pipeline.recipe import load_recipe
from winnow.pipeline.sources import list_shards
from winnow.pipeline.influence import compute_features, influence_checkpoints
from winnow.pipeline.steps import featurizer as _featurizer
recipe = load_recipe(Path({str(recipe)!r}), [])
run = Path({str(run)!r})
ckpts = []
for st in sorted(run.glob("checkpoints/*/seed-0/step-*/state.json")):
    k = int(st.parent.name.split("-")[1])
    ckpts.append({{"seed": 0, "step": k, "path": str(st.parent.relative_to(run)), "fingerprint": ""}})
ick = influence_checkpoints(recipe, sorted(ckpts, key=lambda c: c["step"]))
tok = next(run.glob("tokenizer*"), None) or next(run.rglob("tokenizer.json")).parent
feat, _, _ = _featurizer(recipe, str(tok))
f = compute_features(recipe, run, list_shards(recipe.data)[1], feat, ick)
np.save(sys.argv[1], f["units"])
"""
    out = root / "other.npy"
    env = dict(os.environ, PYTHONHASHSEED="7")
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, env=env, cwd=os.getcwd())
    mine, theirs = np.load(part[0]).astype(np.float32), np.load(out).astype(np.float32)
    assert mine.shape == theirs.shape
    np.testing.assert_allclose(theirs, mine, atol=2e-3, rtol=0)
    cos = (mine * theirs).sum(-1)
    assert float(cos.min()) > 0.9999


def test_rerun_is_cached_and_bad_target_is_refused(infl_run, tmp_path, capsys):
    root, recipe, _ = infl_run
    assert main(["run", str(recipe)]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if "gradient features" in ln or "merge influence" in ln]
    assert lines and all("Cached" in ln for ln in lines), lines
    r = json.loads(json.dumps(__import__("yaml").safe_load(recipe.read_text())))
    r["scoring"]["influence"]["target"] = str(tmp_path / "nothing" / "*.jsonl")
    r["output"]["dir"] = str(tmp_path / "run2")
    assert main(["run", str(write_recipe(tmp_path / "bad.yaml", r))]) == 2
    err = capsys.readouterr().err
    assert "scoring.influence.target" in err
    r["scoring"]["influence"]["target"] = str(root / "target" / "*.jsonl")
    r["scoring"]["influence"]["subtask_column"] = "task"
    assert main(["run", str(write_recipe(tmp_path / "bad2.yaml", r))]) == 2
    err = capsys.readouterr().err
    assert "scoring.influence.subtask_column" in err and "'task'" in err
    assert not (tmp_path / "run2" / "scores").exists()
