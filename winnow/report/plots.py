"""The matplotlib plots of the report; each takes frames and statistics and returns PNG bytes.

Plots are drawn with matplotlib's Agg canvas on ``Figure`` objects (no pyplot state, so the report
can be built from worker threads). Every plot is a ``_plot_*`` function that ends in :func:`_png`
(tests/report/test_plots.py checks each one's title and axis labels through it).
"""

from __future__ import annotations

import inspect
import io
import math
from typing import Any

import numpy as np
import polars as pl
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from winnow.pipeline.display import visible
from winnow.report.stats import MAX_GROUPS, NO_GROUP
from winnow.report.text import _rows

MAX_HEATMAP = 30  # checkpoint columns drawn in one heatmap
KEPT_COLOR = "#1f77b4"
PRUNED_COLOR = "#ff7f0e"

_HORIZONTAL_BXP = (
    {"orientation": "horizontal"}
    if "orientation" in inspect.signature(Axes.bxp).parameters
    else {"vert": False}
)


def _plain(s: Any, width: int = 32) -> str:
    """Text for a matplotlib label: shortened, and `$` escaped so it is never parsed as mathtext."""
    s = visible(s)
    if len(s) > width:  # keep both ends: names often differ only in their suffix
        head = (width - 1) // 2
        s = s[:head] + "…" + s[len(s) - (width - 1 - head) :]
    return s.replace("$", r"\$")


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96)
    return buf.getvalue()


def _bins(values: np.ndarray, n: int = 50, edge: float | None = None) -> np.ndarray | int:
    """Histogram bin edges; with `edge` (the cut-off) one bin edge falls on it, so no bar mixes both sides."""
    if values.size == 0:
        return 10
    lo, hi = float(values.min()), float(values.max())
    if lo == hi:
        return (
            np.array([lo - 0.5, lo + 0.5])
            if lo == 0
            else np.array([lo - abs(lo) * 0.05, lo + abs(lo) * 0.05])
        )
    nb = min(n, max(5, int(math.sqrt(values.size)) + 1))
    if edge is None or not lo <= edge <= hi:
        return np.linspace(lo, hi, nb + 1)
    width = (hi - lo) / nb
    return edge + width * np.arange(math.floor((lo - edge) / width), math.ceil((hi - edge) / width) + 1)


def _legend(ax: Axes, **kw: Any) -> None:
    """A legend to the right of the axes, where it hides no data."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, **kw)


def _finite(frame: pl.DataFrame, col: str) -> np.ndarray:
    return frame.filter(pl.col(col).is_finite())[col].to_numpy()


def _top_groups(stats: dict[str, dict]) -> list[str]:
    return list(stats)[:MAX_GROUPS]  # stats are sorted by input rows, largest first


def _plot_score_hists(frame: pl.DataFrame, cols: list[str], sel: str | None, cutoff: float | None) -> bytes:
    cols = cols[:6]
    ncol = 1 if len(cols) == 1 else 2
    nrow = math.ceil(len(cols) / ncol)
    fig = Figure(figsize=(9 if ncol == 1 else 11, 3.6 * nrow), layout="constrained")
    axes = fig.subplots(nrow, ncol, squeeze=False).ravel()
    for ax, col in zip(axes, cols, strict=False):
        kept = _finite(frame.filter(pl.col("kept")), col)
        pruned = _finite(frame.filter(~pl.col("kept")), col)
        bins = _bins(np.concatenate([kept, pruned]), edge=cutoff if col == sel else None)
        ax.hist(kept, bins=bins, color=KEPT_COLOR, alpha=0.55, label=f"kept ({kept.size:,})")
        ax.hist(pruned, bins=bins, color=PRUNED_COLOR, alpha=0.55, label=f"pruned ({pruned.size:,})")
        if col == sel and cutoff is not None:
            ax.axvline(cutoff, color="black", linestyle="--", linewidth=1.2, label=f"cut-off {cutoff:.4g}")
        role = " (selection score)" if col == sel else ""
        ax.set_title(_plain(f"{col}{role}: kept vs pruned", 80))
        ax.set_xlabel(_plain(f"{col} (mean over checkpoints)", 80))
        ax.set_ylabel("rows")
        _legend(ax)
        if kept.size + pruned.size == 0:
            ax.text(0.5, 0.5, "no finite scores", ha="center", va="center", transform=ax.transAxes)
    for ax in axes[len(cols) :]:
        ax.set_visible(False)
    return _png(fig)


def _plot_group_boxes(
    frame: pl.DataFrame, group: str, stats: dict[str, dict], col: str, cutoff: float | None
) -> bytes:
    names = _top_groups(stats)
    q = (
        frame.filter(pl.col(col).is_finite())
        .with_columns(pl.col(group).fill_null(NO_GROUP).alias("_g"))
        .filter(pl.col("_g").is_in(names))
        .group_by(["_g", "kept"])
        .agg(
            n=pl.len(),
            lo=pl.col(col).quantile(0.05, "linear"),
            q1=pl.col(col).quantile(0.25, "linear"),
            med=pl.col(col).median(),
            q3=pl.col(col).quantile(0.75, "linear"),
            hi=pl.col(col).quantile(0.95, "linear"),
            mean=pl.col(col).mean(),
        )
    )
    by = {(r["_g"], r["kept"]): r for r in q.iter_rows(named=True)}
    fig = Figure(figsize=(9, 1.4 + 0.42 * len(names)), layout="constrained")
    ax = fig.subplots()
    boxes, positions, colors = [], [], []
    for i, name in enumerate(names):
        for kept, off, color in ((True, -0.18, KEPT_COLOR), (False, 0.18, PRUNED_COLOR)):
            r = by.get((name, kept))
            if r is None:
                continue
            boxes.append(
                {
                    "med": r["med"],
                    "q1": r["q1"],
                    "q3": r["q3"],
                    "whislo": r["lo"],
                    "whishi": r["hi"],
                    "mean": r["mean"],
                    "fliers": [],
                }
            )
            positions.append(i + off)
            colors.append(color)
    if boxes:
        art = ax.bxp(
            boxes,
            positions=positions,
            widths=0.3,
            patch_artist=True,
            showfliers=False,
            showmeans=True,
            meanprops={
                "marker": "D",
                "markersize": 4,
                "markerfacecolor": "white",
                "markeredgecolor": "black",
            },
            medianprops={"color": "black"},
            **_HORIZONTAL_BXP,
        )
        for patch, color in zip(art["boxes"], colors, strict=True):
            patch.set_facecolor(color)
            patch.set_alpha(0.7)
    else:
        ax.text(0.5, 0.5, "no finite scores", ha="center", va="center", transform=ax.transAxes)
    ax.set_yticks(range(len(names)), [f"{_plain(n, 28)} (n={stats[n]['input_rows']:,})" for n in names])
    ax.set_ylim(len(names) - 0.5, -0.5)
    handles = [
        Patch(color=KEPT_COLOR, alpha=0.7, label="kept"),
        Patch(color=PRUNED_COLOR, alpha=0.7, label="pruned"),
    ]
    if cutoff is not None:
        ax.axvline(cutoff, color="black", linestyle="--", linewidth=1.2)
        handles.append(
            Patch(facecolor="none", edgecolor="black", linestyle="--", label=f"cut-off {cutoff:.4g}")
        )
    _legend(ax, handles=handles)
    more = f" ({MAX_GROUPS} largest of {len(stats)})" if len(stats) > len(names) else ""
    ax.set_title(
        _plain(f"{col} by {group}, kept vs pruned{more}", 90)
        + "\nbox: quartiles, whiskers: 5th-95th percentile, ◆: mean"
    )
    ax.set_xlabel(_plain(col, 60))
    ax.set_ylabel(group)
    return _png(fig)


def _plot_group_counts(group: str, stats: dict[str, dict]) -> bytes:
    names = _top_groups(stats)
    y = np.arange(len(names))
    kept = np.array([stats[n]["kept_rows"] for n in names])
    pruned = np.array([stats[n]["pruned_rows"] for n in names])
    fig = Figure(figsize=(11, 1.4 + 0.42 * len(names)), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2, sharey=True)
    ax1.barh(y, kept, color=KEPT_COLOR, label="kept")
    ax1.barh(y, pruned, left=kept, color=PRUNED_COLOR, label="pruned")
    ax1.set_yticks(y, [_plain(n, 32) for n in names])
    ax1.set_ylim(len(names) - 0.5, -0.5)
    ax1.set_xlabel("rows")
    ax1.set_ylabel(group)
    more = f" ({MAX_GROUPS} largest of {len(stats)})" if len(stats) > len(names) else ""
    ax1.set_title(_plain(f"Rows per {group}: kept vs pruned{more}", 90))
    _legend(ax1)
    h = 0.27
    series = (
        ("input (before)", "proportion_before", "#888888"),
        ("kept rows (after)", "proportion_after", KEPT_COLOR),
        ("weight of kept rows (after)", "weight_proportion", "#2ca02c"),
    )
    for k, (label, key, color) in enumerate(series):
        vals = np.array([stats[n][key] or 0.0 for n in names])
        ax2.barh(y + (k - 1) * h, vals, height=h, color=color, label=label)
    ax2.set_xlabel("proportion of all rows / of total weight")
    ax2.set_ylabel(group)
    ax2.set_title(f"Share per {group} before and after selection")
    _legend(ax2)
    return _png(fig)


def _plot_weights(frame: pl.DataFrame) -> bytes:
    w = frame.filter(pl.col("kept") & pl.col("weight").is_finite())["weight"].to_numpy()
    fig = Figure(figsize=(9, 3.4), layout="constrained")
    ax = fig.subplots()
    if w.size:
        ax.hist(w, bins=_bins(w), color=KEPT_COLOR, alpha=0.8)
        ax.axvline(float(w.mean()), color="black", linestyle="--", linewidth=1, label=f"mean {w.mean():.4g}")
        _legend(ax)
    else:
        ax.text(0.5, 0.5, "no kept rows", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(f"Weights of kept rows ({_rows(w.size)})")
    ax.set_xlabel("weight (training loss multiplier)")
    ax.set_ylabel("kept rows")
    return _png(fig)


def _plot_heatmap(name: str, agreement: dict) -> bytes:
    cols = agreement["columns"][:MAX_HEATMAP]
    m = np.array(
        [[np.nan if v is None else v for v in row[: len(cols)]] for row in agreement["matrix"][: len(cols)]]
    )
    k = len(cols)
    size = min(11, 2.5 + 0.55 * k)
    fig = Figure(figsize=(size + 1.2, size), layout="constrained")
    ax = fig.subplots()
    finite = m[np.isfinite(m)]
    vmin = min(0.0, float(finite.min())) if finite.size else 0.0
    im = ax.imshow(m, vmin=vmin, vmax=1.0, cmap="viridis")
    labels = [_plain(c.split("@", 1)[1] if "@" in c else c, 24) for c in cols]
    ax.set_xticks(range(k), labels, rotation=60, ha="right")
    ax.set_yticks(range(k), labels)
    if k <= 14:
        for i in range(k):
            for j in range(k):
                if np.isfinite(m[i, j]):
                    ax.text(
                        j,
                        i,
                        f"{m[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if m[i, j] < (vmin + 1) / 2 else "black",
                    )
    fig.colorbar(im, ax=ax, label="Spearman ρ")
    ax.set_title(_plain(f"{name}: Spearman ρ between checkpoints", 80))
    ax.set_xlabel("checkpoint (s = seed, k = step)" if "@" in cols[0] else "score column")
    ax.set_ylabel("checkpoint (s = seed, k = step)" if "@" in cols[0] else "score column")
    return _png(fig)


def _plot_change_shares(group: str, rows: dict[str, dict], prev_name: str) -> bytes:
    """Grouped bars: each group's share of the kept rows in the previous version and in this run."""
    names = list(rows)[:MAX_GROUPS]
    y = np.arange(len(names))
    fig = Figure(figsize=(11, 1.6 + 0.5 * len(names)), layout="constrained")
    ax = fig.subplots()
    h = 0.38
    for k, (label, key, color) in enumerate(
        (
            (f"{_plain(prev_name, 40)} (before)", "share_before", "#888888"),
            ("this run (now)", "share_now", KEPT_COLOR),
        )
    ):
        vals = np.array([rows[n][key] or 0.0 for n in names])
        bars = ax.barh(y + (k - 0.5) * h, vals, height=h, color=color, label=label)
        if len(names) <= 12:
            ax.bar_label(bars, labels=[f"{100 * v:.1f}%" for v in vals], padding=2, fontsize=8)
    ax.set_yticks(y, [_plain(n, 32) for n in names])
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.margins(x=0.12)
    ax.set_xlabel("share of kept rows")
    ax.set_ylabel(group)
    more = f" ({MAX_GROUPS} largest of {len(rows)})" if len(rows) > len(names) else ""
    ax.set_title(_plain(f"Share of kept rows per {group}: {prev_name} vs this run{more}", 100))
    _legend(ax)
    return _png(fig)


def _plot_neighbour_domains(nb: pl.DataFrame) -> bytes:
    """Where each subtask's most influential training examples come from, by domain."""
    counts = (
        nb.with_columns(pl.col("domain").fill_null("(none)"), pl.col("subtask").fill_null("all"))
        .group_by("subtask", "domain")
        .len()
    )
    subtasks = sorted(counts["subtask"].unique().to_list())[:MAX_GROUPS]
    domains = (
        counts.group_by("domain")
        .agg(pl.col("len").sum())
        .sort(["len", "domain"], descending=[True, False])["domain"]
        .to_list()
    )
    domains = domains[:MAX_GROUPS]
    y = np.arange(len(domains))
    fig = Figure(figsize=(11, 1.6 + 0.42 * len(domains)), layout="constrained")
    ax = fig.subplots()
    h = 0.8 / max(1, len(subtasks))
    for k, st in enumerate(subtasks):
        sub = counts.filter(pl.col("subtask") == st)
        total = max(1, int(sub["len"].sum()))
        by = dict(zip(sub["domain"].to_list(), sub["len"].to_list(), strict=True))
        ax.barh(
            y + (k - (len(subtasks) - 1) / 2) * h,
            [by.get(d, 0) / total for d in domains],
            height=h,
            label=_plain(f"target: {st}", 40),
        )
    ax.set_yticks(y, [_plain(d, 32) for d in domains])
    ax.set_ylim(len(domains) - 0.5, -0.5)
    ax.set_xlabel("share of the target examples' top-k most influential training examples")
    ax.set_ylabel("domain of the training example")
    k = int(nb["rank"].max()) if nb.height else 0
    ax.set_title(f"Domains of each target example's {k} nearest training examples by influence")
    _legend(ax)
    return _png(fig)


def _plot_mixture(traj: pl.DataFrame) -> bytes:
    doms = [c for c in traj.columns if c not in ("step", "entropy")][:MAX_GROUPS]
    steps = traj["step"].to_numpy()
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    for d in doms:
        ax1.plot(steps, traj[d].to_numpy(), label=_plain(d, 28))
    ax1.axhline(1 / max(1, len(doms)), color="#888888", linestyle=":", label="uniform")
    ax1.set_xlabel("proxy step")
    ax1.set_ylabel("domain weight")
    ax1.set_title("Mixture weights over training")
    _legend(ax1)
    ax2.plot(steps, traj["entropy"].to_numpy(), color="#444444")
    ax2.axhline(math.log(max(1, len(doms))), color="#888888", linestyle=":", label="uniform (log k)")
    ax2.set_xlabel("proxy step")
    ax2.set_ylabel("entropy of the weights (nats)")
    ax2.set_title("Entropy of the mixture")
    _legend(ax2)
    return _png(fig)
