"""``winnow inspect RUN``: the run's summary as rich tables in the terminal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from winnow.report.load import _load
from winnow.report.stats import MAX_GROUPS, _summarize
from winnow.report.text import _cut_text, _fmt, _pct, _rows, _short


def print_summary(run_dir: str | Path, console: Any = None) -> dict:
    """Print the summary of a run as rich tables (``winnow inspect RUN``) and return summarize()'s dict."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from winnow.pipeline.display import visible

    s = _summarize(_load(run_dir))
    con = console if console is not None else Console()
    info, counts = s["run"], s["counts"]

    head = Table(title=Text(f"winnow run {visible(info['name'])}"), show_header=False, box=None)
    head.add_column(style="bold")
    head.add_column()
    for k, v in (
        ("directory", info["dir"]),
        ("winnow version", info["winnow_version"] or "not recorded"),
        ("created", info["created"]),
        ("selector", info["selector"]),
        ("selection score", s["selection_score"] or "–"),
        ("cut-off", _cut_text(s["cutoff"], s["cutoff_side"])),
        ("input rows", f"{counts['input_rows']:,}"),
        ("kept rows", f"{counts['kept_rows']:,} ({_pct(counts['kept_fraction'])})"),
        ("pruned rows", f"{counts['pruned_rows']:,}"),
    ):
        head.add_row(k, Text(visible(v)))
    bad = s["selection_score_not_finite"]
    if bad and bad["rows"]:
        head.add_row(
            "not finite",
            Text(f"{_rows(bad['rows'])} ({bad['kept']:,} kept, {bad['pruned']:,} pruned)", style="yellow"),
        )
    if not info["has_manifest"]:
        head.add_row("manifest", Text("not written yet (no shards emitted)", style="yellow"))
    con.print(head)

    for key, name in (("domains", "domain"), ("labels", "label")):
        stats = s[key]
        if not stats:
            continue
        t = Table(title=f"per {name}", box=box.SIMPLE_HEAD)
        for h in (name, "input", "kept", "pruned", "kept %", "share before", "share after", "weight share"):
            t.add_column(h, justify="left" if h == name else "right")
        for g, st in list(stats.items())[:MAX_GROUPS]:
            t.add_row(
                Text(visible(g)),
                f"{st['input_rows']:,}",
                f"{st['kept_rows']:,}",
                f"{st['pruned_rows']:,}",
                _pct(st["kept_fraction"]),
                _pct(st["proportion_before"]),
                _pct(st["proportion_after"]),
                _pct(st["weight_proportion"]),
            )
        if len(stats) > MAX_GROUPS:
            t.caption = f"{MAX_GROUPS} largest of {len(stats)} {key}"
        con.print(t)

    if s["scores"]:
        t = Table(
            title="score columns",
            box=box.SIMPLE_HEAD,
            caption="NaN: NaN, inf or null; kept / pruned: mean over kept / pruned rows",
        )
        t.add_column("column", no_wrap=True)
        for h in ("finite", "NaN", "mean", "min", "median", "max", "kept", "pruned"):
            t.add_column(h, justify="right", no_wrap=True)
        for c, st in s["scores"].items():
            bad = st["nan"] + st["inf"] + st["null"]
            t.add_row(
                Text(visible(c)),
                f"{st['finite']:,}",
                Text(f"{bad:,}", style="yellow" if bad else ""),
                *(_short(st[k]) for k in ("mean", "min", "median", "max", "kept_mean", "pruned_mean")),
            )
        con.print(t)

    if s["agreement"]:
        t = Table(title="checkpoint agreement (Spearman ρ)", box=box.SIMPLE_HEAD)
        for h in ("score", "columns", "rows", "all pairs", "seeds, same step", "steps, same seed"):
            t.add_column(h, justify="left" if h == "score" else "right")
        for name, a in s["agreement"].items():
            p = a["pairs"]
            t.add_row(
                Text(visible(name)),
                str(len(a["columns"])),
                f"{a['rows']:,}",
                _fmt(p["all_pairs"]),
                _fmt(p["between_seeds_same_step"]),
                _fmt(p["between_steps_same_seed"]),
            )
        con.print(t)
    for msg in s["signal"]:
        con.print(Text("signal check: " + visible(msg), style="bold yellow"))
    for msg in s["notes"]:
        con.print(Text(visible(msg), style="yellow"))
    return s
