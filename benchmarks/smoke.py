"""Run every benchmark and probe in ``benchmarks/`` in its ``--smoke`` mode (tiny shapes, CPU), so that
none of them rots between GPU sessions. CI runs this (``make bench-smoke``).

    .venv/bin/python benchmarks/smoke.py [NAME ...]

Each script runs in its own process with a time limit, ``SMOKE_JOBS`` of them at once (default 2: CI's
cores); the figures it prints mean nothing at these sizes, only that it ran to the end. Exit status 1 if
any failed, naming it. One Prefect server on loopback serves every script's runs (PREFECT_API_URL), as a
user's own server would: without it each ``winnow run`` process starts and stops a temporary one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks._proc import start_server  # noqa: E402

LIMIT_S = 300


def scripts() -> list[Path]:
    return sorted(
        p for p in HERE.glob("*.py") if p.name != Path(__file__).name and not p.name.startswith("_")
    )


def main(argv: list[str]) -> int:
    chosen = [p for p in scripts() if not argv or p.stem in argv]
    unknown = set(argv) - {p.stem for p in scripts()}
    if unknown:
        print(f"benchmarks/smoke.py: no benchmark named {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    failed = []
    with tempfile.TemporaryDirectory(prefix="winnow-bench-smoke-") as tmp:
        env = dict(
            os.environ,
            OUT="",
            PREFECT_HOME=str(Path(tmp) / "prefect"),
            HF_HOME=str(Path(tmp) / "hf"),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            HF_HUB_OFFLINE="1",
            CUDA_VISIBLE_DEVICES="",
        )
        env.pop("PREFECT_API_URL", None)
        server = start_server(env, Path(tmp))

        def one(p: Path) -> None:
            out = Path(tmp) / p.stem
            out.mkdir()
            t = time.time()
            try:
                r = subprocess.run(
                    [sys.executable, str(p), "--smoke", "--out", str(out)],
                    env=env,
                    cwd=HERE.parent,
                    capture_output=True,
                    text=True,
                    timeout=LIMIT_S,
                )
                ok, tail = r.returncode == 0, (r.stdout + r.stderr)[-3000:]
            except subprocess.TimeoutExpired:
                ok, tail = False, f"(no end within {LIMIT_S} s)"
            print(f"{'ok  ' if ok else 'FAIL'} {p.name:32s} {time.time() - t:6.1f} s", flush=True)
            if not ok:
                failed.append(p.name)
                print(tail, flush=True)

        try:
            with ThreadPoolExecutor(max_workers=max(1, int(os.environ.get("SMOKE_JOBS", "2")))) as pool:
                list(pool.map(one, chosen))
        finally:
            server.terminate()
            server.wait(timeout=60)
    print(f"{len(chosen) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
