"""A mixture run's rows live on disk by domain (token ids and offsets, memory-mapped), written once and
read back: the same rows, tokens and draws as holding them in memory."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import tiny_recipe
from winnow.pipeline.collate import Featurizer
from winnow.pipeline.mixtures.loop import Sampler, load_domains
from winnow.pipeline.models import load_tokenizer, train_tokenizer
from winnow.pipeline.recipe import Recipe
from winnow.pipeline.sources import iter_raw_batches, list_shards


def test_domain_rows_on_disk_are_the_featurized_rows(corpus, tmp_path, monkeypatch):
    recipe = Recipe.model_validate(tiny_recipe(corpus, tmp_path / "run"))
    texts = [json.loads(line)["text"] for f in sorted(corpus.glob("*.jsonl")) for line in open(f)]
    feat = Featurizer(recipe, load_tokenizer(train_tokenizer(texts, recipe, tmp_path / "tok")), None, None)
    shards = list_shards(recipe.data)
    want: dict[str, list[list[int]]] = {}
    for sh in shards:
        for raw in iter_raw_batches(recipe.data, sh):
            for e in feat.featurize(raw, sh.location):
                if len(e.features) >= 2:
                    want.setdefault(e.domain, []).append(e.features)
    folder = tmp_path / "run" / "mixture" / "tokens-aaaa"
    got = load_domains(recipe, shards, feat, folder)
    assert list(got) == sorted(want)
    for d, rows in want.items():
        assert len(got[d]) == len(rows) and got[d].n_tokens == sum(map(len, rows))
        assert [got[d].example(j).features for j in range(len(rows))] == rows
        assert got[d].example(0).domain == d
    # read back without featurizing again; the draws are the in-memory sampler's
    monkeypatch.setattr(feat, "featurize", lambda *a, **k: pytest.fail("featurized again"))
    again = load_domains(recipe, shards, feat, folder)
    s = Sampler(again, seed=3)
    g = np.random.default_rng(3)
    counts = [2, 0, 3]
    exs, dom = s.draw(counts)
    names = list(again)
    expect = [
        want[names[i]][int(j)]
        for i, c in enumerate(counts)
        if c
        for j in g.integers(0, len(want[names[i]]), c)
    ]
    assert [e.features for e in exs] == expect and dom.tolist() == [0, 0, 2, 2, 2]
    # a new tokens folder (new data or tokenizer) replaces the old one
    monkeypatch.undo()
    load_domains(recipe, shards, feat, folder.parent / "tokens-bbbb")
    assert [p.name for p in folder.parent.iterdir()] == ["tokens-bbbb"]
