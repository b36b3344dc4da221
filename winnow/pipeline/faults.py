"""Deterministic fault points for crash and race tests.

- ``WINNOW_FAULT=<point>``: the process SIGKILLs itself when it reaches the point (no clean-up, no flush:
  as a machine that dies there);
- ``WINNOW_FAULT_WAIT=<point>`` and ``WINNOW_FAULT_RELEASE=<file>``: the process waits at the point
  until the file exists (at most 10 minutes), e.g. to hold a run folder's lock while a second run tries.

Points: ``locked`` (the run folder's lock is held, nothing written yet), ``train:seed<S>:step<K>``
(right after checkpoint K of seed S is on disk), ``merge-scores`` (the merged store is in place, the
parts it holds are not removed yet), ``emit`` (scoring and selection are done, no shard is written yet).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def fault_point(name: str) -> None:
    if os.environ.get("WINNOW_FAULT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("WINNOW_FAULT_WAIT") == name:
        release = Path(os.environ.get("WINNOW_FAULT_RELEASE", "/nonexistent"))
        deadline = time.time() + 600
        while not release.exists() and time.time() < deadline:
            time.sleep(0.05)
