"""Scheduled rescoring: a recipe served as a Prefect deployment on a real Prefect server.

``winnow serve RECIPE --interval 3600`` (or ``--cron "0 3 * * *"``) registers the deployment
``winnow-rescore/<name>`` with the server at ``PREFECT_API_URL`` and runs its scheduled flow runs in this
process's runner, one at a time (``limit=1``: two runs never write the same run folder at once). Each run
reads the recipe file and the source again, so rows appended to the source are picked up; the scorers'
content-keyed cache (``winnow.pipeline.scoring``) scores only examples that are new or changed, or all of
them when the scorer, model or tokenizer changed; selection, shards and report are made again and, when
they changed, frozen as the next version ``RUN/v000N/`` (``winnow.pipeline.versions``).

Without a server the command stops before registering anything and says what to start.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow

from winnow.errors import WinnowError

SERVER_HINT = (
    "start one with `make server` (runs `prefect server start --host 127.0.0.1 --port 4200` with its "
    "database in ./.prefect, which survives restarts) and `export PREFECT_API_URL="
    "http://127.0.0.1:4200/api`"
)


@flow(name="winnow-rescore", log_prints=True, validate_parameters=False)
def rescore_flow(
    recipe_path: str, overrides: list[str] | None = None, workdir: str | None = None
) -> dict[str, Any]:
    """One scheduled run: load the recipe again (it may have changed), run it, return its summary."""
    from winnow.flows.run import run_recipe
    from winnow.pipeline.recipe import load_recipe

    if workdir:  # relative paths in the recipe mean what they meant where `winnow serve` was started
        os.chdir(workdir)
    recipe = load_recipe(recipe_path, overrides or [])
    s = run_recipe(recipe)
    v = s.get("version") or {}
    print(
        f"winnow {recipe.name}: {s['rows']} rows, {s['kept']} kept, {s['scored']} scored, {s['reused']} from the "
        f"score cache; version {v.get('name')} ({'new' if v.get('new') else 'unchanged'})"
    )
    return {
        "run_dir": s["run_dir"],
        "rows": s["rows"],
        "kept": s["kept"],
        "scored": s["scored"],
        "reused": s["reused"],
        "version": v.get("name"),
        "new_version": bool(v.get("new")),
    }


def check_server() -> str:
    """The API URL of a reachable Prefect server, or a WinnowError saying what to start."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise WinnowError(
            "winnow serve schedules runs on a Prefect server, and PREFECT_API_URL is not set: " + SERVER_HINT
        )
    try:
        r = httpx.get(url.rstrip("/") + "/health", timeout=10)
        r.raise_for_status()
    except Exception as e:
        raise WinnowError(
            f"no Prefect server answers at PREFECT_API_URL={url} ({type(e).__name__}): " + SERVER_HINT
        ) from None
    return url


def serve_recipe(
    recipe_path: Path, overrides: list[str], cron: str | None, interval: float | None, name: str | None = None
) -> None:
    """Validate, check the server, then serve the recipe's rescoring deployment until interrupted."""
    from winnow.pipeline.recipe import load_recipe

    if (cron is None) == (interval is None):
        raise WinnowError(
            'winnow serve: give exactly one of --cron "MIN HOUR DOM MON DOW" or --interval SECONDS'
        )
    if interval is not None and interval <= 0:
        raise WinnowError(f"--interval: expected a positive number of seconds, got {interval}")
    if cron is not None:
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=cron)
        except Exception as e:
            msg = str(e).splitlines()
            raise WinnowError(
                f"--cron: {cron!r} is not a valid cron expression ({msg[-1] if msg else e})"
            ) from None
    recipe = load_recipe(recipe_path, overrides)  # a broken recipe fails now, not at 3 a.m.
    url = check_server()
    deployment = name or recipe.name
    print(
        f"serving {recipe_path} as deployment 'winnow-rescore/{deployment}' on {url} "
        f"({'cron ' + repr(cron) if cron else f'every {interval:g} s'}); runs write {recipe.run_dir()}/v000N; "
        f"Ctrl-C stops serving (the server keeps the deployment and its history)",
        flush=True,
    )
    rescore_flow.serve(
        name=deployment,
        cron=cron,
        interval=interval,
        parameters={
            "recipe_path": str(Path(recipe_path).absolute()),
            "overrides": list(overrides),
            "workdir": str(Path.cwd()),
        },
        limit=1,
        tags=["winnow"],
        description=f"winnow: rescore {recipe.name} on a schedule",
        print_starting_message=False,
    )


__all__ = ["check_server", "rescore_flow", "serve_recipe"]
