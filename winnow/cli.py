"""The `winnow` command line.

    winnow run RECIPE [--set key=value ...]   score, select and emit shards, manifest and report
    winnow validate RECIPE [--set ...]        check a recipe and print it with defaults filled in
    winnow report RUN                         (re)write RUN/report.html
    winnow inspect RUN                        print a run's summary in the terminal
    winnow demo-data OUT                      write the built-in demo corpus (jsonl) to OUT
    winnow serve RECIPE --interval S | --cron C   rescore on a schedule (a Prefect deployment; needs a server)
    winnow runs NAME|RUN                      list a run's versions (v0001, ...) with counts and times

Errors in the user's input print one line naming the file, column or key, and exit with 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import winnow
from winnow.errors import WinnowError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="winnow", description="Data selection and reweighting for training data."
    )
    p.add_argument("--version", action="version", version=f"winnow {winnow.__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run a recipe: train proxies, score, select, emit shards and report")
    r.add_argument("recipe", type=Path)
    r.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set select.fraction=0.5 (repeatable)",
    )

    v = sub.add_parser("validate", help="validate a recipe and print it with defaults filled in")
    v.add_argument("recipe", type=Path)
    v.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    rep = sub.add_parser("report", help="write RUN/report.html")
    rep.add_argument("run", type=Path)

    ins = sub.add_parser("inspect", help="print a run's summary")
    ins.add_argument("run", type=Path)

    sv = sub.add_parser(
        "serve",
        help="serve RECIPE as a scheduled Prefect deployment (rescoring; needs a "
        "Prefect server at PREFECT_API_URL: make server)",
    )
    sv.add_argument("recipe", type=Path)
    sv.add_argument("--cron", default=None, help='a cron schedule, e.g. "0 3 * * *" (03:00 every day, UTC)')
    sv.add_argument("--interval", type=float, default=None, help="run every this many seconds")
    sv.add_argument("--name", default=None, help="deployment name (default: the recipe's name)")
    sv.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    rn = sub.add_parser("runs", help="list a run's versions with their counts and times")
    rn.add_argument("run", help="a run folder, or a run name (looked up as runs/NAME)")

    d = sub.add_parser("demo-data", help="write the built-in multi-domain demo corpus as jsonl")
    d.add_argument("out", type=Path)
    d.add_argument("--per-domain", type=int, default=500, help="rows per domain (default 500)")
    d.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    d.add_argument(
        "--kind",
        choices=["text", "digits"],
        default="text",
        help="text: the multi-domain corpus; digits: scikit-learn's digits with 10%% labels flipped",
    )
    d.add_argument(
        "--hold-out",
        metavar="DOMAIN:N",
        default=None,
        help="text: move the last N rows of DOMAIN to OUT-target/target.jsonl (an influence target)",
    )
    return p


def _run(args: argparse.Namespace) -> int:
    from winnow.pipeline.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rich.console import Console

    from winnow.flows.run import run_recipe

    summary = run_recipe(recipe)
    con = Console(stderr=False)
    con.print(
        f"winnow run {recipe.name}: {summary['rows']} rows, {summary['kept']} kept, "
        f"{summary['shards']} shard(s) in {summary['run_dir']}",
        markup=False,
        highlight=False,
    )
    con.print(f"  {'step':<28} {'state':<24} {'done at':>8}", markup=False, highlight=False)
    for s in summary["steps"]:
        con.print(
            f"  {s['step']:<28} {s['state']:<24} {s['finished_s']:>7.1f}s", markup=False, highlight=False
        )
    con.print(f"report: {summary['report']}", markup=False, highlight=False)
    for w in summary.get("warnings", []):
        con.print(f"warning: {w}", markup=False, highlight=False)
    return 0


def _runs(target: str) -> int:
    from rich.console import Console
    from rich.table import Table

    from winnow.pipeline.versions import list_versions

    run_dir = Path(target)
    if not run_dir.is_dir():
        run_dir = Path("runs") / target
    if not run_dir.is_dir():
        raise WinnowError(f"{target}: no run folder (looked for {target} and runs/{target})")
    versions = list_versions(run_dir)
    con = Console()
    if not versions:
        con.print(f"{run_dir}: no versions yet (a run writes v0001 when it completes)", markup=False)
        return 0
    con.print(f"{run_dir}: {len(versions)} version(s)", markup=False, highlight=False, soft_wrap=True)
    t = Table()
    for col in (
        "version",
        "created (UTC)",
        "rows",
        "kept",
        "pruned",
        "scored",
        "from cache",
        "new rows",
        "entered",
        "left",
    ):
        t.add_column(col, justify="left" if col in ("version", "created (UTC)") else "right")
    for v in versions:
        t.add_row(
            v["name"],
            v["created_at"].replace("T", " ").rstrip("Z"),
            *(
                str(v.get(k, ""))
                for k in (
                    "rows",
                    "kept",
                    "pruned",
                    "scored_rows",
                    "reused_rows",
                    "new_rows",
                    "entered",
                    "left",
                )
            ),
        )
    con.print(t)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Prefect's temporary server can take longer than its 20 s default to start on a small, busy machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    try:
        if args.cmd == "run":
            return _run(args)
        if args.cmd == "validate":
            from winnow.pipeline.recipe import dump_recipe, load_recipe

            print(dump_recipe(load_recipe(args.recipe, args.overrides)), end="")
            return 0
        if args.cmd == "report":
            from winnow.report import write_report

            print(write_report(args.run))
            return 0
        if args.cmd == "inspect":
            from winnow.report import print_summary

            print_summary(args.run)
            return 0
        if args.cmd == "serve":
            from winnow.flows.serve import serve_recipe

            serve_recipe(args.recipe, args.overrides, args.cron, args.interval, args.name)
            return 0
        if args.cmd == "runs":
            return _runs(args.run)
        if args.cmd == "demo-data":
            from winnow.pipeline.demo import build_demo_corpus

            if args.out.exists() and any(args.out.iterdir()) and not args.force:
                print(f"{args.out} exists; keeping it (use --force to rebuild)")
                return 0
            if args.kind == "digits":
                from winnow.pipeline.demo import build_digits

                n, flipped = build_digits(args.out)
                print(f"wrote {n} digits to {args.out} ({flipped} labels flipped; see flipped.json)")
                return 0
            hold = None
            if args.hold_out is not None:
                dom, _, num = args.hold_out.partition(":")
                if not dom or not num.isdigit() or int(num) < 1:
                    raise WinnowError(f"--hold-out: expected DOMAIN:N with N >= 1, got {args.hold_out!r}")
                hold = (dom, int(num))
            counts = build_demo_corpus(
                args.out,
                per_domain=args.per_domain,
                hold_out=hold,
                hold_out_dir=f"{args.out}-target" if hold else None,
            )
            kept = {k: v for k, v in counts.items() if not k.endswith("(held out)")}
            print(
                f"wrote {sum(kept.values())} rows to {args.out}: "
                + ", ".join(f"{k} {v}" for k, v in kept.items())
            )
            if hold:
                print(
                    f"wrote {counts[f'{hold[0]} (held out)']} held-out {hold[0]} rows to "
                    f"{args.out}-target/target.jsonl"
                )
            return 0
    except WinnowError as e:
        print(f"winnow: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # the user's storage: not a folder, no permission, read-only, disk full
        from winnow.errors import os_error_line

        print(f"winnow: error: {os_error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("winnow: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
