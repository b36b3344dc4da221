"""Bad input: a one-line error naming what is wrong and where, exit status 2, nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import tiny_recipe, write_recipe
from winnow.cli import main

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _run(tmp_path: Path, recipe: dict, capsys, *extra: str) -> str:
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    code = main(["run", str(path), *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("winnow: error:")]
    assert len(lines) == 1, err
    run_dir = Path(recipe["output"]["dir"])
    for name in ("selection.parquet", "manifest.json", "shards", "report.html"):
        assert not (run_dir / name).exists(), name
    if run_dir.exists():
        assert not list(run_dir.rglob("*.tmp-*"))
    return lines[0]


def _texts(corpus: Path, n: int = 40) -> list[dict]:
    rows = [json.loads(line) for f in sorted(corpus.glob("*.jsonl")) for line in open(f)]
    return rows[:: max(1, len(rows) // n)][:n]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_missing_column(tmp_path, corpus, capsys):
    r = tiny_recipe(corpus, tmp_path / "run", data__text_column="body")
    msg = _run(tmp_path, r, capsys)
    assert "no column 'body' (data.text_column)" in msg and ".jsonl" in msg


def test_label_outside_the_models_classes(tmp_path, corpus, capsys):
    rows = [dict(r, label=i % 2) for i, r in enumerate(_texts(corpus))]
    rows[7]["label"] = 5
    _jsonl(tmp_path / "d" / "cls.jsonl", rows)
    r = tiny_recipe(
        corpus,
        tmp_path / "run",
        data__source=str(tmp_path / "d" / "*.jsonl"),
        data__label_column="label",
        model__task="sequence_classification",
        model__num_labels=2,
    )
    msg = _run(tmp_path, r, capsys)
    assert "cls.jsonl row 7" in msg and "label 5" in msg and "outside the model's classes 0..1" in msg


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_dataset(tmp_path, corpus, capsys, content):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "empty.jsonl").write_text(content)
    r = tiny_recipe(corpus, tmp_path / "run", data__source=str(tmp_path / "d" / "*.jsonl"))
    msg = _run(tmp_path, r, capsys)
    assert "empty" in msg or "no rows" in msg


def test_glob_matching_nothing(tmp_path, corpus, capsys):
    r = tiny_recipe(corpus, tmp_path / "run", data__source=str(tmp_path / "nowhere" / "*.jsonl"))
    assert "data.source: no file matches" in _run(tmp_path, r, capsys)


def test_truncated_jsonl(tmp_path, corpus, capsys):
    good = _jsonl(tmp_path / "d" / "a.jsonl", _texts(corpus))
    text = good.read_text()
    (tmp_path / "d" / "b.jsonl").write_text(text[: len(text) // 2])  # cut in the middle of a row
    r = tiny_recipe(corpus, tmp_path / "run", data__source=str(tmp_path / "d" / "*.jsonl"))
    msg = _run(tmp_path, r, capsys)
    assert "b.jsonl" in msg and "cannot be read as json" in msg


def test_truncated_parquet(tmp_path, corpus, capsys):
    import polars as pl

    (tmp_path / "d").mkdir()
    pl.DataFrame(_texts(corpus)).write_parquet(tmp_path / "d" / "a.parquet")
    raw = (tmp_path / "d" / "a.parquet").read_bytes()
    (tmp_path / "d" / "a.parquet").write_bytes(raw[: len(raw) - 200])
    r = tiny_recipe(corpus, tmp_path / "run", data__source=str(tmp_path / "d" / "*.parquet"))
    msg = _run(tmp_path, r, capsys)
    assert "a.parquet" in msg and "cannot be read as parquet" in msg


def test_unknown_scorer(tmp_path, corpus, capsys):
    r = tiny_recipe(corpus, tmp_path / "run", scoring__scorers=[{"name": "grandd"}])
    msg = _run(tmp_path, r, capsys)
    assert "scoring.scorers.0.name: unknown scorer 'grandd'; known: el2n" in msg


def test_unknown_selector(tmp_path, corpus, capsys):
    r = tiny_recipe(corpus, tmp_path / "run", select__method="best")
    assert "select.method: Input should be 'score', 'random', 'all' or 'dpp'" in _run(tmp_path, r, capsys)


@pytest.mark.parametrize("fraction", [0, 1.5, -0.1])
def test_fraction_outside_0_1(tmp_path, corpus, capsys, fraction):
    r = tiny_recipe(corpus, tmp_path / "run")
    msg = _run(tmp_path, r, capsys, "--set", f"select.fraction={fraction}")
    assert f"select.fraction: fraction must be in (0, 1], got {float(fraction)}" in msg


def test_unknown_key_and_wrong_type_name_their_path(tmp_path, corpus, capsys):
    r = tiny_recipe(corpus, tmp_path / "run", train__stepz=3)
    assert "train.stepz: unknown key" in _run(tmp_path, r, capsys)
    r = tiny_recipe(corpus, tmp_path / "run", train__steps="many")
    assert "train.steps: Input should be a valid integer" in _run(tmp_path, r, capsys)
    r = tiny_recipe(corpus, tmp_path / "run")
    del r["model"]["task"]
    assert "model.task: missing required key" in _run(tmp_path, r, capsys)


def test_model_folder_without_weights(tmp_path, corpus, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    r = tiny_recipe(corpus, tmp_path / "run")
    r["model"] = {"task": "causal_lm", "path": str(folder), "tokenizer": {"train": {"vocab_size": 300}}}
    msg = _run(tmp_path, r, capsys)
    assert f"model.path: {folder} has no weights" in msg


def test_output_folder_holding_a_different_run(tmp_path, corpus, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"name": "other", "source": "x", "task": "causal_lm"}))
    msg = _run(tmp_path, tiny_recipe(corpus, run_dir), capsys)
    assert "holds a different run (name 'other'" in msg
    assert json.loads((run_dir / "run.json").read_text())["name"] == "other"  # untouched


def test_output_folder_with_foreign_files(tmp_path, corpus, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    assert "is not empty and holds no winnow run" in _run(tmp_path, tiny_recipe(corpus, run_dir), capsys)


def test_report_and_inspect_of_a_missing_run(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nope") in err
