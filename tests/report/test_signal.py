"""Signal checks (winnow/report/signal.py): each fires on the pattern it names, and only on it."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from tests.report.conftest import make_run
from winnow.report import summarize
from winnow.report.signal import LIMITS


def _mixture(run, traj: np.ndarray, names: list[str], weights: np.ndarray | None = None) -> None:
    w = traj[1:].mean(0) if weights is None else weights
    (run / "mixture.json").write_text(
        json.dumps(
            {
                "method": "doremi",
                "output": "average",
                "steps": len(traj) - 1,
                "weights": dict(zip(names, w.tolist(), strict=True)),
            }
        )
    )
    ent = -(np.where(traj > 0, traj * np.log(np.clip(traj, 1e-300, None)), 0)).sum(1)
    pl.DataFrame(
        {"step": np.arange(len(traj)), **{n: traj[:, i] for i, n in enumerate(names)}, "entropy": ent}
    ).write_parquet(run / "mixture_trajectory.parquet")


def _signal(run) -> list[str]:
    return summarize(run)["signal"]


def test_swinging_mixture_is_flagged_and_a_settled_one_is_not(tmp_path):
    run = make_run(tmp_path)
    names = ["a", "b", "c", "d"]
    rng = np.random.default_rng(0)
    # every 20 steps another domain takes 0.9 of the weight
    traj = np.full((201, 4), 0.25)
    for t in range(1, 201):
        traj[t] = 0.1 / 3
        traj[t, (t // 20) % 4] = 0.9
    _mixture(run, traj, names)
    msgs = _signal(run)
    assert len(msgs) == 1 and "200 of 200 proxy steps" in msgs[0] and "changed 10 times" in msgs[0]
    # settling on one domain (DGA on a one-domain target) is what the method is for
    traj[1:] = 0.1 / 3
    traj[1:, 2] = 0.9
    _mixture(run, traj, names)
    assert _signal(run) == []
    # smooth weights that wander are fine
    traj[1:] = rng.dirichlet([50, 50, 100, 25], size=200)
    _mixture(run, traj, names)
    assert _signal(run) == []


def test_uniform_in_all_but_name(tmp_path):
    run = make_run(tmp_path)
    traj = np.full((11, 3), 1 / 3)
    _mixture(run, traj, ["a", "b", "c"], np.array([0.34, 0.33, 0.33]))
    (msg,) = _signal(run)
    assert "within 2.0% of uniform" in msg
    _mixture(run, traj, ["a", "b", "c"], np.array([0.40, 0.30, 0.30]))
    assert _signal(run) == []


def test_row_weights_that_do_nothing(tmp_path):
    run = make_run(tmp_path)
    sel = pl.read_parquet(run / "selection.parquet")
    kept = sel["kept"].to_numpy()
    w = np.where(kept, 1.0 + 0.004 * np.sin(np.arange(sel.height)), 0.0)  # 0.996 .. 1.004
    sel.with_columns(pl.Series("weight", w)).write_parquet(run / "selection.parquet")
    (msg,) = [m for m in _signal(run) if m.startswith("row weights")]
    assert "0.996" in msg and "1.004" in msg
    sel.with_columns(pl.Series("weight", np.where(kept, 1.0, 0.0))).write_parquet(run / "selection.parquet")
    assert not [m for m in _signal(run) if m.startswith("row weights")]  # no weighting at all: nothing to say


def test_low_checkpoint_agreement(tmp_path):
    run = make_run(tmp_path)
    s = summarize(run)
    name, a = next(iter(s["agreement"].items()))
    flagged = [m for m in s["signal"] if m.startswith(f"{name}:")]
    assert bool(flagged) == (a["pairs"]["all_pairs"] < LIMITS["agreement"])
    # scramble one checkpoint column against the others: agreement drops, the check fires
    path = next(p for p in (run / "scores").glob("*.parquet") if p.name != "rows.parquet")
    t = pq.read_table(path)
    col = next(c for c in t.column_names if "@" in c)
    vals = np.random.default_rng(1).permutation(t[col].to_numpy())
    others = [c for c in t.column_names if "@" in c and c != col]
    t = t.set_column(t.column_names.index(col), col, pa.array(vals))
    for c in others:
        t = t.set_column(
            t.column_names.index(c),
            c,
            pa.array(np.random.default_rng(hash(c) % 97).permutation(t[c].to_numpy())),
        )
    pq.write_table(t, path)
    assert any("checkpoint columns agree at mean Spearman" in m for m in _signal(run))
