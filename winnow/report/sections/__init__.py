"""The report's sections, one function each, in the order the report shows them.

A section is a function ``(Context) -> str | None`` made a :class:`Section` by ``@section(anchor,
title)``; it returns its HTML body, or None when it does not apply to the run (no previous version,
no influence, no mixture). ``_render`` walks ``SECTIONS`` in order and builds the table of contents
from the sections that applied. A new section is a module here and an entry in ``SECTIONS``.
"""

from __future__ import annotations

from winnow.report.sections.agreement import checkpoint_agreement
from winnow.report.sections.base import Context, Section, section
from winnow.report.sections.changes import changes_since
from winnow.report.sections.examples import examples
from winnow.report.sections.groups import kept_and_pruned
from winnow.report.sections.influence import influence_on_target
from winnow.report.sections.mixture import domain_mixture
from winnow.report.sections.provenance import provenance_and_recipe
from winnow.report.sections.scores import score_distributions
from winnow.report.sections.shards import shards_and_mixture

__all__ = ["SECTIONS", "Context", "Section", "section"]

SECTIONS: list[Section] = [
    changes_since,
    score_distributions,
    influence_on_target,
    domain_mixture,
    kept_and_pruned,
    checkpoint_agreement,
    examples,
    provenance_and_recipe,
    shards_and_mixture,
]
