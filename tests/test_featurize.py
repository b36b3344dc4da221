"""Featurizer.encode: the fast tokenizer's Rust encoder called directly gives transformers' ids."""

from __future__ import annotations

import json

from winnow.pipeline.collate import Featurizer
from winnow.pipeline.models import load_tokenizer, train_tokenizer
from winnow.pipeline.recipe import Recipe


def test_direct_encoding_equals_the_tokenizers_call(corpus, tmp_path):
    rows = [json.loads(line)["text"] for f in sorted(corpus.glob("*.jsonl")) for line in open(f)]
    texts = rows + ["a short row", "x"]
    recipe = Recipe.model_validate(
        {
            "name": "t",
            "data": {"source": "x/*.jsonl", "text_column": "text"},
            "model": {
                "task": "causal_lm",
                "config": {"model_type": "gpt2"},
                "tokenizer": {"train": {"vocab_size": 500}},
                "max_length": 40,
            },
            "select": {"method": "all"},
        }
    )
    tok = load_tokenizer(train_tokenizer(texts, recipe, tmp_path / "tok"))
    feat = Featurizer(recipe, tok, None, None)
    want = tok(texts, truncation=True, max_length=40, add_special_tokens=True)["input_ids"]
    assert feat.encode(texts) == want
    assert max(map(len, want)) == 40 and min(map(len, want)) < 40  # truncation and short rows both seen
    tok(texts[:3], padding="max_length", max_length=60)  # a call that leaves padding set on the backend
    assert feat.encode(texts) == want
