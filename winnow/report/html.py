"""The HTML kit of the report: escaping, tables, images, key-value blocks, sections, notes and the CSS.

Every string that comes from the data or the recipe is passed through ``html.escape`` (:func:`_e`);
only :class:`_Raw` strings, built here, go into a page as they are.
"""

from __future__ import annotations

import base64
import html
import json
from typing import Any

from winnow.pipeline.display import visible
from winnow.report.text import _fmt


class _Raw(str):
    """HTML that is already safe (built here); every other cell is escaped."""


def _e(x: Any) -> str:
    """HTML for text from the data or the recipe: control and bidi characters made visible, then escaped."""
    return html.escape(visible(x), quote=True)


def _cell(x: Any) -> str:
    return x if isinstance(x, _Raw) else _e(_fmt(x))


def _table(headers: list[str] | None, rows: list[list[Any]], cls: str = "") -> str:
    head = "<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in headers) + "</tr></thead>" if headers else ""
    body = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    c = f' class="{_e(cls)}"' if cls else ""
    return f"<table{c}>{head}<tbody>{body}</tbody></table>"


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<figure><img alt="{_e(alt)}" src="data:image/png;base64,{data}"></figure>'


def _kv(value: Any, depth: int = 0) -> str:
    """Any JSON value as nested HTML tables, every string escaped."""
    if isinstance(value, dict):
        if not value:
            return "<code>{}</code>"
        rows = "".join(f"<tr><th>{_e(k)}</th><td>{_kv(v, depth + 1)}</td></tr>" for k, v in value.items())
        return f'<table class="kv">{rows}</table>'
    if isinstance(value, list):
        if value and all(isinstance(v, dict) for v in value) and depth < 4:
            keys: list[str] = []
            for v in value:
                keys.extend(k for k in v if k not in keys)
            rows = [
                [
                    _Raw(_kv(v.get(k), depth + 1)) if isinstance(v.get(k), (dict, list)) else v.get(k)
                    for k in keys
                ]
                for v in value
            ]
            return _table(keys, rows)
        return _e(json.dumps(value, default=str))
    if isinstance(value, str):
        return _e(value)
    return _e(_fmt(value))


def _section(anchor: str, title: str, body: str, toc: list[tuple[str, str]]) -> str:
    toc.append((anchor, title))
    return f'<section id="{_e(anchor)}"><h2>{_e(title)}</h2>{body}</section>'


def _note(text: str, kind: str = "note") -> str:
    return f'<p class="{kind}">{_e(text)}</p>'


_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;color:#222;background:#fafafa}
main{max-width:1150px;margin:0 auto;padding:1.5em 2em 4em;background:#fff}
h1{font-size:1.6em;margin:.2em 0}h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
h3{margin-top:1.5em}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em}
th,td{border:1px solid #ddd;padding:.25em .55em;text-align:left;vertical-align:top}
thead th{background:#f0f2f5}td{font-variant-numeric:tabular-nums}
table.kv th{background:#f7f7f9;font-weight:600;white-space:nowrap}table.kv td:first-child{white-space:nowrap}
.cards{display:flex;gap:1em;flex-wrap:wrap;margin:1em 0}
.card{border:1px solid #ddd;border-radius:6px;padding:.6em 1.1em;min-width:9em}
.card b{display:block;font-size:1.5em}.card span{color:#666;font-size:.85em}
.kept b{color:#1f77b4}.pruned b{color:#e8650a}
pre{background:#f6f8fa;border:1px solid #e1e4e8;padding:.8em;overflow:auto;font-size:.82em;max-height:40em}
.preview{white-space:pre-wrap;max-height:9em;overflow:auto;display:block;font-family:monospace;font-size:.82em;
max-width:46em;word-break:break-word}
.note{color:#555;font-style:italic}.warn{background:#fff4e5;border-left:4px solid #ff9800;padding:.4em .8em}
nav{background:#f6f8fa;border:1px solid #e1e4e8;padding:.5em 1.2em;display:inline-block}
nav ol{margin:.3em 0;padding-left:1.4em}
figure{margin:.8em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
code{background:#f3f3f3;padding:0 .25em}
"""
