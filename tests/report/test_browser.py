"""report.html in a real browser: headless Chromium renders it, runs it, and reports its console.

Two real pipeline runs give a report with a "Changes since ..." section; a dataset of HTML and script
payloads (in texts, a domain name, a label and an id) shows that nothing from the data runs as markup.
Chromium (Debian's `chromium`) is installed with apt-get when it is missing and this runs as root;
otherwise these tests are skipped.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import polars as pl
import pytest

from tests.conftest import tiny_recipe, write_recipe
from winnow.cli import main
from winnow.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
WINDOW = (1400, 2400)
CONSOLE = ":INFO:CONSOLE"
# a real tag (serialized text never holds a raw "<" or ">") that carries the payloads' marker
PWNED_TAG = re.compile(r"<[a-zA-Z][^<>]*data-pwned")

TEXT_PAYLOADS = [
    "<script>document.body.setAttribute('data-pwned','1')</script>",
    "<img src=x onerror=\"document.body.setAttribute('data-pwned','2')\">",
    "</textarea><b>bold</b>",
]
DOMAIN_PAYLOAD = "<svg onload=\"document.body.setAttribute('data-pwned','3')\">"
LABEL_PAYLOAD = "<script>document.body.setAttribute('data-pwned','4')</script>"
ID_PAYLOAD = "<img src=y onerror=\"document.body.setAttribute('data-pwned','5')\">"


# --------------------------------------------------------------------------------------------------
# chromium


@pytest.fixture(scope="session")
def chromium() -> str:
    """The Chromium binary; installed with apt-get (Debian's `chromium`) when missing and we are root."""
    found = shutil.which("chromium") or (
        "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None
    )
    if found:
        return found
    apt = shutil.which("apt-get")
    if os.name != "posix" or os.geteuid() != 0 or apt is None:
        pytest.skip(
            "chromium not found and cannot be installed here (needs root and apt-get: "
            "`apt-get update && apt-get install -y chromium`)"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in ([apt, "update"], [apt, "install", "-y", "chromium"]):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
        except (OSError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"`{' '.join(cmd)}` failed: {exc}")
        if r.returncode != 0:
            pytest.skip(f"`{' '.join(cmd)}` exited with {r.returncode}: {(r.stderr or r.stdout)[-500:]}")
    found = shutil.which("chromium")
    if not found:
        pytest.skip("apt-get installed chromium but no `chromium` is on PATH")
    return found


def _chromium(binary: str, page: Path, tmp: Path, mode: str) -> subprocess.CompletedProcess:
    """Run headless Chromium on `page` with a fresh profile; mode is --screenshot=PNG or --dump-dom."""
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp)
    cmd = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        mode,
        page.resolve().as_uri(),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, f"chromium exited with {r.returncode}:\n{r.stderr[-3000:]}"
    return r


def _console(r: subprocess.CompletedProcess) -> list[str]:
    """The page's console messages (dbus, vaapi and other browser warnings on stderr are not)."""
    return [ln for ln in r.stderr.splitlines() if CONSOLE in ln]


def _external_refs(page: str) -> list[str]:
    pats = (
        r"\bsrc\s*=\s*[\"']?\s*(?:https?:)?//",
        r"<link\b[^>]*\bhref\s*=\s*[\"']?\s*(?:https?:)?//",
        r"\bhref\s*=\s*[\"']?\s*https?:",
        r"url\(\s*[\"']?\s*(?:https?:)?//",
        r"@import",
    )
    return [m.group(0) for p in pats for m in re.finditer(p, page, re.I)]


def _check_screenshot(png: Path) -> None:
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC), f"{png} is not a PNG"
    assert len(data) > 50_000, f"{png} is only {len(data):,} bytes"
    try:
        from PIL import Image
    except ImportError:  # no Pillow: the size and the magic bytes above are the check
        assert len(set(data[len(data) // 4 :])) > 200
        return
    with Image.open(png) as im:
        assert im.size == WINDOW
        rgb = im.convert("RGB")
        lo, hi = rgb.convert("L").getextrema()
        assert hi - lo > 128, f"{png} is nearly one flat colour (grey levels {lo}..{hi})"
        colours = rgb.getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 64, f"{png} has only {len(colours)} colours"


# --------------------------------------------------------------------------------------------------
# runs


def _run(recipe: dict, path: Path) -> Path:
    assert main(["run", str(write_recipe(path, recipe))]) == 0
    return Path(recipe["output"]["dir"])


@pytest.fixture(scope="module")
def two_versions(chromium, prefect_harness, corpus, tmp_path_factory) -> tuple[Path, Path]:
    """A run and the previous version of its selection: (run dir, previous version folder).

    Version 1 keeps half of each domain; version 2 (same data, so training and scores are cached) keeps
    the highest-scoring 45% without stratifying, so rows enter and leave and the domain shares move. To have new and gone
    rows as well without training twice, version 1's copy lacks 8 ids that the data has (new rows now)
    and holds 3 kept rows of a domain "retired" that the data no longer has (gone); its manifest's
    counts are made to match.
    """
    tmp = tmp_path_factory.mktemp("versions")
    run_dir = tmp / "runs" / "t"
    _run(tiny_recipe(corpus, run_dir), tmp / "v1.yaml")
    v1 = tmp / "runs" / "t-versions" / "v0001"
    v1.mkdir(parents=True)
    sel = pl.read_parquet(run_dir / "selection.parquet")
    dropped = sel["id"].gather_every(sel.height // 8).head(8)
    retired = pl.DataFrame(
        {"id": [f"retired-{i}" for i in range(3)], "kept": [True] * 3, "weight": [1.0] * 3}
    )
    sel = pl.concat([sel.filter(~pl.col("id").is_in(dropped.implode())), retired])
    sel.write_parquet(v1 / "selection.parquet")
    doms = pl.read_parquet(run_dir / "scores" / "rows.parquet", columns=["id", "domain"])
    per = (
        sel.join(doms, on="id", how="left")
        .with_columns(pl.col("domain").fill_null("retired"))
        .group_by("domain")
        .agg(n=pl.len(), k=pl.col("kept").sum(), w=pl.col("weight").sum())
        .sort("domain")
    )
    man = json.loads((run_dir / "manifest.json").read_text())
    tot_w = float(per["w"].sum())
    man["domains"] = {
        d: {"input_rows": n, "kept_rows": k, "weight_sum": w, "proportion": w / tot_w}
        for d, n, k, w in per.iter_rows()
    }
    man["counts"] = {
        "input_rows": sel.height,
        "kept_rows": int(sel["kept"].sum()),
        "pruned_rows": sel.height - int(sel["kept"].sum()),
    }
    (v1 / "manifest.json").write_text(json.dumps(man))
    _run(tiny_recipe(corpus, run_dir, select__fraction=0.45, select__stratify=None), tmp / "v2.yaml")
    return run_dir, v1


@pytest.fixture(scope="module")
def payload_run(chromium, prefect_harness, corpus, tmp_path_factory) -> Path:
    """A run on 30 rows of real text, some of them (and a domain, a label, an id) HTML and script payloads."""
    tmp = tmp_path_factory.mktemp("payloads")
    real = [json.loads(ln) for f in sorted(corpus.glob("*.jsonl")) for ln in f.read_text().splitlines()]
    real = real[:: max(1, len(real) // 30)][:30]
    rows = []
    for i, r in enumerate(real):
        text = r["text"]
        if i < len(TEXT_PAYLOADS) * 3:
            text = f"{TEXT_PAYLOADS[i % len(TEXT_PAYLOADS)]} {text}"
        rows.append(
            {
                "id": ID_PAYLOAD if i == 4 else f"r{i:03d}",
                "text": text,
                "domain": ("code", "prose", DOMAIN_PAYLOAD)[i % 3],
                "label": ("plain", LABEL_PAYLOAD)[i % 2],
            }
        )
    data = tmp / "data" / "rows.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # a classification task: causal_lm does not map string labels through data.label_names
    recipe = tiny_recipe(
        corpus,
        tmp / "run",
        data__source=str(data),
        data__label_column="label",
        data__label_names=["plain", LABEL_PAYLOAD],
        model__task="sequence_classification",
    )
    return _run(recipe, tmp / "recipe.yaml")


# --------------------------------------------------------------------------------------------------
# tests


def test_report_with_changes_renders_cleanly(chromium, two_versions, tmp_path) -> None:
    run_dir, v1 = two_versions
    out = write_report(run_dir, fingerprint="fp-v2", out=tmp_path / "v0002" / "report.html", previous=v1)
    page = out.read_text(encoding="utf-8")
    assert not _external_refs(page), _external_refs(page)
    assert "Changes since v0001" in page
    assert "retired" in page and "new rows" in page  # the gone domain, the new rows

    shot = tmp_path / "report-v0002.png"
    r = _chromium(chromium, out, tmp_path, f"--screenshot={shot}")
    assert _console(r) == []
    assert shot.is_file()
    _check_screenshot(shot)
    print(f"\nscreenshot of {out}: {shot}")

    r = _chromium(chromium, out, tmp_path, "--dump-dom")
    assert _console(r) == []
    dom = r.stdout
    assert '<section id="changes"><h2>Changes since v0001</h2>' in dom
    assert '<a href="#changes">Changes since v0001</a>' in dom
    assert 'alt="share of kept rows per domain, v0001 vs this run"' in dom
    assert dom.count("data:image/png;base64,") == page.count("data:image/png;base64,") > 5
    for what in ("entered: pruned before, kept now", "left: kept before, pruned now"):
        m = re.search(rf"<td>{what}</td><td>([\d,]+)</td>", dom)
        assert m and int(m.group(1).replace(",", "")) > 0, what
    assert "<td>left: kept before, gone from the data</td><td>3</td>" in dom
    assert "<b>8</b><span>new rows" in dom and "<b>3</b><span>gone rows" in dom


def test_payloads_never_run(chromium, payload_run, tmp_path) -> None:
    # control: the same browser run does execute an unescaped payload and report its console, so the
    # checks below can fail
    control = tmp_path / "control.html"
    control.write_text(
        "<!DOCTYPE html><html><body><p>control</p>"
        + TEXT_PAYLOADS[0]
        + "<script>console.log('control-console')</script></body></html>"
    )
    r = _chromium(chromium, control, tmp_path, "--dump-dom")
    assert PWNED_TAG.search(r.stdout) and any("control-console" in ln for ln in _console(r))

    # a previous version with every kept flag flipped: every row enters or leaves
    prev = tmp_path / "v0001"
    prev.mkdir()
    sel = pl.read_parquet(payload_run / "selection.parquet")
    sel.with_columns(~pl.col("kept")).write_parquet(prev / "selection.parquet")
    shutil.copy(payload_run / "manifest.json", prev / "manifest.json")
    out = write_report(payload_run, out=tmp_path / "report.html", previous=prev)
    page = out.read_text(encoding="utf-8")

    # the source: no markup from the data, the payloads escaped
    assert not re.search(
        r"<script|<svg|<img\b(?![^>]*src=\"data:image/png;base64,)|<b>bold|<textarea", page, re.I
    )
    for payload in (*TEXT_PAYLOADS, DOMAIN_PAYLOAD, LABEL_PAYLOAD, ID_PAYLOAD):
        assert html.escape(payload, quote=True) in page, payload
    assert "&lt;script&gt;" in page
    assert not _external_refs(page), _external_refs(page)

    # the browser: nothing ran, the payloads are text on the page
    r = _chromium(chromium, out, tmp_path, "--dump-dom")
    assert _console(r) == []
    dom = r.stdout
    assert not PWNED_TAG.search(dom), PWNED_TAG.search(dom).group(0)[:300]
    assert "&lt;script&gt;document.body.setAttribute('data-pwned','1')&lt;/script&gt;" in dom
    assert "&lt;/textarea&gt;&lt;b&gt;bold&lt;/b&gt;" in dom
    assert "&lt;svg onload=\"document.body.setAttribute('data-pwned','3')\"&gt;" in dom
    assert "<b>bold</b>" not in dom and "<textarea" not in dom
    assert "Changes since v0001" in dom
