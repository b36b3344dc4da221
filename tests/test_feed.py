"""The scoring feed: striped reading, featurizing in processes or threads, columnar collation and the
deferred input checks give exactly what the plain path gives."""

from __future__ import annotations

import contextlib
import copy
import json

import datasets
import numpy as np
import pytest
import torch

from tests.conftest import tiny_recipe
from winnow.errors import WinnowError
from winnow.grads import checks
from winnow.pipeline import feed, scoring
from winnow.pipeline.collate import Columns, FeatBatch, Featurizer, collate_columns, example_key
from winnow.pipeline.models import load_tokenizer, train_tokenizer
from winnow.pipeline.recipe import DataConfig, Recipe
from winnow.pipeline.sources import iter_raw_batches, iter_striped_batches, list_shards
from winnow.scorers.el2n import causal_lm_token_el2n


def _rows(corpus):
    return [json.loads(line) for f in sorted(corpus.glob("*.jsonl")) for line in open(f)]


def _featurizer(corpus, tmp_path, text_from=None, **over):
    recipe = Recipe.model_validate(tiny_recipe(corpus, tmp_path / "run", **over))
    texts = [r["text"] for r in _rows(text_from or corpus)]
    tok = load_tokenizer(train_tokenizer(texts, recipe, tmp_path / "tok"))
    return recipe, Featurizer(recipe, tok, None, None)


def test_striped_batches_are_the_raw_batches(corpus, tmp_path):
    """Stripes w = 0..W-1 of every source kind (jsonl, a parquet file of images, a saved dataset) together
    are iter_raw_batches' batches, with their row offsets; images decode to the same arrays."""
    rows = _rows(corpus)
    datasets.Dataset.from_list([{"id": r["id"], "text": r["text"]} for r in rows]).save_to_disk(
        str(tmp_path / "disk"), num_shards=2
    )
    from PIL import Image

    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (6, 5, 3), dtype=np.uint8)) for _ in range(23)]
    datasets.Dataset.from_dict({"img": imgs, "y": list(range(23))}).to_parquet(str(tmp_path / "im.parquet"))
    cases = [
        (DataConfig(source=f"{corpus}/*.jsonl", text_column="text", read_batch_size=7), "text"),
        (DataConfig(source=str(tmp_path / "disk"), text_column="text", read_batch_size=9), "text"),
        (DataConfig(source=str(tmp_path / "im.parquet"), image_column="img", read_batch_size=4), "img"),
    ]
    for data, col in cases:
        for shard in list_shards(data):
            want = list(iter_raw_batches(data, shard))
            offsets = np.concatenate([[0], np.cumsum([len(b[col]) for b in want])[:-1]]).tolist()
            for stride in (1, 3):
                got = sorted(
                    (o, b) for w in range(stride) for o, b in iter_striped_batches(data, shard, stride, w)
                )
                assert [o for o, _ in got] == offsets
                for (_, g), w in zip(got, want, strict=True):
                    assert set(g) == set(w)
                    if col == "img":
                        for a, b in zip(g[col], w[col], strict=True):
                            assert np.array_equal(np.asarray(a), np.asarray(b))
                    else:
                        assert g == w


def test_processes_and_threads_feed_the_inline_batches_in_order(corpus, tmp_path):
    """3 processes over 9 read batches (an uneven share each) and 2 threads hand back exactly the inline
    feed's featurized batches, in order: ids, keys, rows parts and token columns."""
    recipe, feat = _featurizer(corpus, tmp_path, data__read_batch_size=5)
    shard = list_shards(recipe.data)[0]
    inline = list(feed.stream(recipe, shard, feat, 0))
    assert len(inline) == 8  # 40 rows a file
    for workers, kind in ((3, "processes"), (2, "threads")):
        got = list(feed.stream(recipe, shard, feat, workers, kind))
        assert len(got) == len(inline)
        for g, w in zip(got, inline, strict=True):
            assert g.ids == w.ids and g.keys == w.keys
            assert g.rows.equals(w.rows)
            assert np.array_equal(g.columns.lengths, w.columns.lengths)
            assert np.array_equal(g.columns.flat, w.columns.flat)


def test_a_bad_row_in_a_worker_process_is_a_clear_error(corpus, tmp_path):
    """A row that does not featurize, read by a worker process: the run's error names the file and row,
    not a worker traceback."""
    bad = tmp_path / "bad"
    bad.mkdir()
    rows = _rows(corpus)[:30]
    rows[17]["text"] = 5
    (bad / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe, feat = _featurizer(bad, tmp_path, text_from=corpus, data__read_batch_size=4)
    shard = list_shards(recipe.data)[0]
    for kind in ("threads", "processes"):
        with pytest.raises(WinnowError, match=r"a\.jsonl row 17: column 'text' holds int, expected text"):
            list(feed.stream(recipe, shard, feat, 2, kind))
    feed.release_pools()


def test_featurizing_processes_live_as_long_as_the_run(corpus, tmp_path):
    """The processes feed starts its workers once: shard after shard (and pass after pass) the same
    processes featurize; a featurizer that differs starts new ones, and release_pools ends them."""
    recipe, feat = _featurizer(corpus, tmp_path, data__read_batch_size=5)
    shards = list_shards(recipe.data)
    assert len(shards) >= 2
    try:
        for shard in shards:
            want = list(feed.stream(recipe, shard, feat, 0))
            got = list(feed.stream(recipe, shard, feat, 2, "processes"))
            assert [g.keys for g in got] == [w.keys for w in want]
        first = feed._pool
        assert first is not None
        pids = set(first.ex._processes)
        list(feed.stream(recipe, shards[0], copy.deepcopy(feat), 2, "processes"))  # an equal featurizer
        assert feed._pool is first and set(first.ex._processes) == pids
        feat.max_length = 7  # another featurizer: other workers
        got = list(feed.stream(recipe, shards[0], feat, 2, "processes"))
        assert max(int(n) for g in got for n in g.columns.lengths) <= 7
        assert feed._pool is not first
    finally:
        feed.release_pools()
    assert feed._pool is None


def test_columns_collate_as_the_featurizer_does(corpus, tmp_path):
    """Columns.take and collate_columns give Featurizer.collate's tensors for any subset and order; a batch
    without padding has no attention_mask (unless asked); keys are example_key's."""
    recipe, feat = _featurizer(corpus, tmp_path)
    shard = list_shards(recipe.data)[0]
    raw = next(iter_raw_batches(recipe.data, shard))
    exs = feat.featurize(raw, shard.location)
    fb = FeatBatch.of(exs)
    assert fb.keys == [example_key(e) for e in exs]
    assert fb.rows.column("preview").to_pylist() == [e.preview for e in exs]
    rng = np.random.default_rng(1)
    for _ in range(5):
        sub = rng.permutation(len(exs))[: rng.integers(1, len(exs))]
        cols = fb.columns.take(sub)
        idx = rng.permutation(len(sub))[:7]
        want = feat.collate([exs[sub[i]] for i in idx])
        got = collate_columns(cols, idx, "causal_lm", feat.pad_id, drop_full_mask=False)
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k], want[k])
    same = [i for i, e in enumerate(exs) if e.n_tokens == exs[0].n_tokens][:3]
    got = collate_columns(fb.columns, np.array(same), "causal_lm", feat.pad_id)
    assert "attention_mask" not in got
    both = Columns.concat([fb.columns.take(np.array([0, 1])), fb.columns.take(np.array([2]))])
    assert np.array_equal(both.flat, fb.columns.take(np.array([0, 1, 2])).flat)


def _ref_el2n(h, w, y):
    p = torch.softmax((h @ w.T).double(), -1)
    return (p - torch.nn.functional.one_hot(y, w.shape[0]).double()).norm(dim=-1).float()


def test_deferred_checks_compute_every_position_and_still_refuse_bad_targets():
    """Inside checks.deferred the token kernel computes every position (no host wait for the mask's count)
    and gives the plain path's scores, NaN where masked; an out-of-range target at a scored position still
    raises (at once on the CPU), one at a masked position does not."""
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(3, 6, 8, generator=g), torch.randn(50, 8, generator=g)
    y = torch.randint(0, 50, (3, 6), generator=g)
    mask = torch.rand(3, 6, generator=g) > 0.3
    plain = causal_lm_token_el2n(h, w, None, y, mask)
    with checks.deferred():
        assert checks.is_deferred()
        dense = causal_lm_token_el2n(h, w, None, y, mask, token_chunk=5)
    assert not checks.is_deferred()
    assert torch.equal(torch.isnan(plain), ~mask) and torch.equal(torch.isnan(dense), ~mask)
    torch.testing.assert_close(dense[mask], plain[mask], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dense[mask], _ref_el2n(h[mask], w, y[mask]), rtol=1e-4, atol=1e-5)
    y_bad = y.clone()
    y_bad[~mask] = 999  # masked: never scored, never checked
    with checks.deferred():
        causal_lm_token_el2n(h, w, None, y_bad, mask)
        y_bad[mask.nonzero()[0].unbind()] = 999
        with pytest.raises(ValueError, match="out of range for a vocabulary of 50"):
            causal_lm_token_el2n(h, w, None, y_bad, mask)


def test_deferred_block_raises_the_first_failed_check_at_its_end(monkeypatch):
    """On an accelerator a check is kept until the block ends; the block then raises the first failed
    check's message (lazy messages are formatted only then). The CPU path is checked at once (above), so the
    accelerator is stood in for by tensors whose device claims not to be the CPU."""

    class Flag(torch.Tensor):
        @property
        def device(self):  # type: ignore[override]
            return torch.device("meta")

    def flag(v: bool) -> torch.Tensor:
        return torch.tensor(v).as_subclass(Flag)

    seen = []
    with pytest.raises(ValueError, match="second"):
        with checks.deferred():
            checks.require(flag(True), "first")
            checks.require(flag(False), lambda: seen.append(1) or "second")
            checks.require(flag(False), "third")
            seen.append("block ended")  # nothing raised inside the block
    assert seen == ["block ended", 1]
    with checks.deferred():
        checks.require(flag(True), "fine")


def test_scoring_models_are_kept_from_shard_to_shard(corpus, model_folder, tmp_path, monkeypatch):
    """A checkpoint is loaded once for all the shards a process scores: a pass gets the kept model, and
    gives it back; a model is lent to one pass at a time; past the byte budget the least recently used go,
    the last one stays; release_models forgets them all."""
    recipe = Recipe.model_validate(tiny_recipe(corpus, tmp_path / "run"))
    loads = []
    real = scoring.load_checkpoint
    monkeypatch.setattr(scoring, "load_checkpoint", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    scoring.release_models()
    cpu = torch.device("cpu")
    try:
        a = scoring._scoring_model(recipe, model_folder, cpu, False)
        key = (str(model_folder), "cpu", False, False)
        scoring._release_model(key, a)
        assert scoring._scoring_model(recipe, model_folder, cpu, False) is a  # kept: not loaded again
        b = scoring._scoring_model(recipe, model_folder, cpu, False)  # `a` is lent out: another copy
        assert b is not a and len(loads) == 2
        scoring._release_model(key, a)
        monkeypatch.setattr(scoring, "MODEL_CACHE_BYTES", 1)
        other = (str(model_folder), "cpu", True, False)
        scoring._release_model(other, b)  # over the budget: `a` (least recently used) goes, `b` stays
        assert list(scoring._models) == [other]
    finally:
        scoring.release_models()
    assert not scoring._models


def _el2n_by_row(cols, feat, model, multiple=1, tokens=0):
    """EL2N of every example of ``cols`` on CPU in 8-row batches (or ``tokens`` a batch), by position; and
    how many batches that took."""
    from winnow.scorers import get_scorer

    parts = scoring._score_columns(
        [get_scorer("el2n")], model, cols, feat, "causal_lm", torch.device("cpu"), 8, multiple, tokens
    )
    out = np.full(len(cols), np.nan)
    for idx, t in parts["el2n"]:
        out[idx] = t.numpy()
    return out, len(parts["el2n"])


def test_padding_to_a_multiple_changes_no_score(corpus, model_folder, tmp_path):
    """scoring.pad_multiple pads a batch's length up to a multiple (masked): every EL2N score is what the
    unpadded batches give, on real text and a real (small) GPT-2."""
    from winnow.pipeline.models import load_checkpoint

    recipe, _ = _featurizer(corpus, tmp_path)
    feat = Featurizer(recipe, load_tokenizer(model_folder), None, None)
    shard = list_shards(recipe.data)[0]
    cols = Columns.concat([fb.columns for fb in feed.stream(recipe, shard, feat, 0)])
    model = load_checkpoint(model_folder, "causal_lm").eval()

    batch = collate_columns(cols, np.arange(5), "causal_lm", feat.pad_id, multiple=16)
    assert batch["input_ids"].shape[1] % 16 == 0
    np.testing.assert_allclose(
        _el2n_by_row(cols, feat, model, multiple=16)[0],
        _el2n_by_row(cols, feat, model)[0],
        rtol=1e-5,
        atol=1e-6,
    )


def _ref_token_groups(lengths, budget, multiple):
    """Plain greedy reference: walk the rows by length, close a group when one more row would make rows x
    padded longest exceed the budget."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups, cur = [], []
    for i in order:
        longest = -(-max(1, lengths[i]) // multiple) * multiple
        if cur and (len(cur) + 1) * longest > budget:
            groups.append(cur)
            cur = []
        cur.append(i)
    return groups + ([cur] if cur else [])


def test_token_budget_batches_are_the_greedy_groups_and_change_no_score(corpus, model_folder, tmp_path):
    """scoring.batch_tokens groups length-sorted rows by padded tokens (rows x longest, one row at least):
    the groups are the plain greedy ones, every row once, within the budget; the EL2N scores are those of
    batch_size batches; auto is the budget on CUDA for forward scorers only, never for images."""
    from winnow.pipeline.collate import length_groups
    from winnow.pipeline.models import load_checkpoint
    from winnow.scorers import get_scorer

    rng = np.random.default_rng(0)
    for lengths, budget, multiple in [
        (rng.integers(1, 300, 1000), 2048, 1),
        (rng.integers(1, 300, 777), 4096, 16),
        (np.array([5000, 3, 3, 3]), 100, 1),  # a row longer than the budget is a group of its own
        (np.zeros(0, np.int64), 64, 1),
    ]:
        got = length_groups(lengths, 8, budget, multiple)
        assert [g.tolist() for g in got] == _ref_token_groups(lengths.tolist(), budget, multiple)
        if len(lengths):
            assert sorted(np.concatenate(got).tolist()) == list(range(len(lengths)))
        for g in got:
            longest = -(-max(1, int(lengths[g].max())) // multiple) * multiple
            assert len(g) == 1 or len(g) * longest <= budget

    recipe, _ = _featurizer(corpus, tmp_path)
    feat = Featurizer(recipe, load_tokenizer(model_folder), None, None)
    shard = list_shards(recipe.data)[0]
    cols = Columns.concat([fb.columns for fb in feed.stream(recipe, shard, feat, 0)])
    model = load_checkpoint(model_folder, "causal_lm").eval()
    scorers = [get_scorer("el2n")]
    by_rows, n_rows = _el2n_by_row(cols, feat, model)
    by_tokens, n_tok = _el2n_by_row(cols, feat, model, tokens=int(cols.lengths.max()) * 24)
    assert n_tok < n_rows  # larger batches of the short rows
    np.testing.assert_allclose(by_tokens, by_rows, rtol=1e-5, atol=1e-6)

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert scoring.batch_tokens(recipe, cuda, scorers) == scoring.AUTO_BATCH_TOKENS
    assert scoring.batch_tokens(recipe, cpu, scorers) == 0
    assert scoring.batch_tokens(recipe, cuda, [get_scorer("grand")]) == 0
    fixed = recipe.model_copy(update={"scoring": recipe.scoring.model_copy(update={"batch_tokens": 999})})
    assert scoring.batch_tokens(fixed, cpu, scorers) == 999
    with pytest.raises(ValueError, match="scoring.batch_tokens"):
        Recipe.model_validate(tiny_recipe(corpus, tmp_path / "bad", scoring__batch_tokens=-1))


def test_attention_kernels_change_no_score(corpus, model_folder, tmp_path):
    """scoring.sdpa_backends picks the kernels SDPA may use while a window is scored: math alone gives
    the scores torch's own choice gives, on real text and a real (small) GPT-2; the setting is torch's
    again once the window is done; on CPU auto leaves torch's choice alone."""
    from winnow.pipeline.models import load_checkpoint
    from winnow.scorers import get_scorer

    recipe, _ = _featurizer(corpus, tmp_path)
    feat = Featurizer(recipe, load_tokenizer(model_folder), None, None)
    shard = list_shards(recipe.data)[0]
    cols = Columns.concat([fb.columns for fb in feed.stream(recipe, shard, feat, 0)])
    model = load_checkpoint(model_folder, "causal_lm").eval()
    cpu = torch.device("cpu")

    def scores(backends):
        r = recipe.model_copy(
            update={"scoring": recipe.scoring.model_copy(update={"sdpa_backends": backends})}
        )
        with scoring.attention_kernels(r, cpu):
            if backends == ["math"]:
                assert not torch.backends.cuda.flash_sdp_enabled()
                assert torch.backends.cuda.math_sdp_enabled()
            parts = scoring._score_columns([get_scorer("el2n")], model, cols, feat, "causal_lm", cpu, 8)
        out = np.full(len(cols), np.nan)
        for idx, t in parts["el2n"]:
            out[idx] = t.numpy()
        return out

    before = torch.backends.cuda.flash_sdp_enabled()
    np.testing.assert_allclose(scores(["math"]), scores("torch"), rtol=1e-5, atol=1e-6)
    assert torch.backends.cuda.flash_sdp_enabled() == before
    assert recipe.scoring.sdpa_backends == "auto"
    assert isinstance(scoring.attention_kernels(recipe, cpu), contextlib.nullcontext)


def test_loader_and_attention_settings_resolve(corpus, tmp_path):
    """auto: processes and no cuDNN attention on CUDA, threads and torch's choice elsewhere; an unknown
    backend is refused naming the key."""
    recipe = Recipe.model_validate(tiny_recipe(corpus, tmp_path / "run"))
    assert scoring.loader_kind(recipe, torch.device("cpu")) == "threads"
    assert scoring.loader_kind(recipe, torch.device("cuda")) == "processes"
    over = tiny_recipe(corpus, tmp_path / "run")
    over["scoring"] = {**over.get("scoring", {}), "loader": "threads", "sdpa_backends": ["efficient", "math"]}
    r = Recipe.model_validate(over)
    assert scoring.loader_kind(r, torch.device("cuda")) == "threads"
    assert r.scoring.sdpa_backends == ["efficient", "math"]
    over["scoring"]["sdpa_backends"] = ["fast"]
    with pytest.raises(Exception, match="sdpa_backends"):
        Recipe.model_validate(over)


def test_train_sdpa_backends_reach_every_step_and_not_the_fingerprint(corpus, tmp_path, monkeypatch):
    """train.sdpa_backends holds for every training step (math alone here: flash off inside each forward),
    is torch's again afterwards, and leaves the training's fingerprint, and so its checkpoints, as they are."""
    from winnow.pipeline import train

    recipe, feat = _featurizer(corpus, tmp_path)
    r = recipe.model_copy(
        update={
            "train": recipe.train.model_copy(
                update={"steps": 4, "checkpoints": [4], "sdpa_backends": ["math"]}
            )
        }
    )
    auto = r.model_copy(update={"train": r.train.model_copy(update={"sdpa_backends": "auto"})})
    assert train.train_fingerprint(r, "in", "tok", "m") == train.train_fingerprint(auto, "in", "tok", "m")
    seen = []
    plain = train.model_loss

    def spy(model, batch, task):
        seen.append((torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()))
        return plain(model, batch, task)

    monkeypatch.setattr(train, "model_loss", spy)
    before = torch.backends.cuda.flash_sdp_enabled()
    ckpts = train.train_proxy(r, tmp_path / "run", list_shards(r.data), feat, 0, "fp", feat.tok, None)
    assert [c.step for c in ckpts] == [4]
    assert seen == [(False, True)] * 4
    assert torch.backends.cuda.flash_sdp_enabled() == before


@pytest.mark.usefixtures("prefect_harness")
def test_the_feeds_processes_start_while_the_proxy_trains_and_end_with_the_run(corpus, tmp_path, monkeypatch):
    """scoring.loader processes: the run starts its featurizing processes in the background once it has a
    tokenizer and a proxy to train, the score tasks use those (no second pool), and the run ends them;
    the scores are those of the threads feed."""
    import polars as pl

    from winnow.flows.run import run_recipe

    made = []
    real_init = feed._Pool.__init__

    def spy(self, *a, **k):
        import threading

        made.append(threading.current_thread().name)
        real_init(self, *a, **k)

    monkeypatch.setattr(feed._Pool, "__init__", spy)
    out = {}
    for kind in ("processes", "threads"):
        over = {"scoring__loader": kind, "scoring__loader_workers": 2, "train__seeds": [0]}
        recipe = Recipe.model_validate(tiny_recipe(corpus, tmp_path / kind, **over))
        run_recipe(recipe)
        assert feed._pool is None  # ended with the run
        out[kind] = pl.read_parquet(tmp_path / kind / "scores" / "el2n.parquet")
    assert made == ["winnow-feed-prewarm"]  # one pool, started beside the training; threads start none
    assert out["processes"].equals(out["threads"])


def test_gradient_scorers_are_kept_with_the_model_from_shard_to_shard(
    corpus, model_folder, tmp_path, monkeypatch
):
    """GraNd over several shards in one process builds its gradient engine once (hooks and first-batch check
    on the kept model once, not once a shard, where each shard used to add its own hooks to the kept
    model), and its scores are those of every shard scored from a fresh start."""
    import polars as pl

    from winnow.pipeline.layout import RunLayout
    from winnow.pipeline.steps import Checkpoint
    from winnow.scorers import grand

    recipe = Recipe.model_validate(
        tiny_recipe(corpus, tmp_path / "run", scoring__scorers=[{"name": "grand"}], select__score="grand")
    )
    feat = Featurizer(recipe, load_tokenizer(model_folder), None, None)
    run_dir = tmp_path / "run"
    ck = Checkpoint(seed=0, step=0, path=str(model_folder), fingerprint="f")
    shards = list_shards(recipe.data)[:3]
    made = []
    real = grand.GradEngine
    monkeypatch.setattr(grand, "GradEngine", lambda *a, **k: made.append(1) or real(*a, **k))

    def scores(fp: str, fresh: bool) -> list[list[float]]:
        out = []
        for sh in shards:
            if fresh:
                scoring.release_models()
            part = scoring.score_shard(recipe, run_dir, sh, [ck], feat, fp)
            out.append(pl.read_parquet(RunLayout(run_dir).path(part.scores)).get_column("grand").to_list())
        return out

    scoring.release_models()
    try:
        kept = scores("a", fresh=False)
        assert len(made) == 1 and len(shards) == 3
        again = scores("b", fresh=True)
        assert len(made) == 4
    finally:
        scoring.release_models()
    assert not scoring._model_scorers
    for k, f in zip(kept, again, strict=True):
        assert len(k) >= 10 and np.allclose(k, f, rtol=1e-5, atol=1e-7)


def test_gpu_steps_take_turns_on_one_gpu(corpus, tmp_path, monkeypatch):
    """The thread runner's tasks that compute on a GPU hold one of runner.tasks_per_gpu slots: with the
    default 1, the second waits for the first (two score tasks sharing the H200 scored 10^6 rows in 240 s
    against 174 s one at a time); with 2 they overlap; CPU steps never wait. Each GPU step names its
    device setting."""
    import threading
    import time

    from winnow.pipeline import models, steps
    from winnow.pipeline.steps import RunContext, all_steps

    monkeypatch.setattr(
        models, "resolve_device", lambda name: torch.device("cuda" if name != "cpu" else "cpu")
    )
    monkeypatch.setattr(steps, "_slots", {})

    def overlap(device: str, per_gpu: int) -> int:
        inside, most, lock = [0], [0], threading.Lock()

        def work() -> None:
            with steps.gpu_slot(device, per_gpu):
                with lock:
                    inside[0] += 1
                    most[0] = max(most[0], inside[0])
                time.sleep(0.2)
                with lock:
                    inside[0] -= 1

        ts = [threading.Thread(target=work) for _ in range(3)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return most[0]

    assert overlap("auto", 1) == 1
    assert overlap("cuda", 2) == 2
    assert overlap("cpu", 1) == 3
    recipe = tiny_recipe(corpus, tmp_path / "run", train__device="cuda", scoring__device="cpu")
    ctx = RunContext(recipe, str(tmp_path / "run"), [])
    got = {name: s.device(ctx) for name, s in all_steps().items()}
    assert got["train"] == "cuda" and got["score"] == "cpu"
    assert {n for n, d in got.items() if d != "cpu"} == {"train"}


def test_a_score_task_holds_the_gpu_slot_only_while_its_pass_computes(corpus, model_folder, tmp_path):
    """A score step takes its GPU slot itself (the task runner does not): from its first window's launch
    to the device's last result, so that another shard's task reads its cache and featurizes its first
    window while this one scores, and writes its parts after; a shard whose every row is cached takes no
    slot at all."""
    import threading
    import time

    from winnow.pipeline.layout import RunLayout
    from winnow.pipeline.score_cache import read_shard_cache
    from winnow.pipeline.steps import Checkpoint, all_steps
    from winnow.pipeline.store import read_provenance

    steps = all_steps()
    assert steps["score"].own_slot and not steps["train"].own_slot
    recipe = Recipe.model_validate(tiny_recipe(corpus, tmp_path / "run"))
    feat = Featurizer(recipe, load_tokenizer(model_folder), None, None)
    run_dir = tmp_path / "run"
    ck = Checkpoint(seed=0, step=0, path=str(model_folder), fingerprint="f")
    shards = list_shards(recipe.data)[:2]
    sem, events, lock = threading.BoundedSemaphore(1), [], threading.Lock()

    def slot_for(sh):
        scores_path, rows_path = scoring.part_paths(run_dir, sh, "a")

        @contextlib.contextmanager
        def slot():
            with sem:
                with lock:
                    events.append(("in", sh.index, time.time(), scores_path.exists() or rows_path.exists()))
                time.sleep(0.3)  # the other task's featurizing happens meanwhile
                yield
                with lock:
                    events.append(("out", sh.index, time.time(), scores_path.exists()))

        return slot

    parts = {}

    def work(sh):
        parts[sh.index] = scoring.score_shard(
            recipe, run_dir, sh, [ck], feat, "a", cache_fp="c", slot=slot_for(sh)
        )

    scoring.release_models()
    try:
        ts = [threading.Thread(target=work, args=(sh,)) for sh in shards]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert len(parts) == 2
        # one pass each, one at a time: in, out, in, out; no part file yet on either side of the pass
        assert [e[0] for e in events] == ["in", "out", "in", "out"]
        assert not any(e[3] for e in events)
        second = events[2][1]
        prov = read_provenance(RunLayout(run_dir).path(parts[second].scores))
        assert prov is not None
        # the second task had featurized its first batch before the first one gave the slot back
        assert prov["started"] + prov["marks"]["first_batch"] < events[1][2]
        assert prov["marks"]["first_batch"] <= prov["marks"]["slot@0"] <= prov["marks"]["finished@0"]
        assert read_shard_cache(RunLayout(run_dir), "c", shards[0]) is not None
        events.clear()
        again = scoring.score_shard(
            recipe, run_dir, shards[0], [ck], feat, "b", cache_fp="c", slot=slot_for(shards[0])
        )
        assert again.scored == 0 and again.reused == parts[shards[0].index].rows and events == []
    finally:
        scoring.release_models()
