"""The score cache (winnow/pipeline/score_cache.py): one compacted file per input shard, a shard's task
reads its own file alone, and the garbage collection keeps what the run's versions need."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from tests.conftest import corpus_rows, tiny_recipe, write_recipe, write_rows
from winnow.cli import main

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _recipe(corpus: Path, model: Path, data: Path, run: Path, scorers=("el2n",)) -> dict:
    r = tiny_recipe(corpus, run)
    r["data"]["source"] = f"{data}/*.jsonl"
    r["model"] = {"task": "causal_lm", "path": str(model), "max_length": 48}
    r["train"] = {"steps": 0, "seeds": [0]}
    r["scoring"] = {"scorers": [{"name": s} for s in scorers], "batch_size": 16}
    return r


def _two_files(tmp_path: Path, corpus: Path) -> tuple[list[dict], Path]:
    """The corpus's rows, and a data folder of two files: a.jsonl (rows 0-39) and b.jsonl (40-89)."""
    rows = corpus_rows(corpus)
    data = tmp_path / "data"
    data.mkdir()
    write_rows(data / "a.jsonl", rows[:40])
    write_rows(data / "b.jsonl", rows[40:90])
    return rows, data


def _cache_files(run: Path) -> dict[str, list[str]]:
    root = run / "scores" / "cache"
    return {d.name: sorted(f.name for f in d.iterdir()) for d in sorted(root.iterdir())}


def _version(run: Path, n: int) -> dict:
    return json.loads((run / f"v{n:04d}" / "version.json").read_text())


def test_a_shard_task_reads_only_its_own_cache_entries(tmp_path, corpus, model_folder, monkeypatch):
    import winnow.pipeline.scoring as scoring
    from winnow.pipeline.score_cache import read_shard_cache, shard_cache_id

    rows, data = _two_files(tmp_path, corpus)
    run = tmp_path / "run"
    rec = write_recipe(tmp_path / "r.yaml", _recipe(corpus, model_folder, data, run))
    assert main(["run", str(rec)]) == 0
    (fp,) = _cache_files(run)
    sizes = {f.name: pl.read_parquet(f).height for f in (run / "scores" / "cache" / fp).iterdir()}
    assert sorted(sizes.values()) == [40, 50]  # one file per shard, its rows' entries only

    reads: list[tuple[str, int, list[str]]] = []

    def spy(layout, cache_fp, shard):
        got = read_shard_cache(layout, cache_fp, shard)
        reads.append((Path(shard.location).name, 0 if got is None else got.height, sorted(got["key"])))
        return got

    monkeypatch.setattr(scoring, "read_shard_cache", spy)
    # b changes (10 rows gone, 15 new): only its task runs, and it reads b's 50 entries, nothing of a's
    write_rows(data / "b.jsonl", rows[50:90] + rows[90:105])
    assert main(["run", str(rec)]) == 0
    assert [(n, h) for n, h, _ in reads] == [("b.jsonl", 50)]
    v2 = _version(run, 2)
    assert (v2["scored_rows"], v2["reused_rows"]) == (15, 40 + 40)
    # compacted: b's file now holds b's 55 current rows, the 10 that left are gone; a's file as it was
    from winnow.pipeline.recipe import load_recipe
    from winnow.pipeline.sources import list_shards

    by_name = {Path(s.location).name: s for s in list_shards(load_recipe(rec).data)}
    b_file = run / "scores" / "cache" / fp / f"shard-{shard_cache_id(by_name['b.jsonl'])}.parquet"
    a_file = run / "scores" / "cache" / fp / f"shard-{shard_cache_id(by_name['a.jsonl'])}.parquet"
    assert pl.read_parquet(b_file).height == 55 and pl.read_parquet(a_file).height == 40
    assert len(set(reads[0][2]) & set(pl.read_parquet(b_file)["key"])) == 40  # the 40 that stayed


def test_garbage_collection_keeps_what_a_version_needs(tmp_path, corpus, model_folder):
    rows = corpus_rows(corpus)
    data = tmp_path / "data"
    data.mkdir()
    write_rows(data / "a.jsonl", rows[:40])
    write_rows(data / "b.jsonl", rows[40:80])
    run = tmp_path / "run"
    one = write_recipe(tmp_path / "one.yaml", _recipe(corpus, model_folder, data, run))
    two = write_recipe(tmp_path / "two.yaml", _recipe(corpus, model_folder, data, run, ("el2n", "loss")))
    assert main(["run", str(one)]) == 0
    (fp1,) = _cache_files(run)
    assert _version(run, 1)["cache_fingerprint"][:16] == fp1
    # another scorer set: a second cache folder; v0001 names the first, so it stays
    assert main(["run", str(two)]) == 0
    fp2 = _version(run, 2)["cache_fingerprint"][:16]
    assert set(_cache_files(run)) == {fp1, fp2}
    # what no version names goes: a folder of another fingerprint, a fragment of the older layout, and the
    # file of a shard the input no longer has
    stray = run / "scores" / "cache" / "0123456789abcdef"
    stray.mkdir()
    pl.DataFrame({"key": ["x"], "el2n": [1.0]}).write_parquet(stray / "shard-000000000000.parquet")
    pl.DataFrame({"key": ["x"], "el2n": [1.0]}).write_parquet(
        run / "scores" / "cache" / fp1 / "frag-00000-x.parquet"
    )
    (data / "b.jsonl").unlink()
    assert main(["run", str(one)]) == 0
    v3 = _version(run, 3)
    assert v3["scored_rows"] == 0 and v3["reused_rows"] == 40  # back to the first scorers: all read back
    files = _cache_files(run)
    assert set(files) == {fp1, fp2}
    assert len(files[fp1]) == 1 and files[fp1][0].startswith("shard-")  # a's file alone
    assert len(files[fp2]) == 2  # v0002's folder kept whole


def test_refit_never_keeps_the_trained_tokenizer_and_proxy_so_new_rows_alone_are_scored(tmp_path, corpus):
    """Periodic rescoring of a recipe that trains its tokenizer and proxy on the data: with ``refit: never``
    a new input file is the only thing scored: the tokenizer and proxy of the first run stay, and every old
    row's scores come from the cache (with the default, ``inputs``, both are trained again on the new
    inputs and all 100 rows are scored again)."""
    refit = "never"
    rows, data = _two_files(tmp_path, corpus)
    run = tmp_path / "run"
    r = tiny_recipe(corpus, run)
    r["data"]["source"] = f"{data}/*.jsonl"
    r["model"]["tokenizer"]["train"]["refit"] = refit
    r["train"].update(steps=4, seeds=[0], checkpoints=[4], refit=refit)
    rec = write_recipe(tmp_path / "r.yaml", r)
    assert main(["run", str(rec)]) == 0
    tokenizers = sorted(p.name for p in run.glob("tokenizer-*"))
    write_rows(data / "c.jsonl", rows[90:100])
    assert main(["run", str(rec)]) == 0
    v2 = _version(run, 2)
    assert (v2["scored_rows"], v2["reused_rows"]) == (10, 90)
    assert sorted(p.name for p in run.glob("tokenizer-*")) == tokenizers
