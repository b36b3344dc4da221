"""Items made by a thread ahead of their consumer: the proxy's training batches, the scoring feed's
featurize jobs."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def ahead(
    items: Iterable[T], depth: int, name: str, on_drop: Callable[[T], Any] | None = None
) -> Iterator[T]:
    """``items`` made by one daemon thread, in order, up to ``depth`` ahead of the consumer. An error in the
    thread is raised where its item would have come; closing the iterator (or leaving it early) stops the
    thread, and ``on_drop`` gets every item made but never taken."""
    q: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    end = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(item):
                    if on_drop is not None:
                        on_drop(item)
                    return
            put(end)
        except BaseException as e:  # handed to the consumer, in order
            put(e)

    t = threading.Thread(target=work, name=name, daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        t.join()
        while not q.empty():
            left = q.get_nowait()
            if on_drop is not None and left is not end and not isinstance(left, BaseException):
                on_drop(left)
