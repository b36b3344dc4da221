"""Section "Shards and mixture": manifest.json's shards, interleave probabilities, Mosaic streams,
diversity, fingerprints and inputs, and mixture.json."""

from __future__ import annotations

from winnow.report.html import _kv, _note, _Raw, _table
from winnow.report.sections.base import Context, section


@section("shards", "Shards and mixture")
def shards_and_mixture(ctx: Context) -> str:
    run = ctx.run
    man = run.manifest
    body = []
    if man is None:
        body.append(
            _note(
                "manifest.json not found: the run has not emitted shards yet (the emit step of "
                "`winnow run RECIPE` writes shards/ and manifest.json)."
            )
        )
    else:
        shards = man.get("shards") or []
        body.append(f"<h3>Output shards ({len(shards)})</h3>")
        if shards:
            rows = [
                [sh.get("path"), sh.get("rows"), sh.get("bytes"), str(sh.get("sha256") or "")[:12]]
                for sh in shards
                if isinstance(sh, dict)
            ]
            tot_rows = sum(r[1] for r in rows if isinstance(r[1], int))
            tot_bytes = sum(r[2] for r in rows if isinstance(r[2], int))
            rows.append([_Raw("<b>total</b>"), tot_rows, tot_bytes, ""])
            body.append(_table(["path", "rows", "bytes", "sha256 (prefix)"], rows))
        else:
            body.append(_note("The manifest lists no shards."))
        inter = man.get("interleave")
        body.append("<h3>Interleave probabilities</h3>")
        if isinstance(inter, dict) and inter.get("names"):
            names, probs = inter.get("names") or [], inter.get("probabilities") or []
            body.append(
                _table(
                    ["name", "probability"],
                    [[nm, probs[i] if i < len(probs) else None] for i, nm in enumerate(names)],
                )
            )
            body.append(
                _note("In this order, as datasets.interleave_datasets(probabilities=...) takes them.")
            )
        else:
            body.append(_note("none recorded"))
        if man.get("mosaic_streams"):
            body.append("<h3>Mosaic streams</h3>" + _kv(man["mosaic_streams"]))
        div = man.get("diversity")
        if isinstance(div, dict):
            body.append("<h3>Diversity</h3>" + _kv(div))
            body.append(
                _note(
                    "diversity_input / diversity_selection: log-det distance per item to a maximally "
                    "diverse reference (random directions) of the same size, on diversity_sample rows; "
                    "smaller is more diverse. DPP runs also give logdet, the log det of the selected "
                    "set's kernel, and random_logdet_mean, the same for random subsets of equal size."
                )
            )
        extra = {
            k: man[k]
            for k in (
                "recipe_fingerprint",
                "input",
                "model",
                "scorers",
                "selector",
                "columns",
                "weight_column",
            )
            if k in man
        }
        if isinstance(extra.get("input"), dict) and isinstance(extra["input"].get("shards"), list):
            inp = dict(extra["input"])
            inp["shards"] = [
                {**sh, "sha256": str(sh.get("sha256") or "")[:12]} if isinstance(sh, dict) else sh
                for sh in inp["shards"]
            ]
            extra["input"] = inp
        if extra:
            body.append("<h3>Fingerprints and inputs</h3>" + _kv(extra))
    if run.mixture is not None:
        body.append("<h3>Mixture (mixture.json)</h3>" + _kv(run.mixture))
    return "".join(body)
