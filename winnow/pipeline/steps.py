"""The step protocol: every step of a run owns its fingerprint, its work and its "am I done" check.

A step (tokenizer, train, score, embed, influence features, mixture, merges, select, emit, report, version)
is a small object registered in :data:`STEPS` by the module that does its work (``pipeline/models.py``,
``train.py``, ``scoring.py``, ...). The flow (``winnow/flows/run.py``) only wires steps into a graph and
runs each through one Prefect task wrapper, cached under ``<step name>-<fingerprint>``:

- ``fingerprint(ctx, **inputs)``: a sha256 of everything the step's output depends on;
- ``run(ctx, fp, **inputs)``: the work; returns a JSON-able result (what Prefect stores in the run folder);
- ``present(ctx, result, fp)``: whether a cached result's files are still on disk and are the ones this
  fingerprint made (a stale cache entry is run again);
- ``load(result)``: the stored result as the step's typed result (``Checkpoint``, ``ScorePart``, ...).

:class:`RunContext` is what every step gets instead of the recipe, run folder, tokenizer folder, input
shards and thread count passed one by one: it travels to task workers (threads or Ray processes) as a dict.
"""

from __future__ import annotations

import abc
import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from winnow.pipeline.layout import RunLayout

T = TypeVar("T")


# -- typed results -----------------------------------------------------------------------------
class Result:
    """A step's result: a frozen dataclass that travels as a plain dict (JSON) between processes."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def of(cls: type[T], d: Any) -> T:
        """``d`` itself, or a dict of the same fields as this result (unknown keys are dropped)."""
        if isinstance(d, cls):
            return d
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in dict(d).items() if k in names})


@dataclass(frozen=True)
class Checkpoint(Result):
    """One proxy checkpoint: ``path`` relative to the run folder."""

    seed: int
    step: int
    path: str
    fingerprint: str


@dataclass(frozen=True)
class WeightedCheckpoint(Result):
    """A checkpoint used by influence, with its weight (the mean learning rate since the previous one)."""

    seed: int
    step: int
    path: str
    fingerprint: str
    weight: float


@dataclass(frozen=True)
class ScorePart(Result):
    """One input shard's scores (``scores``) and row descriptions (``rows_file``) before merging."""

    shard: int
    rows: int
    scores: str
    rows_file: str
    skipped: bool = False
    scored: int = 0
    reused: int = 0


@dataclass(frozen=True)
class EmbeddingPart(Result):
    shard: int
    vectors: str
    ids: str


@dataclass(frozen=True)
class FeaturePart(Result):
    """One shard's influence features (checkpoints × rows × k, fp16) and their row metadata."""

    shard: int
    role: str
    vectors: str
    meta: str
    rows: int = 0


# -- the run context ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RunContext:
    """One run, as every step sees it. ``recipe``: the validated recipe as JSON (``Recipe.model_dump``);
    ``shards``: the input shards as dicts; ``tok_dir``: the tokenizer folder once known; ``threads``:
    torch threads of a task that shares the machine with ``runner.max_workers - 1`` others;
    ``all_threads``: of a task that runs alone (training one seed at a time, a mixture)."""

    recipe: dict[str, Any]
    run_dir: str
    shards: list[dict[str, Any]]
    tok_dir: str | None = None
    threads: int | None = None
    all_threads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunContext:
        return cls(**d)

    def with_tokenizer(self, tok_dir: str | None) -> RunContext:
        return RunContext(**{**self.to_dict(), "tok_dir": tok_dir})

    @cached_property
    def config(self) -> Any:
        """The :class:`~winnow.pipeline.recipe.Recipe` (validated once per context)."""
        from winnow.pipeline.recipe import recipe_from_dict

        return recipe_from_dict(self.recipe)

    @property
    def root(self) -> Path:
        return Path(self.run_dir)

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.run_dir)

    def input_shards(self) -> list[Any]:
        from winnow.pipeline.sources import InputShard

        return [InputShard.from_dict(s) for s in self.shards]

    def setup(self, threads: int | None = None) -> Any:
        """In a task: the environment and torch threads a worker needs; returns the recipe."""
        import torch

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if threads:
            torch.set_num_threads(threads)
        return self.config

    def featurizer(self, recipe: Any = None) -> tuple[Any, Any, int | None]:
        """``(Featurizer, tokenizer or None, number of classes)`` for ``recipe`` (default: the run's)."""
        return featurizer(recipe or self.config, self.tok_dir)


def featurizer(recipe: Any, tok_dir: str | None) -> tuple[Any, Any, int | None]:
    """``(Featurizer, tokenizer or None, number of classes)`` of a recipe with its tokenizer folder."""
    from winnow.errors import WinnowError
    from winnow.pipeline.collate import Featurizer
    from winnow.pipeline.models import class_names, load_tokenizer

    tok = None
    if recipe.model.task != "image_classification":
        if tok_dir is not None:
            tok = load_tokenizer(tok_dir, recipe.model.trust_remote_code)
        elif recipe.data.input_ids_column is None:
            raise WinnowError("no tokenizer: set model.tokenizer.path or model.tokenizer.train")
    names, n = class_names(recipe)
    vocab = (recipe.model.config or {}).get("vocab_size") if tok is None else None
    return Featurizer(recipe, tok, names, n, vocab_size=vocab), tok, n


def progress(desc: str, total: int | None, unit: str) -> Any:
    """A tqdm bar for a step's work (left behind by nothing: closed by the caller)."""
    from tqdm.auto import tqdm

    # a bar in a terminal only: logs and captured output get no cursor-control codes
    return tqdm(
        total=total, desc=desc, unit=unit, mininterval=1.0, leave=False, dynamic_ncols=True, disable=None
    )


# -- the protocol --------------------------------------------------------------------------------
class Step(abc.ABC):
    """Base class of a step; subclasses set ``name`` (the Prefect task name and cache-key prefix) and
    ``result`` (the typed result class, or None for a plain JSON value) and implement the methods."""

    name: ClassVar[str] = ""
    result: ClassVar[Any] = None
    many: ClassVar[bool] = False  # run() returns a list of results
    retries: ClassVar[int] = 1
    cached: ClassVar[bool] = True  # False: run every time (versions compare with what is on disk)
    # True: the step takes its GPU slot itself, around the part that computes on the device (see gpu_slot)
    own_slot: ClassVar[bool] = False

    @abc.abstractmethod
    def fingerprint(self, ctx: RunContext, **inputs: Any) -> str:
        """A sha256 of everything the step's output depends on."""

    @abc.abstractmethod
    def run(self, ctx: RunContext, fp: str, **inputs: Any) -> Any:
        """The work; a JSON-able result (``dump`` of the typed result)."""

    def device(self, ctx: RunContext) -> str:
        """The recipe's device setting the step computes on (``auto``, ``cpu``, ``cuda``); a step that
        computes on a GPU says so, and then holds one of :func:`gpu_slot`'s slots while it runs (the whole
        task, or where ``own_slot`` says so, the part the step itself wraps in :meth:`slot`)."""
        return "cpu"

    def slot(self, ctx: RunContext) -> contextlib.AbstractContextManager[None]:
        """One of the step's GPU slots (:func:`gpu_slot` for its device), for a step with ``own_slot``."""
        return gpu_slot(self.device(ctx), ctx.config.runner.tasks_per_gpu)

    def present(self, ctx: RunContext, result: Any, fp: str) -> bool:
        """Whether a cached result's files are on disk and were made by this fingerprint."""
        return True

    def on_cached(self, result: Any) -> Any:
        """The typed result of a cache hit, as this run reports it (e.g. a score part scored nothing)."""
        return result

    def load(self, result: Any) -> Any:
        """The JSON result as the step's typed result."""
        if self.result is None:
            return result
        if self.many:
            return [self.result.of(r) for r in result]
        return self.result.of(result)

    def dump(self, value: Any) -> Any:
        """The typed result as JSON (what ``run`` returns)."""
        if self.result is None:
            return value
        if self.many:
            return [self.result.of(v).to_dict() for v in value]
        return self.result.of(value).to_dict()


STEPS: dict[str, Step] = {}


def register_step(cls: type[Step]) -> type[Step]:
    """Class decorator: one instance of the step under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in STEPS and type(STEPS[cls.name]) is not cls:
        raise ValueError(f"step {cls.name!r} is already registered by {type(STEPS[cls.name]).__name__}")
    STEPS[cls.name] = cls()
    return cls


def all_steps() -> dict[str, Step]:
    """Every step, with the modules that register them imported."""
    import winnow.pipeline.embeddings  # noqa: F401
    import winnow.pipeline.influence  # noqa: F401
    import winnow.pipeline.mixtures.loop  # noqa: F401
    import winnow.pipeline.models  # noqa: F401
    import winnow.pipeline.score_merge  # noqa: F401
    import winnow.pipeline.scoring  # noqa: F401
    import winnow.pipeline.selection.table  # noqa: F401
    import winnow.pipeline.shards  # noqa: F401
    import winnow.pipeline.train  # noqa: F401
    import winnow.pipeline.versions  # noqa: F401
    import winnow.report.step  # noqa: F401

    return STEPS


# -- step records ------------------------------------------------------------------------------
def read_record(layout: RunLayout, step: Step, fp: str) -> Any | None:
    """The typed result a finished step recorded under this fingerprint, or None when there is none or
    it is unusable (unreadable, another step's, another fingerprint's, fields that do not fit): a record
    is data (JSON), and a bad one means the step runs again, never that the run fails."""
    import json

    path = layout.step_record(step.name, fp)
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rec, dict) or rec.get("step") != step.name or rec.get("fingerprint") != fp:
            return None
        return step.load(rec["result"])
    except (OSError, ValueError, TypeError, KeyError):
        return None


def write_record(layout: RunLayout, step: Step, fp: str, result: Any) -> None:
    """Record a finished step's JSON result (atomically), after its outputs are on disk."""
    import json

    import winnow
    from winnow.pipeline.atomic import write_text

    rec = {"step": step.name, "fingerprint": fp, "winnow_version": winnow.__version__, "result": result}
    write_text(layout.step_record(step.name, fp), json.dumps(rec, indent=1, default=str) + "\n")


_slots: dict[tuple[str, int], threading.BoundedSemaphore] = {}
_slots_lock = threading.Lock()


@contextlib.contextmanager
def gpu_slot(device: str, per_gpu: int) -> Iterator[None]:
    """Hold one of the process's ``per_gpu`` (``runner.tasks_per_gpu``) slots on the GPU that ``device``
    resolves to while a step computes on it; nothing for the CPU. With the thread runner's default two
    workers, two score tasks used to share one GPU: on the H200, 10^6 rows of EL2N took 240 s of scoring
    at 65% GPU against 174 s at 89% one at a time (RESULTS, run 8): the two launching threads share the
    interpreter lock and the feed, and neither keeps the device busy. A score task holds it only from its
    first window's launch to the device's last result (``own_slot``): the next shard's task reads its
    cache and featurizes its first window, and the last one writes its parts, while another scores.
    Under Ray a worker is its own process: its GPU is Ray's ``num_gpus`` to give, not this."""
    from winnow.pipeline.models import resolve_device

    dev = resolve_device(device)
    if dev.type == "cpu":
        yield
        return
    key = (str(dev), per_gpu)  # the settings name no GPU index: "cuda" is the process's current one
    with _slots_lock:
        sem = _slots.setdefault(key, threading.BoundedSemaphore(per_gpu))
    with sem:
        yield
