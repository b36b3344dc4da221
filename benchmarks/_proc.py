"""What the benchmarks that run ``winnow run`` in a subprocess share: the RSS of its process tree and, where
there is a GPU, its utilisation, sampled while it runs (bench_pipeline.py, bench_scale.py), and a Prefect
server on loopback for the runs (bench_pipeline.py --server, smoke.py)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np


def start_server(env: dict[str, str], work: Path) -> subprocess.Popen[bytes]:
    """A Prefect server on 127.0.0.1 (``env`` gets its PREFECT_API_URL; its log is ``work/server.log``), as a
    user who runs flows has one: a run then does not start and stop a temporary one. The caller stops it
    (``terminate``)."""
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    log = open(work / "server.log", "w")  # noqa: SIM115  (open while the server runs)
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/api"
    for _ in range(240):
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    env["PREFECT_API_URL"] = url
                    print(f"prefect server at {url}", flush=True)
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"the Prefect server did not start (see {work / 'server.log'})")


def tree_rss(pid: int, by_role: dict[str, float] | None = None) -> float:
    """RSS in bytes of process ``pid`` and all its descendants (from /proc; 0 where there is none). With
    ``by_role``, each role's sum is written there too: ``main`` (``pid`` itself), ``prefect server`` (a
    descendant running uvicorn or ``prefect server``), ``workers`` (any other descendant)."""
    kids: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            fields = dict(
                line.split(":", 1) for line in (d / "status").read_text().splitlines() if ":" in line
            )
        except OSError:
            continue
        p = int(d.name)
        kids.setdefault(int(fields.get("PPid", "0")), []).append(p)
        rss[p] = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
    total, todo = 0, [(pid, "main")]
    while todo:
        p, role = todo.pop()
        if p != pid and role == "workers" and by_role is not None:
            try:
                cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                cmd = b""
            if b"uvicorn" in cmd or b"prefect server" in cmd:
                role = "prefect server"
        total += rss.get(p, 0)
        if by_role is not None:
            by_role[role] = by_role.get(role, 0.0) + rss.get(p, 0)
        # a server's own children stay the server's
        todo += [(k, role if role == "prefect server" else "workers") for k in kids.get(p, [])]
    return float(total)


class Sampler:
    """GPU utilisation (NVML, where there is a GPU) and the RSS of a process tree, every ``dt`` seconds."""

    def __init__(self, pid: int, dt: float = 0.2):
        self.pid, self.dt, self.peak = pid, dt, 0.0
        self.role_peaks: dict[str, float] = {}  # each role's own peak RSS in bytes (see tree_rss)
        self.samples: list[tuple[float, float | None, float]] = []  # (time, gpu %, rss bytes)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # noqa: BLE001  (no GPU, no NVML: RSS only)
            handle = None
        while not self._stop.is_set():
            roles: dict[str, float] = {}
            rss = tree_rss(self.pid, roles)
            for role, b in roles.items():
                self.role_peaks[role] = max(self.role_peaks.get(role, 0.0), b)
            util = float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu) if handle is not None else None
            self.samples.append((time.time(), util, float(rss)))
            self.peak = max(self.peak, float(rss))
            time.sleep(self.dt)

    def __enter__(self) -> Sampler:
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()

    def stage_peaks(self, log: Path, stages: dict[str, float]) -> dict[str, float]:
        """Peak RSS (GiB) within each stage's window: the flow's start is the log's "Beginning flow run"
        line (local time of day), each stage ends at its recorded finish (summary.md)."""
        line = next((x for x in log.read_text().splitlines() if "Beginning flow run" in x), None)
        if line is None or not self.samples:
            return {}
        h, m, sec = line.split(" ")[0].split(":")
        day = time.localtime(self.samples[0][0])
        t0 = time.mktime((day.tm_year, day.tm_mon, day.tm_mday, int(h), int(m), 0, 0, 0, -1)) + float(sec)
        out, lo = {}, float("-inf")
        for stage, dur in stages.items():
            hi = (t0 if lo == float("-inf") else lo) + dur
            inside = [r for t, _, r in self.samples if lo <= t <= hi]
            out[stage] = round(max(inside, default=0.0) / 2**30, 3)
            lo = hi
        return out

    def window(self, lo: float, hi: float) -> dict[str, float | None]:
        s = [x for x in self.samples if lo <= x[0] <= hi]
        utils = [u for _, u, _ in s if u is not None]
        return {
            "gpu_util_mean": float(np.mean(utils)) if utils else None,
            "samples": len(s),
            "peak_rss_gib": max((r for _, _, r in s), default=0.0) / 2**30,
        }
