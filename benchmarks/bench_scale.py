"""Out of core on one CPU machine: ``winnow run`` (the real CLI, a fresh run folder) on 10^5, 10^6 (and
10^7) rows of real text, per stage wall time, peak RSS and the run folder's size (issue 17).

The corpus is this machine's real text, cut into pieces of about 440 characters by the demo corpus's
readers (``winnow.pipeline.demo``): English manual pages (/usr/share/man), Debian changelogs and
licences (/usr/share/doc) and the standard library's sources and tests. Those few tens of thousands of
distinct pieces (exact repeats dropped) are replicated to ``--rows`` rows: the k-th pass over them (k >= 1) puts ``[r<k>] ``
in front of each piece, so every row is distinct to the model too (its own id, its own tokens within
``max_length``, its own score) while its length and vocabulary stay those of real text. (Until
2026-12-01 the tag was a suffix, which truncation to 64 tokens cut off: replicas then shared their
cache key, and a score cache shared across shards scored only ~8% of 10^6 rows.) The rows are written as jsonl files of ``--rows-per-file`` rows each (default
25 000: one input shard per file, as a data set of many files is read; 10^5 rows are 4 files, so both
workers score at every size), domain = where the piece came from.

The recipe is the one issue 17 measured: a 1-layer GPT-2 (n_embd 64, 2 heads) from its config, a BPE
of 2048 tokens trained on the data's first 50 000 rows, ``train.steps: 0`` (the proxy scores as
initialised), EL2N, max_length 64, score selection of half by EL2N with softmax weights, shards of
100 000 rows, two workers. Each size runs ``winnow run`` in a subprocess while this process samples the
RSS of its whole process tree (the CLI, its Prefect server and any child) from /proc every 0.2 s.

Reported per size: the run's own step timings (``summary.md``'s "finished at" column: a stage's time is
its last step's finish minus the previous stage's), the wall time of the command, peak RSS (overall and
within each stage's window; the first window also holds the start: imports, the Prefect server), and the run
folder's size against the input's, the merged scores' (``scores/*.parquet``) and the shards'. Then the
targets: peak RSS at the largest size <= 1.3x that at the smallest; every stage's time per row within
20% of the smallest size's (stages under 2 s at the smallest size are left out of that: their fixed
cost dominates); run folder <= 1.2x (input + scores + shards). With ``--incremental``, after each size's
run: 1% new rows in one more input file and the same run again on the same folder (a periodic
rescoring), its wall time against the full run's (target: at most 5%) and how many rows it scored.

    .venv/bin/python benchmarks/bench_scale.py --rows 100000 1000000 --out .bench/scale
    .venv/bin/python benchmarks/bench_scale.py --rows 10000000 --out .bench/scale      # ~1 h on 2 cores
    .venv/bin/python benchmarks/bench_scale.py --smoke --out DIR                        # 3000 rows, < 40 s
    # the baseline: the same script against another checkout (its package on PYTHONPATH first)
    .venv/bin/python benchmarks/bench_scale.py --winnow-src ../base --rows 100000 --out .bench/base

Writes ``scale.json`` (every figure) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._proc import Sampler  # noqa: E402


def base_texts(n_man: int) -> list[tuple[str, str]]:
    """(domain, text) pieces of this machine's real text: manual pages, changelogs, licences, sources."""
    from winnow.pipeline import demo

    out: list[tuple[str, str]] = []
    for dom, rows in (
        ("man", demo.man_rows("en", n_man)),
        ("changelog", demo.changelog_rows(n_man)),
        ("license", demo.license_rows(n_man)),
        ("code", demo.code_rows(n_man)),
        ("tests", demo.test_code_rows(n_man)),
    ):
        out += [(dom, t) for t, _ in rows]
    seen: set[str] = set()
    out = [(d, t) for d, t in out if not (t in seen or seen.add(t))]  # distinct pieces: distinct rows
    if len(out) < 100:
        raise SystemExit(
            "bench_scale: fewer than 100 pieces of text on this machine (/usr/share/man, /usr/share/doc)"
        )
    return out


def write_corpus(texts: list[tuple[str, str]], rows: int, per_file: int, out: Path) -> int:
    """``rows`` rows replicated from ``texts`` as jsonl files of ``per_file`` rows; returns their bytes."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    n, f, size = 0, None, 0
    try:
        while n < rows:
            if n % per_file == 0:
                if f is not None:
                    f.close()
                f = open(out / f"part-{n // per_file:05d}.jsonl", "w", encoding="utf-8")
            k, i = divmod(n, len(texts))
            dom, text = texts[i]
            f.write(json.dumps({"text": text if k == 0 else f"[r{k}] {text}", "domain": dom}) + "\n")
            n += 1
    finally:
        if f is not None:
            f.close()
    for p in out.glob("*.jsonl"):
        size += p.stat().st_size
    return size


def recipe(data: Path, run: Path, shard_rows: int) -> dict[str, Any]:
    return {
        "name": "scale",
        "data": {"source": f"{data}/*.jsonl", "text_column": "text", "domain_column": "domain"},
        "model": {
            "task": "causal_lm",
            "config": {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 64, "n_positions": 64},
            # refit never: a rerun on grown data keeps the tokenizer (the incremental measurement)
            "tokenizer": {"train": {"vocab_size": 2048, "refit": "never"}},
            "max_length": 64,
        },
        "train": {"steps": 0, "seeds": [0]},
        "scoring": {"scorers": [{"name": "el2n"}], "batch_size": 64},
        "select": {"score": "el2n", "fraction": 0.5, "keep": "highest", "weights": {"method": "softmax"}},
        "output": {"dir": str(run), "shard_max_rows": shard_rows},
        "runner": {"kind": "thread", "max_workers": 2},
    }


def du(path: Path) -> int:
    """Bytes of the files under ``path`` (each inode once: a version's hard links are not counted twice)."""
    seen, total = set(), 0
    for p in [path, *path.rglob("*")] if path.exists() else []:
        try:
            st = p.lstat()
        except OSError:
            continue
        if p.is_file() and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def step_times(summary: Path) -> dict[str, float]:
    """Per stage seconds from summary.md's table (step | state | finished at): a stage's time is its last
    step's finish minus the previous stage's last finish; parallel steps of one kind (score ...) are one
    stage."""
    finished: dict[str, float] = {}
    lines = summary.read_text().splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| step | state |"))
    for line in lines[head + 2 :]:
        m = re.match(r"^\| (.+?) \| (.+?) \| ([0-9.]+) \|$", line)
        if not m:
            continue
        stage = m.group(1).split(" ")[0] if m.group(1).startswith(("score ", "train ")) else m.group(1)
        finished[stage] = max(finished.get(stage, 0.0), float(m.group(3)))
    out, prev = {}, 0.0
    for stage, t in sorted(finished.items(), key=lambda kv: kv[1]):
        out[stage] = round(t - prev, 2)
        prev = t
    return out


def _run(boot: str, rec: Path, env: dict[str, str], out: Path, log_name: str) -> tuple[float, Any]:
    """``winnow run rec`` in a subprocess, its tree's RSS sampled; (wall seconds, the sampler)."""
    cmd = [sys.executable, "-c", boot, "run", str(rec)]
    t0 = time.time()
    with open(out / log_name, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=out)
        with Sampler(proc.pid) as s:
            rc = proc.wait()
    wall = time.time() - t0
    if rc != 0:
        tail = (out / log_name).read_text()[-3000:]
        raise SystemExit(f"bench_scale: winnow run ({log_name}) exited {rc}:\n{tail}")
    return wall, s


def incremental(
    rows: int,
    a: argparse.Namespace,
    texts: list[tuple[str, str]],
    data: Path,
    rec: Path,
    boot: str,
    env: dict[str, str],
    out: Path,
    full: dict[str, Any],
) -> dict[str, Any]:
    """1% new rows (one more input file, each row tagged ``[new<k>]``, so distinct from every old one), then
    the same ``winnow run`` again on the same run folder: what a periodic rescoring costs against the
    full run (issue 17's target: at most 5%)."""
    new = max(1, rows // 100)
    with open(data / "part-zz-new.jsonl", "w", encoding="utf-8") as f:
        for n in range(new):
            k, i = divmod(n, len(texts))
            dom, text = texts[i]
            f.write(json.dumps({"text": f"[new{k}] {text}", "domain": dom}) + "\n")
    wall, peak = _run(boot, rec, env, out, f"log-{rows}-incremental.txt")
    log = (out / f"log-{rows}-incremental.txt").read_text()
    m = re.search(r"scored (\d+) row\(s\), (\d+) read back from the score cache", log)
    run = Path(yaml_safe_load(rec)["output"]["dir"])
    return {
        "new_rows": new,
        "wall_s": round(wall, 1),
        "over_full": round(wall / full["wall_s"], 4),
        "peak_rss_gib": round(peak.peak / 2**30, 3),
        "stages_s": step_times(run / "summary.md"),
        "scored": int(m.group(1)) if m else None,
        "from_cache": int(m.group(2)) if m else None,
    }


def yaml_safe_load(path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text())


def run_size(rows: int, a: argparse.Namespace, texts: list[tuple[str, str]], out: Path) -> dict[str, Any]:
    import yaml

    data, run = out / f"data-{rows}", out / f"run-{rows}"
    input_bytes = write_corpus(texts, rows, a.rows_per_file, data)
    if run.exists():
        shutil.rmtree(run)
    rec = out / f"recipe-{rows}.yaml"
    rec.write_text(yaml.safe_dump(recipe(data, run, a.shard_rows), sort_keys=False))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.setdefault("PREFECT_HOME", str(out / "prefect"))
    boot = "import sys\n"
    if a.winnow_src:  # that checkout's package, ahead of this venv's editable install (a meta-path finder)
        boot += (
            "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]\n"
            f"sys.path.insert(0, {str(Path(a.winnow_src).resolve())!r})\n"
        )
    boot += "import winnow\nprint('winnow from', winnow.__file__, flush=True)\n"
    boot += "from winnow.cli import main\nsys.exit(main())\n"
    wall, peak = _run(boot, rec, env, out, f"log-{rows}.txt")
    scores = sum(p.stat().st_size for p in (run / "scores").glob("*.parquet"))
    shards = du(run / "shards")
    res = {
        "rows": rows,
        "files": -(-rows // a.rows_per_file),
        "wall_s": round(wall, 1),
        "rows_per_s": round(rows / wall, 1),
        "peak_rss_gib": round(peak.peak / 2**30, 3),
        # each process role's own peak (the CLI's process, the temporary Prefect server, any other child)
        "role_peak_rss_gib": {k: round(v / 2**30, 3) for k, v in sorted(peak.role_peaks.items())},
        "stages_s": step_times(run / "summary.md"),
        "stage_peak_rss_gib": {},
        "input_bytes": input_bytes,
        "scores_bytes": scores,
        "shards_bytes": shards,
        "run_dir_bytes": du(run),
        "run_dir_parts": {p.name: du(p) for p in sorted(run.iterdir())},
    }
    res["stage_peak_rss_gib"] = peak.stage_peaks(out / f"log-{rows}.txt", res["stages_s"])
    if a.incremental:
        res["incremental"] = incremental(rows, a, texts, data, rec, boot, env, out, res)
    res["run_dir_over_input_scores_shards"] = round(res["run_dir_bytes"] / (input_bytes + scores + shards), 3)
    res["run_dir_over_scores_shards"] = round(res["run_dir_bytes"] / (scores + shards), 3)
    if not a.keep:
        shutil.rmtree(data)
        shutil.rmtree(run)
    return res


def targets(results: list[dict[str, Any]]) -> dict[str, Any]:
    lo, hi = results[0], results[-1]
    scale = hi["rows"] / lo["rows"]
    per_stage = {}
    for stage, t in lo["stages_s"].items():
        if t < 2.0 or stage not in hi["stages_s"]:
            continue
        per_stage[stage] = round(hi["stages_s"][stage] / (t * scale), 3)  # 1.0 = exactly linear
    return {
        "rss_ratio": round(hi["peak_rss_gib"] / lo["peak_rss_gib"], 3),
        "rss_ok": hi["peak_rss_gib"] <= 1.3 * lo["peak_rss_gib"],
        "stage_time_over_linear": per_stage,
        "stages_ok": all(r <= 1.2 for r in per_stage.values()),
        "run_dir_ok": all(r["run_dir_over_input_scores_shards"] <= 1.2 for r in results),
        **(
            {
                "incremental_over_full": {r["rows"]: r["incremental"]["over_full"] for r in results},
                "incremental_ok": all(r["incremental"]["over_full"] <= 0.05 for r in results),
            }
            if all("incremental" in r for r in results)
            else {}
        ),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--rows-per-file", type=int, default=25_000)
    p.add_argument("--shard-rows", type=int, default=100_000, help="output.shard_max_rows")
    p.add_argument("--man-pieces", type=int, default=20_000, help="manual-page pieces in the base corpus")
    p.add_argument("--winnow-src", help="a checkout whose winnow package runs instead (the baseline)")
    p.add_argument("--keep", action="store_true", help="keep the corpora and run folders")
    p.add_argument(
        "--incremental", action="store_true", help="after each size: 1%% new rows and the same run again"
    )
    p.add_argument("--smoke", action="store_true", help="3000 rows in files of 1000: checks the script")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    if a.smoke:
        a.rows, a.rows_per_file, a.shard_rows, a.man_pieces = [3000], 1000, 1000, 500
        a.incremental = True
    a.out = a.out.absolute()  # the runs start in it: a relative path would name the wrong place there
    a.out.mkdir(parents=True, exist_ok=True)
    t = time.time()
    texts = base_texts(a.man_pieces)
    print(f"base corpus: {len(texts)} pieces of real text in {time.time() - t:.1f} s", flush=True)
    results = []
    for rows in sorted(a.rows):
        r = run_size(rows, a, texts, a.out)
        results.append(r)
        print(json.dumps(r), flush=True)
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} cores",
        "winnow_src": str(Path(a.winnow_src).resolve()) if a.winnow_src else str(ROOT),
        "base_pieces": len(texts),
        "results": results,
    }
    if len(results) > 1:
        out["targets"] = targets(results)
        print(json.dumps(out["targets"]), flush=True)
    (a.out / "scale.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
