"""EL2N scorer against a plain reference: full float64 softmax, explicit one-hot, a loop over examples."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import winnow.scorers.el2n as el2n_mod
from winnow.scorers import (
    EL2N,
    SCORERS,
    Scorer,
    causal_lm_token_el2n,
    el2n_from_logits,
    get_scorer,
    reduce_token_scores,
    register,
)

transformers = pytest.importorskip("transformers")

V = 101  # vocabulary of the tiny language models


# ---------------------------------------------------------------------------------------------
# reference


def ref_el2n(logits_row: torch.Tensor, label: int) -> float:
    """||softmax(logits) - onehot(label)||_2 for one prediction, in float64."""
    p = torch.softmax(logits_row.double(), dim=-1)
    y = torch.zeros_like(p)
    y[label] = 1.0
    return float(torch.sqrt(((p - y) ** 2).sum()))


def ref_causal(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, reduction: str):
    """Per-example causal-LM EL2N from full logits (B, T, V), python loops."""
    out = []
    for b in range(input_ids.shape[0]):
        vals = []
        for t in range(input_ids.shape[1] - 1):
            if attention_mask[b, t] and attention_mask[b, t + 1]:
                vals.append(ref_el2n(logits[b, t], int(input_ids[b, t + 1])))
        if not vals:
            out.append(math.nan)
        elif reduction == "mean":
            out.append(sum(vals) / len(vals))
        elif reduction == "sum":
            out.append(sum(vals))
        else:
            out.append(max(vals))
    return torch.tensor(out, dtype=torch.float64)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol=1e-5, atol=1e-6):
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# plain functions


def test_el2n_from_logits_matches_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 6, generator=g) * 4
    labels = torch.randint(0, 6, (9,), generator=g)
    labels[0] = int(logits[0].argmax())
    expected = torch.tensor([ref_el2n(logits[i], int(labels[i])) for i in range(9)])
    assert_close(el2n_from_logits(logits, labels), expected)
    # bf16 logits are upcast before the softmax
    lb = logits.bfloat16()
    expected_b = torch.tensor([ref_el2n(lb[i].float(), int(labels[i])) for i in range(9)])
    assert_close(el2n_from_logits(lb, labels), expected_b)


def test_el2n_from_logits_labels():
    logits = torch.randn(3, 4)
    out = el2n_from_logits(logits, torch.tensor([1, -100, 2]))
    assert math.isnan(out[1]) and not math.isnan(out[0]) and not math.isnan(out[2])
    with pytest.raises(ValueError, match="label 4 out of range for 4 classes"):
        el2n_from_logits(logits, torch.tensor([0, 4, 1]))


def _token_problem(n=23, h=16, v=37, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g) * 3
    weight = torch.randn(v, h, generator=g)
    b = torch.randn(v, generator=g) if bias else None
    logits = F.linear(hidden, weight, b)
    targets = torch.randint(0, v, (n,), generator=g)
    # about half the tokens predict their argmax with p close to 1 (EL2N near 0)
    targets[::2] = logits[::2].argmax(-1)
    return hidden, weight, b, targets, logits


@pytest.mark.parametrize("vocab_chunk", [1, 5, 8, 36, 37, 1000])
@pytest.mark.parametrize("token_chunk", [1, 4, 23, 100])
def test_token_el2n_chunked_equals_full(vocab_chunk, token_chunk):
    hidden, weight, bias, targets, logits = _token_problem()
    expected = torch.tensor([ref_el2n(logits[i], int(targets[i])) for i in range(len(targets))])
    assert float(expected.min()) < 1e-3  # the near-zero regime is exercised
    got = causal_lm_token_el2n(
        hidden, weight, bias, targets, vocab_chunk=vocab_chunk, token_chunk=token_chunk
    )
    # relative accuracy holds near zero too (no cancellation in the sum formula)
    assert_close(got, expected, rtol=1e-5, atol=1e-7)


def ref_el2n_stable(logits_row: torch.Tensor, label: int) -> float:
    """float64 reference that also resolves scores far below 1e-16 (1 - p_y as a sum of the others)."""
    z = logits_row.double()
    q = torch.exp(z - torch.logsumexp(z, dim=0))
    others = torch.cat([q[:label], q[label + 1 :]])
    return float(torch.sqrt((others**2).sum() + others.sum() ** 2))


@pytest.mark.parametrize("vocab_chunk", [1, 3, 7, 40])
def test_token_el2n_extreme_confidence(vocab_chunk):
    """Identity output layer, so the logits are exact: scores down to ~1e-35 keep relative precision."""
    g = torch.Generator().manual_seed(7)
    v, n = 40, 30
    logits = torch.randn(n, v, generator=g) * 3
    targets = torch.randint(0, v, (n,), generator=g)
    gaps = [0.0, 2.0, 5.0, 20.0, 45.0, 60.0, 80.0]
    for i, gap in enumerate(gaps):  # the target beats the best other class by `gap`
        others_max = torch.cat([logits[i, : targets[i]], logits[i, targets[i] + 1 :]]).max()
        logits[i, targets[i]] = others_max + gap
    expected = torch.tensor(
        [ref_el2n_stable(logits[i], int(targets[i])) for i in range(n)], dtype=torch.float64
    )
    assert expected.min() < 1e-34
    got = causal_lm_token_el2n(logits, torch.eye(v), None, targets, vocab_chunk=vocab_chunk, token_chunk=8)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0.0)


def test_token_el2n_single_class():
    got = causal_lm_token_el2n(torch.randn(3, 4), torch.randn(1, 4), None, torch.zeros(3, dtype=torch.long))
    assert torch.equal(got, torch.zeros(3))


def test_token_el2n_mask_shape_and_nan():
    hidden, weight, bias, targets, logits = _token_problem(n=12, bias=False)
    mask = torch.tensor([True, False] * 6)
    got = causal_lm_token_el2n(
        hidden.view(3, 4, -1),
        weight,
        None,
        targets.view(3, 4),
        mask.view(3, 4),
        vocab_chunk=10,
        token_chunk=3,
    )
    assert got.shape == (3, 4)
    flat = got.reshape(-1)
    assert torch.isnan(flat[~mask]).all()
    expected = torch.tensor([ref_el2n(logits[i], int(targets[i])) for i in range(12) if mask[i]])
    assert_close(flat[mask], expected)
    # no position at all
    none = causal_lm_token_el2n(hidden, weight, None, targets, torch.zeros(12, dtype=torch.bool))
    assert torch.isnan(none).all()


def test_token_el2n_scale_softcap():
    hidden, weight, bias, targets, logits = _token_problem()
    scale, cap = 0.7, 3.0
    z = torch.tanh(logits * scale / cap) * cap
    expected = torch.tensor([ref_el2n(z[i], int(targets[i])) for i in range(len(targets))])
    got = causal_lm_token_el2n(hidden, weight, bias, targets, vocab_chunk=7, logit_scale=scale, softcap=cap)
    assert_close(got, expected)


def test_token_el2n_bf16_accumulates_in_fp32():
    hidden, weight, bias, targets, _ = _token_problem(n=16, h=32, v=50)
    hb, wb, bb = hidden.bfloat16(), weight.bfloat16(), bias.bfloat16()
    logits = F.linear(hb, wb, bb).float()
    expected = torch.tensor([ref_el2n(logits[i], int(targets[i])) for i in range(16)])
    got = causal_lm_token_el2n(hb, wb, bb, targets, vocab_chunk=16)
    assert_close(got, expected, rtol=2e-2, atol=1e-3)


def test_token_el2n_target_out_of_range():
    hidden, weight, bias, targets, _ = _token_problem(n=4)
    targets[1] = 37
    with pytest.raises(ValueError, match="out of range"):
        causal_lm_token_el2n(hidden, weight, bias, targets)


def test_compile_path_plumbing(monkeypatch):
    """compile=True goes through the compiled function (the real torch.compile is checked by the GPU
    benchmark: compiling takes ~1 min on a small CPU)."""
    calls = []

    def fake_compiled():
        def fn(*args):
            calls.append(args[0].shape[0])
            return el2n_mod._token_chunk_el2n(*args)

        return fn

    monkeypatch.setattr(el2n_mod, "_compiled_token_chunk_el2n", fake_compiled)
    hidden, weight, bias, targets, logits = _token_problem()
    expected = torch.tensor([ref_el2n(logits[i], int(targets[i])) for i in range(len(targets))])
    got = causal_lm_token_el2n(hidden, weight, bias, targets, vocab_chunk=8, token_chunk=8, compile=True)
    assert calls == [8, 8, 7]
    assert_close(got, expected)


@pytest.mark.parametrize("reduction", ["mean", "sum", "max"])
def test_reduce_token_scores(reduction):
    scores = torch.tensor([[1.0, 2.0, 4.0], [3.0, 9.0, 9.0], [5.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    want = {"mean": [1.5, 3.0, math.nan], "sum": [3.0, 3.0, math.nan], "max": [2.0, 3.0, math.nan]}[reduction]
    assert_close(reduce_token_scores(scores, mask, reduction), torch.tensor(want))


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


def _gemma2():
    cfg = transformers.Gemma2Config(
        num_hidden_layers=1,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        vocab_size=V,
        max_position_embeddings=32,
        final_logit_softcapping=2.0,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=1,
        initializer_range=0.3,
    )
    return transformers.Gemma2ForCausalLM(cfg).eval()


def _cohere():
    cfg = transformers.CohereConfig(
        num_hidden_layers=1,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=V,
        max_position_embeddings=32,
        logit_scale=3.0,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=1,
        initializer_range=0.3,
    )
    return transformers.CohereForCausalLM(cfg).eval()


LENGTHS = [7, 3, 5, 1]  # the last example has no valid position


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


def _single_reference(model, seqs, reduction):
    """Reference per example, each run alone and unpadded through model(...).logits."""
    out = []
    with torch.no_grad():
        for s in seqs:
            ids = s.unsqueeze(0)
            am = torch.ones_like(ids)
            out.append(ref_causal(model(input_ids=ids).logits, ids, am, reduction)[0])
    return torch.stack(out)


@pytest.mark.parametrize(
    "build", [_gpt2, _llama, _gemma2, _cohere], ids=["gpt2", "llama", "gemma2", "cohere"]
)
def test_causal_lm_padding_matches_unpadded_reference(build):
    torch.manual_seed(0)
    model = build()
    seqs = _sequences()
    scorer = get_scorer("el2n", vocab_chunk=13, token_chunk=5)
    expected = _single_reference(model, seqs, "mean")
    assert torch.isnan(expected[-1]) and not torch.isnan(expected[:-1]).any()
    for side in ("right", "left"):
        ids, am = _pad(seqs, side)
        got = scorer.score_batch(model, {"input_ids": ids, "attention_mask": am}, "causal_lm")["el2n"]
        assert got.shape == (len(seqs),)
        assert_close(got, expected, rtol=2e-5, atol=2e-6)
    # each example alone through the scorer too
    alone = torch.cat(
        [
            scorer.score_batch(
                model,
                {"input_ids": s[None], "attention_mask": torch.ones(1, len(s), dtype=torch.long)},
                "causal_lm",
            )["el2n"]
            for s in seqs
        ]
    )
    assert_close(alone, expected, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize(
    "build", [_gpt2, _llama, _gemma2, _cohere], ids=["gpt2", "llama", "gemma2", "cohere"]
)
def test_deferred_pass_gives_sdpa_models_a_ready_mask_with_the_same_scores(build, monkeypatch):
    """Inside checks.deferred (the pipeline's passes) an SDPA model gets a 4-D mask built by winnow: the same
    scores as the unpadded reference, padded either side or not at all, and transformers never builds its
    own mask (the step that asks the device whether the padding mask is all ones)."""
    from transformers import masking_utils

    from winnow.grads import checks

    torch.manual_seed(0)
    model = build()
    seqs = _sequences()
    scorer = get_scorer("el2n", vocab_chunk=13, token_chunk=5)
    expected = _single_reference(model, seqs, "mean")
    sdpa = model.config._attn_implementation == "sdpa"
    if sdpa:

        def refuse(*a, **k):
            raise AssertionError("transformers built a mask from a 2-D one inside a deferred pass")

        for name in ("find_packed_sequence_indices", "_ignore_causal_mask_sdpa", "sdpa_mask"):
            monkeypatch.setattr(masking_utils, name, refuse)
        monkeypatch.setattr(type(model), "warn_if_padding_and_no_attention_mask", refuse)
    with checks.deferred():
        for side in ("right", "left"):
            ids, am = _pad(seqs, side)
            got = scorer.score_batch(model, {"input_ids": ids, "attention_mask": am}, "causal_lm")["el2n"]
            assert_close(got, expected, rtol=2e-5, atol=2e-6)
        alone = torch.cat(
            [scorer.score_batch(model, {"input_ids": s[None]}, "causal_lm")["el2n"] for s in seqs]
        )
    assert_close(alone, expected, rtol=2e-5, atol=2e-6)


def test_ready_mask_is_causal_and_hides_padding_keys():
    am = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    m = el2n_mod.causal_mask_4d(am.shape, am, torch.device("cpu"))
    assert m.shape == (2, 1, 4, 4) and m.dtype == torch.bool
    for b in range(2):
        for t in range(4):
            for s_ in range(4):
                want = (s_ <= t and bool(am[b, s_])) or s_ == t
                assert bool(m[b, 0, t, s_]) == want
    plain = el2n_mod.causal_mask_4d((3, 5), None, torch.device("cpu"))
    assert plain.shape == (3, 1, 5, 5) and torch.equal(plain[1, 0], torch.ones(5, 5, dtype=torch.bool).tril())


@pytest.mark.parametrize("reduction", ["mean", "sum", "max"])
def test_causal_lm_reductions_match_model_logits(reduction):
    torch.manual_seed(1)
    model = _llama()
    ids, am = _pad(_sequences(seed=3), "right")
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=am).logits
    expected = ref_causal(logits, ids, am, reduction)
    got = get_scorer("el2n", reduction=reduction, vocab_chunk=32).score_batch(
        model, {"input_ids": ids, "attention_mask": am}, "causal_lm"
    )["el2n"]
    assert_close(got, expected, rtol=2e-5, atol=2e-6)


def test_causal_lm_no_mask_and_training_flag_restored():
    torch.manual_seed(2)
    model = _gpt2().train()
    ids = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        model.eval()
        logits = model(input_ids=ids).logits
        model.train()
    expected = ref_causal(logits, ids, torch.ones_like(ids), "mean")
    got = EL2N().score_batch(model, {"input_ids": ids}, "causal_lm")["el2n"]
    assert model.training
    assert_close(got, expected, rtol=2e-5, atol=2e-6)


def test_causal_lm_bf16_model():
    torch.manual_seed(3)
    model = _gpt2().to(torch.bfloat16)
    ids = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    expected = ref_causal(logits, ids, torch.ones_like(ids), "mean")
    got = get_scorer("el2n", vocab_chunk=40).score_batch(model, {"input_ids": ids}, "causal_lm")["el2n"]
    assert_close(got, expected, rtol=2e-2, atol=1e-3)


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
    ids = torch.randint(0, V, (1, 5))
    with pytest.raises(ValueError, match="logits_scaling"):
        EL2N().score_batch(model, {"input_ids": ids}, "causal_lm")


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
    labels = torch.tensor([0, 4, 2, 1])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=am).logits
    expected = torch.tensor([ref_el2n(logits[i], int(labels[i])) for i in range(4)])
    batch = {"input_ids": ids, "attention_mask": am, "labels": labels}
    got = get_scorer("el2n").score_batch(model, batch, "sequence_classification")["el2n"]
    assert_close(got, expected)


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
    expected = torch.tensor([ref_el2n(logits[i], int(labels[i])) for i in range(3)])
    got = get_scorer("el2n").score_batch(
        model, {"pixel_values": pixels, "labels": labels}, "image_classification"
    )
    assert_close(got["el2n"], expected)


# ---------------------------------------------------------------------------------------------
# registry and parameters


def test_registry_and_params():
    assert SCORERS["el2n"] is EL2N
    scorer = get_scorer("el2n", reduction="max", vocab_chunk=1024)
    params = scorer.params()
    assert params == {"reduction": "max", "vocab_chunk": 1024, "token_chunk": 16384, "compile": False}
    assert json.loads(json.dumps(params)) == params
    assert EL2N.tasks == {"causal_lm", "sequence_classification", "image_classification"}
    assert EL2N.columns == ("el2n",)


def test_unknown_scorer():
    with pytest.raises(ValueError, match=r"unknown scorer 'nope'; valid scorers: .*el2n"):
        get_scorer("nope")


@pytest.mark.parametrize(
    ("params", "pattern"),
    [
        ({"reduction": "median"}, r"'reduction' must be one of 'mean', 'sum', 'max', got 'median'"),
        ({"vocab_chunk": 0}, r"'vocab_chunk' must be an int > 0, got 0"),
        ({"vocab_chunk": True}, r"'vocab_chunk' must be an int > 0, got True"),
        ({"token_chunk": "8"}, r"'token_chunk' must be an int > 0, got '8'"),
        ({"token_chunk": 2.5}, r"'token_chunk' must be an int > 0"),
        ({"compile": 1}, r"'compile' must be a bool"),
        (
            {"foo": 1},
            r"unknown parameter 'foo'; valid parameters: compile, reduction, token_chunk, vocab_chunk",
        ),
    ],
)
def test_bad_params(params, pattern):
    with pytest.raises(ValueError, match=pattern):
        get_scorer("el2n", **params)
    with pytest.raises(ValueError, match=pattern):
        EL2N(**params)


def test_bad_task_and_missing_labels():
    model = _gpt2()
    with pytest.raises(ValueError, match="does not support task 'regression'"):
        EL2N().score_batch(model, {"input_ids": torch.zeros(1, 3, dtype=torch.long)}, "regression")
    with pytest.raises(ValueError, match="needs 'labels'"):
        EL2N().score_batch(
            model, {"input_ids": torch.zeros(1, 3, dtype=torch.long)}, "sequence_classification"
        )


def test_register_rejects_duplicates():
    class Other(Scorer):
        name = "el2n"
        tasks = frozenset({"causal_lm"})

    with pytest.raises(ValueError, match="already registered"):
        register(Other)
    assert SCORERS["el2n"] is EL2N


def test_classification_el2n_keeps_its_digits_on_confident_examples():
    """Near-certain predictions: the plain ||softmax(z) - e_y|| in fp32 lost up to 68% at EL2N ~ 3e-9;
    the stable form (the causal-LM path's) matches a float64 reference to fp32 precision."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 10, generator=g) * 3
    y = torch.randint(0, 10, (64,), generator=g)
    z[torch.arange(64), y] += torch.linspace(0, 40, 64)  # from unsure to p_y = 1 - 1e-17
    # float64 reference without cancellation: ||p - e_y||^2 = sum_{i != y} p_i^2 + (sum_{i != y} p_i)^2
    # (1 - p_y directly would lose its digits in float64 too, below 1e-15)
    q = torch.softmax(z.double(), -1).scatter(1, y[:, None], 0.0)
    ref = (q.square().sum(1) + q.sum(1).square()).sqrt()
    got = el2n_from_logits(z, y).double()
    assert float(ref.min()) < 1e-8
    assert float(((got - ref).abs() / ref).max()) < 1e-5
