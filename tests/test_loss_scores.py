"""Loss scorer and loss-based weights against plain references.

Scorer: per-token NLLs from full float64 softmaxes and from ``F.cross_entropy(reduction="none")``, the
statistics by python loops and numpy. Weights: the authors' code of Sow et al. (ICLR 2025) written out
step by step (``h_func`` -> ``f_func_*`` -> ``g_func`` -> normalise) on plain python floats.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import winnow.scorers.loss as loss_mod
from winnow.scorers import SCORERS, get_scorer
from winnow.scorers.loss import (
    LOSS_COLUMNS,
    LossScorer,
    causal_lm_token_nll,
    nll_from_logits,
    token_loss_stats,
)
from winnow.selectors import LOSS_STRATEGIES, loss_to_weight

transformers = pytest.importorskip("transformers")

V = 101  # vocabulary of the tiny language models


# ---------------------------------------------------------------------------------------------
# references


def ref_nll(logits_row: torch.Tensor, label: int) -> float:
    """-log softmax(logits)[label] from the full float64 softmax."""
    p = torch.softmax(logits_row.double(), dim=-1)
    return float(-torch.log(p[label]))


def ref_stats(vals: list[float], percentile: float = 90.0) -> dict[str, float]:
    """mean, max, population std, linear-interpolated percentile and count, by python loops."""
    n = len(vals)
    if n == 0:
        return {
            "loss": math.nan,
            "loss_max": math.nan,
            "loss_std": math.nan,
            "loss_pctl": math.nan,
            "n_scored": 0.0,
        }
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / n)
    srt = sorted(vals)
    pos = percentile / 100 * (n - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    pct = srt[lo] + (pos - lo) * (srt[hi] - srt[lo])
    assert math.isclose(pct, float(np.percentile(vals, percentile)), rel_tol=1e-12, abs_tol=1e-12)
    return {"loss": mean, "loss_max": max(vals), "loss_std": std, "loss_pctl": pct, "n_scored": float(n)}


def ref_causal(
    logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, percentile: float = 90.0
) -> dict[str, torch.Tensor]:
    """Per-example statistics from full logits (B, T, V): float64 softmax per position, python loops.

    Every token NLL is also checked against ``F.cross_entropy(reduction="none")``.
    """
    rows = []
    for b in range(input_ids.shape[0]):
        vals = []
        for t in range(input_ids.shape[1] - 1):
            if attention_mask[b, t] and attention_mask[b, t + 1]:
                vals.append(ref_nll(logits[b, t], int(input_ids[b, t + 1])))
        ce = F.cross_entropy(logits[b, :-1].double(), input_ids[b, 1:], reduction="none")
        keep = (attention_mask[b, :-1] & attention_mask[b, 1:]).bool()
        torch.testing.assert_close(ce[keep], torch.tensor(vals, dtype=torch.float64), rtol=1e-9, atol=1e-12)
        rows.append(ref_stats(vals, percentile))
    return {c: torch.tensor([r[c] for r in rows], dtype=torch.float64) for c in LOSS_COLUMNS}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol=1e-5, atol=1e-6):
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, equal_nan=True)


def assert_stats(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rtol=2e-5, atol=2e-6):
    assert tuple(got) == LOSS_COLUMNS
    for c in LOSS_COLUMNS:
        assert_close(got[c], expected[c], rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------
# plain functions


def test_nll_from_logits_matches_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 6, generator=g) * 4
    labels = torch.randint(0, 6, (9,), generator=g)
    expected = F.cross_entropy(logits.double(), labels, reduction="none")
    assert_close(nll_from_logits(logits, labels), expected)
    assert_close(
        nll_from_logits(logits, labels), torch.tensor([ref_nll(logits[i], int(labels[i])) for i in range(9)])
    )
    lb = logits.bfloat16()  # upcast before the log-softmax
    assert_close(nll_from_logits(lb, labels), F.cross_entropy(lb.double(), labels, reduction="none"))
    labels[2] = -100
    out = nll_from_logits(logits, labels)
    assert torch.isnan(out[2]) and not torch.isnan(out[[0, 1, 3]]).any()
    with pytest.raises(ValueError, match="label 6 out of range for 6 classes"):
        nll_from_logits(logits, torch.full((9,), 6))
    with pytest.raises(ValueError, match="do not match"):
        nll_from_logits(logits, labels[:3])


def _token_problem(n=23, h=16, v=37, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.7
    b = torch.randn(v, generator=g) if bias else None
    y = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, b, y


@pytest.mark.parametrize(("vocab_chunk", "token_chunk"), [(1, 1), (5, 4), (36, 7), (37, 100), (4096, 16384)])
@pytest.mark.parametrize("bias", [True, False])
def test_token_nll_chunked_equals_full(vocab_chunk, token_chunk, bias):
    hidden, weight, b, y = _token_problem(bias=bias)
    logits = F.linear(hidden, weight, b)
    expected = torch.tensor([ref_nll(logits[i], int(y[i])) for i in range(len(y))])
    got = causal_lm_token_nll(hidden, weight, b, y, vocab_chunk=vocab_chunk, token_chunk=token_chunk)
    assert_close(got, expected)


def test_token_nll_extreme_confidence():
    # the target logit far above the rest: NLL = log1p(sum_{i != y} exp(z_i - z_y)) ~ 1e-13 .. 1e-30;
    # logsumexp(z) - z_y in fp32 would give exactly 0
    v = 50
    weight = torch.eye(v)  # logits = hidden rows
    bias = torch.linspace(-1.0, 1.0, v)
    y = torch.tensor([3, 10, 49, 0])
    for gap in (30.0, 50.0, 70.0):
        hidden = torch.zeros(4, v)
        hidden[torch.arange(4), y] = gap
        got = causal_lm_token_nll(hidden, weight, bias, y, vocab_chunk=7)
        z = hidden.double() + bias.double()
        expected = torch.tensor(
            [
                math.log1p(float(torch.exp(z[i][torch.arange(v) != t] - z[i, t]).sum()))
                for i, t in enumerate(y)
            ]
        )
        assert (expected > 0).all() and (expected < 1e-10).all()
        zf = z.float()
        naive = torch.logsumexp(zf, dim=-1) - zf[torch.arange(4), y]
        assert (naive == 0).all()  # the plain fp32 form loses every digit
        assert_close(got, expected, rtol=1e-5, atol=0)


def test_token_nll_mask_shape_nan_and_single_class():
    hidden, weight, b, y = _token_problem(n=12)
    hidden, y = hidden.reshape(3, 4, -1), y.reshape(3, 4)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 1]], dtype=torch.bool)
    got = causal_lm_token_nll(hidden, weight, b, y, mask, vocab_chunk=8, token_chunk=3)
    full = causal_lm_token_nll(hidden, weight, b, y)
    assert got.shape == (3, 4)
    assert torch.isnan(got[~mask]).all()
    assert_close(got[mask], full[mask])
    # a vocabulary of one: the target is certain
    one = causal_lm_token_nll(torch.randn(3, 4), torch.randn(1, 4), None, torch.zeros(3, dtype=torch.long))
    assert torch.equal(one, torch.zeros(3))


def test_token_nll_scale_softcap_bf16_and_bad_targets():
    hidden, weight, b, y = _token_problem(seed=2)
    z = F.linear(hidden, weight, b).double() * 3.0
    z = 2.0 * torch.tanh(z / 2.0)
    expected = torch.tensor([ref_nll(z[i], int(y[i])) for i in range(len(y))])
    assert_close(
        causal_lm_token_nll(hidden, weight, b, y, vocab_chunk=6, logit_scale=3.0, softcap=2.0), expected
    )
    hb, wb, bb = hidden.bfloat16(), weight.bfloat16(), b.bfloat16()
    zb = F.linear(hb, wb, bb).float()  # logits in the model's dtype, the rest in fp32
    expected_b = torch.tensor([ref_nll(zb[i], int(y[i])) for i in range(len(y))])
    assert_close(causal_lm_token_nll(hb, wb, bb, y, vocab_chunk=10), expected_b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="out of range for a vocabulary of 37"):
        causal_lm_token_nll(hidden, weight, b, torch.full_like(y, 37))
    with pytest.raises(ValueError, match="must be > 0"):
        causal_lm_token_nll(hidden, weight, b, y, vocab_chunk=0)


def test_compile_path_plumbing(monkeypatch):
    calls = []

    def fake_compiled():
        def fn(*args):
            calls.append(args[0].shape[0])
            return loss_mod._token_chunk_nll(*args)

        return fn

    monkeypatch.setattr(loss_mod, "_compiled_token_chunk_nll", fake_compiled)
    hidden, weight, b, y = _token_problem(n=10)
    got = causal_lm_token_nll(hidden, weight, b, y, token_chunk=4, compile=True)
    assert calls == [4, 4, 2]
    assert_close(got, causal_lm_token_nll(hidden, weight, b, y))


@pytest.mark.parametrize("percentile", [0.0, 37.5, 50.0, 90.0, 100.0])
def test_token_loss_stats_matches_numpy(percentile):
    g = torch.Generator().manual_seed(7)
    x = torch.rand(6, 9, generator=g) * 5
    mask = torch.rand(6, 9, generator=g) > 0.4
    mask[0] = True
    mask[1] = False
    mask[2] = False
    mask[2, 4] = True  # a single position: std 0, every statistic that value
    x[~mask] = 1e9  # padding values must not leak into any statistic
    got = token_loss_stats(x, mask, percentile)
    rows = [ref_stats([float(v) for v in x[i][mask[i]].double()], percentile) for i in range(6)]
    expected = {c: torch.tensor([r[c] for r in rows]) for c in LOSS_COLUMNS}
    assert_stats(got, expected)
    assert got["n_scored"][1] == 0 and torch.isnan(got["loss"][1])
    assert got["loss_std"][2] == 0 and got["loss_pctl"][2] == got["loss"][2] == got["loss_max"][2]
    with pytest.raises(ValueError, match="percentile must be in"):
        token_loss_stats(x, mask, 101)


# ---------------------------------------------------------------------------------------------
# real transformers models


def _gpt2():
    cfg = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=V,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
        initializer_range=0.3,
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def _llama():
    cfg = transformers.LlamaConfig(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=V,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=1,
        initializer_range=0.3,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


LENGTHS = [7, 3, 5, 2, 1]  # 6, 2, 4, 1, 0 scored positions: the last example has none


def _sequences(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, V, (n,), generator=g) for n in LENGTHS]


def _pad(seqs, side):
    t = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), t, dtype=torch.long)
    am = torch.zeros(len(seqs), t, dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "right":
            ids[i, : len(s)], am[i, : len(s)] = s, 1
        else:
            ids[i, t - len(s) :], am[i, t - len(s) :] = s, 1
    return ids, am


def _single_reference(model, seqs, percentile=90.0):
    """Reference per example, each run alone and unpadded through model(...).logits."""
    rows = []
    with torch.no_grad():
        for s in seqs:
            ids = s.unsqueeze(0)
            rows.append(ref_causal(model(input_ids=ids).logits, ids, torch.ones_like(ids), percentile))
    return {c: torch.cat([r[c] for r in rows]) for c in LOSS_COLUMNS}


@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_causal_lm_padding_matches_unpadded_reference(build):
    torch.manual_seed(0)
    model = build()
    seqs = _sequences()
    scorer = get_scorer("loss", vocab_chunk=13, token_chunk=5, percentile=75)
    expected = _single_reference(model, seqs, 75.0)
    assert torch.isnan(expected["loss"][-1]) and not torch.isnan(expected["loss"][:-1]).any()
    assert expected["n_scored"].tolist() == [6, 2, 4, 1, 0]
    for side in ("right", "left"):
        ids, am = _pad(seqs, side)
        got = scorer.score_batch(model, {"input_ids": ids, "attention_mask": am}, "causal_lm")
        assert all(v.shape == (len(seqs),) for v in got.values())
        assert_stats(got, expected)


def test_causal_lm_matches_padded_model_logits_and_model_loss():
    torch.manual_seed(1)
    model = _llama()
    ids, am = _pad(_sequences(seed=3), "right")
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=am)
    expected = ref_causal(out.logits, ids, am)
    got = get_scorer("loss", vocab_chunk=32).score_batch(
        model, {"input_ids": ids, "attention_mask": am}, "causal_lm"
    )
    assert_stats(got, expected)
    # the model's own mean loss over the batch is the token-weighted mean of the per-example losses
    labels = ids.masked_fill(am == 0, -100)
    with torch.no_grad():
        model_loss = float(model(input_ids=ids, attention_mask=am, labels=labels).loss)
    scored = ~torch.isnan(got["loss"])
    pooled = (got["loss"][scored] * got["n_scored"][scored]).sum() / got["n_scored"].sum()
    assert math.isclose(float(pooled), model_loss, rel_tol=1e-5)


def test_causal_lm_no_mask_and_training_flag_restored():
    torch.manual_seed(2)
    model = _gpt2().train()
    ids = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        model.eval()
        logits = model(input_ids=ids).logits
        model.train()
    expected = ref_causal(logits, ids, torch.ones_like(ids))
    got = LossScorer().score_batch(model, {"input_ids": ids}, "causal_lm")
    assert model.training
    assert_stats(got, expected)


def test_causal_lm_refuses_logits_scaling():
    cfg = transformers.GraniteConfig(
        num_hidden_layers=1,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=V,
        max_position_embeddings=32,
        logits_scaling=2.0,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=1,
    )
    model = transformers.GraniteForCausalLM(cfg)
    with pytest.raises(ValueError, match=r"^loss: GraniteForCausalLM has config.logits_scaling=2.0"):
        LossScorer().score_batch(model, {"input_ids": torch.randint(0, V, (1, 5))}, "causal_lm")


def test_sequence_classification_bert():
    torch.manual_seed(4)
    cfg = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=V,
        max_position_embeddings=32,
        num_labels=5,
        initializer_range=0.3,
    )
    model = transformers.BertForSequenceClassification(cfg).eval()
    ids, am = _pad(_sequences(seed=5), "right")
    labels = torch.tensor([0, 4, 2, 1, -100])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=am).logits
    ce = F.cross_entropy(logits.double(), labels, reduction="none", ignore_index=-100)
    ce[labels < 0] = math.nan
    loop = torch.tensor(
        [ref_nll(logits[i], int(labels[i])) if labels[i] >= 0 else math.nan for i in range(5)]
    )
    torch.testing.assert_close(ce, loop.double(), equal_nan=True)
    batch = {"input_ids": ids, "attention_mask": am, "labels": labels}
    got = get_scorer("loss").score_batch(model, batch, "sequence_classification")
    expected = {
        "loss": ce,
        "loss_max": ce,
        "loss_std": ce * 0,
        "loss_pctl": ce,
        "n_scored": torch.tensor([1.0, 1, 1, 1, 0]),
    }
    assert_stats(got, expected)


def test_image_classification_resnet():
    torch.manual_seed(5)
    cfg = transformers.ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=4
    )
    model = transformers.ResNetForImageClassification(cfg).eval()
    pixels = torch.randn(3, 3, 32, 32)
    labels = torch.tensor([3, 0, 1])
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
    got = get_scorer("loss").score_batch(
        model, {"pixel_values": pixels, "labels": labels}, "image_classification"
    )
    assert_close(got["loss"], F.cross_entropy(logits.double(), labels, reduction="none"))


# ---------------------------------------------------------------------------------------------
# registry and parameters


def test_registry_and_params():
    assert SCORERS["loss"] is LossScorer
    scorer = get_scorer("loss", percentile=50, vocab_chunk=1024)
    params = scorer.params()
    assert params == {"percentile": 50.0, "vocab_chunk": 1024, "token_chunk": 16384, "compile": False}
    assert isinstance(params["percentile"], float)
    assert json.loads(json.dumps(params)) == params
    assert LossScorer.tasks == {"causal_lm", "sequence_classification", "image_classification"}
    assert LossScorer.columns == ("loss", "loss_max", "loss_std", "loss_pctl", "n_scored")


@pytest.mark.parametrize(
    ("params", "pattern"),
    [
        (
            {"percentile": 101},
            r"scorer 'loss': parameter 'percentile' must be a float >= 0 and <= 100, got 101",
        ),
        ({"percentile": -1.0}, r"'percentile' must be a float >= 0 and <= 100"),
        ({"percentile": "90"}, r"'percentile' must be a float"),
        ({"percentile": True}, r"'percentile' must be a float"),
        ({"vocab_chunk": 0}, r"'vocab_chunk' must be an int > 0, got 0"),
        ({"token_chunk": 2.5}, r"'token_chunk' must be an int > 0"),
        ({"compile": 1}, r"'compile' must be a bool"),
        (
            {"reduction": "mean"},
            r"unknown parameter 'reduction'; valid parameters: compile, percentile, "
            r"token_chunk, vocab_chunk",
        ),
    ],
)
def test_bad_params(params, pattern):
    with pytest.raises(ValueError, match=pattern):
        get_scorer("loss", **params)


def test_bad_task_and_missing_labels():
    model = _gpt2()
    with pytest.raises(ValueError, match="does not support task 'regression'"):
        LossScorer().score_batch(model, {"input_ids": torch.zeros(1, 3, dtype=torch.long)}, "regression")
    with pytest.raises(ValueError, match="loss: task 'sequence_classification' needs 'labels'"):
        LossScorer().score_batch(
            model, {"input_ids": torch.zeros(1, 3, dtype=torch.long)}, "sequence_classification"
        )


# ---------------------------------------------------------------------------------------------
# loss-based weights (Sow et al., ICLR 2025)


def ref_weights(losses, strategy, r=1.0, delta=1.0):
    """The authors' code step by step on python floats: h_func, f_func_*, g_func, w = g / sum(g), * n."""
    l_min, l_max = min(losses), max(losses)
    span = max(l_max - l_min, 1e-6)
    h = [2.0 * delta * v / span - delta * (l_max + l_min) / span for v in losses]  # h_func
    if strategy == "linupper":
        f = [min(x + delta, delta) for x in h]  # f_func_linupper
    elif strategy == "quadratic":
        f = [1 - x**2 / delta**2 for x in h]  # f_func_mid
    else:
        f = [abs(x) for x in h]  # f_func_extremes
    top = max(f)
    g = [math.exp((v - top) / r) for v in f]  # g_func(f - f.max(), l=r)
    total = sum(g)
    return [len(losses) * v / total for v in g]  # weights = g / g.sum(); the loss is scaled by the batch size


@pytest.mark.parametrize("strategy", LOSS_STRATEGIES)
@pytest.mark.parametrize(("r", "delta"), [(1.0, 1.0), (0.3, 1.0), (2.0, 0.5), (0.05, 2.0)])
def test_weights_match_reference(strategy, r, delta):
    rng = np.random.default_rng(0)
    losses = rng.gamma(4.0, 0.8, size=40)
    kept = rng.random(40) < 0.7
    losses[~kept] = np.nan  # pruned rows are never read
    w = loss_to_weight(losses, kept, strategy=strategy, temperature=r, delta=delta)
    assert w.dtype == np.float64 and w.shape == (40,)
    assert np.all(w[~kept] == 0.0)
    np.testing.assert_allclose(
        w[kept], ref_weights(list(losses[kept]), strategy, r, delta), rtol=1e-10, atol=1e-12
    )
    assert math.isclose(w[kept].mean(), 1.0, rel_tol=1e-12)


@pytest.mark.parametrize("strategy", LOSS_STRATEGIES)
def test_weights_invariants_and_bounds(strategy):
    rng = np.random.default_rng(1)
    losses = rng.normal(3.0, 1.0, size=200)  # any real losses are accepted
    for r in (0.1, 1.0, 10.0):
        w = loss_to_weight(losses, strategy=strategy, temperature=r)
        assert math.isclose(w.mean(), 1.0, rel_tol=1e-12) and np.all(w > 0)
        assert w.max() / w.min() <= math.exp(1.0 / r) * (1 + 1e-12)  # f spans at most [0, delta], delta = 1
    near_uniform = loss_to_weight(losses, strategy=strategy, temperature=1e6)
    np.testing.assert_allclose(near_uniform, 1.0, atol=1e-5)
    # quadratic does not depend on delta; for the others only delta / r matters
    a = loss_to_weight(losses, strategy=strategy, temperature=0.5, delta=2.0)
    b = loss_to_weight(losses, strategy=strategy, temperature=0.25, delta=1.0)
    c = loss_to_weight(losses, strategy=strategy, temperature=0.5, delta=1.0)
    np.testing.assert_allclose(a, c if strategy == "quadratic" else b, rtol=1e-12)


def test_monotonicity_by_strategy():
    losses = np.linspace(1.0, 5.0, 41)  # sorted: middle of the range at index 20 (loss 3.0)
    lin = loss_to_weight(losses, strategy="linupper", temperature=0.5)
    assert np.all(np.diff(lin[:21]) > 0)  # rises with the loss up to the middle of the range
    np.testing.assert_allclose(lin[20:], lin[20], rtol=1e-12)  # flat above: high losses are capped
    assert math.isclose(lin[-1] / lin[0], math.exp(1 / 0.5), rel_tol=1e-12)
    quad = loss_to_weight(losses, strategy="quadratic", temperature=0.5)
    assert np.all(np.diff(quad[:21]) > 0) and np.all(np.diff(quad[20:]) < 0)  # peak in the middle
    assert math.isclose(quad[0], quad[-1], rel_tol=1e-12) and quad.argmax() == 20
    ext = loss_to_weight(losses, strategy="extremes", temperature=0.5)
    assert np.all(np.diff(ext[:21]) < 0) and np.all(np.diff(ext[20:]) > 0)  # both ends up-weighted
    assert ext.argmin() == 20
    # the order of rows does not matter, only their losses
    perm = np.random.default_rng(2).permutation(41)
    np.testing.assert_allclose(loss_to_weight(losses[perm], strategy="linupper", temperature=0.5), lin[perm])


def test_linupper_down_weights_redundant_low_loss_rows():
    # 60 near-duplicate boilerplate rows the proxy model already predicts well (low loss) among
    # 40 diverse rows: LinUpper moves weight away from the redundant rows
    rng = np.random.default_rng(3)
    redundant = 0.4 + 0.02 * rng.random(60)
    diverse = rng.uniform(2.0, 4.5, size=40)
    losses = np.concatenate([redundant, diverse])
    w = loss_to_weight(losses, strategy="linupper", temperature=0.5)
    assert np.all(w[:60] < 0.3) and np.all(w[60:] > 1.0)
    share = w[:60].sum() / w.sum()
    assert share < 0.25 < 60 / 100  # their share of the training signal falls from 60% to under 25%
    # in a uniform weighting the same rows would have kept 60% of it
    assert math.isclose(w.sum(), 100.0, rel_tol=1e-12)


def test_strata_kept_and_degenerate_sets():
    rng = np.random.default_rng(4)
    losses = np.concatenate([rng.normal(2.0, 0.3, 30), rng.normal(5.0, 0.3, 20)])
    strata = np.array(["web"] * 30 + ["code"] * 20, dtype=object)
    kept = rng.random(50) < 0.8
    w = loss_to_weight(losses, kept, strategy="linupper", strata=strata)
    for name in ("web", "code"):
        rows = (strata == name) & kept
        assert math.isclose(w[rows].mean(), 1.0, rel_tol=1e-12)  # no weight moves between strata
        np.testing.assert_allclose(w[rows], loss_to_weight(losses[rows], strategy="linupper"), rtol=1e-12)
    assert np.all(w[~kept] == 0)
    # without strata the low-loss domain as a whole is down-weighted
    w_all = loss_to_weight(losses, kept, strategy="linupper")
    assert w_all[(strata == "web") & kept].mean() < 1.0 < w_all[(strata == "code") & kept].mean()
    # degenerate sets
    np.testing.assert_array_equal(loss_to_weight(np.full(5, 2.5), strategy="extremes"), np.ones(5))
    np.testing.assert_array_equal(loss_to_weight(np.array([7.0])), np.ones(1))
    np.testing.assert_array_equal(loss_to_weight(np.array([1.0, 2.0]), np.zeros(2, dtype=bool)), np.zeros(2))
    assert loss_to_weight(np.zeros(0)).shape == (0,)
    # a range below the authors' 1e-6 floor gives (nearly) uniform weights, as their code does
    tiny = 3.0 + np.array([0.0, 1e-9, 2e-9])
    np.testing.assert_allclose(
        loss_to_weight(tiny, strategy="linupper"), ref_weights(list(tiny), "linupper"), rtol=1e-9
    )
    np.testing.assert_allclose(loss_to_weight(tiny, strategy="linupper"), 1.0, atol=1e-2)


def test_range_quantile_resists_an_outlier():
    rng = np.random.default_rng(5)
    inliers = rng.uniform(2.0, 4.0, size=199)
    losses = np.append(inliers, 40.0)  # one degenerate document
    plain = loss_to_weight(losses, strategy="linupper", temperature=0.5)
    robust = loss_to_weight(losses, strategy="linupper", temperature=0.5, range_quantile=0.01)
    # min/max normalisation: the outlier squashes the inliers into the bottom 5% of the range, where
    # LinUpper barely separates them; quantile normalisation spreads them again
    assert np.ptp(np.log(plain[:199])) < 0.25 < 1.5 < np.ptp(np.log(robust[:199]))
    # step by step: quantile bounds, normalise, clip, strategy, softmax
    lo, hi = np.quantile(losses, [0.01, 0.99])
    x = np.clip((2 * losses - hi - lo) / (hi - lo), -1.0, 1.0)
    g = np.exp((np.minimum(x + 1, 1) - 1) / 0.5)
    np.testing.assert_allclose(robust, len(g) * g / g.sum(), rtol=1e-10)
    assert robust[-1] == robust.max()  # the outlier gets the capped weight, not more


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (
            {"strategy": "linear"},
            r"strategy must be one of 'linupper', 'quadratic', 'extremes', got 'linear'",
        ),
        ({"strategy": "uniform"}, r"strategy must be one of"),
        ({"temperature": 0}, r"temperature \(the paper's r\) must be a finite number > 0, got 0"),
        ({"temperature": -1.0}, r"temperature"),
        ({"temperature": math.inf}, r"temperature"),
        ({"temperature": math.nan}, r"temperature"),
        ({"temperature": True}, r"temperature"),
        ({"delta": 0.0}, r"delta must be a finite number > 0, got 0.0"),
        ({"delta": "1"}, r"delta must be"),
        ({"range_quantile": 0.5}, r"range_quantile must be a number in \[0, 0.5\), got 0.5"),
        ({"range_quantile": -0.1}, r"range_quantile"),
        ({"kept": np.ones(4, dtype=int)}, r"kept must be a boolean array"),
        ({"kept": np.ones(3, dtype=bool)}, r"kept must have the same length as losses \(4\), got 3"),
        ({"strata": np.array(["a", "b"])}, r"strata must have the same length"),
    ],
)
def test_weight_errors(kwargs, pattern):
    kept = kwargs.pop("kept", None)
    with pytest.raises(ValueError, match=pattern):
        loss_to_weight(np.array([1.0, 2.0, 3.0, 4.0]), kept, **kwargs)


def test_weight_errors_on_losses():
    with pytest.raises(ValueError, match="losses has 1 NaN values among kept rows"):
        loss_to_weight(np.array([1.0, np.nan, 3.0]))
    with pytest.raises(ValueError, match="losses has 1 infinite values among kept rows"):
        loss_to_weight(np.array([1.0, np.inf, 3.0]))
    w = loss_to_weight(np.array([1.0, np.nan, 3.0]), np.array([True, False, True]))  # pruned NaN is fine
    assert w[1] == 0 and math.isclose(w.mean() * 3 / 2, 1.0)
    with pytest.raises(ValueError, match="losses must be a 1-D array"):
        loss_to_weight(np.ones((2, 2)))
    with pytest.raises(ValueError, match="losses must be a real numeric array"):
        loss_to_weight(np.array(["a", "b"]))
