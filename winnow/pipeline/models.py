"""Models and tokenizers, offline.

Models are transformers Auto classes, either loaded from a local folder (safetensors preferred,
`trust_remote_code` only when the recipe says so) or built from a config with a random init under
a seed. Tokenizers come from the model folder, a tokenizer folder, or are trained on the data with
`tokenizers` (byte-level BPE) when the recipe asks.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from winnow.errors import WinnowError
from winnow.pipeline.atomic import atomic_path, fingerprint, sha256_file
from winnow.pipeline.recipe import Recipe
from winnow.pipeline.steps import RunContext, Step, register_step

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
EOS, PAD, CLS = "<|endoftext|>", "<pad>", "<cls>"
# transformers builds models under context managers that patch torch globally (meta-device init);
# two threads building at once corrupt each other's models, so construction is serialised.
_BUILD_LOCK = threading.RLock()


def _quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers.utils import logging as tf_logging

    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()


def warm_imports() -> None:
    """Resolve, in the calling thread, the transformers names that tasks use. transformers' lazy module is
    not safe for two threads resolving names at once: two scoring tasks of the thread runner starting
    together got ``ImportError: cannot import name 'AutoTokenizer' from 'transformers'`` (seen 2026-12-01;
    Prefect's retry hid it). The flow calls this before it submits any task."""
    import transformers as tf

    for name in (
        "AutoConfig",
        "AutoModel",
        "AutoTokenizer",
        "PreTrainedTokenizerFast",
        "AutoModelForCausalLM",
        "AutoModelForSequenceClassification",
        "AutoModelForImageClassification",
    ):
        getattr(tf, name)


def auto_class(task: str):
    import transformers as tf

    return {
        "causal_lm": tf.AutoModelForCausalLM,
        "sequence_classification": tf.AutoModelForSequenceClassification,
        "image_classification": tf.AutoModelForImageClassification,
    }[task]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise WinnowError("device is 'cuda' but torch sees no GPU; set it to auto or cpu")
    return torch.device(name)


# -- tokenizers ----------------------------------------------------------------------------------
def train_tokenizer(texts: Iterable[str], recipe: Recipe, out_dir: Path) -> Path:
    """Byte-level BPE trained on the data; saved as a transformers fast tokenizer (atomically)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    _quiet_transformers()
    cfg = recipe.model.tokenizer.train
    assert cfg is not None
    specials = [EOS, PAD] + ([CLS] if recipe.model.task == "sequence_classification" else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    kwargs: dict[str, Any] = {"eos_token": EOS, "pad_token": PAD}
    if recipe.model.task == "sequence_classification":
        tok.post_processor = processors.TemplateProcessing(
            single=f"{CLS} $A", special_tokens=[(CLS, tok.token_to_id(CLS))]
        )
        kwargs["cls_token"] = CLS
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    fast.model_max_length = recipe.model.max_length
    with atomic_path(out_dir) as tmp:
        fast.save_pretrained(str(tmp))
    return out_dir


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    _quiet_transformers()
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as e:
        raise WinnowError(
            f"{path}: no usable tokenizer ({str(e).splitlines()[0][:200]}); "
            f"set model.tokenizer.path or model.tokenizer.train"
        ) from None
    if tok.pad_token is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        else:
            tok.add_special_tokens({"pad_token": PAD})
    return tok


def tokenizer_fingerprint(path: str | Path) -> str:
    p = Path(path)
    files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else []
    return fingerprint("tokenizer", [(f.name, sha256_file(f)) for f in files])


# -- models --------------------------------------------------------------------------------------
def check_model_folder(path: str | Path) -> None:
    p = Path(path)
    if not p.is_dir():
        raise WinnowError(f"model.path: {p} is not a folder")
    if not (p / "config.json").exists():
        raise WinnowError(f"model.path: {p} has no config.json")
    if not any((p / w).exists() for w in WEIGHT_FILES):
        raise WinnowError(f"model.path: {p} has no weights (expected one of {', '.join(WEIGHT_FILES)})")


def model_source_fingerprint(recipe: Recipe) -> str:
    m = recipe.model
    if m.path is not None:
        p = Path(m.path)
        files = sorted(
            f
            for f in p.iterdir()
            if f.is_file() and (f.name in WEIGHT_FILES or f.suffix in (".json", ".safetensors", ".bin"))
        )
        return fingerprint("model-folder", [(f.name, f.stat().st_size, sha256_file(f)) for f in files])
    return fingerprint("model-config", m.config)


def class_names(recipe: Recipe) -> tuple[list[str] | None, int | None]:
    """Label names and number of classes for classification tasks (None for causal LM)."""
    m, d = recipe.model, recipe.data
    if m.task == "causal_lm":
        return None, None
    names = d.label_names
    n = m.num_labels
    if m.path is not None:
        cfg = json.loads((Path(m.path) / "config.json").read_text())
        id2label = cfg.get("id2label")
        if id2label:
            folder_names = [id2label[str(i)] for i in range(len(id2label))]
            if n is None:
                n = len(folder_names)
            if names is None and not all(x == f"LABEL_{i}" for i, x in enumerate(folder_names)):
                names = folder_names
    if n is None and names is not None:
        n = len(names)
    if n is None and m.config is not None and "num_labels" in m.config:
        n = int(m.config["num_labels"])
    if n is None:
        raise WinnowError(
            f"model.num_labels: unknown number of classes for {m.task}; "
            f"set model.num_labels or data.label_names"
        )
    if names is not None and len(names) != n:
        raise WinnowError(f"data.label_names has {len(names)} names but the model has {n} classes")
    return names, n


def init_model(recipe: Recipe, seed: int, tokenizer: Any | None, num_labels: int | None):
    """The model a proxy run starts from: loaded from model.path, or a seeded random init."""
    from transformers import AutoConfig

    _quiet_transformers()
    m = recipe.model
    cls = auto_class(m.task)
    if m.path is not None:
        check_model_folder(m.path)
        kw: dict[str, Any] = {"trust_remote_code": m.trust_remote_code}
        if num_labels is not None:
            kw["num_labels"] = num_labels
        try:
            with _BUILD_LOCK:
                model = cls.from_pretrained(m.path, **kw)
        except Exception as e:
            raise WinnowError(
                f"model.path: cannot load {m.path} as {m.task}: {str(e).splitlines()[0][:300]}"
            ) from None
    else:
        conf = dict(m.config or {})
        mtype = conf.pop("model_type")
        if tokenizer is not None:
            # a random init takes its vocabulary and special ids from the tokenizer it is trained with
            conf["vocab_size"] = len(tokenizer)
            eos = tokenizer.eos_token_id
            ids = {
                "pad_token_id": tokenizer.pad_token_id,
                "eos_token_id": eos,
                "bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos,
            }
            for key, tid in ids.items():
                if key not in (m.config or {}):
                    conf[key] = tid
        if num_labels is not None:
            conf["num_labels"] = num_labels
        try:
            config = AutoConfig.for_model(mtype, **conf)
        except Exception as e:
            raise WinnowError(f"model.config: {str(e).splitlines()[0][:300]}") from None
        try:
            with _BUILD_LOCK:
                torch.manual_seed(seed)
                model = cls.from_config(config)
        except Exception as e:
            raise WinnowError(
                f"model.config: cannot build a {m.task} model of type {mtype!r}: "
                f"{str(e).splitlines()[0][:300]}"
            ) from None
    if tokenizer is not None:
        vocab = model.get_input_embeddings().num_embeddings
        if len(tokenizer) > vocab:
            raise WinnowError(
                f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {vocab}"
            )
        if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
            model.config.pad_token_id = tokenizer.pad_token_id
    return model


def load_checkpoint(path: str | Path, task: str, trust_remote_code: bool = False):
    _quiet_transformers()
    with _BUILD_LOCK:
        return auto_class(task).from_pretrained(str(path), trust_remote_code=trust_remote_code)


# -- the tokenizer step --------------------------------------------------------------------------
@register_step
class TokenizerStep(Step):
    """``model.tokenizer.train``: a byte-level BPE trained on the data, in ``RUN/tokenizer-<fp12>/``;
    the result is that folder."""

    name = "tokenizer"

    def fingerprint(self, ctx: RunContext, input_fp: str = "") -> str:
        m = ctx.config.model
        t = m.tokenizer.train
        # refit never: the tokenizer the folder trained first stays when the inputs change
        data = input_fp if t is None or t.refit == "inputs" else None
        return fingerprint("tokenizer", m.tokenizer.model_dump(), m.task, m.max_length, data)

    def run(self, ctx: RunContext, fp: str, **_: Any) -> str:
        from winnow.pipeline.sources import sample_texts

        recipe = ctx.setup()
        out = ctx.layout.tokenizer(fp)
        if not (out / "tokenizer.json").exists():
            cfg = recipe.model.tokenizer.train
            assert cfg is not None
            train_tokenizer(sample_texts(recipe.data, ctx.input_shards(), cfg.max_rows), recipe, out)
        return out.name  # relative to the run folder

    def present(self, ctx: RunContext, result: Any, fp: str) -> bool:
        return (ctx.layout.path(result) / "tokenizer.json").exists()
