"""The built-in demo corpus: real multi-domain text that lies on any machine with Python.

Domains (each written as jsonl files of at most `rows_per_file` rows, so the flows see several
input shards):

- `code`: the standard library's own sources, cut into chunks of whole lines;
- `prose`: the documentation topics of `pydoc_data.topics` (the language reference), by paragraph;
- `man-en`, `man-de`, `man-fr`: manual pages under /usr/share/man (English, German, French), with
  the roff markup stripped, where the machine has them;
- `licenses`: the copyright and licence files under /usr/share/doc, where present.

Every row is `{"id", "text", "domain", "origin"}`; the corpus is deterministic for a given machine.
"""

from __future__ import annotations

import gzip
import json
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from winnow.pipeline.atomic import atomic_path

CHUNK_CHARS = 480


def _chunks(text: str, size: int = CHUNK_CHARS, min_chars: int = 120) -> Iterator[str]:
    """Cut text at line boundaries into pieces of about `size` characters."""
    buf: list[str] = []
    n = 0
    for line in text.splitlines():
        if n + len(line) > size and n >= min_chars:
            yield "\n".join(buf).strip()
            buf, n = [], 0
        buf.append(line[:size])
        n += len(line) + 1
    rest = "\n".join(buf).strip()
    if len(rest) >= min_chars:
        yield rest


def code_rows(limit: int) -> Iterator[tuple[str, str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if not p.name.startswith("_"))
    per_file = 3
    for p in files:
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        # skip the licence header every file starts with: take chunks from the middle
        chunks = list(_chunks(text))
        mid = chunks[len(chunks) // 3 : len(chunks) // 3 + per_file]
        for c in mid:
            yield c, f"stdlib/{p.name}"
            limit -= 1
            if limit <= 0:
                return


def prose_rows(limit: int) -> Iterator[tuple[str, str]]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        for c in _chunks(topics[key]):
            yield c, f"pydoc_data/{key}"
            limit -= 1
            if limit <= 0:
                return


_GLYPHS = {
    ":a": "ä",
    ":o": "ö",
    ":u": "ü",
    ":A": "Ä",
    ":O": "Ö",
    ":U": "Ü",
    "ss": "ß",
    "'e": "é",
    "`e": "è",
    "^e": "ê",
    "`a": "à",
    "^a": "â",
    ",c": "ç",
    "^o": "ô",
    "^i": "î",
    "^u": "û",
    "`u": "ù",
    "'E": "É",
    "oq": "'",
    "cq": "'",
    "lq": '"',
    "rq": '"',
    "Fo": "«",
    "Fc": "»",
    "bu": "•",
}
_ROFF_ESC = [
    (r"\\\*\(Aq", "'"),
    (r"\\s[+-]?\d+", ""),
    (r"\\f[BIRP]|\\f\(..|\\f\[[^\]]*\]", ""),
    (r"\\\(aq", "'"),
    (r"\\\(dq", '"'),
    (r"\\-", "-"),
    (r"\\\(em|\\\(en", "-"),
    (r"\\&", ""),
    (r"\\e", "\\\\"),
    (r"\\\(..", ""),
    (r"\\\[[^\]]*\]", ""),
    (r"\\\*\(..|\\\*.", ""),
    (r"\\[ ~0|^]", " "),
    (r'\\"', ""),
]


def strip_roff(src: str) -> str:
    out = []
    for line in src.splitlines():
        if line.startswith(('.\\"', "'\\\"", ".ig", ".de", "..")):
            continue
        if line.startswith((".", "'")):
            parts = line[1:].split(None, 1)
            line = (
                parts[1]
                if len(parts) == 2 and parts[0] not in ("so", "TH", "ds", "nr", "ie", "el", "if")
                else ""
            )
            line = line.replace('"', "")
        line = re.sub(r"\\\((..)", lambda m: _GLYPHS.get(m.group(1), m.group(0)), line)
        line = re.sub(r"\\\[u([0-9A-Fa-f]{4})\]", lambda m: chr(int(m.group(1), 16)), line)
        line = re.sub(r"\\\[(..)\]", lambda m: _GLYPHS.get(m.group(1), m.group(0)), line)
        for pat, rep in _ROFF_ESC:
            line = re.sub(pat, rep, line)
        if line.strip():
            out.append(line.strip())
    return "\n".join(out)


def man_rows(lang: str, limit: int, sections: tuple[str, ...] = ("man1",)) -> Iterator[tuple[str, str]]:
    root = Path("/usr/share/man") / (lang if lang != "en" else "")
    pages = [p for sec in sections for p in sorted((root / sec).glob("*.gz"))]
    for p in pages:
        try:
            src = gzip.decompress(p.read_bytes()).decode("utf-8", errors="replace")
        except (OSError, EOFError):
            continue
        if src.lstrip().startswith(".so "):
            continue
        for c in list(_chunks(strip_roff(src)))[1:3]:  # past the NAME line, two chunks a page
            yield c, f"man/{lang}/{p.name}"
            limit -= 1
            if limit <= 0:
                return


def changelog_rows(limit: int) -> Iterator[tuple[str, str]]:
    """Debian package changelogs (/usr/share/doc/*/changelog.Debian.gz): release notes in a fixed format."""
    for p in sorted(Path("/usr/share/doc").glob("*/changelog.Debian.gz")):
        try:
            text = gzip.decompress(p.read_bytes()).decode("utf-8", errors="replace")
        except (OSError, EOFError):
            continue
        for c in list(_chunks(text))[:2]:
            yield c, f"doc/{p.parent.name}/changelog.Debian.gz"
            limit -= 1
            if limit <= 0:
                return


def test_code_rows(limit: int) -> Iterator[tuple[str, str]]:
    """The standard library's test suite (Python of another kind than the library itself)."""
    files = sorted((Path(sysconfig.get_paths()["stdlib"]) / "test").glob("test_*.py"))
    for p in files:
        try:
            chunks = list(_chunks(p.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue
        for c in chunks[len(chunks) // 2 : len(chunks) // 2 + 2]:
            yield c, f"stdlib/test/{p.name}"
            limit -= 1
            if limit <= 0:
                return


def noise_rows(
    kind: str, limit: int, seed: int = 0, words: list[str] | None = None, size: int = CHUNK_CHARS
) -> Iterator[tuple[str, str]]:
    """Text nothing can be learned from: ``hex`` (random hexadecimal digits in groups), ``words`` (words
    drawn uniformly from ``words``) or ``shuffled`` (the characters of real text in random order)."""
    import random

    rng = random.Random(seed)
    pool = words or ["data", "winnow", "text"]
    real = "".join(t for t, _ in prose_rows(200))
    for i in range(limit):
        if kind == "hex":
            text = " ".join(
                "".join(rng.choice("0123456789abcdef") for _ in range(8)) for _ in range(size // 9)
            )
        elif kind == "words":
            text = " ".join(rng.choice(pool) for _ in range(size // 6))
        elif kind == "shuffled":
            lo = rng.randrange(0, max(1, len(real) - size))
            chars = list(real[lo : lo + size])
            rng.shuffle(chars)
            text = "".join(chars)
        else:
            raise ValueError(f"noise kind must be hex, words or shuffled, got {kind!r}")
        yield text, f"noise/{kind}/{i}"


def license_rows(limit: int) -> Iterator[tuple[str, str]]:
    seen: set[str] = set()
    for p in sorted(Path("/usr/share/doc").glob("*/copyright")):
        try:
            text = p.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for c in list(_chunks(text))[1:3]:
            if c in seen:
                continue
            seen.add(c)
            yield c, f"doc/{p.parent.name}/copyright"
            limit -= 1
            if limit <= 0:
                return


def build_demo_corpus(
    out_dir: str | Path,
    per_domain: int = 500,
    rows_per_file: int = 250,
    domains: list[str] | None = None,
    hold_out: tuple[str, int] | None = None,
    hold_out_dir: str | Path | None = None,
) -> dict[str, int]:
    """Write the demo corpus as jsonl files under `out_dir`; return rows per domain.

    ``hold_out=(domain, n)``: the last n rows of that domain go to ``hold_out_dir/target.jsonl``
    instead (a target set for influence scoring, disjoint from the corpus)."""
    held: list[dict] = []
    sources = {
        "code": lambda n: code_rows(n),
        "prose": lambda n: prose_rows(n),
        "man-en": lambda n: man_rows("en", n),
        "man-de": lambda n: man_rows("de", n),
        "man-fr": lambda n: man_rows("fr", n),
        "licenses": lambda n: license_rows(n),
    }
    out = Path(out_dir)
    counts: dict[str, int] = {}
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        for dom, fn in sources.items():
            if domains is not None and dom not in domains:
                continue
            rows = [
                {"id": f"{dom}-{i:05d}", "text": t, "domain": dom, "origin": o}
                for i, (t, o) in enumerate(fn(per_domain))
            ]
            if len(rows) < 20:  # not on this machine
                continue
            if hold_out is not None and dom == hold_out[0]:
                n = min(hold_out[1], len(rows) // 2)
                held, rows = rows[len(rows) - n :], rows[: len(rows) - n]
            counts[dom] = len(rows)
            for k in range(0, len(rows), rows_per_file):
                with open(tmp / f"{dom}-{k // rows_per_file:05d}.jsonl", "w", encoding="utf-8") as f:
                    for r in rows[k : k + rows_per_file]:
                        f.write(json.dumps(r, ensure_ascii=False) + "\n")
    if hold_out is not None:
        from winnow.errors import WinnowError

        if not held:
            raise WinnowError(
                f"--hold-out: domain {hold_out[0]!r} has no rows on this machine "
                f"(domains: {', '.join(counts)})"
            )
        with atomic_path(Path(hold_out_dir or f"{out}-target")) as tmp:
            tmp.mkdir(parents=True)
            with open(tmp / "target.jsonl", "w", encoding="utf-8") as f:
                for r in held:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
        counts[f"{hold_out[0]} (held out)"] = len(held)
    return counts


def build_digits(out_dir: str | Path, flip_fraction: float = 0.1, seed: int = 0) -> tuple[int, int]:
    """scikit-learn's digits (1797 real 8x8 images) as parquet, with a fraction of labels flipped.

    The ids of the flipped rows are written to `flipped.json` beside the data, so a selection can be
    checked against them.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        from winnow.errors import WinnowError

        raise WinnowError("--kind digits needs scikit-learn: pip install scikit-learn") from None
    import numpy as np
    import polars as pl

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    flipped = rng.choice(len(y), int(len(y) * flip_fraction), replace=False)
    y = y.copy()
    y[flipped] = (y[flipped] + rng.integers(1, 10, len(flipped))) % 10
    ids = [f"digit-{i:04d}" for i in range(len(y))]
    out = Path(out_dir)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        pl.DataFrame({"id": ids, "pixels": x.astype(np.float32).tolist(), "label": y.tolist()}).write_parquet(
            tmp / "digits.parquet"
        )
        (tmp / "flipped.json").write_text(json.dumps(sorted(ids[i] for i in flipped)))
    return len(y), len(flipped)
