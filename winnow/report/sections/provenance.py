"""Section "Provenance and recipe": each score file's provenance, config.yaml and run.json."""

from __future__ import annotations

import json

from winnow.report.html import _e, _kv, _note
from winnow.report.sections.base import Context, section


@section("provenance", "Provenance and recipe")
def provenance_and_recipe(ctx: Context) -> str:
    run = ctx.run
    body = []
    for t in run.tables:
        body.append(f"<h3>{_e(t.path.name)}</h3>")
        ckpt_cols = sum(len(v) for v in t.checkpoints.values())
        body.append(_note(f"mean columns: {', '.join(t.means) or '–'}; checkpoint columns: {ckpt_cols}"))
        if t.provenance is None:
            body.append(_note("No winnow.provenance metadata in this file."))
        elif isinstance(t.provenance, (dict, list)):
            body.append(_kv(t.provenance))
            body.append(
                "<details><summary>raw JSON</summary><pre>"
                + _e(json.dumps(t.provenance, indent=2, default=str))
                + "</pre></details>"
            )
        else:
            body.append(f"<pre>{_e(t.provenance)}</pre>")
    body.append("<h3>Recipe (config.yaml)</h3>")
    body.append(
        f"<pre>{_e(run.config_text)}</pre>"
        if run.config_text is not None
        else _note("config.yaml not found.")
    )
    if run.run_json:
        body.append("<h3>run.json</h3>" + _kv(run.run_json))
    return "".join(body)
