"""Incremental rescoring, versioned outputs and scheduled runs on a real Prefect server.

The data is real text (stdlib code and pydoc prose from the demo corpus); the model is a local folder
scored as loaded (train.steps 0), so new rows leave the model's fingerprint, and the cached scores of the
old rows, as they were."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from tests.conftest import corpus_rows as _rows
from tests.conftest import tiny_recipe, write_recipe
from tests.conftest import write_rows as _write_rows
from winnow.cli import main

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _recipe(tmp_path: Path, corpus: Path, model: Path, data: Path, run: Path) -> dict:
    r = tiny_recipe(corpus, run)
    r["data"]["source"] = str(data / "*.jsonl")
    r["model"] = {"task": "causal_lm", "path": str(model), "max_length": 48}
    r["train"] = {"steps": 0, "seeds": [0]}
    r["scoring"] = {"scorers": [{"name": "el2n"}, {"name": "loss"}], "batch_size": 16}
    return r


def test_incremental_rescoring_writes_versions(tmp_path, corpus, model_folder, capsys, monkeypatch):
    rows = _rows(corpus)
    first, extra = rows[:60], rows[60:75]
    data = tmp_path / "data"
    data.mkdir()
    _write_rows(data / "rows.jsonl", first)
    run = tmp_path / "run"
    rec = write_recipe(tmp_path / "r.yaml", _recipe(tmp_path, corpus, model_folder, data, run))

    import winnow.report

    rendered, real = [], winnow.report.write_report
    monkeypatch.setattr(
        winnow.report, "write_report", lambda *a, **k: rendered.append(k.get("out")) or real(*a, **k)
    )
    assert main(["run", str(rec)]) == 0
    v1 = json.loads((run / "v0001" / "version.json").read_text())
    assert (v1["version"], v1["rows"], v1["scored_rows"], v1["reused_rows"]) == (1, 60, 60, 0)
    assert v1["previous"] is None and v1["entered"] == v1["kept"]
    # the first version's report compares with nothing: it is the run's own report, not rendered twice
    assert rendered == [None]
    assert (run / "v0001" / "report.html").read_bytes() == (run / "report.html").read_bytes()
    before = pl.read_parquet(run / "scores" / "el2n.parquet")

    # the same data again: nothing scored, the outputs unchanged, no new version
    assert main(["run", str(rec)]) == 0
    assert not (run / "v0002").exists()

    # rows appended to the file: the shard changed, but only the new rows are scored
    _write_rows(data / "rows.jsonl", first + extra)
    assert main(["run", str(rec)]) == 0
    v2 = json.loads((run / "v0002" / "version.json").read_text())
    assert (v2["rows"], v2["scored_rows"], v2["reused_rows"], v2["new_rows"]) == (75, 15, 60, 15)
    assert v2["previous"] == "v0001" and v2["entered"] + v1["kept"] - v2["left"] == v2["kept"]
    after = pl.read_parquet(run / "scores" / "el2n.parquet")
    old = before.join(after, on="id", suffix="_new")
    assert old.height == 60 and (old["el2n"] == old["el2n_new"]).all()  # read back, not recomputed
    assert after.height == 75 and after["el2n"].is_nan().sum() == 0
    # both versions on disk, each with its manifest, selection, shards and report
    for v in ("v0001", "v0002"):
        man = json.loads((run / v / "manifest.json").read_text())
        assert all((run / v / "shards" / Path(s["path"]).name).exists() for s in man["shards"]), v
        assert (run / v / "selection.parquet").exists() and (run / v / "report.html").exists()
    assert json.loads((run / "v0001" / "manifest.json").read_text())["counts"]["input_rows"] == 60
    html = (run / "v0002" / "report.html").read_text()
    assert (
        "Changes since v0001" in html and "Changes since" not in (run / "v0001" / "report.html").read_text()
    )
    # the run's report is its version's (it compares with v0001 too), rendered once in each of the runs
    assert (run / "report.html").read_text() == html
    assert rendered == [None, None]

    # a changed scorer is a new cache fingerprint: every row is scored again
    r = _recipe(tmp_path, corpus, model_folder, data, run)
    r["scoring"]["scorers"] = [{"name": "el2n"}]
    assert main(["run", str(write_recipe(tmp_path / "r2.yaml", r))]) == 0
    v3 = json.loads((run / "v0003" / "version.json").read_text())
    assert (v3["scored_rows"], v3["new_rows"]) == (75, 0)

    capsys.readouterr()
    assert main(["runs", str(run)]) == 0
    out = capsys.readouterr().out
    assert "3 version(s)" in out and all(v in out for v in ("v0001", "v0002", "v0003"))
    assert main(["runs", str(tmp_path / "nothing-here")]) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path, api: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PREFECT_LOGGING_LEVEL="INFO",
    )
    if api:
        env["PREFECT_API_URL"] = api
    return env


def _wait(cond, timeout: float, what: str, procs: list[subprocess.Popen]) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"{what}: {p.args[:3]} exited with {p.returncode}")
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _stop(p: subprocess.Popen | None) -> None:
    if p is None or p.poll() is not None:
        return
    p.send_signal(signal.SIGINT)
    try:
        p.wait(20)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(10)


def test_serve_runs_on_schedule_against_a_real_prefect_server(tmp_path, corpus, model_folder):
    """A real `prefect server start` on loopback; `winnow serve --interval` registers the recipe and its
    runner executes the scheduled runs; rows appended between runs are the only ones the later run scores;
    both versions are on disk, and the server records the completed scheduled runs."""
    import httpx

    rows = _rows(corpus)
    data = tmp_path / "data"
    data.mkdir()
    _write_rows(data / "rows.jsonl", rows[:50])
    run = tmp_path / "run"
    rec = write_recipe(tmp_path / "r.yaml", _recipe(tmp_path, corpus, model_folder, data, run))
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    home = tmp_path / "prefect-home"
    prefect = str(Path(sys.executable).parent / "prefect")
    winnow = str(Path(sys.executable).parent / "winnow")
    server = serve = None
    logs = tmp_path / "logs"
    logs.mkdir()
    try:
        server = subprocess.Popen(
            [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=dict(_env(home, None), PREFECT_UI_ENABLED="false"),
            stdout=open(logs / "server.log", "w"),
            stderr=subprocess.STDOUT,
        )

        def healthy() -> bool:
            try:
                return httpx.get(api + "/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        t0 = time.time()
        _wait(healthy, 120, "the Prefect server", [server])
        print(f"server healthy after {time.time() - t0:.1f} s")
        serve = subprocess.Popen(
            [winnow, "serve", str(rec), "--interval", "5", "--name", "test"],
            env=dict(_env(home, api), PREFECT_RUNNER_POLL_FREQUENCY="2"),
            cwd=tmp_path,
            stdout=open(logs / "serve.log", "w"),
            stderr=subprocess.STDOUT,
        )
        _wait(
            lambda: (run / "v0001" / "version.json").exists(), 240, "the first scheduled run", [server, serve]
        )
        print(f"v0001 after {time.time() - t0:.1f} s")
        _write_rows(data / "rows.jsonl", rows[:50] + rows[50:62])
        _wait(
            lambda: (run / "v0002" / "version.json").exists(),
            240,
            "a scheduled run on the new rows",
            [server, serve],
        )
        print(f"v0002 after {time.time() - t0:.1f} s")
        v1 = json.loads((run / "v0001" / "version.json").read_text())
        v2 = json.loads((run / "v0002" / "version.json").read_text())
        assert (v1["rows"], v1["scored_rows"]) == (50, 50)
        assert (v2["rows"], v2["scored_rows"], v2["reused_rows"], v2["new_rows"]) == (62, 12, 50, 12)
        assert v1["flow_run_id"] and v2["flow_run_id"] and v1["flow_run_id"] != v2["flow_run_id"]

        def completed() -> list[dict]:
            r = httpx.post(
                api + "/flow_runs/filter",
                timeout=10,
                json={
                    "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}},
                    "flows": {"name": {"any_": ["winnow-rescore"]}},
                },
            )
            r.raise_for_status()
            return r.json()

        def scheduled() -> list[dict]:
            return [f for f in completed() if f.get("deployment_id")]

        # the run that wrote v0002 finishes (artifacts, final state) just after writing it
        _wait(
            lambda: len(scheduled()) >= 2, 120, "two completed scheduled runs on the server", [server, serve]
        )
        ids = {f["id"] for f in scheduled()}
        assert {v1["flow_run_id"], v2["flow_run_id"]} <= ids
    finally:
        _stop(serve)
        _stop(server)
        for f in sorted(logs.glob("*.log")):  # on failure, what the server and the runner said
            print(f"--- {f.name} (tail)\n" + "\n".join(f.read_text(errors="replace").splitlines()[-40:]))


def test_serve_without_a_server_says_what_to_start(tmp_path, corpus, capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    rec = write_recipe(tmp_path / "r.yaml", tiny_recipe(corpus, tmp_path / "run"))
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["serve", str(rec), "--interval", "60"]) == 2
    err = capsys.readouterr().err
    assert "PREFECT_API_URL is not set" in err and "make server" in err
    dead = f"http://127.0.0.1:{_free_port()}/api"
    with temporary_settings(updates={PREFECT_API_URL: dead}):
        assert main(["serve", str(rec), "--cron", "0 3 * * *"]) == 2
        assert f"no Prefect server answers at PREFECT_API_URL={dead}" in capsys.readouterr().err
        assert main(["serve", str(rec), "--cron", "not a cron"]) == 2
        assert "--cron: 'not a cron' is not a valid cron expression" in capsys.readouterr().err
        assert main(["serve", str(rec), "--interval", "60", "--cron", "0 3 * * *"]) == 2
        assert "exactly one of --cron" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
