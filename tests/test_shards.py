"""The emit step (winnow/pipeline/shards.py) against a plain reference: every source row looked up in
selection.parquet and the store by id (a dict), in source order, the way the emit before the streaming
join did it batch by batch. Real text (the corpus), files with exact repeats of other files' rows (no id
column: ids are content hashes, so a repeat shares its first occurrence's id and selection)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import polars as pl
import pytest

from tests.conftest import corpus_rows, tiny_recipe, write_recipe, write_rows
from winnow.cli import main
from winnow.errors import WinnowError

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _recipe(corpus: Path, model: Path, data: Path, run: Path, **output) -> dict:
    r = tiny_recipe(corpus, run)
    r["data"] = {"source": f"{data}/*.jsonl", "text_column": "text", "domain_column": "domain"}
    r["model"] = {"task": "causal_lm", "path": str(model), "max_length": 48}
    r["train"] = {"steps": 0, "seeds": [0]}
    r["output"].update(score_columns=["el2n"], shard_max_rows=23, **output)
    return r


@pytest.fixture(scope="module")
def data(corpus, tmp_path_factory) -> Path:
    rows = [{k: v for k, v in r.items() if k != "id"} for r in corpus_rows(corpus)]
    d = tmp_path_factory.mktemp("emit-data")
    for k in range(0, len(rows), 50):
        write_rows(d / f"part-{k // 50:03d}.jsonl", rows[k : k + 50])
    write_rows(d / "zz-repeats.jsonl", rows[3:9] + rows[70:74])  # exact repeats of earlier files' rows
    return d


def _reference(run: Path, data: Path, include_pruned: bool) -> tuple[list[dict], dict]:
    from winnow.pipeline.sources import content_id

    sel = {r["id"]: r for r in pl.read_parquet(run / "selection.parquet").iter_rows(named=True)}
    score = dict(pl.read_parquet(run / "scores" / "el2n.parquet").select("id", "el2n").iter_rows())
    out, doms = [], {}
    for f in sorted(data.glob("*.jsonl")):
        for line in open(f):
            r = json.loads(line)
            s = sel[content_id(r["text"])]
            w = s["weight"] if s["kept"] else 0.0
            acc = doms.setdefault(r["domain"], [0, 0, 0.0])
            acc[0], acc[1], acc[2] = acc[0] + 1, acc[1] + int(s["kept"]), acc[2] + w
            if s["kept"] or include_pruned:
                out.append(dict(r, weight=w, el2n=score[content_id(r["text"])]))
    return out, doms


@pytest.mark.parametrize("include_pruned", [False, True])
def test_emit_matches_the_lookup_reference(tmp_path, corpus, model_folder, data, include_pruned):
    run = tmp_path / "run"
    rec = _recipe(corpus, model_folder, data, run, include_pruned=include_pruned)
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", rec))]) == 0
    man = json.loads((run / "manifest.json").read_text())
    want, doms = _reference(run, data, include_pruned)
    got = pl.concat([pl.read_parquet(run / s["path"]) for s in man["shards"]]).to_dicts()
    assert len(got) == len(want) == man["counts"]["written_rows"]
    assert got == want  # the same rows, in source order, with the same weights and score columns
    assert [s["rows"] for s in man["shards"]][:-1] == [23] * (len(man["shards"]) - 1)
    n = sum(v[0] for v in doms.values())
    assert man["counts"]["input_rows"] == n == 180 + 10
    assert man["counts"]["kept_rows"] == sum(v[1] for v in doms.values())
    total = sum(v[2] for v in doms.values())
    for d, (rows, kept, w) in doms.items():
        m = man["domains"][d]
        assert (m["input_rows"], m["kept_rows"]) == (rows, kept)
        assert math.isclose(m["weight_sum"], round(w, 6), abs_tol=1e-6)
        assert math.isclose(m["proportion"], w / total, rel_tol=1e-12)
    assert not list(run.glob("emit-scratch*")), "the emit's scratch folder is removed"


def test_emit_names_the_file_whose_row_has_no_selection(tmp_path, corpus, model_folder, data):
    import shutil

    from winnow.pipeline.recipe import recipe_from_dict
    from winnow.pipeline.shards import emit_shards
    from winnow.pipeline.steps import RunContext

    d = tmp_path / "data"
    shutil.copytree(data, d)
    run = tmp_path / "run"
    rec = _recipe(corpus, model_folder, d, run)
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", rec))]) == 0
    sel = pl.read_parquet(run / "selection.parquet")
    sel.slice(1).write_parquet(run / "selection.parquet")  # the first row of part-000 loses its selection
    recipe = recipe_from_dict(rec)
    ctx = RunContext(rec, str(run), [s.to_dict() for s in _shards(recipe)]).with_tokenizer(str(model_folder))
    feat, _, _ = ctx.featurizer()
    with pytest.raises(WinnowError, match=r"part-000\.jsonl: row with id .* has no selection"):
        emit_shards(recipe, run, ctx.input_shards(), feat, {"recipe": "", "input": "", "model": ""})
    assert (run / "shards").is_dir() and not list(run.glob("emit-scratch*")) and not list(run.glob("*.tmp-*"))


def _emit_inputs(rec: dict, run: Path, model: Path):
    from winnow.pipeline.recipe import recipe_from_dict
    from winnow.pipeline.steps import RunContext

    recipe = recipe_from_dict(rec)
    ctx = RunContext(rec, str(run), [s.to_dict() for s in _shards(recipe)]).with_tokenizer(str(model))
    return recipe, ctx.input_shards(), ctx.featurizer()[0]


def test_emit_takes_the_ids_from_the_order_file_and_without_it_writes_the_same_shards(
    tmp_path, corpus, model_folder, data, monkeypatch
):
    """With scores/order.parquet the input files are read once and nothing is hashed; a store without it
    (merged by a winnow before the file) has its ids hashed from the source, into the same shards."""
    import shutil

    import winnow.pipeline.collate as collate
    from winnow.pipeline.shards import emit_shards

    run = tmp_path / "run"
    rec = _recipe(corpus, model_folder, data, run)
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", rec))]) == 0
    man = json.loads((run / "manifest.json").read_text())
    first = pl.concat([pl.read_parquet(run / s["path"]) for s in man["shards"]])
    recipe, shards, feat = _emit_inputs(rec, run, model_folder)
    fps = {"recipe": "r", "input": "i", "model": "m"}
    hashed = []
    real = collate.content_id
    monkeypatch.setattr(collate, "content_id", lambda v: hashed.append(1) or real(v))
    shutil.rmtree(run / "shards")
    emit_shards(recipe, run, shards, feat, fps)
    assert not hashed, "ids came from scores/order.parquet"
    again = json.loads((run / "manifest.json").read_text())
    assert pl.concat([pl.read_parquet(run / s["path"]) for s in again["shards"]]).equals(first)
    (run / "scores" / "order.parquet").unlink()
    shutil.rmtree(run / "shards")
    emit_shards(recipe, run, shards, feat, fps)
    assert len(hashed) == 190, "every source row hashed once"
    fallback = json.loads((run / "manifest.json").read_text())
    assert pl.concat([pl.read_parquet(run / s["path"]) for s in fallback["shards"]]).equals(first)
    assert fallback["counts"] == man["counts"] and fallback["input"]["shards"] == man["input"]["shards"]


def test_emit_refuses_an_input_file_that_changes_while_it_is_read(
    tmp_path, corpus, model_folder, data, monkeypatch
):
    import shutil

    import winnow.pipeline.shards as shards_mod

    run = tmp_path / "run"
    rec = _recipe(corpus, model_folder, data, run)
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", rec))]) == 0
    recipe, shards, feat = _emit_inputs(rec, run, model_folder)
    calls = iter(range(1000))
    monkeypatch.setattr(shards_mod, "_stat", lambda shard: (next(calls), 0))  # size and mtime move on
    shutil.rmtree(run / "shards")
    with pytest.raises(WinnowError, match=r"part-000\.jsonl: changed while its shards were written"):
        shards_mod.emit_shards(recipe, run, shards, feat, {"recipe": "", "input": "", "model": ""})
    assert not (run / "shards").exists() and not list(run.glob("emit-scratch*"))


def _shards(recipe):
    from winnow.pipeline.sources import list_shards

    return list_shards(recipe.data)
