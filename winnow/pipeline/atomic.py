"""Atomic outputs: every file and folder appears complete or not at all.

Files are written under a temporary name in the destination folder and renamed with
`os.replace`, which is atomic on POSIX within one file system. Folders are built under a
temporary name and renamed whole. A crash leaves only `*.tmp-*` names, which readers ignore
and the next run removes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"


def tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it onto `path`.

    Works for files and folders. On error the temporary is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            old = tmp_name(path)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        if isinstance(e, OSError) and e.filename is not None and TMP_MARK in str(e.filename):
            # name the file the user knows, not its temporary name
            raise type(e)(e.errno, e.strerror, str(path)) from None
        raise


_NPY_HEADER = 128  # bytes of magic, length and header dict: room for any 2-D shape numpy can hold


@contextlib.contextmanager
def npy_rows(path: str | os.PathLike, dtype: Any, width: int) -> Iterator[Any]:
    """Write a C-ordered 2-D ``.npy`` of ``width`` columns whose row count is not known in advance,
    atomically: yields ``append(block)`` (a (rows, width) block, cast to ``dtype``); at the end of the block
    the header gets the row count and the file is renamed onto ``path`` (on error nothing is left). Only a
    block is ever held: the array is written as it comes (numpy reads the result with ``np.load``)."""
    import numpy as np

    dt = np.dtype(dtype)
    rows = 0

    def header(n: int) -> bytes:
        d = repr({"descr": np.lib.format.dtype_to_descr(dt), "fortran_order": False, "shape": (n, width)})
        body = d.encode("latin1").ljust(_NPY_HEADER - 10 - 1) + b"\n"
        return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header(0))

        def append(block: Any) -> None:
            nonlocal rows
            a = np.ascontiguousarray(block, dtype=dt)
            if a.ndim != 2 or a.shape[1] != width:
                raise ValueError(f"{path}: a block of shape {a.shape}, expected (rows, {width})")
            f.write(a.tobytes())
            rows += a.shape[0]

        yield append
        f.seek(0)
        f.write(header(rows))


def read_npy_rows(path: str | os.PathLike, rows: Any, block: int = 65536) -> Iterator[Any]:
    """The given rows (ascending int indices) of a 2-D ``.npy``, at most ``block`` at a time, each block an
    in-memory array read by file offset as one span of at most 4 x ``block`` rows (nothing is
    memory-mapped: only a block is held, however large the file)."""
    import numpy as np

    rows = np.asarray(rows, dtype=np.int64)
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dt = read(f)
        if fortran or len(shape) != 2:
            raise ValueError(f"{path}: expected a C-ordered 2-D array, found shape {shape}")
        head, width = f.tell(), shape[1]
        i = 0
        while i < len(rows):
            # at most `block` rows, read as one span of at most 4 x `block` rows of the file
            r0 = int(rows[i])
            j = i + max(1, int(np.searchsorted(rows[i : i + block], r0 + 4 * block)))
            want = rows[i:j]
            r1 = int(want[-1]) + 1
            f.seek(head + r0 * width * dt.itemsize)
            span = np.fromfile(f, dt, count=(r1 - r0) * width).reshape(r1 - r0, width)
            yield span[want - r0]
            i = j


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def json_safe(obj: Any) -> Any:
    """Non-finite floats become None: strict JSON has no Infinity or NaN (many readers reject them)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(json_safe(obj), indent=2, sort_keys=False, default=str) + "\n")


def clean_temporaries(folder: str | os.PathLike) -> int:
    """Remove leftovers of crashed writes under `folder`; returns how many were removed."""
    n = 0
    folder = Path(folder)
    if not folder.exists():
        return 0
    for p in sorted(folder.rglob(f"*{TMP_MARK}*"), key=lambda q: len(q.parts), reverse=True):
        if TMP_MARK not in p.name:
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        n += 1
    return n


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint(*parts: Any) -> str:
    """A stable hex digest of JSON-able parts (dict keys sorted)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def save_npy(path: str | os.PathLike, arr: Any) -> Path:
    """Write a numpy array as .npy atomically."""
    import numpy as np

    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr)
    return path
