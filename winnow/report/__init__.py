"""The run report: one self-contained ``report.html`` and the terminal summary behind ``winnow inspect``.

Reads a run folder through :class:`winnow.pipeline.layout.RunLayout` (schema in docs/ARCHITECTURE.md,
"The run directory"):

- ``selection.parquet`` (id, kept, weight) and ``scores/`` are required;
- ``scores/<name>.parquet``: id, mean score columns and ``<score>@s<seed>k<step>`` checkpoint columns,
  provenance JSON under the parquet key-value metadata key ``winnow.provenance``;
- ``scores/rows.parquet`` (id, domain, label, n_tokens), ``scores/previews.parquet`` (id, preview: read
  for the example rows shown only), ``config.yaml``, ``manifest.json``,
  ``run.json``, ``mixture.json`` and ``influence/neighbours.parquet`` are used when present.

The package, a job per module: ``load`` (the run folder and a previous version), ``stats`` (the
numbers), ``plots`` (matplotlib, PNG bytes), ``html`` (escaping, tables, the CSS), ``text`` (number
formats), ``sections/`` (one function per section, in the order of ``SECTIONS``), ``render`` (the
page), ``terminal`` (``print_summary``). Every string that comes from the data or the recipe is
passed through ``html.escape``.

``write_report(..., previous=FOLDER)`` compares the run with a previous version of it (a folder with
that version's ``selection.parquet`` and ``manifest.json``) in a section "Changes since FOLDER":
rows that entered and left the selection, new and gone rows, kept shares per domain and label
before and after, and examples.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from winnow.report.html import _e
from winnow.report.load import _load, _load_previous
from winnow.report.render import _render
from winnow.report.stats import _summarize
from winnow.report.terminal import print_summary

__all__ = ["write_report", "summarize", "print_summary", "report_fingerprint"]


def summarize(run_dir: str | Path) -> dict:
    """The numbers the report shows, as a JSON-able dict.

    Keys: ``run`` (name, dir, winnow_version, report_version, created, selector, has_manifest),
    ``counts`` (input_rows, kept_rows, pruned_rows, kept_fraction), ``manifest_counts`` (as the
    manifest records them, or None), ``selection_score`` (the column the plots treat as the
    selection score), ``cutoff`` / ``cutoff_side`` ("high": kept rows score above it, "low", "mixed"
    or None), ``selection_score_not_finite`` (rows whose selection score is NaN, infinite or
    missing), ``domains`` and ``labels`` ({name: input_rows, kept_rows, pruned_rows, kept_fraction,
    proportion_before, proportion_after, weight_sum, weight_proportion}; empty when the data has
    none; null groups are named "(none)"), ``scores`` ({column: file, base, seed, step, rows,
    finite, nan, inf, null, mean, std, min, p05, median, p95, max, kept_mean, pruned_mean}),
    ``weights`` (of kept rows), ``agreement`` ({score: Spearman matrix between its checkpoint
    columns and pair means}), ``signal`` (one line per signal check that fired:
    :mod:`winnow.report.signal`) and ``notes``. NaN statistics are None.

    Raises FileNotFoundError when run_dir, run_dir/scores or run_dir/selection.parquet is missing.
    """
    return _summarize(_load(run_dir))


def write_report(
    run_dir: str | Path,
    fingerprint: str | None = None,
    *,
    out: str | Path | None = None,
    previous: str | Path | None = None,
) -> Path:
    """Write the report (self-contained: inline CSS, plots as PNG data URIs) and return its path.

    `out` is where it goes (default run_dir/report.html). The file appears atomically: it is written
    as ``<name>.tmp-<pid>`` in the same folder and renamed. Raises FileNotFoundError when run_dir,
    run_dir/scores or run_dir/selection.parquet is missing; manifest.json, config.yaml and
    scores/rows.parquet are optional. `fingerprint`, when given, is recorded in a
    `<meta name="winnow-fingerprint">` tag (the flow's cache check reads it).

    `previous`, a folder holding the previous version's ``selection.parquet`` and ``manifest.json``,
    adds a section "Changes since <its folder name>": rows that entered and left the selection, new
    and gone rows, kept shares per domain and label before and after, and examples. A missing or
    unreadable file there becomes a note in that section.
    """
    run = _load(run_dir)
    prev = _load_previous(previous) if previous is not None else None
    page = _render(run, _summarize(run), prev)
    if fingerprint is not None:
        page = page.replace(
            '<meta charset="utf-8">',
            f'<meta charset="utf-8"><meta name="winnow-fingerprint" content="{_e(fingerprint)}">',
            1,
        )
    dest = Path(out) if out is not None else run.layout.report
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f"{dest.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(page)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def report_fingerprint(path: str | Path) -> str | None:
    """The fingerprint recorded by `write_report(..., fingerprint=...)`, if any."""
    try:
        head = Path(path).read_text(encoding="utf-8", errors="replace")[:4096]
    except OSError:
        return None
    m = re.search(r'<meta name="winnow-fingerprint" content="([^"]*)">', head)
    return m.group(1) if m else None
