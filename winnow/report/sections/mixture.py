"""Section "Domain mixture" (runs with a ``mixture`` section: mixture.json and its trajectory)."""

from __future__ import annotations

import polars as pl

from winnow.report.html import _img, _note, _table
from winnow.report.plots import _plot_mixture
from winnow.report.sections.base import Context, section


@section("mixture", "Domain mixture")
def domain_mixture(ctx: Context) -> str | None:
    run = ctx.run
    path = run.layout.mixture_trajectory
    if not path.exists() or run.mixture is None:
        return None
    traj = pl.read_parquet(path)
    mix = run.mixture if isinstance(run.mixture, dict) else {}
    body = [
        _note(
            f"Method: {mix.get('method')}; the weights in mixture.json are the {mix.get('output')} over "
            f"{mix.get('steps')} steps; every kept row of a domain carries weight N·α_d/n_d, so the shards' "
            "weight shares, the interleave probabilities and the Mosaic proportions are the mixture."
        )
    ]
    if traj.height > 1:
        body.append(_img(_plot_mixture(traj), "domain weights and their entropy over the proxy's steps"))
    w = mix.get("weights") or {}
    fin = mix.get("final_weights") or {}
    avg = mix.get("average_weights") or {}
    tok = mix.get("domain_tokens") or {}
    body.append(
        _table(
            ["domain", "weight (output)", "final", "average", "tokens"],
            [[d, w.get(d), fin.get(d), avg.get(d), tok.get(d)] for d in w],
        )
    )
    if mix.get("target_domains"):
        body.append(
            _note(
                "Target domains (held out of training and of the emitted data): "
                + ", ".join(mix["target_domains"])
            )
        )
    return "".join(body)
