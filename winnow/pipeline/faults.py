"""Deterministic crash points for resume tests: ``WINNOW_FAULT=<point>`` makes the process SIGKILL itself
when it reaches that point (no clean-up, no flush: as a machine that dies there). Points:
``train:seed<S>:step<K>`` (right after checkpoint K of seed S is on disk)."""

from __future__ import annotations

import os
import signal


def fault_point(name: str) -> None:
    if os.environ.get("WINNOW_FAULT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
