"""winnow.report.stats: the summary's numbers, recomputed from the run folder's files."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from tests.report.conftest import make_run
from winnow.report import summarize


def test_summarize_counts_match_the_data(tmp_path: Path) -> None:
    run = make_run(tmp_path, n=90, nan_rows=4)
    s = summarize(run)
    sel = pl.read_parquet(run / "selection.parquet")
    rows = pl.read_parquet(run / "scores" / "rows.parquet")
    assert s["counts"] == {
        "input_rows": 90,
        "kept_rows": sel["kept"].sum(),
        "pruned_rows": 90 - sel["kept"].sum(),
        "kept_fraction": sel["kept"].sum() / 90,
    }
    joined = sel.join(rows, on="id")
    for col, key in (("domain", "domains"), ("label", "labels")):
        want = {
            r[col]: (r["n"], r["k"])
            for r in joined.group_by(col).agg(n=pl.len(), k=pl.col("kept").sum()).iter_rows(named=True)
        }
        got = {g: (v["input_rows"], v["kept_rows"]) for g, v in s[key].items()}
        assert got == want
        assert sum(v["proportion_before"] for v in s[key].values()) == pytest.approx(1.0)
        assert sum(v["proportion_after"] for v in s[key].values()) == pytest.approx(1.0)
    assert s["selection_score"] == "el2n" and s["cutoff_side"] == "high"
    el2n = pl.read_parquet(run / "scores" / "el2n.parquet")
    kept_scores = el2n.join(sel, on="id").filter(pl.col("kept") & pl.col("el2n").is_not_nan())["el2n"]
    assert s["cutoff"] <= kept_scores.min()
    assert s["scores"]["el2n"]["nan"] == 4 and s["scores"]["el2n"]["finite"] == 86
    assert s["scores"]["el2n@s1k200"] | {"seed": 1, "step": 200} == s["scores"]["el2n@s1k200"]
    assert s["selection_score_not_finite"] == {"rows": 4, "kept": 0, "pruned": 4}
    assert s["weights"]["mean"] == pytest.approx(1.0)
    a = s["agreement"]["el2n"]
    assert len(a["matrix"]) == 4 and a["rows"] == 86
    assert a["pairs"]["between_seeds_same_step"] > 0.8  # the fixture's checkpoints share one base score
    json.dumps(s)  # JSON-able
