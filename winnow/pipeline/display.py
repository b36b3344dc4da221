"""Text from the data, made safe to show: in the report, the Markdown artifact and the terminal.

Control characters (ANSI escape sequences start with one), bidirectional overrides and isolates (which
make ``file\\u202egnp.exe`` read as ``fileexe.png``) and zero-width characters are shown as ``\\uXXXX``
instead of acting; newlines and tabs are kept. Escaping for HTML or Markdown comes on top of this.
"""

from __future__ import annotations

import html
import re
from typing import Any

_INVISIBLE = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb]"
)


def visible(x: Any) -> str:
    """``x`` as text with every control, bidi-control and zero-width character written as ``\\uXXXX``."""
    return _INVISIBLE.sub(lambda m: f"\\u{ord(m.group()):04x}", str(x))


def markdown_cell(x: Any) -> str:
    """Text for a Markdown table cell: visible, HTML-escaped (Markdown renders raw HTML), and the
    characters that would end the cell or start formatting escaped with a backslash."""
    s = html.escape(visible(x), quote=True).replace("\n", " ")
    return re.sub(r"([\\`*_{}\[\]()#+!|~>])", r"\\\1", s)
