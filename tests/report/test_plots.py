"""winnow.report.plots: every figure says what it shows."""

from __future__ import annotations

import io
import json
from pathlib import Path

import polars as pl
import pytest

from tests.report.conftest import make_previous, make_run
from winnow.report import write_report


def _figure_problems(fig) -> list[str]:
    """What a rendered figure lacks: a title per Axes with content (or a suptitle), x and y labels, tick
    labels on image axes (heatmaps), a label on colorbars."""
    suptitle = (
        fig.get_suptitle()
        if hasattr(fig, "get_suptitle")
        else (fig._suptitle.get_text() if fig._suptitle else "")
    )
    problems = []
    for i, ax in enumerate(fig.axes):
        if not ax.get_visible():
            continue
        if ax.get_label() == "<colorbar>":
            if not (ax.get_ylabel().strip() or ax.get_xlabel().strip()):
                problems.append(f"axes {i}: colorbar without a label")
            continue
        if not (ax.lines or ax.patches or ax.collections or ax.images or ax.texts or ax.containers):
            continue
        name = ax.get_title() or ax.get_title("left") or ax.get_title("right") or suptitle
        if not name.strip():
            problems.append(f"axes {i}: no title")
        for axis, label in (("x", ax.get_xlabel()), ("y", ax.get_ylabel())):
            if not label.strip():
                problems.append(f"axes {i} ({name!r}): no {axis} label")
        if ax.images:
            for axis, ticks in (("x", ax.get_xticklabels()), ("y", ax.get_yticklabels())):
                if not any(t.get_text().strip() for t in ticks):
                    problems.append(f"axes {i} ({name!r}): image without {axis} tick labels")
    return problems


def test_figure_check_can_fail() -> None:
    from matplotlib.figure import Figure

    fig = Figure()
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot([0, 1], [1, 0])
    ax1.set_title("t")
    ax1.set_xlabel("x")
    ax2.imshow([[0.0, 1.0], [1.0, 0.0]])
    ax2.set_xticks([])
    fig.colorbar(ax2.images[0], ax=ax2)
    fig.savefig(io.BytesIO(), format="png")
    problems = _figure_problems(fig)
    assert any("axes 0" in p and "no y label" in p for p in problems)
    assert any("axes 1: no title" in p for p in problems)
    assert any("image without x tick labels" in p for p in problems)
    assert any("colorbar without a label" in p for p in problems)


def test_every_plot_has_title_and_axis_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from winnow.report import plots as report

    run = make_run(tmp_path)
    # an influence and a mixture section, so that their plots are drawn too
    pl.DataFrame(
        {
            "target_id": ["t0"] * 3 + ["t1"] * 3,
            "target_preview": ["target text"] * 6,
            "subtask": ["a"] * 3 + ["b"] * 3,
            "rank": [1, 2, 3] * 2,
            "id": [f"row-{i:04d}" for i in range(6)],
            "domain": ["web", "code", "books"] * 2,
            "influence": [0.9, 0.5, 0.1] * 2,
            "preview": ["neighbour text"] * 6,
        }
    ).write_parquet((run / "influence").mkdir() or run / "influence" / "neighbours.parquet")
    steps = list(range(0, 50, 10))
    pl.DataFrame(
        {
            "step": steps,
            "web": [0.5, 0.45, 0.4, 0.4, 0.38],
            "code": [0.3, 0.35, 0.4, 0.4, 0.42],
            "books": [0.2] * 5,
            "entropy": [1.03, 1.04, 1.05, 1.05, 1.05],
        }
    ).write_parquet(run / "mixture_trajectory.parquet")
    (run / "mixture.json").write_text(
        json.dumps(
            {
                "method": "doremi",
                "output": "average",
                "steps": 50,
                "weights": {"web": 0.4, "code": 0.4, "books": 0.2},
            }
        )
    )
    prev = make_previous(run, tmp_path / "v0001")

    seen: dict[str, list[str]] = {}
    render = report._png

    def checked(fig) -> bytes:
        png = render(fig)  # drawn first, so tick labels are filled in
        seen.setdefault(sys._getframe(1).f_code.co_name, []).extend(_figure_problems(fig))
        return png

    monkeypatch.setattr(report, "_png", checked)
    write_report(run, previous=prev)
    plots = {name for name in vars(report) if name.startswith("_plot_")}
    assert set(seen) == plots, f"plots not drawn by this test: {plots - set(seen)}"
    assert {k: v for k, v in seen.items() if v} == {}
