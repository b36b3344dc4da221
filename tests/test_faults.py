"""Fault tests: SIGKILLs at random moments, each followed by a rerun that must give the uninterrupted
run's outputs byte for byte with no process left behind; and two runs on one folder at once, of which
one is refused and nothing is mixed.

``make test`` runs the first WINNOW_FAULT_KILLS (default 1) of the fixed seed list and
WINNOW_FAULT_RACES (default 1) race; ``make test-faults`` runs all 20 and 10."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from tests.conftest import ROOT, tiny_recipe, write_recipe
from winnow.cli import main

pytestmark = pytest.mark.usefixtures("prefect_harness")

SEEDS = [11, 23, 37, 41, 53, 67, 71, 89, 97, 101, 113, 127, 131, 149, 157, 163, 173, 181, 191, 199]
KILLS = int(os.environ.get("WINNOW_FAULT_KILLS", "1"))
RACES = int(os.environ.get("WINNOW_FAULT_RACES", "1"))


def _env(**extra) -> dict:
    from prefect.settings import PREFECT_API_URL

    return dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), PYTHONUNBUFFERED="1", **extra)


def _popen(recipe: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "winnow", "run", str(recipe)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _recipe(corpus: Path, run_dir: Path, **over) -> dict:
    r = tiny_recipe(corpus, run_dir, **over)
    r["train"].update(steps=16, checkpoints=[8, 16])  # two seeds, two checkpoints each
    return r


def _outputs(run_dir: Path) -> dict[str, bytes]:
    out = {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in sorted((run_dir / "shards").glob("*"))}
    for f in ("selection.parquet", "scores/el2n.parquet", "scores/rows.parquet"):
        out[f] = (run_dir / f).read_bytes()
    man = json.loads((run_dir / "manifest.json").read_text())
    man.pop("created")
    out["manifest"] = json.dumps(man, sort_keys=True).encode()
    return out


def _group_gone(pgid: int, timeout: float = 10.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    ref = tmp / "ref"
    assert main(["run", str(write_recipe(tmp / "ref.yaml", _recipe(corpus, ref)))]) == 0
    t = time.time()
    proc = _popen(write_recipe(tmp / "timing.yaml", _recipe(corpus, tmp / "timing")), _env())
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return ref, time.time() - t


@pytest.mark.parametrize("seed", SEEDS[:KILLS])
def test_sigkill_at_a_random_moment_then_rerun(seed, corpus, tmp_path, reference):
    ref, duration = reference
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(corpus, run))
    delay = random.Random(seed).uniform(0.3, duration)  # any phase: start-up, training, scoring, emit, report
    proc = _popen(recipe, _env())
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert _group_gone(proc.pid), "a process of the killed run is still alive"
    proc = _popen(recipe, _env())
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"rerun after a kill at {delay:.2f} s failed:\n{out}"
    assert _group_gone(proc.pid)
    assert _outputs(run) == _outputs(ref), f"outputs differ after a kill at {delay:.2f} s"
    assert not list(run.rglob("*.tmp-*"))


@pytest.mark.parametrize("round_", range(RACES))
def test_two_runs_on_one_folder_one_is_refused(round_, corpus, tmp_path_factory):
    """Run A holds the folder's lock (it waits at the lock until released) while run B, another recipe
    for the same folder, starts: B is refused with one line naming A, writes nothing, and A's outputs
    are A's alone."""
    tmp = tmp_path_factory.mktemp(f"race{round_}")
    run, release = tmp / "run", tmp / "go"
    fa, fb = (0.5, 0.2) if round_ % 2 == 0 else (0.2, 0.5)
    ra = write_recipe(tmp / "a.yaml", _recipe(corpus, run, select__fraction=fa))
    rb = write_recipe(tmp / "b.yaml", _recipe(corpus, run, select__fraction=fb))
    a = _popen(ra, _env(WINNOW_FAULT_WAIT="locked", WINNOW_FAULT_RELEASE=str(release)))
    lock = run / ".winnow" / "lock"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if json.loads(lock.read_text() or "{}").get("pid") == a.pid:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    b = _popen(rb, _env())
    out_b, _ = b.communicate(timeout=120)
    assert b.returncode == 2, out_b
    (line,) = [ln for ln in out_b.splitlines() if "winnow: error:" in ln]
    assert f"is in use by winnow run {ra}" in line and f"pid {a.pid}" in line
    assert not (run / "config.yaml").exists()  # B wrote nothing; A has not started writing
    release.touch()
    out_a, _ = a.communicate(timeout=300)
    assert a.returncode == 0, out_a
    man = json.loads((run / "manifest.json").read_text())
    sel = pl.read_parquet(run / "selection.parquet")
    assert man["selector"]["fraction"] == fa and f"fraction: {fa}" in (run / "config.yaml").read_text()
    assert man["counts"]["kept_rows"] == int(sel["kept"].sum())
    versions = sorted(p.name for p in run.glob("v0*"))
    assert versions == ["v0001"]
