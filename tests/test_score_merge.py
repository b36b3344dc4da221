"""The merge-scores step (winnow/pipeline/score_merge.py): the store out of core, previews apart, the parts
removed once merged, and a rerun that resumes from the store (real text, a fixed model: scores do not
depend on which run computed them)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from tests.conftest import ROOT, corpus_rows, tiny_recipe, write_recipe, write_rows

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _recipe(corpus: Path, model: Path, data: Path, run: Path) -> dict:
    r = tiny_recipe(corpus, run)
    r["data"]["source"] = f"{data}/*.jsonl"
    r["model"] = {"task": "causal_lm", "path": str(model), "max_length": 48}
    r["train"] = {"steps": 0, "seeds": [0]}
    r["scoring"] = {"scorers": [{"name": "el2n"}, {"name": "loss"}], "batch_size": 16}
    return r


def _data(corpus: Path, folder: Path, rows_per_file: int = 50, extra: list[dict] | None = None) -> Path:
    rows = corpus_rows(corpus)
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(0, 150, rows_per_file):
        write_rows(folder / f"part-{k // rows_per_file:03d}.jsonl", rows[k : k + rows_per_file])
    return folder


def _run(tmp: Path, name: str, rec: dict) -> dict[str, str]:
    from winnow.flows.run import run_recipe
    from winnow.pipeline.recipe import load_recipe

    summary = run_recipe(load_recipe(write_recipe(tmp / f"{name}.yaml", rec)))
    return {s["step"]: s["state"] for s in summary["steps"]}


def _store(run: Path) -> dict[str, pl.DataFrame]:
    return {
        f: pl.read_parquet(run / "scores" / f"{f}.parquet")
        for f in ("el2n", "loss", "rows", "previews", "order")
    }


def _same_store(a: Path, b: Path) -> None:
    sa, sb = _store(a), _store(b)
    for f in sa:
        assert sa[f].equals(sb[f], null_equal=True), f


def test_store_has_previews_apart_and_no_parts_left(tmp_path, corpus, model_folder):
    data = _data(corpus, tmp_path / "data")
    run = tmp_path / "run"
    _run(tmp_path, "r", _recipe(corpus, model_folder, data, run))
    store = _store(run)
    assert store["rows"].columns == ["id", "domain", "label", "n_tokens"]
    assert store["previews"].columns == ["id", "preview"]
    assert store["previews"]["id"].to_list() == store["rows"]["id"].to_list() == store["el2n"]["id"].to_list()
    texts = {r["id"]: r["text"] for r in corpus_rows(corpus)[:150]}
    assert all(texts[i].startswith(p) for i, p in store["previews"].iter_rows())
    assert store["rows"].height == 150 and not list((run / "scores" / "parts").glob("*"))
    # every input row's shard and id, in source order (what emit reads instead of hashing the source)
    ids = [r["id"] for r in corpus_rows(corpus)[:150]]  # data.id_column: the corpus's own ids
    assert store["order"].columns == ["shard", "id"]
    assert store["order"]["id"].to_list() == ids
    assert store["order"]["shard"].to_list() == [k // 50 for k in range(150)]
    # the report reads the previews for the rows it shows
    from winnow.report.load import _load, _previews

    some = store["rows"]["id"].to_list()[:3]
    assert _previews(_load(run), some) == {i: texts[i][:500] for i in some}
    # each removed part's timing outlives it, its phases in order (first batch, last launch, device drained)
    timing = json.loads((run / "scores" / "timing.json").read_text())
    assert len(timing) == 3
    for t in timing.values():
        m = t["marks"]
        assert 0 <= m["first_batch"] <= m["streamed@0"] <= m["finished@0"] <= t["seconds"]


def test_rescoring_one_shard_merges_the_others_from_the_store(tmp_path, corpus, model_folder):
    data = _data(corpus, tmp_path / "data")
    run = tmp_path / "run"
    rec = _recipe(corpus, model_folder, data, run)
    _run(tmp_path, "r", rec)
    # rows appended to the middle file: its shard is scored again, the others are cached and their parts
    # are gone, so the merge takes their rows back from the store's slices
    rows = corpus_rows(corpus)
    write_rows(data / "part-001.jsonl", rows[50:100] + rows[150:170])
    states = _run(tmp_path, "r", rec)
    assert states["score part-001.jsonl"] == "Completed"
    assert states["score part-000.jsonl"] == states["score part-002.jsonl"] == "Cached"
    assert states["merge scores"] == "Completed"
    assert not list((run / "scores" / "parts").glob("*"))
    # the same store as a fresh run on the same data writes
    fresh = tmp_path / "fresh"
    _run(tmp_path, "f", _recipe(corpus, model_folder, data, fresh))
    _same_store(run, fresh)
    assert _store(run)["rows"].height == 170
    assert json.loads((run / "manifest.json").read_text())["counts"]["input_rows"] == 170


def test_kill_after_merge_before_parts_removed_resumes(tmp_path, corpus, model_folder):
    from prefect.settings import PREFECT_API_URL

    data = _data(corpus, tmp_path / "data")
    run, ref = tmp_path / "run", tmp_path / "ref"
    rec = write_recipe(tmp_path / "r.yaml", _recipe(corpus, model_folder, data, run))
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), WINNOW_FAULT="merge-scores")
    p = subprocess.run(
        [sys.executable, "-m", "winnow", "run", str(rec)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert p.returncode == -9, p.stdout[-2000:] + p.stderr[-2000:]
    assert len(list((run / "scores" / "parts").glob("*.parquet"))) == 6  # the store in place, parts too
    states = _run(tmp_path, "r", _recipe(corpus, model_folder, data, run))
    assert states["merge scores"] == "Completed" and not list((run / "scores" / "parts").glob("*"))
    _run(tmp_path, "ref", _recipe(corpus, model_folder, data, ref))
    _same_store(run, ref)
    # and once more: every step cached
    states = _run(tmp_path, "r", _recipe(corpus, model_folder, data, run))
    states.pop("version")
    assert all(v == "Cached" for v in states.values()), states


def test_a_part_with_repeats_of_an_earlier_part_stays_until_it_can_be_rebuilt(tmp_path, corpus, model_folder):
    rows = corpus_rows(corpus)
    data = _data(corpus, tmp_path / "data")
    write_rows(data / "part-002.jsonl", rows[100:150] + rows[:5])  # 5 rows repeat part-000's (same ids)
    r = _recipe(corpus, model_folder, data, tmp_path / "run")
    r["data"]["id_column"] = None  # ids are content hashes: a repeat is the same example
    _run(tmp_path, "r", r)
    parts = sorted(p.name for p in (tmp_path / "run" / "scores" / "parts").glob("*.parquet"))
    assert [p.split("-")[1] for p in parts] == ["00002", "00002"]  # the whole parts went, not this one
    states = _run(tmp_path, "r", r)
    states.pop("version")
    assert all(v == "Cached" for v in states.values()), states
    # the repeated rows leave part-000: part-002's own rows come back from its part file
    write_rows(data / "part-000.jsonl", rows[5:50])
    _run(tmp_path, "r", r)
    fresh = tmp_path / "fresh"
    r2 = dict(r, output=dict(r["output"], dir=str(fresh)))
    _run(tmp_path, "f", r2)
    _same_store(tmp_path / "run", fresh)
    assert _store(fresh)["rows"].height == 150
    shutil.rmtree(fresh)
