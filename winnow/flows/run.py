"""The main Prefect flow: the graph of a run's steps, the task runner, and one task wrapper.

    tokenizer → train (one task per seed) → score (per input shard) → merge-scores
              ↘ embed (per shard) → merge-embeddings        ↘
              ↘ influence-features (per target and input shard) → merge-influence → select → emit → report → version
              ↘ mixture                                     ↗

Each step (``winnow.pipeline.steps``: its fingerprint, its work, its "are my files still there" check)
lives with the module that does its work; this module only wires them. Every step runs through one
Prefect task (:func:`step_task`), named after the step and cached under ``<step>-<fingerprint>``, with
its cache records and JSON results inside the run folder (``RUN/.prefect/``), so rerunning an unchanged
recipe redoes nothing and a crashed run resumes from the steps that finished; a cached step whose files
have gone, or were since made by another fingerprint, runs again.

User errors (``WinnowError``) are not retried; other failures are retried once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from winnow.errors import WinnowError, is_user_os_error
from winnow.pipeline.atomic import fingerprint, write_text
from winnow.pipeline.display import markdown_cell
from winnow.pipeline.faults import fault_point
from winnow.pipeline.layout import RunLayout
from winnow.pipeline.preflight import check_run_dir, preflight, prepare_run_dir
from winnow.pipeline.recipe import Recipe
from winnow.pipeline.run_lock import RunLock
from winnow.pipeline.sources import InputShard, shards_fingerprint
from winnow.pipeline.steps import RunContext, ScorePart, all_steps, gpu_slot, read_record, write_record


# -- running steps ------------------------------------------------------------------------------
def _no_retry_for_user_errors(task: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except WinnowError:
        return False
    except OSError as e:  # a full disk or a read-only folder is not fixed by trying again
        return not is_user_os_error(e)
    except Exception:
        return True
    return True


@task(persist_result=False, retries=1, retry_delay_seconds=1, retry_condition_fn=_no_retry_for_user_errors)
def step_task(step: str, ctx: dict[str, Any], fp: str, inputs: dict[str, Any]) -> Any:
    """Run one step (threads or Ray workers: steps are reached by name, so they pickle by reference)."""
    s, c = all_steps()[step], RunContext.from_dict(ctx)
    with contextlib.nullcontext() if s.own_slot else gpu_slot(s.device(c), c.config.runner.tasks_per_gpu):
        return s.run(c, fp, **inputs)


class _Graph:
    """Runs steps, each at most once per fingerprint: a step whose record (``RUN/.winnow/steps/``) says it
    finished under this fingerprint, and whose files are still there, is not run again ("Cached").

    The records are winnow's, not Prefect's result cache: Prefect's records name absolute result paths
    (a moved folder, another ``PREFECT_HOME``, another machine cannot read them) and the serializer to
    load them with (a planted record could name pickle); these are plain JSON, with paths relative to
    the run folder, read as data and rebuilt when unusable."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.steps = all_steps()
        self.log: list[dict[str, Any]] = []
        self.t0 = time.time()
        self.done: dict[int, float] = {}

    def _task(self, name: str, label: str) -> Any:
        return step_task.with_options(name=name, task_run_name=label, retries=self.steps[name].retries)

    def submit(self, name: str, label: str, fp: str, **inputs: Any):
        step, ctx = self.steps[name], self.ctx
        had_record = False
        if step.cached:
            rec = read_record(ctx.layout, step, fp)
            had_record = rec is not None
            if rec is not None and step.present(ctx, step.dump(rec), fp):
                return ("cached", name, label, fp, step.on_cached(rec))
        args = {"step": name, "ctx": ctx.to_dict(), "fp": fp, "inputs": inputs}
        fut = self._task(name, label).submit(**args)
        try:
            fut.add_done_callback(lambda f, k=id(fut): self.done.setdefault(k, time.time()))
        except Exception:  # a runner whose futures take no callbacks: fall back to when we read it
            pass
        return ("run" if not had_record else "stale", name, label, fp, fut)

    def result(self, handle) -> Any:
        """The step's typed result (made now, or recorded by an earlier run)."""
        kind, name, label, fp, payload = handle
        step = self.steps[name]
        if kind == "cached":
            self.log.append({"step": label, "state": "Cached", "finished_s": round(time.time() - self.t0, 2)})
            return payload
        res = payload.result()
        if step.cached:
            write_record(self.ctx.layout, step, fp, res)
        state = payload.state.name if kind == "run" else "Completed (cache stale)"
        finished = self.done.get(id(payload), time.time())
        self.log.append({"step": label, "state": state, "finished_s": round(finished - self.t0, 2)})
        return step.load(res)

    def run(self, name: str, label: str, fp: str, **inputs: Any) -> Any:
        return self.result(self.submit(name, label, fp, **inputs))

    def fingerprint(self, name: str, **inputs: Any) -> str:
        return self.steps[name].fingerprint(self.ctx, **inputs)


def _prewarm_feed(ctx: RunContext) -> None:
    """Where scoring featurizes in processes (``scoring.loader``, auto on CUDA), start them now."""
    from winnow.pipeline.feed import prewarm
    from winnow.pipeline.models import resolve_device
    from winnow.pipeline.scoring import loader_kind, loader_workers

    recipe = ctx.config
    device = resolve_device(recipe.scoring.device)
    workers = loader_workers(recipe, device)
    if workers > 0 and loader_kind(recipe, device) == "processes":
        prewarm(ctx.featurizer()[0], workers)


# -- the flow ------------------------------------------------------------------------------------
@flow(name="winnow-run", log_prints=True, validate_parameters=False)
def run_flow(recipe_d: dict[str, Any], run_dir: str, shard_ds: list[dict[str, Any]]) -> dict[str, Any]:
    from winnow.pipeline.feed import release_pools

    try:
        return _spine(recipe_d, run_dir, shard_ds)
    finally:  # a run that fails ends its featurizing processes too (`winnow serve` outlives its runs)
        release_pools()


def _spine(recipe_d: dict[str, Any], run_dir: str, shard_ds: list[dict[str, Any]]) -> dict[str, Any]:
    """The flow's body: the steps in order, each a task (see :class:`_Graph`)."""
    from winnow.pipeline.feed import release_pools
    from winnow.pipeline.influence import influence_checkpoints, target_shards
    from winnow.pipeline.models import model_source_fingerprint, tokenizer_fingerprint, warm_imports
    from winnow.pipeline.score_merge import parts_fingerprint
    from winnow.pipeline.scoring import cache_fingerprint, release_models
    from winnow.pipeline.train import train_fingerprint

    warm_imports()  # before any task thread: transformers' lazy imports race between threads
    logger = get_run_logger()
    recipe = RunContext(recipe_d, run_dir, shard_ds).config
    workers = recipe.runner.max_workers
    ctx = RunContext(
        recipe_d,
        run_dir,
        shard_ds,
        threads=recipe.runner.torch_threads or max(1, (os.cpu_count() or 1) // workers),
        all_threads=recipe.runner.torch_threads or (os.cpu_count() or 1),
    )
    g = _Graph(ctx)
    shards = [InputShard.from_dict(s) for s in shard_ds]
    input_fp = shards_fingerprint(shards, recipe.data)
    logger.info(f"{len(shards)} input shard(s), input fingerprint {input_fp[:12]}")

    # tokenizer
    tok_dir: str | None = None
    if recipe.model.task != "image_classification":
        if recipe.model.tokenizer.train is not None:
            tok_dir = str(
                ctx.layout.path(
                    g.run("tokenizer", "tokenizer", g.fingerprint("tokenizer", input_fp=input_fp))
                )
            )
        else:
            tok_dir = recipe.model.tokenizer.path or recipe.model.path
    tok_fp = tokenizer_fingerprint(tok_dir) if tok_dir else None
    model_fp = model_source_fingerprint(recipe)
    ctx = g.ctx = ctx.with_tokenizer(tok_dir)

    # proxy training, one task per seed
    train_fp = train_fingerprint(recipe, input_fp, tok_fp, model_fp)
    handles = [
        g.submit(
            "train",
            f"train seed {s}",
            g.fingerprint("train", train_fp=train_fp, seed=s),
            seed=s,
            train_fp=train_fp,
        )
        for s in recipe.train.seeds
    ]
    if any(h[0] != "cached" for h in handles):  # the GPU trains: the feed's processes start meanwhile
        _prewarm_feed(ctx)
    ckpts = [c for h in handles for c in g.result(h)]
    ck_dicts = [c.to_dict() for c in ckpts]

    # scoring, one task per input shard; examples already scored by the same scorers, model and tokenizer
    # (keyed by content) are read back from the cache, not scored again
    cache_fp = cache_fingerprint(recipe, ckpts, tok_fp)
    handles = [
        g.submit(
            "score",
            f"score {s.name}",
            g.fingerprint("score", shard=s, ckpts=ckpts, tok_fp=tok_fp),
            shard=s.to_dict(),
            ckpts=ck_dicts,
            cache_fp=cache_fp,
        )
        for s in shards
    ]
    emb_handles = []
    if recipe.scoring.embeddings is not None:
        emb_handles = [
            g.submit(
                "embed",
                f"embed {s.name}",
                g.fingerprint("embed", shard=s, ckpts=ckpts),
                shard=s.to_dict(),
                ckpts=ck_dicts,
            )
            for s in shards
        ]
    infl_handles, tgt_handles, ickpts = [], [], []
    if recipe.scoring.influence is not None:
        ickpts = [c.to_dict() for c in influence_checkpoints(recipe, ckpts)]
        for role, shs in (("target", target_shards(recipe)), ("train", shards)):
            for s in shs:
                fp = g.fingerprint("influence-features", shard=s, ickpts=ickpts, tok_fp=tok_fp, role=role)
                h = g.submit(
                    "influence-features",
                    f"gradient features {role} {s.name}",
                    fp,
                    shard=s.to_dict(),
                    ickpts=ickpts,
                    role=role,
                )
                (tgt_handles if role == "target" else infl_handles).append(h)
    parts: list[ScorePart] = [g.result(h) for h in handles]
    release_models()  # the scoring models kept loaded from shard to shard
    release_pools()  # and the featurizing processes, where scoring.loader is processes
    part_dicts = [p.to_dict() for p in parts]
    parts_fp = parts_fingerprint(parts)
    emb_fp = None
    if emb_handles:
        emb_parts = [g.result(h).to_dict() for h in emb_handles]
        emb_fp = g.fingerprint("merge-embeddings", parts=emb_parts)
        g.run("merge-embeddings", "merge embeddings", emb_fp, parts=emb_parts)
    provenance = {
        "model_fingerprint": model_fp,
        "tokenizer_fingerprint": tok_fp,
        "train_fingerprint": train_fp,
        "checkpoints": ck_dicts,
        "seeds": recipe.train.seeds,
        "input_fingerprint": input_fp,
    }
    merged = g.run(
        "merge-scores",
        "merge scores",
        g.fingerprint("merge-scores", parts=part_dicts),
        parts=part_dicts,
        provenance=provenance,
        cache_fp=cache_fp,
    )
    if merged["duplicate_rows"]:
        logger.warning(f"{merged['duplicate_rows']} rows are exact duplicates of others and share their id")
    infl_fp = None
    if infl_handles:
        tparts = [g.result(h).to_dict() for h in tgt_handles]
        iparts = [g.result(h).to_dict() for h in infl_handles]
        infl_fp = g.fingerprint("merge-influence", parts=iparts, target_parts=tparts)
        infl = g.run(
            "merge-influence", "merge influence", infl_fp, parts=iparts, target_parts=tparts, ickpts=ickpts
        )
        logger.info(
            f"influence: {infl['rows']} rows against {infl['target_rows']} target examples "
            f"({len(infl['subtasks'])} subtask(s)); neighbours by {infl['neighbours_by']}"
        )

    mix_fp = None
    if recipe.mixture is not None:
        mix_fp = g.fingerprint("mixture", input_fp=input_fp, tok_fp=tok_fp)
        mix = g.run("mixture", f"mixture {recipe.mixture.method}", mix_fp, input_fp=input_fp, tok_fp=tok_fp)
        logger.info(
            f"mixture ({recipe.mixture.method}): "
            + ", ".join(f"{k} {v:.3f}" for k, v in mix["weights"].items())
        )

    select_fp = g.fingerprint("select", upstream=[parts_fp, emb_fp, infl_fp, mix_fp])
    selected = g.run("select", "select", select_fp)
    for w in selected.get("warnings", []):
        logger.warning(w)
    recipe_fp = fingerprint("recipe", recipe.model_dump(exclude={"runner": True, "output": {"dir"}}))
    fps = {"recipe": recipe_fp, "input": input_fp, "model": model_fp}
    emit_fp = g.fingerprint("emit", select_fp=select_fp, fingerprints=fps)
    emitted = g.run("emit", "emit shards", emit_fp, fingerprints=fps)
    report_fp = g.fingerprint("report", emit_fp=emit_fp)
    report = str(ctx.layout.path(g.run("report", "report", report_fp, emit_fp=emit_fp)))
    scored = sum(p.scored for p in parts)
    reused = sum(p.reused for p in parts)
    logger.info(f"scored {scored} row(s), {reused} read back from the score cache")
    # a new version of the outputs when they changed (never cached: it compares with the versions on disk)
    from prefect.runtime import flow_run

    root = flow_run.root_flow_run_id or flow_run.id  # a scheduled run's own id (winnow-run is its subflow)
    version = g.steps["version"].load(
        g._task("version", "version")(
            step="version",
            ctx=ctx.to_dict(),
            fp="version",
            inputs={
                "emit_fp": emit_fp,
                "input_fp": input_fp,
                "scored": scored,
                "reused": reused,
                "report_fp": report_fp,
                "flow_run_id": str(root) if root else None,
                "cache_fp": cache_fp,
            },
        )
    )
    g.log.append(
        {
            "step": "version",
            "state": f"{version['name']} ({'new' if version['new'] else 'unchanged'})",
            "finished_s": round(time.time() - g.t0, 2),
        }
    )
    summary = {
        "run_dir": run_dir,
        "rows": merged["rows"],
        "kept": selected["kept"],
        "scored": scored,
        "reused": reused,
        "shards": emitted["shards"],
        "report": report,
        "version": version,
        "steps": g.log,
        "warnings": list(selected.get("warnings", [])),
    }
    _artifact(recipe, Path(run_dir), summary)
    return summary


def _artifact(recipe: Recipe, run_dir: Path, summary: dict[str, Any]) -> None:
    import json

    layout = RunLayout(run_dir)
    man = json.loads(layout.manifest.read_text())
    lines = [
        f"# winnow run `{recipe.name}`",
        "",
        f"- rows: **{man['counts']['input_rows']}** in, **{man['counts']['kept_rows']}** kept, "
        f"{man['counts']['pruned_rows']} pruned",
        f"- selector: `{recipe.select.method}` by `{recipe.select.score}` "
        f"({'fraction ' + str(recipe.select.fraction) if recipe.select.fraction else ''}"
        f"{'count ' + str(recipe.select.count) if recipe.select.count is not None else ''}"
        f"{'threshold ' + str(recipe.select.threshold) if recipe.select.threshold is not None else ''}, "
        f"keep {recipe.select.keep})",
        f"- shards: {len(man['shards'])} under `{layout.shards}`",
        f"- scored: {summary['scored']} row(s); {summary['reused']} read back from the score cache",
        f"- report: [{summary['report']}](file://{Path(summary['report']).resolve()})",
    ]
    version = summary.get("version")
    if version:
        vreport = RunLayout(version["path"]).report
        state = "new" if version.get("new") else "unchanged since"
        lines.append(
            f"- version: **{version['name']}** ({state}; {version.get('entered', 0)} entered, "
            f"{version.get('left', 0)} left the selection): [{vreport}](file://{vreport.resolve()})"
        )
    lines.append("")
    if man["domains"]:
        lines += ["| domain | input | kept | proportion |", "|---|---:|---:|---:|"]
        lines += [
            f"| {markdown_cell(k)} | {v['input_rows']} | {v['kept_rows']} | {v['proportion']:.3f} |"
            for k, v in man["domains"].items()
        ]
    lines += ["", "| step | state | finished at (s after start) |", "|---|---|---:|"]
    lines += [f"| {markdown_cell(s['step'])} | {s['state']} | {s['finished_s']} |" for s in summary["steps"]]
    key = "winnow-" + "".join(c if c.isalnum() else "-" for c in recipe.name.lower())
    create_markdown_artifact("\n".join(lines), key=key[:100], description=f"winnow run {recipe.name}")
    if version:
        create_link_artifact(
            f"file://{RunLayout(version['path']).report.resolve()}",
            link_text=f"{recipe.name} {version['name']} report",
            key=(key + "-report")[:100],
            description=f"selection report of {recipe.name} {version['name']}",
        )
    write_text(layout.summary, "\n".join(lines) + "\n")


_FORWARDED_ENV = (
    "PREFECT_HOME",
    "PREFECT_SERVER_ANALYTICS_ENABLED",
    "PREFECT_LOGGING_LEVEL",
    "HF_HUB_OFFLINE",
    "HF_HOME",
    "TOKENIZERS_PARALLELISM",
)


def task_runner(recipe: Recipe, settings: dict[Any, Any] | None = None):
    if recipe.runner.kind == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError:
            raise WinnowError(
                "runner.kind is 'ray' but prefect-ray is not installed: pip install 'winnow[ray]'"
            ) from None
        env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
        env.update({s.name: str(v) for s, v in (settings or {}).items()})
        init = {
            "num_cpus": recipe.runner.max_workers,
            "include_dashboard": False,
            "log_to_driver": True,
            "runtime_env": {"env_vars": env},
        }
        return RayTaskRunner(address=recipe.runner.ray_address, init_kwargs=init)
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=recipe.runner.max_workers)


def _die_with_parent() -> None:
    """In a child process, before exec: SIGKILL it when the process that started it dies (Linux
    PR_SET_PDEATHSIG), however that one dies (a SIGKILL of winnow included)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):  # not Linux: the server is stopped at exit instead
        pass


@contextlib.contextmanager
def _prefect_api(recipe: Recipe) -> Iterator[str | None]:
    """The Prefect API the run talks to: ``PREFECT_API_URL`` when set (a ``make server``, a team's
    server); else a temporary server on 127.0.0.1 for this run alone, which dies with the run (also
    on SIGKILL: it is started with PR_SET_PDEATHSIG) and is stopped when the run ends. Ray workers are
    other processes and are pointed at the same server."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if url:
        yield url
        return
    if recipe.runner.ray_address:
        raise WinnowError(
            "runner.ray_address: a Ray cluster's workers need a Prefect server they can reach; "
            "start one (prefect server start) and set PREFECT_API_URL"
        )

    with temporary_prefect_server() as api:
        yield api


@contextlib.contextmanager
def temporary_prefect_server() -> Iterator[str]:
    """A Prefect server on 127.0.0.1 for this process alone: it dies with the process (also on SIGKILL:
    started with PR_SET_PDEATHSIG), and on exit the events and logs still queued are sent before it stops.
    Yields its API URL. (The runs' own, and the benchmarks' that drive several runs.)"""
    from prefect.server.api.server import SubprocessASGIServer

    class LinkedServer(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> Any:
            import subprocess

            popen = subprocess.Popen

            def linked(*args: Any, **kwargs: Any) -> Any:
                return popen(*args, preexec_fn=_die_with_parent, **kwargs)

            subprocess.Popen = linked  # type: ignore[misc]
            try:
                return super()._run_uvicorn_command()
            finally:
                subprocess.Popen = popen  # type: ignore[misc]

    server = LinkedServer()
    server.start()
    try:
        yield server.api_url
    finally:
        # send what the run's events and logs still hold while their server lives: otherwise each is
        # retried against the stopped server when the process exits (seconds an item)
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        for worker in (EventsWorker, APILogWorker):
            with contextlib.suppress(Exception):
                worker.drain_all(timeout=10)
        server.stop()


class _OneLineUserErrors(logging.Filter):
    """Prefect logs a failed task's traceback; for a user error the one-line message says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and (
            isinstance(record.exc_info[1], WinnowError) or is_user_os_error(record.exc_info[1])
        ):
            record.exc_info = None
            record.exc_text = None
        return True


def _quiet_user_errors() -> None:
    flt = _OneLineUserErrors()
    for name in (
        "prefect",
        "prefect.task_runs",
        "prefect.flow_runs",
        "prefect.task_engine",
        "prefect.flow_engine",
    ):
        lg = logging.getLogger(name)
        if not any(isinstance(f, _OneLineUserErrors) for f in lg.filters):
            lg.addFilter(flt)
    for h in logging.getLogger("prefect").handlers:
        if not any(isinstance(f, _OneLineUserErrors) for f in h.filters):
            h.addFilter(flt)


def run_recipe(recipe: Recipe) -> dict[str, Any]:
    """Validate the inputs, open the run folder, and run the flow; returns the run's summary."""
    recipe = recipe.model_copy(deep=True)
    for holder, key in ((recipe.model, "path"), (recipe.model.tokenizer, "path")):
        value = getattr(holder, key)
        if value is not None and Path(value).exists():  # workers (Ray) may run elsewhere
            setattr(holder, key, str(Path(value).absolute()))
    shards = preflight(recipe)
    run_dir = check_run_dir(recipe).absolute()
    _quiet_user_errors()
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with RunLock(run_dir):
        fault_point("locked")
        prepare_run_dir(recipe)
        args = (recipe.model_dump(mode="json"), str(run_dir), [s.to_dict() for s in shards])
        with _prefect_api(recipe) as url:
            settings = {PREFECT_API_URL: url}
            f = run_flow.with_options(
                task_runner=task_runner(recipe, settings), flow_run_name=f"{recipe.name}"
            )
            with temporary_settings(settings):
                return f(*args)
