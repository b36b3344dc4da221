"""Before a run starts: the checks that need no model or flow, and the run folder opened for it.

``preflight`` reads the first rows of the source (and of an influence target) to check the columns, checks a
model folder's weights and the classes; ``prepare_run_dir`` refuses a folder that holds another run,
removes leftovers of crashed writes and records the run's identity and recipe. Failing here costs seconds,
not a training run, and leaves nothing behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import winnow
from winnow.errors import WinnowError
from winnow.pipeline.atomic import clean_temporaries, write_json, write_text
from winnow.pipeline.layout import RunLayout
from winnow.pipeline.recipe import Recipe, dump_recipe
from winnow.pipeline.sources import InputShard, check_columns, iter_raw_batches, list_shards


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


def _identity(recipe: Recipe) -> dict[str, object]:
    return {"name": recipe.name, "source": recipe.data.source, "task": recipe.model.task}


def check_run_dir(recipe: Recipe) -> Path:
    """The run folder, checked without writing anything: new, empty, or holding this recipe's run."""
    run_dir = recipe.run_dir()
    ident = _identity(recipe)
    layout = RunLayout(run_dir)
    marker = layout.run_json
    if run_dir.exists() and not run_dir.is_dir():
        raise WinnowError(f"output.dir: {run_dir} is a file, not a folder; choose another output.dir")
    if run_dir.exists() and any(p.name != ".winnow" for p in run_dir.iterdir()):
        if not marker.exists():
            raise WinnowError(
                f"output.dir: {run_dir} is not empty and holds no winnow run (no run.json); "
                f"choose another output.dir"
            )
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
    return run_dir


def prepare_run_dir(recipe: Recipe) -> Path:
    """Create or reopen the run folder (under its lock: ``run_lock.RunLock``); refuse one that holds a
    different run; remove leftovers of crashed writes; record the run's identity and recipe."""
    run_dir = check_run_dir(recipe)
    layout = RunLayout(run_dir)
    marker = layout.run_json
    ident = _identity(recipe)
    run_dir.mkdir(parents=True, exist_ok=True)
    clean_temporaries(run_dir)
    write_json(marker, dict(ident, winnow_version=winnow.__version__))
    write_text(layout.config, dump_recipe(recipe))
    return run_dir
