"""What a report section is: an anchor, a title and a function from the run to its HTML body."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from winnow.report.load import _Previous, _Run


@dataclass(frozen=True)
class Context:
    """What every section reads: the loaded run, its summary (``_summarize``) and the previous version."""

    run: _Run
    summary: dict
    previous: _Previous | None = None


@dataclass(frozen=True)
class Section:
    anchor: str  # the section's id, and the table of contents' link to it
    title: str | Callable[[Context], str]
    body: Callable[[Context], str | None]  # None: the section does not apply to this run

    def title_for(self, ctx: Context) -> str:
        return self.title(ctx) if callable(self.title) else self.title

    def __call__(self, ctx: Context) -> str | None:
        return self.body(ctx)


def section(anchor: str, title: str | Callable[[Context], str]) -> Callable[[Callable], Section]:
    """Make a function ``(Context) -> str | None`` a report section; ``SECTIONS`` gives the order."""

    def wrap(body: Callable[[Context], str | None]) -> Section:
        return Section(anchor, title, body)

    return wrap
