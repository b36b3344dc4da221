"""Input checks that need not stop the GPU.

A check such as "every target token id is inside the vocabulary" is a reduction on the device followed by
a Python ``bool``: the host waits until the GPU has run everything queued before it, so the next batch
cannot be prepared while this one computes. The kernels call :func:`require` instead. Outside
:func:`deferred` (a plain call, every test of a kernel) it raises at once, as before. Inside it, on a
device other than the CPU, the condition stays on the device and is evaluated when the block ends, once
for all the batches of the block; the first failed check raises its ``ValueError`` then. The scoring
pipeline scores a whole pass over a shard inside one block and copies its scores back at the end, which
waits for the GPU anyway: the checks cost one more small copy per pass instead of a stall per batch
(checks with the same message are folded into one flag, so a block holds a few tensors however long). Whatever a failing block computed is discarded by the caller, since the block raises.

Branches on data (is this batch padded?) cannot be deferred: :func:`is_deferred` lets a kernel take the
path that is right either way (pass the mask) instead of asking the device.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

_local = threading.local()


def is_deferred() -> bool:
    """True inside :func:`deferred` (in this thread)."""
    return getattr(_local, "pending", None) is not None


def require(ok: torch.Tensor, message: str | Callable[[], str]) -> None:
    """Raise ``ValueError(message)`` unless the 0-d bool tensor ``ok`` is true: now, or at the end of the
    enclosing :func:`deferred` block when ``ok`` lives on an accelerator. ``message`` may be a callable,
    called only when the check fails (its text may read tensors)."""
    pending = getattr(_local, "pending", None)
    if pending is None or ok.device.type == "cpu":
        if not bool(ok):
            raise ValueError(message() if callable(message) else message)
        return
    # checks with the same text are folded into one flag: a block over a million batches holds a few tensors
    key: Any = message if isinstance(message, str) else len(pending)
    have = pending.get(key)
    ok = ok.reshape(())
    pending[key] = (ok if have is None else have[0] & ok, message)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Defer :func:`require` checks on accelerator tensors to the end of the block (one host wait for all).
    Nested blocks share the outermost one's list."""
    if is_deferred():
        yield
        return
    held: dict[Any, tuple[torch.Tensor, str | Callable[[], str]]] = {}
    _local.pending = held
    try:
        yield
    finally:
        _local.pending = None
    if not held:
        return
    flags = torch.stack([ok for ok, _ in held.values()]).cpu()
    for (_, message), good in zip(held.values(), flags.tolist(), strict=True):
        if not good:
            raise ValueError(message() if callable(message) else message)
