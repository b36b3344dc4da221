"""Recipes: every shipped example validates; overrides; errors name the dotted path."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ROOT
from winnow.errors import WinnowError
from winnow.pipeline.recipe import dump_recipe, load_recipe, recipe_from_dict


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path):
    r = load_recipe(path)
    assert recipe_from_dict(__import__("yaml").safe_load(dump_recipe(r))) == r  # round-trips


def test_overrides_parse_yaml_values():
    r = load_recipe(
        ROOT / "configs" / "demo.yaml",
        ["train.seeds=[3, 4]", "select.fraction=0.25", "output.dir=/tmp/x", "select.stratify=null"],
    )
    assert r.train.seeds == [3, 4] and r.select.fraction == 0.25 and r.select.stratify is None
    assert str(r.run_dir()) == "/tmp/x"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.seeds=[1, 1]", "train: Value error, train.seeds has repeated seeds"),
        ("train.checkpoints=[500]", "train.checkpoints: step 500 is outside 0..train.steps"),
        ("select.score=grand", "select.score: 'grand' is not a score this recipe computes (el2n)"),
        (
            "select.count=10",
            "give exactly one of select.fraction, select.count, select.threshold (got fraction, count)",
        ),
        ("model.path=/m", "give exactly one of model.path (a local folder) or model.config (random init)"),
        ("data.domain_column=null", "select.stratify is 'domain' but the data has no domains"),
        ("name=has space", "name: String should match pattern"),
        (
            "scoring.scorers=[{name: el2n, params: {reduction: median}}]",
            "scoring.scorers.0.params: scorer 'el2n': parameter 'reduction' must be one of",
        ),
        (
            "scoring.scorers=[{name: el2n, params: {reductoin: mean}}]",
            "scoring.scorers.0.params: scorer 'el2n': unknown parameter 'reductoin'; valid parameters:",
        ),
        (
            "mixture={method: doge, eta: 2.0}",
            "mixture.doge.eta: unknown key",
        ),
        ("nosuch", "expected KEY=VALUE"),
    ],
)
def test_bad_values_are_refused_with_their_path(override, message):
    with pytest.raises(WinnowError) as e:
        load_recipe(ROOT / "configs" / "demo.yaml", [override])
    assert message.replace("Value error, ", "") in str(e.value)
    assert (
        str(e.value).startswith("configs/demo.yaml")
        or "expected KEY=VALUE" in str(e.value)
        or str(e.value).startswith(str(ROOT))
    )


def test_missing_recipe_file_and_bad_yaml(tmp_path):
    with pytest.raises(WinnowError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(WinnowError, match=r"bad.yaml:\d+:\d+: not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")


def test_validate_and_run_refuse_bad_scorer_params_before_anything_runs(tmp_path, capsys):
    """`winnow validate` checks every key, scorer parameters included: one line, exit 2; `winnow run`
    stops there too, before a run folder or a model exists (it used to train, retry and exit 1)."""
    import yaml

    from winnow.cli import main

    raw = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    raw["scoring"]["scorers"] = [{"name": "el2n", "params": {"reductoin": "mean"}}]
    raw["output"] = {"dir": str(tmp_path / "run")}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    for cmd in ("validate", "run"):
        assert main([cmd, str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "scoring.scorers.0.params" in err[0] and "'reductoin'" in err[0], err
    assert not (tmp_path / "run").exists()
