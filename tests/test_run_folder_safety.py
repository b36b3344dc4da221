"""Run folders are data that survive moves and hostile edits, inputs are accounted for row by row, and what
the data says is shown as text: each case here failed before (the issue "Nothing lost, nobody in")."""

from __future__ import annotations

import json
import os
import pickle
import shutil
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


def _cli(args: list[str], env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "winnow", *args],
        cwd=ROOT,
        env=env or dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
        **kw,
    )


def _api_env(**extra) -> dict:
    from prefect.settings import PREFECT_API_URL

    return dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), PYTHONUNBUFFERED="1", **extra)


def _rows(corpus: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(corpus.glob("*.jsonl")) for line in open(f)]


def _small(corpus: Path, run_dir: Path, **over) -> dict:
    r = tiny_recipe(corpus, run_dir, **over)
    r["train"].update(steps=8, seeds=[0], checkpoints=[8])
    return r


def _outputs(run_dir: Path) -> dict[str, bytes]:
    out = {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in sorted((run_dir / "shards").glob("*"))}
    out["selection.parquet"] = (run_dir / "selection.parquet").read_bytes()
    man = json.loads((run_dir / "manifest.json").read_text())
    man.pop("created")
    out["manifest"] = json.dumps(man, sort_keys=True).encode()
    return out


# -- portable run folders ------------------------------------------------------------------------
def test_a_moved_folder_resumes_under_another_prefect_home(tmp_path, corpus):
    """The folder's records are its own: copied elsewhere and run by a process with another PREFECT_HOME
    (and its own temporary server), every step is a cache hit and the outputs are the same. It used to
    fail with 'outside of the base path' on every rerun."""
    a, b = tmp_path / "a", tmp_path / "moved" / "b"
    rec = _small(corpus, a)
    assert main(["run", str(write_recipe(tmp_path / "a.yaml", rec))]) == 0
    shutil.copytree(a, b, symlinks=True)
    rec["output"]["dir"] = str(b)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "other-home")
    r = _cli(["run", str(write_recipe(tmp_path / "b.yaml", rec))], env)
    assert r.returncode == 0, r.stdout + r.stderr
    states = [
        ln.split()[-2] for ln in r.stdout.splitlines() if ln.startswith("  ") and ln.rstrip().endswith("s")
    ]
    assert states and all(s == "Cached" for s in states[:-1]), r.stdout  # the last is the version
    assert "v0001 (unchanged)" in r.stdout
    assert _outputs(a) == _outputs(b)


def test_unusable_step_records_are_rebuilt(tmp_path, corpus):
    run = tmp_path / "run"
    path = write_recipe(tmp_path / "r.yaml", _small(corpus, run))
    assert main(["run", str(path)]) == 0
    before = _outputs(run)
    recs = sorted((run / ".winnow" / "steps").glob("*.json"))
    assert {p.name.split("-")[0] for p in recs} >= {"tokenizer", "train", "score", "select", "emit", "report"}
    recs[0].write_text("{not json")
    recs[1].write_text(json.dumps({"step": "score", "fingerprint": "x", "result": {"nonsense": 1}}))
    assert main(["run", str(path)]) == 0
    assert _outputs(run) == before


# -- nothing a run folder holds runs as code -------------------------------------------------------
class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_optimizer_state_is_never_unpickled(tmp_path, corpus):
    """Training resumes from a checkpoint's optimizer.pt with torch's tensor-only loader: a planted
    pickle whose __reduce__ calls os.system does not run; the checkpoint is trained again instead."""
    run = tmp_path / "run"
    rec = tiny_recipe(corpus, run)
    rec["train"].update(steps=16, seeds=[0], checkpoints=[8, 16])
    path = write_recipe(tmp_path / "r.yaml", rec)
    r = _cli(["run", str(path)], _api_env(WINNOW_FAULT="train:seed0:step8"), start_new_session=True)
    assert r.returncode == -signal.SIGKILL
    (opt,) = run.glob("checkpoints/*/seed-0/step-8/optimizer.pt")
    marker = tmp_path / "pwned"
    with open(opt, "wb") as f:
        pickle.dump({"optimizer": _Payload(marker), "scheduler": {}, "rng": None}, f)
    r = _cli(["run", str(path)], _api_env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert not marker.exists()
    ref = tmp_path / "ref"
    rec["output"]["dir"] = str(ref)
    assert main(["run", str(write_recipe(tmp_path / "ref.yaml", rec))]) == 0
    assert pl.read_parquet(run / "scores" / "el2n.parquet").equals(
        pl.read_parquet(ref / "scores" / "el2n.parquet")
    )


# -- every input file accounted for ----------------------------------------------------------------
def _err(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_a_glob_part_that_matches_nothing_is_an_error(tmp_path, corpus, capsys):
    r = _small(corpus, tmp_path / "run", data__source=f"{corpus}/*.jsonl,{tmp_path}/nothing/*.jsonl")
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", r))]) == 2
    assert "no file matches" in (e := _err(capsys)) and "nothing/*.jsonl" in e
    assert not (tmp_path / "run").exists()


def test_dangling_links_and_link_loops_are_errors(tmp_path, corpus, capsys):
    d = tmp_path / "d"
    d.mkdir()
    shutil.copy(sorted(corpus.glob("*.jsonl"))[0], d / "a.jsonl")
    (d / "gone.jsonl").symlink_to(tmp_path / "deleted.jsonl")
    r = _small(corpus, tmp_path / "run", data__source=f"{d}/*.jsonl")
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", r))]) == 2
    assert "broken symbolic link" in _err(capsys)
    (d / "gone.jsonl").unlink()
    (d / "loop").symlink_to(d)
    r = _small(corpus, tmp_path / "run", data__source=f"{d}/**/*.jsonl")
    t = time.time()
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", r))]) == 2
    assert "symbolic-link loop" in _err(capsys) and time.time() - t < 30  # before anything trains
    assert not (tmp_path / "run").exists()


def test_a_file_reached_twice_is_read_once(tmp_path, corpus):
    d = tmp_path / "d"
    d.mkdir()
    src = sorted(corpus.glob("*.jsonl"))[0]
    shutil.copy(src, d / "a.jsonl")
    (d / "b.jsonl").symlink_to(d / "a.jsonl")
    n = sum(1 for _ in open(src))
    run = tmp_path / "run"
    r = _small(corpus, run, data__source=f"{d}/*.jsonl,{d}/a.jsonl", select={"method": "all"})
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", r))]) == 0
    man = json.loads((run / "manifest.json").read_text())
    assert man["counts"]["input_rows"] == n and len(man["input"]["shards"]) == 1


def test_a_file_rewritten_after_scoring_stops_the_run(tmp_path, corpus):
    d = tmp_path / "d"
    d.mkdir()
    shutil.copy(sorted(corpus.glob("*.jsonl"))[0], d / "a.jsonl")
    run, release = tmp_path / "run", tmp_path / "go"
    path = write_recipe(tmp_path / "r.yaml", _small(corpus, run, data__source=f"{d}/*.jsonl"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "winnow", "run", str(path)],
        cwd=ROOT,
        text=True,
        env=_api_env(WINNOW_FAULT_WAIT="emit", WINNOW_FAULT_RELEASE=str(release)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 240
    while not (run / "selection.parquet").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    rows = [json.loads(line) for line in open(d / "a.jsonl")]
    rows[0]["text"] = "rewritten " + rows[0]["text"]
    (d / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    release.touch()
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 2, out + err
    assert "changed since this run scored it" in err
    assert not (run / "manifest.json").exists()


# -- OS errors are one line ------------------------------------------------------------------------
def test_output_dir_that_is_a_file_or_under_a_file(tmp_path, corpus, capsys):
    (tmp_path / "f").write_text("x")
    for where in (tmp_path / "f", tmp_path / "f" / "run"):
        r = _small(corpus, where)
        assert main(["run", str(write_recipe(tmp_path / "r.yaml", r))]) == 2
        e = _err(capsys)
        assert str(tmp_path / "f") in e and ("not a folder" in e or "Not a directory" in e), e


def test_a_read_only_output_folder(tmp_path, corpus, capsys):
    probe = Path("/proc/winnow-readonly-probe")
    r = _small(corpus, probe / "run")
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", r))]) == 2
    e = _err(capsys)
    assert str(probe) in e


def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(tmp_path, corpus, capsys, monkeypatch):
    import errno

    import pyarrow.parquet as pq

    run = tmp_path / "run"
    write = pq.write_table

    def full(table, where, *a, **k):
        if "selection.parquet" in str(where):
            raise OSError(errno.ENOSPC, "No space left on device", str(where))
        return write(table, where, *a, **k)

    monkeypatch.setattr(pq, "write_table", full)
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", _small(corpus, run)))]) == 2
    (e,) = [ln for ln in capsys.readouterr().err.splitlines() if "winnow: error:" in ln]
    assert e.endswith(f"{run / 'selection.parquet'}: No space left on device"), e
    assert not (run / "selection.parquet").exists() and not list(run.rglob("*.tmp-*"))


# -- no process left behind ------------------------------------------------------------------------
def _servers_of(home: Path) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            env = (p / "environ").read_bytes()
            cmd = (p / "cmdline").read_bytes()
        except OSError:
            continue
        if f"PREFECT_HOME={home}".encode() in env and b"uvicorn" in cmd:
            pids.append(int(p.name))
    return pids


def test_the_temporary_prefect_server_dies_with_a_killed_run(tmp_path, corpus):
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), WINNOW_FAULT="emit")
    rec = _small(corpus, tmp_path / "run")
    r = _cli(["run", str(write_recipe(tmp_path / "r.yaml", rec))], env, start_new_session=True)
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    deadline = time.time() + 10
    while _servers_of(home) and time.time() < deadline:
        time.sleep(0.1)
    assert not _servers_of(home)


# -- text from the data is shown as text -----------------------------------------------------------
def test_hostile_domain_names_are_shown_as_text(tmp_path, corpus, capsys):
    rows = _rows(corpus)[:60]
    names = [
        "<script>alert(1)</script>",
        "<img src=x onerror=alert(2)>",
        "file\u202egnp.exe",
        "\x1b[31mred\x1b[0m",
    ]
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.jsonl").write_text(
        "".join(json.dumps(dict(r, domain=names[i % 4])) + "\n" for i, r in enumerate(rows))
    )
    run = tmp_path / "run"
    assert (
        main(
            ["run", str(write_recipe(tmp_path / "r.yaml", _small(corpus, run, data__source=f"{d}/*.jsonl")))]
        )
        == 0
    )
    md = (run / "summary.md").read_text()
    assert "<script>" not in md and "<img" not in md and "&lt;script&gt;" in md
    html = (run / "report.html").read_text()
    assert "\u202e" not in html and "\\u202e" in html and "<script>alert" not in html
    capsys.readouterr()
    assert main(["inspect", str(run)]) == 0
    out = capsys.readouterr().out
    assert "\x1b[31m" not in out and "\u202e" not in out and "\\u001b" in out


# -- smaller edges -----------------------------------------------------------------------------------
def test_output_dir_with_a_tilde_is_the_home_folder(tmp_path, corpus, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    r = _small(corpus, Path("~/runs/x"))
    r["output"]["dir"] = "~/runs/x"
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", r))]) == 0
    assert (tmp_path / "home" / "runs" / "x" / "manifest.json").exists() and not (tmp_path / "~").exists()


def test_a_huge_row_is_cut_before_it_is_tokenized(tmp_path, corpus):
    from winnow.pipeline.collate import CHARS_PER_TOKEN
    from winnow.pipeline.recipe import recipe_from_dict
    from winnow.pipeline.steps import featurizer

    run = tmp_path / "run"
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", _small(corpus, run)))]) == 0
    recipe = recipe_from_dict(_small(corpus, run))
    feat, _, _ = featurizer(recipe, str(next(run.glob("tokenizer-*"))))
    seen: list[int] = []
    encode = feat.encode  # what the tokenizer is given (its Rust encoder, or its __call__)

    def spy(texts):
        seen.extend(len(t) for t in texts)
        return encode(texts)

    feat.encode = spy  # type: ignore[method-assign]
    big = " ".join(_rows(corpus)[0]["text"] for _ in range(3000))[: 5 * 2**20]
    t = time.time()
    (ex,) = feat.featurize({"id": ["big"], "text": [big], "domain": ["code"]}, "mem")
    assert time.time() - t < 5
    assert max(seen) <= recipe.model.max_length * CHARS_PER_TOKEN < len(big)
    assert ex.n_tokens == recipe.model.max_length


def test_a_count_larger_than_the_data_warns(tmp_path, corpus, capsys):
    r = _small(corpus, tmp_path / "run", select={"method": "score", "score": "el2n", "count": 10_000})
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", r))]) == 0
    assert "warning: select.count 10000 is more than the data's" in capsys.readouterr().out


def test_an_empty_text_column_says_so(tmp_path, corpus, capsys):
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.jsonl").write_text(
        "".join(json.dumps({"id": f"r{i}", "text": "", "domain": "x"}) + "\n" for i in range(40))
    )
    r = _small(corpus, tmp_path / "run", data__source=f"{d}/*.jsonl")
    code = main(["run", str(write_recipe(tmp_path / "r.yaml", r))])
    err = capsys.readouterr().err
    assert code == 2 and "empty" in err and "lower train.lr" not in err, err


def test_a_nan_image_says_so(tmp_path):
    import numpy as np

    from winnow.errors import WinnowError
    from winnow.pipeline.collate import _image_array

    with pytest.raises(WinnowError, match="NaN or infinite pixel values"):
        _image_array(np.array([[0.0, np.nan], [1.0, 2.0]]), None, "d.parquet row 3", "image")
