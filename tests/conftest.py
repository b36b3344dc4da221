"""Shared fixtures: an isolated Prefect home, one Prefect test harness per session, real text."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Every cache a test run touches lives in this process's own temporary folder: nothing is shared with
# other test processes, earlier runs or the user's home (Prefect, Hugging Face, torch.compile, matplotlib).
_HOME = tempfile.mkdtemp(prefix="winnow-prefect-")
_CACHES = tempfile.mkdtemp(prefix="winnow-caches-")
os.environ["PREFECT_HOME"] = _HOME
os.environ["HF_HOME"] = os.path.join(_CACHES, "huggingface")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(_CACHES, "torchinductor")
os.environ["MPLCONFIGDIR"] = os.path.join(_CACHES, "matplotlib")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A small multi-domain corpus of real text from this machine: stdlib code and pydoc prose."""
    from winnow.pipeline.demo import build_demo_corpus

    out = tmp_path_factory.mktemp("corpus") / "data"
    build_demo_corpus(out, per_domain=60, rows_per_file=40, domains=["code", "prose", "licenses"])
    return out


def tiny_recipe(corpus: Path, run_dir: Path, **over) -> dict:
    """A recipe small enough to train, score and emit in seconds on two CPU cores."""
    r = {
        "name": "t",
        "data": {
            "source": f"{corpus}/*.jsonl",
            "id_column": "id",
            "text_column": "text",
            "domain_column": "domain",
        },
        "model": {
            "task": "causal_lm",
            "config": {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 64},
            "tokenizer": {"train": {"vocab_size": 400}},
            "max_length": 48,
        },
        "train": {
            "steps": 16,
            "batch_size": 8,
            "lr": 2e-3,
            "warmup_steps": 2,
            "seeds": [0, 1],
            "checkpoints": [8, 16],
        },
        "scoring": {"scorers": [{"name": "el2n"}], "batch_size": 16},
        "select": {
            "score": "el2n",
            "fraction": 0.5,
            "keep": "highest",
            "stratify": "domain",
            "weights": {"method": "softmax", "temperature": 2.0},
        },
        "output": {"dir": str(run_dir), "shard_max_rows": 30},
        "runner": {"kind": "thread", "max_workers": 2},
    }
    for dotted, value in over.items():
        node = r
        keys = dotted.split("__")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return r


def write_recipe(path: Path, recipe: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def corpus_rows(corpus: Path) -> list[dict]:
    """Every row of the corpus, in file order."""
    import json

    return [json.loads(line) for f in sorted(corpus.glob("*.jsonl")) for line in open(f)]


def write_rows(path: Path, rows: list[dict]) -> None:
    """Rows as a jsonl file, replaced atomically (a run never reads a half-written file)."""
    import json

    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, corpus) -> Path:
    """A GPT-2 saved with its tokenizer (trained on the corpus): a fixed scoring model (``train.steps: 0``
    scores it as loaded, so new rows leave the model's fingerprint, and the cached scores, as they were)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from winnow.pipeline.models import train_tokenizer
    from winnow.pipeline.recipe import recipe_from_dict

    folder = tmp_path_factory.mktemp("model") / "gpt2"
    base = recipe_from_dict(tiny_recipe(corpus, folder.parent / "x"))
    train_tokenizer((r["text"] for r in corpus_rows(corpus)), base, folder)
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=1, n_head=2, n_embd=32, n_positions=64))
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder
