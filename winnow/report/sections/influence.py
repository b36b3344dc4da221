"""Section "Influence on the target set" (runs with ``scoring.influence``: ``influence/neighbours.parquet``)."""

from __future__ import annotations

import polars as pl

from winnow.report.html import _e, _img, _note, _Raw, _table
from winnow.report.plots import _plain, _plot_neighbour_domains
from winnow.report.sections.base import Context, section
from winnow.report.text import _fmt


@section("influence", "Influence on the target set")
def influence_on_target(ctx: Context) -> str | None:
    run = ctx.run
    path = run.layout.neighbours
    if not path.exists():
        return None
    nb = pl.read_parquet(path)
    prov = next((t.provenance for t in run.tables if t.path == run.layout.influence_scores), None)
    body = [
        _note(
            "LESS / TracIn influence: for each training example, the learning-rate-weighted sum over "
            "checkpoints of the cosine between its (Adam-preconditioned, projected) gradient and each "
            "target example's, averaged within a target subtask and maximised over subtasks. "
            "gradsim_target: cosine with the mean target gradient; gradsim_domain: with the mean "
            "gradient of the example's own domain (how typical it is); self_influence: TracIn's "
            "sum of weighted squared gradient norms."
        )
    ]
    if isinstance(prov, dict):
        facts = [
            ["target examples", prov.get("target_rows")],
            ["subtasks", ", ".join(prov.get("subtasks") or [])],
            [
                "checkpoints (step: lr weight)",
                ", ".join(f"{c.get('step')}: {_fmt(c.get('weight'))}" for c in prov.get("checkpoints") or []),
            ],
            ["nearest neighbours by", prov.get("neighbours_by") or prov.get("faiss")],
        ]
        params = prov.get("params") or {}
        facts += [[k, params.get(k)] for k in ("proj_dim", "precondition", "parameters") if k in params]
        body.append(_table(None, [[_Raw(f"<b>{_e(k)}</b>"), v] for k, v in facts], "kv"))
    if nb.height:
        body.append(
            _img(
                _plot_neighbour_domains(nb),
                "share of domains among each target example's most influential training examples",
            )
        )
        body.append("<h3>Most influential training examples of the first target examples</h3>")
        first = nb["target_id"].unique(maintain_order=True).to_list()[:8]
        rows = []
        for t in first:
            part = nb.filter((pl.col("target_id") == t) & (pl.col("rank") <= 3))
            for r in part.iter_rows(named=True):
                rows.append(
                    [
                        r["target_id"] if r["rank"] == 1 else "",
                        _plain(r["target_preview"], 80) if r["rank"] == 1 else "",
                        r["rank"],
                        r["id"],
                        r["domain"],
                        r["influence"],
                        _plain(r["preview"], 120),
                    ]
                )
        body.append(
            _table(["target", "target text", "rank", "training id", "domain", "influence", "text"], rows)
        )
        body.append(_note(f"All {nb.height:,} neighbour rows: influence/neighbours.parquet."))
    return "".join(body)
