"""The influence merge's memory and time against the number of training rows: ``merge_influence`` on feature
parts as the features step writes them (float16, (checkpoints, rows, k) per 25,000-row part, with their
metadata), run in a fresh process per size, peak RSS read from that process (``ru_maxrss``).

The features are random unit vectors: this measures memory and time, which do not depend on their values
(the merge's results against a plain reference are tests/test_influence_merge.py's, its quality on real
text tests/test_influence_pipeline.py's). ``--winnow-src DIR`` runs another tree's package (the baseline:
the merge before it streamed, which held every part and float32 copies at once).

    .venv/bin/python benchmarks/bench_influence_merge.py --rows 100000 300000 --k 2048 --out DIR
    .venv/bin/python benchmarks/bench_influence_merge.py --smoke --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import winnow.pipeline.influence as inf
from winnow.pipeline.influence import merge_influence
from winnow.pipeline.recipe import Recipe
from winnow.pipeline.steps import FeaturePart, WeightedCheckpoint
spec = json.loads(sys.argv[1])
recipe = Recipe.model_validate(spec["recipe"])
parts = [FeaturePart(**p) for p in spec["parts"]]
tparts = [FeaturePart(**p) for p in spec["target_parts"]]
ick = [WeightedCheckpoint(0, 10 * (i + 1), f"ck{i}", f"fp{i}", 1.0 / (i + 1)) for i in range(spec["C"])]
t = time.perf_counter()
merge_influence(recipe, Path(spec["run"]), parts, tparts, ick, "bench")
print(json.dumps({"seconds": time.perf_counter() - t, "streamed": hasattr(inf, "MERGE_BLOCK_BYTES"),
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def _write_parts(run: Path, role: str, n: int, C: int, k: int, per: int, seed: int) -> list[dict]:
    import polars as pl

    from winnow.pipeline.atomic import save_npy
    from winnow.pipeline.layout import RunLayout
    from winnow.pipeline.store import write_parquet

    rng = np.random.default_rng(seed)
    layout = RunLayout(run)
    out = []
    for s, lo in enumerate(range(0, n, per)):
        m = min(per, n - lo)
        x = rng.standard_normal((C, m, k), dtype=np.float32)
        x /= np.linalg.norm(x, axis=2, keepdims=True)
        vec, meta = layout.influence_part(role, s, "b" * 12)
        save_npy(vec, x.astype(np.float16))
        del x
        cols = {
            "id": [f"{role}{lo + i}" for i in range(m)],
            "domain": [["a", "b", "c", "d"][(lo + i) % 4] for i in range(m)],
            "preview": [f"row {lo + i} " + "x" * 200 for i in range(m)],
        }
        for c in range(C):
            cols[f"norm@{c}"] = rng.uniform(0.5, 2, m).tolist()
            cols[f"sqnorm@{c}"] = rng.uniform(0.5, 4, m).tolist()
        write_parquet(pl.DataFrame(cols), meta, {"fingerprint": "bench"})
        out.append(
            {"shard": s, "role": role, "vectors": layout.rel(vec), "meta": layout.rel(meta), "rows": m}
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 300_000])
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--checkpoints", type=int, default=3)
    ap.add_argument("--targets", type=int, default=1000)
    ap.add_argument("--part-rows", type=int, default=25_000)
    ap.add_argument("--winnow-src", default=None, help="run this tree's winnow package (a baseline)")
    ap.add_argument("--out", default=os.environ.get("OUT") or None)
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    if a.smoke:
        a.rows, a.k, a.targets, a.part_rows = [600, 1200], 64, 20, 250
    sys.path.insert(0, str(ROOT))
    out = Path(a.out or tempfile.mkdtemp(prefix="bench-infl-merge-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    src = str(Path(a.winnow_src).resolve()) if a.winnow_src else str(ROOT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])))
    res = {"k": a.k, "checkpoints": a.checkpoints, "targets": a.targets, "winnow_src": src, "sizes": []}
    for n in a.rows:
        with tempfile.TemporaryDirectory(prefix="infl-merge-", dir=out) as work:
            run = Path(work) / "run"
            t = time.perf_counter()
            parts = _write_parts(run, "train", n, a.checkpoints, a.k, a.part_rows, 1)
            tparts = _write_parts(run, "target", a.targets, a.checkpoints, a.k, a.part_rows, 2)
            made = time.perf_counter() - t
            recipe = {
                "name": "bench",
                "data": {"source": "x/*.jsonl", "text_column": "text"},
                "model": {
                    "task": "causal_lm",
                    "config": {"model_type": "gpt2"},
                    "tokenizer": {"train": {"vocab_size": 500}},
                },
                "scoring": {
                    "influence": {"target": "t/*.jsonl", "proj_dim": a.k, "neighbours": 10, "device": "cpu"}
                },
                "select": {"method": "all"},
            }
            spec = {
                "recipe": recipe,
                "run": str(run),
                "parts": parts,
                "target_parts": tparts,
                "C": a.checkpoints,
            }
            # from the work folder: with -c the current folder comes first on sys.path, before PYTHONPATH
            p = subprocess.run(
                [sys.executable, "-c", CHILD, json.dumps(spec)],
                env=env,
                cwd=work,
                capture_output=True,
                text=True,
            )
            if p.returncode != 0:
                raise SystemExit(f"merge failed at {n} rows:\n{p.stderr[-3000:]}")
            got = json.loads(p.stdout.strip().splitlines()[-1])
            parts_gib = sum((run / q["vectors"]).stat().st_size for q in parts) / 2**30
            row = {"rows": n, "parts_gib": parts_gib, "made_s": made, **got}
            print(json.dumps(row), flush=True)
            res["sizes"].append(row)
    (out / "bench_influence_merge.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
