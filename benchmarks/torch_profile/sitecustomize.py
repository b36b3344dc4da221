"""torch.profiler over one scoring shard of ``winnow run``, for benchmarks: put this folder first on
PYTHONPATH and set WINNOW_TORCH_PROFILE to a file prefix. The shard a process scores as its
WINNOW_TORCH_PROFILE_SHARD-th (default 1, the second: the first is cold, with the model's load and the
first shapes) runs under torch.profiler (CPU and, where there is one, CUDA activity). At its end
``<prefix>-<pid>.txt`` gets the shard's seconds, the ops by self device time and by self host time, and
the CUDA runtime calls (kernel launches, synchronisations, allocations, copies) with their counts and host
time: slow launches mean the host thread cannot keep up (or the launch queue is full), synchronisations
mean it waits for the device."""

import importlib.abc
import importlib.machinery
import os
import sys
import threading
import time

_PREFIX = os.environ.get("WINNOW_TORCH_PROFILE")
_TARGET = "winnow.pipeline.scoring"


def _write(prof, seconds: float) -> None:
    ka = prof.key_averages()
    lines = [f"profiled shard: {seconds:.2f} s (wall, under the profiler)", ""]
    for key in ("self_device_time_total", "self_cuda_time_total", "self_cpu_time_total"):
        try:
            lines.append(f"== ops by {key}")
            lines.append(ka.table(sort_by=key, row_limit=35, max_name_column_width=60))
        except Exception as e:  # a sort key this torch does not have
            lines.append(f"(not available: {e})")
    runtime = sorted((e for e in ka if e.key.startswith("cuda")), key=lambda e: -e.cpu_time_total)
    lines.append("== CUDA runtime calls: name, count, host ms total, host us each")
    for e in runtime:
        lines.append(
            f"{e.key:45s} {e.count:9d} {e.cpu_time_total / 1e3:10.1f} {e.cpu_time_total / max(1, e.count):9.1f}"
        )
    with open(f"{_PREFIX}-{os.getpid()}.txt", "w") as fh:
        fh.write("\n".join(lines) + "\n")


def _install(mod) -> None:
    original = mod.score_shard
    which = int(os.environ.get("WINNOW_TORCH_PROFILE_SHARD", "1"))
    seen = [0]
    lock = threading.Lock()

    def score_shard(*args, **kwargs):
        with lock:
            n = seen[0]
            seen[0] += 1
        if n != which:
            return original(*args, **kwargs)
        import torch
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        t = time.perf_counter()
        with profile(activities=acts) as prof:
            out = original(*args, **kwargs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        _write(prof, time.perf_counter() - t)
        return out

    mod.score_shard = score_shard


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _install(module)

        spec.loader.exec_module = exec_module
        return spec


if _PREFIX:
    sys.meta_path.insert(0, _Finder())
