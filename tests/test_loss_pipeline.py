"""Loss scores and Sow et al.'s loss-to-weight strategies through the recipe and the flow, on real text."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from tests.conftest import tiny_recipe, write_recipe
from winnow.cli import main
from winnow.selectors import loss_to_weight

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_loss_scores_and_linupper_weights_end_to_end(tmp_path, corpus):
    r = tiny_recipe(corpus, tmp_path / "run")
    r["train"].update(steps=8, seeds=[0], checkpoints=[8])
    r["scoring"]["scorers"] = [{"name": "el2n"}, {"name": "loss", "params": {"percentile": 75}}, "grand"]
    r["select"] = {
        "score": "el2n",
        "fraction": 0.6,
        "keep": "lowest",
        "stratify": "domain",
        "weights": {"method": "linupper", "score": "loss", "temperature": 0.5, "per_stratum": True},
    }
    r["output"]["score_columns"] = ["loss", "el2n"]
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", r))]) == 0
    run = tmp_path / "run"
    loss = pl.read_parquet(run / "scores" / "loss.parquet")
    assert {"loss", "loss_max", "loss_std", "loss_pctl", "n_scored", "loss@s0k8"} <= set(loss.columns)
    assert (loss["loss_max"] >= loss["loss"]).all() and (loss["loss_pctl"] <= loss["loss_max"]).all()
    grand = pl.read_parquet(run / "scores" / "grand.parquet")  # GPT-2 with tied embeddings, padded batches
    assert grand.columns == ["id", "grand", "grand@s0k8"] and (grand["grand"] > 0).all()
    rows = pl.read_parquet(run / "scores" / "rows.parquet")
    sel = pl.read_parquet(run / "selection.parquet")
    df = rows.join(loss, on="id").join(sel, on="id")
    want = loss_to_weight(
        df["loss"].to_numpy(),
        df["kept"].to_numpy(),
        strategy="linupper",
        temperature=0.5,
        strata=np.array(df["domain"].to_list(), dtype=object),
    )
    np.testing.assert_allclose(df["weight"].to_numpy(), want, rtol=1e-12)
    for dom in df["domain"].unique():  # per stratum: mean weight 1 inside every domain
        k = df.filter((pl.col("domain") == dom) & pl.col("kept"))
        assert k["weight"].mean() == pytest.approx(1.0)
    man = json.loads((run / "manifest.json").read_text())
    assert {"loss", "el2n", "weight"} <= set(man["columns"])


def test_loss_strategy_options_are_checked(tmp_path, corpus, capsys):
    r = tiny_recipe(corpus, tmp_path / "run")
    r["select"]["weights"] = {"method": "quadratic", "clip_max": 3.0}
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", r))]) == 2
    assert "clip_max does not apply to the loss strategy 'quadratic'" in capsys.readouterr().err
