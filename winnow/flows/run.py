"""The main Prefect flow: tokenizer → proxy training → scoring → merge → select → emit → report.

One task per seed (training) and per input shard (scoring); every task is cached by a
fingerprint of its inputs and parameters (`cache_policy` keyed on the task's `fp` argument, with
the cache records and their JSON results under `runs/NAME/.prefect/`), so rerunning an unchanged recipe redoes nothing
and a crashed run resumes from the tasks that finished. Outputs are files written atomically;
a cached task whose files have since gone is run again.

User errors (`WinnowError`) are not retried; other failures are retried once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE, CachePolicy

import winnow
from winnow.errors import WinnowError
from winnow.pipeline.atomic import clean_temporaries, fingerprint, write_json, write_text
from winnow.pipeline.recipe import Recipe, dump_recipe, recipe_from_dict
from winnow.pipeline.sources import (
    InputShard,
    check_columns,
    iter_raw_batches,
    list_shards,
    shards_fingerprint,
)


# -- run directory -------------------------------------------------------------------------------
def prepare_run_dir(recipe: Recipe) -> Path:
    """Create or reopen the run folder; refuse one that holds a different run."""
    run_dir = recipe.run_dir()
    ident = {"name": recipe.name, "source": recipe.data.source, "task": recipe.model.task}
    marker = run_dir / "run.json"
    if run_dir.exists() and any(run_dir.iterdir()):
        if not marker.exists():
            raise WinnowError(
                f"output.dir: {run_dir} is not empty and holds no winnow run (no run.json); "
                f"choose another output.dir"
            )
        import json

        try:
            old = json.loads(marker.read_text())
        except json.JSONDecodeError:
            raise WinnowError(
                f"{marker}: unreadable; delete {run_dir} or choose another output.dir"
            ) from None
        diff = [k for k in ident if old.get(k) != ident[k]]
        if diff:
            k = diff[0]
            raise WinnowError(
                f"output.dir: {run_dir} holds a different run ({k} {old.get(k)!r}, this recipe "
                f"has {ident[k]!r}); choose another output.dir or delete the folder"
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    clean_temporaries(run_dir)
    write_json(marker, dict(ident, winnow_version=winnow.__version__))
    write_text(run_dir / "config.yaml", dump_recipe(recipe))
    return run_dir


# -- caching -------------------------------------------------------------------------------------
def _fp_key(context: Any, parameters: dict[str, Any]) -> str:
    return f"{context.task.name}-{parameters['fp']}"


def _no_retry_for_user_errors(task: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except WinnowError:
        return False
    except Exception:
        return True
    return True


def _policy(run_dir: Path) -> CachePolicy:
    return CachePolicy.from_cache_key_fn(_fp_key).configure(key_storage=str(run_dir / ".prefect"))


def _task_options(run_dir: Path) -> dict[str, Any]:
    """Results as JSON (nothing a run folder holds is unpickled); where they are written is the run
    folder's own `.prefect/results` (`_run_settings`)."""
    return {"cache_policy": _policy(run_dir), "result_serializer": "json"}


def _run_settings(run_dir: Path, api_url: str | None) -> dict[Any, Any]:
    """Prefect settings for one run: task results in the run folder beside their cache records, so one
    folder's results never stand in for another's (the keys are fingerprints of inputs, and two
    folders, or two tests, can share them) and the folder carries what resuming it needs."""
    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH

    out: dict[Any, Any] = {PREFECT_LOCAL_STORAGE_PATH: str(run_dir / ".prefect" / "results")}
    if api_url:
        out[PREFECT_API_URL] = api_url
    return out


TASK_OPTS: dict[str, Any] = dict(
    persist_result=True, retries=1, retry_delay_seconds=1, retry_condition_fn=_no_retry_for_user_errors
)


# -- shared helpers for tasks (run in threads or on Ray workers) ----------------------------------
def _setup(recipe_d: dict[str, Any], threads: int | None) -> Recipe:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads:
        torch.set_num_threads(threads)
    return recipe_from_dict(recipe_d)


def _featurizer(recipe: Recipe, tok_dir: str | None):
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


def _progress(desc: str, total: int | None, unit: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, mininterval=1.0, leave=False, dynamic_ncols=True)


# -- tasks ---------------------------------------------------------------------------------------
@task(name="tokenizer", **TASK_OPTS)
def tokenizer_task(recipe_d: dict[str, Any], run_dir: str, shards: list[dict], fp: str) -> str:
    from winnow.pipeline.models import train_tokenizer
    from winnow.pipeline.train import shard_examples  # noqa: F401  (keeps import cost in the task)

    recipe = _setup(recipe_d, None)
    out = Path(run_dir) / f"tokenizer-{fp[:12]}"
    if (out / "tokenizer.json").exists():
        return str(out)
    cfg = recipe.model.tokenizer.train
    assert cfg is not None
    col = recipe.data.text_column

    def texts():
        n = 0
        # round-robin over shards so every domain is represented in the vocabulary
        its = [iter_raw_batches(recipe.data, InputShard.from_dict(s)) for s in shards]
        while its and n < cfg.max_rows:
            for it in list(its):
                batch = next(it, None)
                if batch is None:
                    its.remove(it)
                    continue
                for t in batch[col]:
                    if isinstance(t, str):
                        n += 1
                        yield t

    train_tokenizer(texts(), recipe, out)
    return str(out)


# Dropout draws from torch's process-wide RNG, so two seeds training in threads of one process
# would interleave their draws and neither would be reproducible: within a process, seeds train
# one after another (each with all the torch threads). On Ray each task is its own process.
_TRAIN_LOCK = threading.Lock()


def _train_lock() -> threading.Lock:
    # Tasks are pickled by value for Ray (their module name points at the Task object, not the
    # function), so they must reach the lock through a function that pickles by reference.
    return _TRAIN_LOCK


@task(name="train", **TASK_OPTS)
def train_task(
    recipe_d: dict[str, Any],
    run_dir: str,
    shards: list[dict],
    tok_dir: str | None,
    seed: int,
    train_fp: str,
    threads: int | None,
    fp: str,
) -> list[dict[str, Any]]:
    from winnow.pipeline.train import train_proxy

    recipe = _setup(recipe_d, threads)
    feat, tok, n = _featurizer(recipe, tok_dir)
    bar = _progress(f"train seed {seed}", recipe.train.steps, "step")

    def cb(step: int, total: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

    try:
        with _train_lock():
            if threads:
                torch.set_num_threads(threads)
            return train_proxy(
                recipe,
                Path(run_dir),
                [InputShard.from_dict(s) for s in shards],
                feat,
                seed,
                train_fp,
                tok,
                n,
                progress=cb,
            )
    finally:
        bar.close()


@task(name="score", **TASK_OPTS)
def score_task(
    recipe_d: dict[str, Any],
    run_dir: str,
    shard: dict,
    ckpts: list[dict],
    tok_dir: str | None,
    threads: int | None,
    fp: str,
    cache_fp: str | None = None,
) -> dict[str, Any]:
    from winnow.pipeline.scoring import score_shard

    recipe = _setup(recipe_d, threads)
    feat, _, _ = _featurizer(recipe, tok_dir)
    sh = InputShard.from_dict(shard)
    bar = _progress(f"score {sh.name}", None, "row")
    try:
        return score_shard(recipe, Path(run_dir), sh, ckpts, feat, fp, progress=bar.update, cache_fp=cache_fp)
    finally:
        bar.close()


@task(name="embed", **TASK_OPTS)
def embed_task(
    recipe_d: dict[str, Any],
    run_dir: str,
    shard: dict,
    tok_dir: str | None,
    threads: int | None,
    ckpts: list[dict],
    fp: str,
) -> dict[str, Any]:
    from winnow.pipeline.embeddings import embed_shard

    recipe = _setup(recipe_d, threads)
    feat, _, _ = _featurizer(recipe, tok_dir)
    return embed_shard(recipe, Path(run_dir), InputShard.from_dict(shard), feat, fp, ckpts=ckpts)


@task(name="merge-embeddings", **TASK_OPTS)
def merge_embeddings_task(run_dir: str, parts: list[dict], fp: str) -> dict:
    from winnow.pipeline.embeddings import merge_embeddings

    return merge_embeddings(Path(run_dir), parts, fp)


@task(name="influence-features", **TASK_OPTS)
def influence_features_task(
    recipe_d: dict[str, Any],
    run_dir: str,
    shard: dict,
    tok_dir: str | None,
    threads: int | None,
    ickpts: list[dict],
    role: str,
    fp: str,
) -> dict[str, Any]:
    from winnow.pipeline.influence import features_shard, target_recipe

    recipe = _setup(recipe_d, threads)
    feat, _, _ = _featurizer(target_recipe(recipe) if role == "target" else recipe, tok_dir)
    sh = InputShard.from_dict(shard)
    bar = _progress(f"gradient features {'target ' if role == 'target' else ''}{sh.name}", None, "row")
    try:
        return features_shard(recipe, Path(run_dir), sh, feat, ickpts, fp, role=role, progress=bar.update)
    finally:
        bar.close()


@task(name="merge-influence", **TASK_OPTS)
def merge_influence_task(
    recipe_d: dict[str, Any],
    run_dir: str,
    parts: list[dict],
    target_parts: list[dict],
    ickpts: list[dict],
    fp: str,
) -> dict:
    from winnow.pipeline.influence import merge_influence

    return merge_influence(_setup(recipe_d, None), Path(run_dir), parts, target_parts, ickpts, fp)


@task(name="mixture", **TASK_OPTS)
def mixture_task(
    recipe_d: dict[str, Any],
    run_dir: str,
    shards: list[dict],
    tok_dir: str | None,
    threads: int | None,
    fp: str,
) -> dict[str, Any]:
    from winnow.pipeline.mixture import run_mixture

    recipe = _setup(recipe_d, threads)
    feat, tok, _ = _featurizer(recipe, tok_dir)
    bar = _progress(f"mixture {recipe.mixture.method}", None, "step")
    state = {"phase": None}

    def cb(phase: str, step: int, total: int) -> None:
        if state["phase"] != phase:
            state["phase"] = phase
            bar.reset(total=total)
            bar.set_description(f"mixture {phase}")
        bar.update(1)

    try:
        return run_mixture(
            recipe, Path(run_dir), [InputShard.from_dict(s) for s in shards], feat, tok, fp, progress=cb
        )
    finally:
        bar.close()


@task(name="merge-scores", **TASK_OPTS)
def merge_task(recipe_d: dict[str, Any], run_dir: str, parts: list[dict], provenance: dict, fp: str) -> dict:
    from winnow.pipeline.selection import merge_parts

    return merge_parts(_setup(recipe_d, None), Path(run_dir), parts, provenance, step_fingerprint=fp)


@task(name="select", **TASK_OPTS)
def select_task(recipe_d: dict[str, Any], run_dir: str, fp: str) -> dict:
    from winnow.pipeline.selection import write_selection

    return write_selection(_setup(recipe_d, None), Path(run_dir), step_fingerprint=fp)


@task(name="emit", **TASK_OPTS)
def emit_task(
    recipe_d: dict[str, Any],
    run_dir: str,
    shards: list[dict],
    tok_dir: str | None,
    fingerprints: dict[str, str],
    fp: str,
) -> dict:
    from winnow.pipeline.shards import emit_shards

    recipe = _setup(recipe_d, None)
    feat, _, _ = _featurizer(recipe, tok_dir)
    return emit_shards(
        recipe,
        Path(run_dir),
        [InputShard.from_dict(s) for s in shards],
        feat,
        fingerprints,
        step_fingerprint=fp,
    )


@task(name="version", **TASK_OPTS)
def version_task(run_dir: str, emit_fp: str, input_fp: str, scored: int, reused: int, report_fp: str) -> dict:
    from prefect.runtime import flow_run

    from winnow.pipeline.versions import write_version

    root = flow_run.root_flow_run_id or flow_run.id  # a scheduled run's own id (winnow-run is its subflow)
    return write_version(
        Path(run_dir),
        emit_fp,
        input_fp,
        scored,
        reused,
        report_fingerprint=report_fp,
        flow_run_id=str(root) if root else None,
    )


@task(name="report", **TASK_OPTS)
def report_task(run_dir: str, fp: str) -> str:
    from winnow.pipeline.report import write_report

    return str(write_report(Path(run_dir), fingerprint=fp))


# -- the flow ------------------------------------------------------------------------------------
def _outputs_present(name: str, result: Any, run_dir: Path, fp: str) -> bool:
    """Whether a cached step's files are still on disk, and are the ones this fingerprint made.

    Steps that write to fixed paths (selection, shards, report, merged scores) record their
    fingerprint in the file: switching a recipe back and forth must not reuse another config's file.
    """
    from winnow.pipeline.report import report_fingerprint
    from winnow.pipeline.shards import check_shards
    from winnow.pipeline.store import read_provenance

    def prov_fp(path: Path) -> str | None:
        return (read_provenance(path) or {}).get("step_fingerprint") if path.exists() else None

    if name == "train":
        return all((run_dir / c["path"] / "state.json").exists() for c in result)
    if name == "score":
        return Path(result["scores"]).exists() and Path(result["rows_file"]).exists()
    if name == "tokenizer":
        return (Path(result) / "tokenizer.json").exists()
    if name in ("merge-scores", "merge-embeddings"):
        return all(prov_fp(Path(p)) == fp for p in result["files"])
    if name == "embed":
        return Path(result["vectors"]).exists() and Path(result["ids"]).exists()
    if name == "mixture":
        import json as _json

        p = run_dir / "mixture.json"
        try:
            return (
                p.exists()
                and _json.loads(p.read_text()).get("fingerprint") == fp
                and (run_dir / "mixture_trajectory.parquet").exists()
            )
        except ValueError:
            return False
    if name == "influence-features":
        return Path(result["vectors"]).exists() and Path(result["meta"]).exists()
    if name == "merge-influence":
        from winnow.pipeline.influence import merged_fingerprint_ok

        return merged_fingerprint_ok(run_dir, fp)
    if name == "select":
        return prov_fp(run_dir / "selection.parquet") == fp
    if name == "emit":
        return check_shards(run_dir, fp)
    if name == "report":
        return report_fingerprint(result) == fp
    return True


class _Steps:
    """Runs tasks with the run's cache policy and records each step's final state and finish time."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.options = _task_options(run_dir)
        self.log: list[dict[str, Any]] = []
        self.t0 = time.time()
        self.done: dict[int, float] = {}

    def submit(self, t: Any, label: str, **kw: Any):
        fut = t.with_options(**self.options).submit(**kw)
        try:
            fut.add_done_callback(lambda f, k=id(fut): self.done.setdefault(k, time.time()))
        except Exception:  # a runner whose futures take no callbacks: fall back to when we read it
            pass
        return (fut, t, label, kw)

    def result(self, handle) -> Any:
        fut, t, label, kw = handle
        res = fut.result()
        state_name = fut.state.name
        if state_name == "Cached" and not _outputs_present(t.name, res, self.run_dir, kw["fp"]):
            res = t.with_options(**self.options, refresh_cache=True)(**kw)
            state_name = "Completed (cache stale)"
            self.done[id(fut)] = time.time()
        if state_name == "Cached" and t.name == "score":  # nothing was scored by this run
            res = dict(res, scored=0, reused=res["rows"])
        finished = self.done.get(id(fut), time.time())
        self.log.append({"step": label, "state": state_name, "finished_s": round(finished - self.t0, 2)})
        return res


def preflight(recipe: Recipe) -> list[InputShard]:
    """Checks that need no model or flow: the source resolves, columns exist, the model folder has
    weights, the classes are known. Failing here costs seconds, not a training run."""
    from winnow.pipeline.models import check_model_folder, class_names

    shards = list_shards(recipe.data)
    first = shards[0]
    for raw in iter_raw_batches(recipe.data, first, batch_size=8):
        check_columns(recipe.data, list(raw), first.location)
        break
    if recipe.model.path is not None:
        check_model_folder(recipe.model.path)
    class_names(recipe)
    if recipe.scoring.influence is not None:
        from winnow.pipeline.influence import target_recipe, target_shards

        if not any(k > 0 for k in recipe.train.checkpoint_steps()):
            raise WinnowError(
                "scoring.influence needs a trained proxy checkpoint: train.steps > 0 and a "
                "train.checkpoints step above 0"
            )
        tdata = target_recipe(recipe).data
        tfirst = target_shards(recipe)[0]
        for raw in iter_raw_batches(tdata, tfirst, batch_size=8):
            try:
                check_columns(tdata, list(raw), tfirst.location)
            except WinnowError as e:
                raise WinnowError(
                    f"scoring.influence.target: {str(e).replace('data.domain_column', 'scoring.influence.subtask_column')}"
                ) from None
            break
    return shards


@flow(name="winnow-run", log_prints=True, validate_parameters=False)
def run_flow(recipe_d: dict[str, Any], run_dir: str, shard_ds: list[dict[str, Any]]) -> dict[str, Any]:
    recipe = recipe_from_dict(recipe_d)
    rd = Path(run_dir)
    logger = get_run_logger()
    steps = _Steps(rd)
    shards = [InputShard.from_dict(s) for s in shard_ds]
    input_fp = shards_fingerprint(shards, recipe.data)
    logger.info(f"{len(shards)} input shard(s), input fingerprint {input_fp[:12]}")
    workers = recipe.runner.max_workers
    threads = recipe.runner.torch_threads or max(1, (os.cpu_count() or 1) // workers)

    from winnow.pipeline.models import model_source_fingerprint, tokenizer_fingerprint
    from winnow.pipeline.scoring import cache_fingerprint, score_fingerprint
    from winnow.pipeline.train import train_fingerprint

    # tokenizer
    tok_dir: str | None = None
    if recipe.model.task != "image_classification":
        if recipe.model.tokenizer.train is not None:
            fp = fingerprint(
                "tokenizer",
                recipe.model.tokenizer.model_dump(),
                recipe.model.task,
                recipe.model.max_length,
                input_fp,
            )
            tok_dir = steps.result(
                steps.submit(
                    tokenizer_task, "tokenizer", recipe_d=recipe_d, run_dir=run_dir, shards=shard_ds, fp=fp
                )
            )
        else:
            tok_dir = recipe.model.tokenizer.path or recipe.model.path
    tok_fp = tokenizer_fingerprint(tok_dir) if tok_dir else None
    model_fp = model_source_fingerprint(recipe)

    # proxy training, one task per seed
    train_fp = train_fingerprint(recipe, input_fp, tok_fp, model_fp)
    handles = [
        steps.submit(
            train_task,
            f"train seed {s}",
            recipe_d=recipe_d,
            run_dir=run_dir,
            shards=shard_ds,
            tok_dir=tok_dir,
            seed=s,
            train_fp=train_fp,
            threads=recipe.runner.torch_threads or (os.cpu_count() or 1),
            fp=fingerprint(train_fp, s, recipe.train.checkpoint_steps()),
        )
        for s in recipe.train.seeds
    ]
    ckpts = [c for h in handles for c in steps.result(h)]

    # scoring, one task per input shard; examples already scored by the same scorers, model and tokenizer
    # (keyed by content) are read back from the cache, not scored again
    handles = []
    cache_fp = cache_fingerprint(recipe, ckpts, tok_fp)
    for s in shards:
        fp = score_fingerprint(recipe, s, ckpts, tok_fp)
        handles.append(
            steps.submit(
                score_task,
                f"score {s.name}",
                recipe_d=recipe_d,
                run_dir=run_dir,
                shard=s.to_dict(),
                ckpts=ckpts,
                tok_dir=tok_dir,
                threads=threads,
                fp=fp,
                cache_fp=cache_fp,
            )
        )
    emb_handles = []
    if recipe.scoring.embeddings is not None:
        from winnow.pipeline.embeddings import embed_fingerprint

        for s in shards:
            emb_handles.append(
                steps.submit(
                    embed_task,
                    f"embed {s.name}",
                    recipe_d=recipe_d,
                    run_dir=run_dir,
                    shard=s.to_dict(),
                    tok_dir=tok_dir,
                    threads=threads,
                    ckpts=ckpts,
                    fp=embed_fingerprint(recipe, s, ckpts),
                )
            )
    infl_handles, tgt_handles, ickpts = [], [], []
    if recipe.scoring.influence is not None:
        from winnow.pipeline.influence import features_fingerprint, influence_checkpoints, target_shards

        ickpts = influence_checkpoints(recipe, ckpts)
        for role, shs in (("target", target_shards(recipe)), ("train", shards)):
            for s in shs:
                h = steps.submit(
                    influence_features_task,
                    f"gradient features {role} {s.name}",
                    recipe_d=recipe_d,
                    run_dir=run_dir,
                    shard=s.to_dict(),
                    tok_dir=tok_dir,
                    threads=threads,
                    ickpts=ickpts,
                    role=role,
                    fp=features_fingerprint(recipe, s, ickpts, tok_fp, role),
                )
                (tgt_handles if role == "target" else infl_handles).append(h)
    parts = [steps.result(h) for h in handles]
    parts_fp = fingerprint([p["scores"] for p in parts])
    emb_fp = None
    if emb_handles:
        emb_parts = [steps.result(h) for h in emb_handles]
        emb_fp = fingerprint("merge-embeddings", [p["vectors"] for p in emb_parts])
        steps.result(
            steps.submit(
                merge_embeddings_task, "merge embeddings", run_dir=run_dir, parts=emb_parts, fp=emb_fp
            )
        )
    provenance = {
        "model_fingerprint": model_fp,
        "tokenizer_fingerprint": tok_fp,
        "train_fingerprint": train_fp,
        "checkpoints": ckpts,
        "seeds": recipe.train.seeds,
        "input_fingerprint": input_fp,
    }
    merged = steps.result(
        steps.submit(
            merge_task,
            "merge scores",
            recipe_d=recipe_d,
            run_dir=run_dir,
            parts=parts,
            provenance=provenance,
            fp=fingerprint("merge", parts_fp),
        )
    )
    if merged["duplicate_rows"]:
        logger.warning(f"{merged['duplicate_rows']} rows are exact duplicates of others and share their id")
    infl_fp = None
    if infl_handles:
        tparts = [steps.result(h) for h in tgt_handles]
        iparts = [steps.result(h) for h in infl_handles]
        infl_fp = fingerprint(
            "merge-influence",
            [p["vectors"] for p in tparts],
            [p["vectors"] for p in iparts],
            recipe.scoring.influence.neighbours,
        )
        infl = steps.result(
            steps.submit(
                merge_influence_task,
                "merge influence",
                recipe_d=recipe_d,
                run_dir=run_dir,
                parts=iparts,
                target_parts=tparts,
                ickpts=ickpts,
                fp=infl_fp,
            )
        )
        logger.info(
            f"influence: {infl['rows']} rows against {infl['target_rows']} target examples "
            f"({len(infl['subtasks'])} subtask(s)); neighbours by faiss on {infl['faiss']}"
        )

    mix_fp = None
    if recipe.mixture is not None:
        from winnow.pipeline.mixture import mixture_fingerprint

        mix_fp = mixture_fingerprint(recipe, input_fp, tok_fp)
        mix = steps.result(
            steps.submit(
                mixture_task,
                f"mixture {recipe.mixture.method}",
                recipe_d=recipe_d,
                run_dir=run_dir,
                shards=shard_ds,
                tok_dir=tok_dir,
                threads=recipe.runner.torch_threads or (os.cpu_count() or 1),
                fp=mix_fp,
            )
        )
        logger.info(
            "mixture ("
            + recipe.mixture.method
            + "): "
            + ", ".join(f"{k} {v:.3f}" for k, v in mix["weights"].items())
        )

    select_fp = fingerprint("select", parts_fp, emb_fp, infl_fp, mix_fp, recipe.select.model_dump())
    selected = steps.result(
        steps.submit(select_task, "select", recipe_d=recipe_d, run_dir=run_dir, fp=select_fp)
    )
    recipe_fp = fingerprint("recipe", recipe.model_dump(exclude={"runner"}))
    fps = {"recipe": recipe_fp, "input": input_fp, "model": model_fp}
    emit_fp = fingerprint("emit", select_fp, recipe.output.model_dump(), fps)
    emitted = steps.result(
        steps.submit(
            emit_task,
            "emit shards",
            recipe_d=recipe_d,
            run_dir=run_dir,
            shards=shard_ds,
            tok_dir=tok_dir,
            fingerprints=fps,
            fp=emit_fp,
        )
    )
    report_fp = fingerprint("report", emit_fp, winnow.__version__)
    report = steps.result(steps.submit(report_task, "report", run_dir=run_dir, fp=report_fp))
    scored = sum(p.get("scored", p["rows"]) for p in parts)
    reused = sum(p.get("reused", 0) for p in parts)
    logger.info(f"scored {scored} row(s), {reused} read back from the score cache")
    # a new version of the outputs when they changed (never cached: it compares with the versions on disk)
    version = version_task.with_options(cache_policy=NO_CACHE, persist_result=False)(
        run_dir=run_dir, emit_fp=emit_fp, input_fp=input_fp, scored=scored, reused=reused, report_fp=report_fp
    )
    steps.log.append(
        {
            "step": "version",
            "state": f"{version['name']} ({'new' if version['new'] else 'unchanged'})",
            "finished_s": round(time.time() - steps.t0, 2),
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
        "steps": steps.log,
    }
    _artifact(recipe, rd, summary)
    return summary


def _artifact(recipe: Recipe, run_dir: Path, summary: dict[str, Any]) -> None:
    import json

    man = json.loads((run_dir / "manifest.json").read_text())
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
        f"- shards: {len(man['shards'])} under `{run_dir / 'shards'}`",
        f"- scored: {summary['scored']} row(s); {summary['reused']} read back from the score cache",
        f"- report: [{summary['report']}](file://{Path(summary['report']).resolve()})",
    ]
    version = summary.get("version")
    if version:
        vreport = Path(version["path"]) / "report.html"
        state = "new" if version.get("new") else "unchanged since"
        lines.append(
            f"- version: **{version['name']}** ({state}; {version.get('entered', 0)} entered, "
            f"{version.get('left', 0)} left the selection): [{vreport}](file://{vreport.resolve()})"
        )
    lines.append("")
    if man["domains"]:
        lines += ["| domain | input | kept | proportion |", "|---|---:|---:|---:|"]
        lines += [
            f"| {k} | {v['input_rows']} | {v['kept_rows']} | {v['proportion']:.3f} |"
            for k, v in man["domains"].items()
        ]
    lines += ["", "| step | state | finished at (s after start) |", "|---|---|---:|"]
    lines += [f"| {s['step']} | {s['state']} | {s['finished_s']} |" for s in summary["steps"]]
    key = "winnow-" + "".join(c if c.isalnum() else "-" for c in recipe.name.lower())
    create_markdown_artifact("\n".join(lines), key=key[:100], description=f"winnow run {recipe.name}")
    if version:
        create_link_artifact(
            f"file://{(Path(version['path']) / 'report.html').resolve()}",
            link_text=f"{recipe.name} {version['name']} report",
            key=(key + "-report")[:100],
            description=f"selection report of {recipe.name} {version['name']}",
        )
    write_text(run_dir / "summary.md", "\n".join(lines) + "\n")
    _ = json  # keep import local


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


def _api_for_workers(recipe: Recipe) -> str | None:
    """Ray workers are other processes: without a Prefect server each would start its own temporary
    one on the same database. Start the temporary server here, once, and point the workers at it."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if url or recipe.runner.kind != "ray":
        return url or None
    if recipe.runner.ray_address:
        raise WinnowError(
            "runner.ray_address: a Ray cluster's workers need a Prefect server they can reach; "
            "start one (prefect server start) and set PREFECT_API_URL"
        )
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    return server.api_url


class _OneLineUserErrors(logging.Filter):
    """Prefect logs a failed task's traceback; for a user error the one-line message says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], WinnowError):
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
    run_dir = prepare_run_dir(recipe).absolute()
    _quiet_user_errors()
    from prefect.settings import temporary_settings

    settings = _run_settings(run_dir, _api_for_workers(recipe))
    f = run_flow.with_options(task_runner=task_runner(recipe, settings), flow_run_name=f"{recipe.name}")
    args = (recipe.model_dump(mode="json"), str(run_dir), [s.to_dict() for s in shards])
    with temporary_settings(settings):
        return f(*args)
