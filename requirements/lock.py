"""Write the dependency locks with uv (run by `make lock`; see README, "Dependencies and the lock").

    python requirements/lock.py [--upgrade] [--check]
    python requirements/lock.py --diff LOCK FREEZE     (what `make test-latest` installed beyond the lock)

- ``requirements/cpu.lock.txt``: CPU machines and CI (CPython 3.11, x86_64 Linux). torch is the CPU
  build that lies on these machines (``/opt/wheels``, pinned in ``cpu-platform.txt``); every other
  package from PyPI, with hashes. ``make install`` syncs the venv to exactly this file.
- ``requirements/gpu.lock.txt``: the GPU machine (CPython 3.12, torch 2.11 + CUDA 13 preinstalled).
  The same versions as the CPU lock wherever the platform allows (the CPU lock is its constraint
  file), torch pinned to the machine's and left out together with the CUDA wheels it pulls in (the
  machine provides them), faiss as ``faiss-cpu`` (PyPI's faiss-gpu wheels need CUDA 12 runtimes of
  several hundred MB). ``benchmarks/gpu_wheels.py`` carries what it lists.

Without ``--upgrade`` uv keeps every version already in a lock and only resolves what changed in
pyproject.toml; ``--upgrade`` takes the newest versions pyproject allows. ``--check`` fails when a
lock is out of date with pyproject.toml (it writes nothing).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQ = ROOT / "requirements"
LOCAL_WHEELS = "/opt/wheels"  # the CPU torch build on these machines
CPU_EXTRAS = ["cpu", "dev", "ray", "embed"]
GPU_EXTRAS = ["cpu", "ray", "embed"]
GPU_TORCH = "torch==2.11.0"  # what the GPU machine has installed
# provided by the GPU machine's torch install, never carried there
GPU_PROVIDED = ("torch", "triton", "nvidia-", "cuda-")
# CPU pins not carried over as GPU constraints: torch 2.11 caps setuptools (<82)
GPU_UNPINNED = ("setuptools",)


def _compile(out: Path, args: list[str], upgrade: bool, seed: Path | None) -> None:
    """uv pip compile into ``out``; ``seed`` (the current lock) gives uv the versions to keep."""
    if seed is not None and seed.exists() and not upgrade:
        shutil.copyfile(seed, out)
    cmd = [
        "uv",
        "pip",
        "compile",
        "pyproject.toml",
        "--quiet",
        "--generate-hashes",
        "--no-header",
        "--python-platform",
        "x86_64-manylinux_2_28",
        "-o",
        str(out),
        *args,
    ]
    if upgrade:
        cmd.append("--upgrade")
    subprocess.run(cmd, cwd=ROOT, check=True)


def _header(text: str, what: str) -> str:
    return f"# {what}\n# Written by `make lock` (requirements/lock.py); do not edit by hand.\n" + text


def cpu_lock(out: Path, upgrade: bool) -> None:
    extras = [a for e in CPU_EXTRAS for a in ("--extra", e)]
    _compile(
        out,
        [
            "--python-version",
            "3.11",
            "--find-links",
            LOCAL_WHEELS,
            "-c",
            str(REQ / "cpu-platform.txt"),
            *extras,
        ],
        upgrade,
        REQ / "cpu.lock.txt",
    )
    out.write_text(
        _header(
            _strip_header(out.read_text()),
            "CPU machines and CI: CPython 3.11, x86_64 Linux, torch from /opt/wheels",
        )
    )


def gpu_lock(out: Path, cpu: Path, upgrade: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cons = Path(tmp) / "constraints.txt"
        pins = [
            ln.split(" ")[0]
            for ln in cpu.read_text().splitlines()
            if "==" in ln and not ln.startswith(("#", " ")) and not ln.startswith(GPU_PROVIDED + GPU_UNPINNED)
        ]
        cons.write_text("\n".join([*pins, GPU_TORCH]) + "\n")
        extras = [a for e in GPU_EXTRAS for a in ("--extra", e)]
        # the torch-provided packages are named after a first pass (uv needs exact names)
        probe = Path(tmp) / "probe.txt"
        _compile(probe, ["--python-version", "3.12", "-c", str(cons), *extras], True, None)
        provided = sorted(
            {
                ln.split("==")[0]
                for ln in probe.read_text().splitlines()
                if "==" in ln and ln.startswith(GPU_PROVIDED)
            }
        )
        skip = [a for p in provided for a in ("--no-emit-package", p)]
        _compile(
            out, ["--python-version", "3.12", "-c", str(cons), *extras, *skip], upgrade, REQ / "gpu.lock.txt"
        )
        # the constraint file's temporary path would make every run's output differ
        out.write_text(out.read_text().replace(str(cons), "requirements/cpu.lock.txt (for the GPU machine)"))
    out.write_text(
        _header(
            _strip_header(out.read_text()),
            f"The GPU machine: CPython 3.12, x86_64 Linux, its own {GPU_TORCH} + CUDA 13 "
            f"(left out: {', '.join(provided)})",
        )
    )


def _strip_header(text: str) -> str:
    lines = text.splitlines(keepends=True)
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    return "".join(lines)


def _pins(text: str) -> dict[str, str]:
    out = {}
    for ln in text.splitlines():
        if "==" in ln and not ln.startswith(("#", " ", "-")):
            name, version = ln.split(" ")[0].split("==", 1)
            out[name.lower().replace("_", "-")] = version
    return out


def diff(lock: Path, freeze: Path) -> int:
    """Print the packages whose version in ``freeze`` (uv pip freeze) differs from ``lock``."""
    old, new = _pins(lock.read_text()), _pins(freeze.read_text())
    changed = [
        (n, old.get(n, "-"), new.get(n, "-")) for n in sorted(set(old) | set(new)) if old.get(n) != new.get(n)
    ]
    for n, a, b in changed:
        print(f"  {n:32s} {a:>16s} -> {b}")
    if not changed:
        print("  none: the newest versions allowed are the locked ones")
    return 0


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--diff":
        return diff(Path(sys.argv[2]), Path(sys.argv[3]))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upgrade", action="store_true", help="newest versions pyproject.toml allows")
    ap.add_argument("--check", action="store_true", help="fail if a lock is out of date; write nothing")
    a = ap.parse_args()
    if shutil.which("uv") is None:
        print("requirements/lock.py: uv is not on PATH (make lock installs it into .venv)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        cpu, gpu = Path(tmp) / "cpu.lock.txt", Path(tmp) / "gpu.lock.txt"
        cpu_lock(cpu, a.upgrade)
        gpu_lock(gpu, cpu, a.upgrade)
        stale = [
            p.name
            for p in (cpu, gpu)
            if not (REQ / p.name).exists() or not filecmp.cmp(p, REQ / p.name, shallow=False)
        ]
        if a.check:
            if stale:
                print(
                    f"requirements/: {', '.join(stale)} out of date with pyproject.toml; run make lock",
                    file=sys.stderr,
                )
                return 1
            print("requirements/: locks up to date")
            return 0
        for p in (cpu, gpu):
            shutil.copyfile(p, REQ / p.name)
        print(
            f"requirements/: wrote {', '.join(p.name for p in (cpu, gpu))}"
            + (f" ({', '.join(stale)} changed)" if stale else " (unchanged)")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
