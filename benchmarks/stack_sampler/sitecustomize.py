"""A sampling profile of every Python thread of a process, for benchmarks (py-spy does not install on the
GPU machine from its wheel): put this folder first on PYTHONPATH and set WINNOW_STACK_SAMPLES to a file.
Every 5 ms a daemon thread reads sys._current_frames() and counts, per thread name, the innermost
winnow/torch/transformers frame (file:line function) and the whole stack (outermost first, collapsed);
at exit the counts are written to the file as JSON (top 60 of each per thread). Frames waiting in C code
(a blocking copy, the tokenizer) show as the Python line that called it."""

import atexit
import collections
import json
import os
import sys
import threading
import time

_PATH = os.environ.get("WINNOW_STACK_SAMPLES")
if _PATH:
    _PATH = f"{_PATH}-{os.getpid()}.json"  # one file per process (the run, its server, the script)


def _start() -> None:
    tops: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    stacks: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    total: collections.Counter = collections.Counter()

    def where(f) -> str:
        c = f.f_code
        return f"{os.path.basename(c.co_filename)}:{f.f_lineno} {c.co_name}"

    def loop() -> None:
        me = threading.get_ident()
        while True:
            time.sleep(0.005)
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                name = names.get(ident, str(ident))
                total[name] += 1
                chain = []
                f = frame
                while f is not None:
                    chain.append(f)
                    f = f.f_back
                tops[name][where(chain[0])] += 1
                keep = [
                    where(x) for x in reversed(chain) if "site-packages/prefect" not in x.f_code.co_filename
                ]
                stacks[name][" ; ".join(keep[-12:])] += 1

    def dump() -> None:
        out = {
            n: {"samples": total[n], "top": tops[n].most_common(60), "stacks": stacks[n].most_common(30)}
            for n in total
            if total[n] >= 20
        }
        with open(_PATH, "w") as fh:
            json.dump(out, fh, indent=1)

    threading.Thread(target=loop, name="stack-sampler", daemon=True).start()
    atexit.register(dump)


if _PATH:
    _start()
