"""End to end through the CLI on real local text: train, score, select, emit, report, rerun, resume."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from tests.conftest import ROOT, tiny_recipe, write_recipe
from winnow.cli import main

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture(scope="module")
def first_run(corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    run_dir = tmp / "run"
    recipe = write_recipe(tmp / "recipe.yaml", tiny_recipe(corpus, run_dir))
    assert main(["run", str(recipe)]) == 0
    return recipe, run_dir


def _manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def test_outputs_match_manifest_and_load_with_datasets(first_run, corpus):
    import datasets

    _, run_dir = first_run
    man = _manifest(run_dir)
    sel = pl.read_parquet(run_dir / "selection.parquet")
    n_input = sum(1 for f in corpus.glob("*.jsonl") for _ in open(f))
    assert man["counts"]["input_rows"] == n_input == sel.height
    # stratified: half of every domain is kept
    assert man["counts"]["kept_rows"] == int(sel["kept"].sum())
    for d in man["domains"].values():
        assert d["kept_rows"] == round(d["input_rows"] * 0.5)

    files = [str(run_dir / s["path"]) for s in man["shards"]]
    assert len(files) >= 2 and all(Path(f).name.startswith("data-") for f in files)
    assert Path(files[0]).name.endswith(f"-of-{len(files):05d}.parquet")
    ds = datasets.load_dataset("parquet", data_files=files, split="train")
    assert ds.num_rows == man["counts"]["kept_rows"]
    assert set(ds.column_names) >= {"id", "text", "domain", "origin", "weight"}
    # every row's weight is the selection's; kept rows only; weights have mean 1
    want = dict(zip(sel["id"].to_list(), sel["weight"].to_list(), strict=True))
    kept = set(sel.filter(pl.col("kept"))["id"].to_list())
    assert set(ds["id"]) == kept
    assert np.allclose(ds["weight"], [want[i] for i in ds["id"]])
    assert np.isclose(np.mean(ds["weight"]), 1.0)
    # proportions: each domain's share of the total weight, as interleave_datasets takes them
    w = np.asarray(ds["weight"])
    doms = np.asarray(ds["domain"])
    for name, p in zip(man["interleave"]["names"], man["interleave"]["probabilities"], strict=True):
        assert p == pytest.approx(w[doms == name].sum() / w.sum())
    assert sum(man["interleave"]["probabilities"]) == pytest.approx(1.0)
    assert [s["name"] for s in man["mosaic_streams"]] == man["interleave"]["names"]
    # shard hashes
    from winnow.pipeline.atomic import sha256_file

    for s in man["shards"]:
        assert sha256_file(run_dir / s["path"]) == s["sha256"]
    assert (run_dir / "report.html").stat().st_size > 10_000
    assert (run_dir / "config.yaml").exists()
    assert not list(run_dir.rglob("*.tmp-*"))


def test_scores_average_seeds_and_checkpoints_against_reference(first_run, corpus):
    """EL2N in the store equals a plain full-softmax reference, averaged over 2 seeds x 2 checkpoints."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from winnow.pipeline.store import read_provenance

    _, run_dir = first_run
    scores = pl.read_parquet(run_dir / "scores" / "el2n.parquet")
    ck_cols = [c for c in scores.columns if c.startswith("el2n@")]
    assert sorted(ck_cols) == ["el2n@s0k16", "el2n@s0k8", "el2n@s1k16", "el2n@s1k8"]
    prov = read_provenance(run_dir / "scores" / "el2n.parquet")
    assert prov["scorer"] == "el2n" and prov["seeds"] == [0, 1] and len(prov["checkpoints"]) == 4
    assert prov["model_fingerprint"] and prov["package_version"]

    rows = [json.loads(line) for f in sorted(corpus.glob("*.jsonl")) for line in open(f)]
    sample = rows[::37][:6]
    tok = AutoTokenizer.from_pretrained(str(next(run_dir.glob("tokenizer-*"))))
    by_id = {r: i for i, r in enumerate(scores["id"].to_list())}
    ref = np.zeros((len(prov["checkpoints"]), len(sample)))
    for k, ck in enumerate(prov["checkpoints"]):
        model = AutoModelForCausalLM.from_pretrained(str(run_dir / ck["path"])).eval()
        for j, r in enumerate(sample):
            ids = tok(r["text"], truncation=True, max_length=48)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, :-1].double()
            p = torch.softmax(logits, -1)
            onehot = torch.nn.functional.one_hot(torch.tensor(ids[1:]), p.shape[-1]).double()
            ref[k, j] = (p - onehot).norm(dim=-1).mean().item()
            col = f"el2n@s{ck['seed']}k{ck['step']}"
            assert scores[col][by_id[r["id"]]] == pytest.approx(ref[k, j], rel=1e-4)
    got = np.array([scores["el2n"][by_id[r["id"]]] for r in sample])
    np.testing.assert_allclose(got, ref.mean(0), rtol=1e-4)


def test_checkpoints_keep_where_training_time_went(first_run):
    """Each checkpoint's state.json says where the proxy's seconds went (read by bench_pipeline)."""
    _, run_dir = first_run
    for seed in (0, 1):
        states = sorted(
            run_dir.glob(f"checkpoints/*/seed-{seed}/step-*/state.json"),
            key=lambda p: int(p.parent.name.split("-")[1]),
        )
        assert len(states) == 2, states
        first, last = (json.loads(p.read_text())["timing"] for p in states)
        assert set(last) == {"init_s", "first_step_s", "steps_s", "save_s"}
        assert all(v >= 0 for v in last.values())
        assert last["init_s"] > 0 and last["first_step_s"] > 0
        # the steps so far: more of them by the later checkpoint, which also counts the earlier's save
        assert last["steps_s"] > first["steps_s"] > 0 and last["save_s"] > first["save_s"]


def test_rerun_of_unchanged_recipe_skips_every_step(first_run):
    from winnow.flows.run import run_recipe
    from winnow.pipeline.recipe import load_recipe

    recipe, run_dir = first_run
    run_recipe(load_recipe(recipe))  # the module's recipe as it was (other tests here may run others first)
    latest = sorted(p.name for p in run_dir.glob("v[0-9]*"))[-1]
    before = {p: p.read_bytes() for p in (run_dir / "shards").glob("*.parquet")}
    summary = run_recipe(load_recipe(recipe))
    states = {s["step"]: s["state"] for s in summary["steps"]}
    # every task cached; the outputs are the last run's, so no new version either
    assert states.pop("version") == f"{latest} (unchanged)"
    assert states and all(v == "Cached" for v in states.values()), states
    assert summary["scored"] == 0 and summary["reused"] == summary["rows"]
    after = {p: p.read_bytes() for p in (run_dir / "shards").glob("*.parquet")}
    assert before == after


def test_changing_the_selector_reuses_training_and_scores(first_run):
    from winnow.flows.run import run_recipe
    from winnow.pipeline.recipe import load_recipe

    recipe, run_dir = first_run
    first_sel = pl.read_parquet(run_dir / "selection.parquet")
    summary = run_recipe(load_recipe(recipe, ["select.fraction=0.25", "select.weights.method=uniform"]))
    states = {s["step"]: s["state"] for s in summary["steps"]}
    assert all(v == "Cached" for k, v in states.items() if k.startswith(("train", "score", "tokenizer"))), (
        states
    )
    assert states["select"] == "Completed" and states["emit shards"] == "Completed"
    man = _manifest(run_dir)
    assert man["selector"]["fraction"] == 0.25
    sel = pl.read_parquet(run_dir / "selection.parquet")
    assert set(sel.filter(pl.col("kept"))["weight"].unique().to_list()) == {1.0}
    # back to the first recipe: the steps are cached, but selection.parquet and the shards on disk were
    # made by the other selector, so those steps are redone (their files record a fingerprint); the report
    # is a new one: it compares with the other selector's version, which these outputs follow
    from winnow.pipeline.versions import list_versions

    other = list_versions(run_dir)[-1]["name"]
    summary = run_recipe(load_recipe(recipe))
    states = {s["step"]: s["state"] for s in summary["steps"]}
    assert states["select"] == states["emit shards"] == "Completed (cache stale)", states
    assert (
        states["report"] == "Completed" and f"Changes since {other}" in (run_dir / "report.html").read_text()
    )
    assert all(v == "Cached" for k, v in states.items() if k.startswith(("train", "score", "merge"))), states
    assert pl.read_parquet(run_dir / "selection.parquet").equals(first_sel)


def _cli(args: list[str], env: dict, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "winnow", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def test_killed_run_resumes_to_the_same_outputs(corpus, tmp_path, first_run):
    """SIGKILL a run after its first checkpoint, rerun it: the outputs equal an uninterrupted run's."""
    _, ref_dir = first_run
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(corpus, run_dir))
    from prefect.settings import PREFECT_API_URL

    # the subprocess talks to this session's test server instead of starting its own
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), PYTHONUNBUFFERED="1")
    # the run kills itself (SIGKILL) right after seed 0's step-8 checkpoint: polling for the checkpoint
    # from here raced a 16-step training that can finish before the poll sees step 8
    proc = _cli(["run", str(recipe)], dict(env, WINNOW_FAULT="train:seed0:step8"), start_new_session=True)
    proc.communicate(timeout=240)
    assert proc.returncode == -signal.SIGKILL
    assert list(run_dir.glob("checkpoints/*/seed-0/step-8/state.json"))
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    assert not (run_dir / "manifest.json").exists()
    assert not list(run_dir.glob("checkpoints/*/seed-0/step-16/state.json"))

    proc = _cli(["run", str(recipe)], env)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    a = pl.read_parquet(run_dir / "selection.parquet")
    b = pl.read_parquet(ref_dir / "selection.parquet")
    assert a.equals(b)
    sa = pl.read_parquet(run_dir / "scores" / "el2n.parquet")
    sb = pl.read_parquet(ref_dir / "scores" / "el2n.parquet")
    assert sa.equals(sb)
    ma, mb = _manifest(run_dir), _manifest(ref_dir)
    assert [s["sha256"] for s in ma["shards"]] == [s["sha256"] for s in mb["shards"]]
    assert not list(run_dir.rglob("*.tmp-*"))


def test_report_inspect_and_artifact(first_run, capsys):
    _, run_dir = first_run
    (run_dir / "report.html").unlink()
    assert main(["report", str(run_dir)]) == 0
    html = (run_dir / "report.html").read_text()
    assert "data:image/png;base64," in html and "<script" not in html
    assert main(["inspect", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "code" in out and "prose" in out and "kept" in out.lower()

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        # this module's run: other tests of this process also run recipes named t on the same server
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
        from prefect.client.schemas.sorting import ArtifactSort

        mine = ArtifactFilter(key=ArtifactFilterKey(any_=["winnow-t"]))
        arts = [
            a
            for a in client.read_artifacts(artifact_filter=mine, sort=ArtifactSort.CREATED_DESC, limit=200)
            if str(run_dir / "shards") in a.data
        ]
    assert arts and "kept" in arts[0].data and "| domain |" in arts[0].data


def test_loader_threads_and_wide_buckets_score_the_same(first_run, corpus, tmp_path):
    """Featurizing in 3 threads ahead of the model, with small read batches length-sorted 7 rows at a time
    across read batches (the GPU path's feed, forced on CPU), gives every row the scores of the inline
    path, in the same row order."""
    _, base_dir = first_run
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(
        corpus, run_dir, data__read_batch_size=5, scoring__loader_workers=3, scoring__bucket_rows=7
    )
    assert main(["run", str(write_recipe(tmp_path / "recipe.yaml", recipe))]) == 0
    base = pl.read_parquet(base_dir / "scores" / "el2n.parquet")
    got = pl.read_parquet(run_dir / "scores" / "el2n.parquet")
    assert got["id"].to_list() == base["id"].to_list()
    for col in [c for c in base.columns if c.startswith("el2n")]:
        np.testing.assert_allclose(got[col].to_numpy(), base[col].to_numpy(), rtol=1e-5)
    rows = pl.read_parquet(next(run_dir.glob("scores/rows*.parquet")))
    assert rows["id"].to_list() == base["id"].to_list()
