"""Signal checks: does a run's selection rest on a signal, or on noise that looks like one?

Each check reads what the run folder already holds and returns a one-line warning, or nothing:

- mixture weights that swing: in a quarter or more of the proxy's steps one domain held more than half
  the weight (with three or more domains) and the leading domain changed three or more times, so the
  output is set by a few swings (DoReMi with a large step size or small per-domain batches, doremi#5 in
  the authors' tracker); a mixture that settles on one domain (DGA on a one-domain target) is not flagged;
- mixture weights that are uniform in all but name (every domain within 5% of 1/k);
- row weights that barely differ (kept rows' weights not all equal, but within 2% of their mean);
- low checkpoint agreement: the mean Spearman correlation between a score's checkpoint columns below 0.5
  (the ranking depends on which proxy or step scored the rows);
- influence that does not rank held-out target examples above the training data: the AUROC of one half
  of the target set scored against the other, versus the training rows, below 0.6
  (:func:`winnow.scorers.influence.heldout_target_auroc`).

The thresholds are the ``LIMITS`` below; every warning names the number it saw and the limit.
"""

from __future__ import annotations

from typing import Any

import polars as pl

LIMITS = {
    "one_hot_share": 0.25,  # fraction of steps with one domain above half the weight
    "switches": 3,  # ... and times the leading domain changed among those steps
    "uniform_tolerance": 0.05,  # every mixture weight within this relative distance of 1/k
    "weight_spread": 0.02,  # (max - min) / mean of kept rows' weights
    "agreement": 0.5,  # mean Spearman between a score's checkpoint columns
    "heldout_auroc": 0.6,  # influence: held-out target vs training rows
}


def _mixture(run: Any) -> list[str]:
    out: list[str] = []
    mix = run.mixture if isinstance(run.mixture, dict) else None
    if not mix:
        return out
    weights = mix.get("weights") or {}
    k = len(weights)
    path = run.layout.mixture_trajectory
    if mix.get("steps") and k >= 3 and path.exists():
        traj = pl.read_parquet(path)
        doms = [c for c in traj.columns if c not in ("step", "entropy") and c in weights]
        steps = traj.filter(pl.col("step") > 0)
        if steps.height and doms:
            w = steps.select(doms).to_numpy()
            top = w.max(axis=1) > 0.5
            lead = w.argmax(axis=1)[top]
            switches = int((lead[1:] != lead[:-1]).sum())
            if top.mean() >= LIMITS["one_hot_share"] and switches >= LIMITS["switches"]:
                ent = float(steps["entropy"].mean())
                out.append(
                    f"mixture: in {int(top.sum())} of {steps.height} proxy steps one domain held more than "
                    f"half the weight, and which one changed {switches} times (mean entropy {ent:.2f} nats, "
                    f"uniform {_log(k):.2f}): the "
                    f"{mix.get('output', 'output')} weights are set by a few swings, not a stable signal; "
                    "more rows per domain per step (mixture.batch_size) or a smaller step size would steady them"
                )
    if k >= 2:
        dev = max(abs(float(w) * k - 1.0) for w in weights.values())
        if dev < LIMITS["uniform_tolerance"]:
            out.append(
                f"mixture: every domain's weight is within {dev:.1%} of uniform (1/{k}): the mixture is "
                "uniform in all but name"
            )
    return out


def _log(x: float) -> float:
    import math

    return math.log(x)


def _row_weights(s: dict) -> list[str]:
    w = s.get("weights") or {}
    lo, hi, mean = w.get("min"), w.get("max"), w.get("mean")
    if lo is None or hi is None or not mean or hi == lo:
        return []
    spread = (hi - lo) / mean
    if spread < LIMITS["weight_spread"]:
        return [
            f"row weights span {lo:.4g}–{hi:.4g} (mean {mean:.4g}; spread {spread:.2%} < "
            f"{LIMITS['weight_spread']:.0%}): they change training by almost nothing; a lower temperature "
            "or another weight method would make them count"
        ]
    return []


def _agreement(s: dict) -> list[str]:
    out = []
    for name, a in (s.get("agreement") or {}).items():
        if name.startswith("between scorers"):
            continue
        mean = (a.get("pairs") or {}).get("all_pairs")
        if mean is not None and mean < LIMITS["agreement"]:
            out.append(
                f"{name}: its {len(a['columns'])} checkpoint columns agree at mean Spearman {mean:.2f} "
                f"(< {LIMITS['agreement']}): the ranking depends on which proxy or step scored the rows; "
                "more seeds (train.seeds) or later checkpoints would steady it"
            )
    return out


def _influence(run: Any) -> list[str]:
    for t in run.tables:
        prov = t.provenance if isinstance(t.provenance, dict) else {}
        if prov.get("scorer") != "influence":
            continue
        auc = prov.get("heldout_target_auroc")
        if isinstance(auc, (int, float)) and auc < LIMITS["heldout_auroc"]:
            return [
                f"influence: half of the target set, scored against the other half, ranks above the "
                f"training rows at AUROC {auc:.2f} (0.5 is random; < {LIMITS['heldout_auroc']}): the "
                "influence scores do not single out target-like data (unless most of the training data is "
                "like the target); a larger target set, more checkpoints or proj_dim may help"
            ]
    return []


def signal_warnings(run: Any, s: dict) -> list[str]:
    """Every check's warning for a loaded run (:class:`winnow.report.load._Run`) and its summary."""
    return [*_mixture(run), *_row_weights(s), *_agreement(s), *_influence(run)]
