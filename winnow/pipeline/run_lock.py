"""One run at a time per run folder: an exclusive lock held for the whole run.

``RUN/.winnow/lock`` is locked with ``flock`` (exclusive, non-blocking) and holds its owner as JSON
(pid, host, user, command, start time). The operating system releases the lock when the owner dies,
however it dies (SIGKILL included), so a lock left by a dead run is taken over by the next run without
any clean-up; a second run while the first is alive is refused with one line naming the owner. On
network file systems ``flock`` is only as good as the file system's locking (NFSv4 and Lustre lock
across hosts; some older NFS set-ups lock per host only).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import getpass
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from winnow.errors import WinnowError
from winnow.pipeline.layout import RunLayout


def _owner() -> dict[str, Any]:
    try:
        user = getpass.getuser()
    except Exception:  # no user name in this environment
        user = str(os.getuid())
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "user": user,
        "command": " ".join(["winnow", *sys.argv[1:]]) if sys.argv else "winnow",
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


class RunLock:
    """``with RunLock(run_dir): ...``: hold the run folder's lock, or raise ``WinnowError`` naming the
    run that holds it."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = RunLayout(run_dir).lock
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                owner = json.loads(os.pread(fd, 65536, 0) or b"{}")
            except ValueError:
                owner = {}
            os.close(fd)
            who = (
                f"{owner.get('command', 'another winnow run')} (pid {owner.get('pid', '?')} on "
                f"{owner.get('host', '?')}, user {owner.get('user', '?')}, since {owner.get('started', '?')})"
            )
            raise WinnowError(
                f"output.dir: {self.run_dir} is in use by {who}; wait for it to end or choose another "
                f"output.dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_owner()) + "\n").encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
