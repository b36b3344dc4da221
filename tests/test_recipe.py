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
        ("scoring.scorers=[{name: el2n, params: {reduction: median}}]", None),
        ("nosuch", "expected KEY=VALUE"),
    ],
)
def test_bad_values_are_refused_with_their_path(override, message):
    if message is None:  # scorer parameters are checked when the scorer is built
        from winnow.scorers import get_scorer

        r = load_recipe(ROOT / "configs" / "demo.yaml", [override])
        with pytest.raises(ValueError, match="reduction"):
            get_scorer(r.scoring.scorers[0].name, **r.scoring.scorers[0].params)
        return
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
    with pytest.raises(WinnowError, match="bad.yaml: not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")
