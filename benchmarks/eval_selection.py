"""Do the selections hold on data nobody tuned them to? A varied evaluation through the CLI's recipes.

Five corpus compositions built from this machine's real text (manual pages in several languages, Python
library and test sources, pydoc prose, licences, Debian changelogs), each with one kind of noise domain
(random hex, random words, shuffled characters) and a held-out slice of one domain as a target; every
(composition, seed) case runs the product's recipes with the example configs' settings and measures:

- ``doremi``: the noise domain's weight / uniform (target: < 0.25 in >= 90% of cases);
- ``doge`` / ``dga`` (the held-out slice as ``mixture.target_domains``): the weight of the domain the
  target came from / uniform and its rank (DoGE's target: >= 1.5 and first in >= 90% of cases);
- ``influence`` (the held-out slice as ``scoring.influence.target``): precision of the top 5% for the
  target's domain, and the random baseline (target: >= 0.8 and >= 3x random in >= 90% of cases);
- ``el2n`` (sequence classification of the domain, 10% of labels flipped): the AUROC of EL2N and GraNd
  for the flipped rows.

    .venv/bin/python benchmarks/eval_selection.py --out /tmp/eval [--methods doremi,doge] [--seeds 0 1]
    .venv/bin/python benchmarks/eval_selection.py --smoke --out /tmp/eval-smoke

Writes ``eval_selection.json`` (every case) and prints a table of the distributions. CPU only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MAN_SECTIONS = ("man1", "man5", "man8")


def _sources() -> dict[str, Any]:
    from winnow.pipeline import demo

    def man(lang: str):
        return lambda n: demo.man_rows(lang, n, MAN_SECTIONS)

    return {
        "man-en": man("en"),
        "man-de": man("de"),
        "man-fr": man("fr"),
        "man-nl": man("nl"),
        "man-sv": man("sv"),
        "man-it": man("it"),
        "man-pl": man("pl"),
        "code": demo.code_rows,
        "tests": demo.test_code_rows,
        "prose": demo.prose_rows,
        "licenses": demo.license_rows,
        "changelogs": demo.changelog_rows,
    }


# domains, noise kind, the domain a target slice is held out of, rows per domain
COMPOSITIONS: dict[str, dict[str, Any]] = {
    "mixed8": {
        "domains": ["man-de", "man-fr", "man-en", "code", "licenses", "changelogs", "prose"],
        "noise": "hex",
        "target": "man-fr",
        "rows": 200,
    },
    "langs6": {
        "domains": ["man-en", "man-de", "man-fr", "man-nl", "man-sv"],
        "noise": "words",
        "target": "man-de",
        "rows": 180,
    },
    "code4": {
        "domains": ["code", "tests", "prose", "changelogs"],
        "noise": "shuffled",
        "target": "tests",
        "rows": 200,
    },
    "small3": {"domains": ["prose", "code", "man-en"], "noise": "hex", "target": "prose", "rows": 120},
    "wide10": {
        "domains": [
            "man-en",
            "man-de",
            "man-fr",
            "man-nl",
            "man-it",
            "man-pl",
            "code",
            "licenses",
            "changelogs",
        ],
        "noise": "shuffled",
        "target": "changelogs",
        "rows": 120,
    },
}
HELD = 40  # rows of the target domain held out


def build(comp: dict[str, Any], seed: int, root: Path, rows: int | None = None) -> dict[str, Any]:
    """Write data/<domain>.jsonl (every training domain, the noise domain), target/target.jsonl (the
    held-out slice) and held/<target>-held.jsonl (the same slice as a domain, for DoGE / DGA)."""
    from winnow.pipeline.demo import noise_rows

    rng = np.random.default_rng(seed)
    n = rows or comp["rows"]
    srcs = _sources()
    data, target, held = root / "data", root / "target", root / "held"
    for d in (data, target, held):
        d.mkdir(parents=True, exist_ok=True)
    words: list[str] = []
    counts = {}
    for dom in comp["domains"]:
        extra = HELD if dom == comp["target"] else 0
        rows_ = [
            {"id": f"{dom}-{i:05d}", "text": t, "domain": dom}
            for i, (t, _) in enumerate(srcs[dom](n + extra))
        ]
        order = rng.permutation(len(rows_))
        rows_ = [rows_[i] for i in order]
        for r in rows_[:50]:
            words.extend(r["text"].split()[:50])
        if extra:
            slice_, rows_ = rows_[:extra], rows_[extra:]
            (target / "target.jsonl").write_text("".join(json.dumps(r) + "\n" for r in slice_))
            (held / f"{dom}-held.jsonl").write_text(
                "".join(json.dumps(dict(r, domain=f"{dom}-held", id=r["id"] + "-h")) + "\n" for r in slice_)
            )
        (data / f"{dom}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_))
        counts[dom] = len(rows_)
    noise = [
        {"id": f"noise-{i:05d}", "text": t, "domain": "noise"}
        for i, (t, _) in enumerate(noise_rows(comp["noise"], n, seed=seed, words=words))
    ]
    (data / "noise.jsonl").write_text("".join(json.dumps(r) + "\n" for r in noise))
    counts["noise"] = len(noise)
    return counts


def _run(recipe: dict[str, Any], path: Path) -> None:
    import yaml

    from winnow.cli import main

    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    code = main(["run", str(path)])
    if code != 0:
        raise RuntimeError(f"winnow run {path} exited {code}")


def _lm(root: Path, name: str, source: str, smoke: bool) -> dict[str, Any]:
    """The language-model recipe of configs/mixture-doremi.yaml and configs/influence.yaml."""
    return {
        "name": name,
        "data": {"source": source, "id_column": "id", "text_column": "text", "domain_column": "domain"},
        "model": {
            "task": "causal_lm",
            "config": {
                "model_type": "gpt2",
                "n_layer": 1 if smoke else 2,
                "n_head": 4,
                "n_embd": 32 if smoke else 64,
                "n_positions": 128,
            },
            "tokenizer": {"train": {"vocab_size": 512 if smoke else 4096}},
            "max_length": 128,
        },
        "train": {"steps": 2 if smoke else 20, "seeds": [0], "checkpoints": [2 if smoke else 20]},
        "scoring": {"scorers": ["el2n"]},
        "select": {"method": "all"},
        "output": {"dir": str(root / "runs" / name)},
    }


def _example_mixture() -> dict[str, Any]:
    import yaml

    path = Path(__file__).resolve().parents[1] / "configs" / "mixture-doremi.yaml"
    return dict(yaml.safe_load(path.read_text())["mixture"])


def mixture_case(method: str, root: Path, comp: dict[str, Any], seed: int, smoke: bool) -> dict[str, Any]:
    tgt = comp["target"]
    sources = f"{root}/data/*.jsonl" + (f",{root}/held/*.jsonl" if method in ("doge", "dga") else "")
    r = _lm(root, f"{method}-{seed}", sources, smoke)
    mix: dict[str, Any] = {"method": method, "seed": seed}
    # configs/mixture-doremi.yaml's proxy settings (steps, batch, lr; everything else the defaults)
    example = _example_mixture()
    mix.update({k: example[k] for k in ("steps", "batch_size", "lr") if k in example})
    if method != "doremi":
        mix["steps"] = 200  # doge / dga: the 200 steps their tests and README measure
    if smoke:
        mix["steps"] = 4
    if method != "doremi":
        mix["target_domains"] = [f"{tgt}-held"]
    r["mixture"] = mix
    _run(r, root / f"{method}-{seed}.yaml")
    res = json.loads((root / "runs" / r["name"] / "mixture.json").read_text())
    w = res["weights"]
    k = len(w)
    traj = __import__("polars").read_parquet(root / "runs" / r["name"] / "mixture_trajectory.parquet")
    doms = [c for c in traj.columns if c not in ("step", "entropy")]
    steps = traj.filter(traj["step"] > 0).select(doms).to_numpy()
    one_hot = float((steps.max(axis=1) > 0.5).mean()) if len(steps) else 0.0
    out = {
        "weights": w,
        "k": k,
        "one_hot_steps": one_hot,
        "mean_entropy": float(traj.filter(traj["step"] > 0)["entropy"].mean() or 0),
    }
    if method == "doremi":
        out["noise_ratio"] = w["noise"] * k
        out["pass"] = out["noise_ratio"] < 0.25
    else:
        rank = sorted(w, key=w.get, reverse=True).index(tgt) + 1
        out.update(target_ratio=w[tgt] * k, target_rank=rank)
        out["pass"] = out["target_ratio"] >= 1.5 and rank == 1
    return out


def influence_case(root: Path, comp: dict[str, Any], seed: int, smoke: bool) -> dict[str, Any]:
    import polars as pl

    r = _lm(root, f"influence-{seed}", f"{root}/data/*.jsonl", smoke)
    # configs/influence.yaml's settings
    r["model"]["config"].update(n_embd=32 if smoke else 128)
    r["train"] = {
        "steps": 4 if smoke else 120,
        "batch_size": 16,
        "lr": 1e-3,
        "warmup_steps": 10,
        "seeds": [seed],
        "checkpoints": [2, 4] if smoke else [40, 80, 120],
    }
    r["scoring"] = {
        "scorers": ["el2n"],
        "batch_size": 32,
        "influence": {
            "target": f"{root}/target/*.jsonl",
            "proj_dim": 256 if smoke else 8192,
            "neighbours": 10,
            "batch_size": 16,
        },
    }
    r["select"] = {"method": "score", "score": "influence", "fraction": 0.05, "keep": "highest"}
    _run(r, root / f"influence-{seed}.yaml")
    run = root / "runs" / r["name"]
    df = pl.read_parquet(run / "scores" / "rows.parquet").join(
        pl.read_parquet(run / "scores" / "influence.parquet"), on="id"
    )
    n = max(1, round(0.05 * df.height))
    top = df.sort("influence", descending=True).head(n)
    prec = float((top["domain"] == comp["target"]).mean())
    base = float((df["domain"] == comp["target"]).mean())
    return {"precision": prec, "random": base, "pass": prec >= 0.8 and prec >= 3 * base}


def _auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    npos, nneg = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - npos * (npos + 1) / 2) / max(1, npos * nneg))


def el2n_case(root: Path, comp: dict[str, Any], seed: int, smoke: bool) -> dict[str, Any]:
    import polars as pl

    rng = np.random.default_rng(seed + 100)
    doms = comp["domains"] + ["noise"]
    cls = root / "cls"
    cls.mkdir(exist_ok=True)
    rows = [json.loads(line) for f in sorted((root / "data").glob("*.jsonl")) for line in open(f)]
    flipped = rng.random(len(rows)) < 0.1
    for r, f in zip(rows, flipped, strict=True):
        r["label"] = r["domain"] if not f else rng.choice([d for d in doms if d != r["domain"]])
        r["flipped"] = bool(f)
    (cls / "cls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # configs/text-classification.yaml's settings
    r = {
        "name": f"el2n-{seed}",
        "data": {
            "source": str(cls / "cls.jsonl"),
            "id_column": "id",
            "text_column": "text",
            "label_column": "label",
            "label_names": doms,
            "domain_column": "domain",
        },
        "model": {
            "task": "sequence_classification",
            "config": {
                "model_type": "bert",
                "num_hidden_layers": 1 if smoke else 2,
                "hidden_size": 32 if smoke else 64,
                "num_attention_heads": 4,
                "intermediate_size": 64 if smoke else 128,
                "max_position_embeddings": 128,
            },
            "tokenizer": {"train": {"vocab_size": 512 if smoke else 4096}},
            "max_length": 128,
        },
        "train": {
            "steps": 4 if smoke else 80,
            "batch_size": 16,
            "lr": 1e-3,
            "seeds": [seed, seed + 1],
            "checkpoints": [2, 4] if smoke else [40, 80],
        },
        "scoring": {"scorers": ["el2n", "grand"]},
        "select": {"score": "el2n", "fraction": 0.7, "keep": "lowest"},
        "output": {"dir": str(root / "runs" / f"el2n-{seed}")},
    }
    _run(r, root / f"el2n-{seed}.yaml")
    run = root / "runs" / f"el2n-{seed}"
    df = pl.DataFrame({"id": [r_["id"] for r_ in rows], "flipped": flipped})
    for s in ("el2n", "grand"):
        df = df.join(pl.read_parquet(run / "scores" / f"{s}.parquet").select("id", s), on="id")
    pos = df["flipped"].to_numpy()
    return {s: _auroc(df[s].fill_nan(0).to_numpy(), pos) for s in ("el2n", "grand")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--smoke", action="store_true", help="one tiny case (checks the script; numbers mean nothing)"
    )
    ap.add_argument("--compositions", default=",".join(COMPOSITIONS))
    ap.add_argument("--methods", default="doremi,doge,dga,influence,el2n")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    a = ap.parse_args()
    out = Path(a.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="winnow-eval-"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # as the CLI: a busy box
    comps = a.compositions.split(",")
    methods = a.methods.split(",")
    if a.smoke:
        comps, a.seeds = ["small3"], [0]
    from winnow.flows.run import temporary_prefect_server

    results: list[dict[str, Any]] = []
    given = os.environ.get("PREFECT_API_URL")  # a server of the caller's (benchmarks/smoke.py's)
    with contextlib.nullcontext(given) if given else temporary_prefect_server() as api:
        os.environ["PREFECT_API_URL"] = api
        for name in comps:
            comp = COMPOSITIONS[name]
            for seed in a.seeds:
                root = out / f"{name}-s{seed}"
                counts = build(comp, seed, root, rows=40 if a.smoke else None)
                for m in methods:
                    t = time.time()
                    if m in ("doremi", "doge", "dga"):
                        res = mixture_case(m, root, comp, seed, a.smoke)
                    elif m == "influence":
                        res = influence_case(root, comp, seed, a.smoke)
                    else:
                        res = el2n_case(root, comp, seed, a.smoke)
                    res.update(
                        composition=name, seed=seed, method=m, seconds=round(time.time() - t, 1), rows=counts
                    )
                    results.append(res)
                    print(
                        json.dumps({k: v for k, v in res.items() if k not in ("weights", "rows")}), flush=True
                    )
                    (out / "eval_selection.json").write_text(json.dumps(results, indent=1))
    print(summary(results))


def summary(results: list[dict[str, Any]]) -> str:
    lines = [
        "| method | metric | cases | min | median | max | pass |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m, metric in (
        ("doremi", "noise_ratio"),
        ("doge", "target_ratio"),
        ("dga", "target_ratio"),
        ("influence", "precision"),
        ("el2n", "el2n"),
        ("el2n", "grand"),
    ):
        vals = [r[metric] for r in results if r["method"] == m and metric in r]
        if not vals:
            continue
        passes = [r["pass"] for r in results if r["method"] == m and "pass" in r]
        rate = f"{sum(passes)}/{len(passes)}" if passes else "-"
        lines.append(
            f"| {m} | {metric} | {len(vals)} | {min(vals):.3f} | {float(np.median(vals)):.3f} | "
            f"{max(vals):.3f} | {rate} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
