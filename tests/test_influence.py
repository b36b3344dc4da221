"""Influence / gradient-similarity compute layer: preconditioned projections against materialised
gradients, the score formulas against plain loops, and the projection's JL error on real text."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from tests.grads._harness import causal_loss_alone, flat, gpt2, reference_grads, rel_rows, seqs, text_batch
from winnow.grads import GradEngine, per_example_loss, select_parameters
from winnow.scorers.influence import (
    adam_preconditioner,
    gradient_similarity,
    influence_scores,
    mean_direction,
    self_influence,
)


def _dense_scale(eng: GradEngine, pre: dict) -> torch.Tensor:
    """The preconditioner as one vector over the flattened gradient (reference)."""
    parts = []
    for name in eng.param_names:
        d = pre[name]
        parts.append(
            torch.outer(d[0], d[1]).flatten()[: eng.params[name].numel()]
            if isinstance(d, tuple)
            else d.double()
        )
    return torch.cat(parts)


def _fake_adam_state(eng: GradEngine, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        n: torch.rand(p.shape, generator=g, dtype=torch.float64) ** 2 * 1e-4 for n, p in eng.params.items()
    }


def test_preconditioned_projection_equals_projecting_the_scaled_gradient():
    """P (D * g_b) from the factors equals the dense P times the materialised, scaled gradient (GPT-2,
    tied embeddings, padding), in float64."""
    model = gpt2().double()
    examples = seqs([9, 4, 7, 2, 6], seed=3)
    names = list(select_parameters(model, "all"))
    G = flat(reference_grads(model, names, examples, causal_loss_alone), names)
    batch = text_batch(examples, "right")
    with GradEngine(model, proj_dim=64, proj_seed=7) as eng:
        pre = adam_preconditioner(
            eng.views,
            eng.kinds,
            {n: p.numel() for n, p in eng.params.items()},
            _fake_adam_state(eng, 1),
            step=50,
            beta2=0.999,
            eps=1e-8,
        )
        out = eng.compute(lambda: per_example_loss(model, batch, "causal_lm"), project=True, precondition=pre)
        plain = eng.compute(lambda: per_example_loss(model, batch, "causal_lm"), project=True)
    P = eng.projection_matrix()
    D = _dense_scale(eng, pre)
    assert rel_rows(out["proj"], (G * D) @ P.t()) < 1e-6
    assert rel_rows(plain["proj"], G @ P.t()) < 1e-6
    torch.testing.assert_close(out["sqnorm"], plain["sqnorm"])  # norms stay those of the plain gradient
    with pytest.raises(ValueError, match="precondition has no entry"):
        eng2 = GradEngine(model, proj_dim=64)
        eng2.compute(lambda: per_example_loss(model, batch, "causal_lm"), project=True, precondition={})


def test_adam_preconditioner_formulas():
    """Vectors: 1/(sqrt(v_hat)+eps) exactly. Matrices: Adafactor's rank-one v_hat; for a v that IS rank
    one the scale is 1/(sqrt(v_hat) + sqrt(eps)(rho_i + gamma_j) + eps) exactly."""
    torch.manual_seed(0)
    a, b = torch.rand(5, dtype=torch.float64) + 0.1, torch.rand(3, dtype=torch.float64) + 0.1
    V = torch.outer(a, b) * 1e-3  # rank one
    vec = torch.rand(4, dtype=torch.float64) * 1e-3
    step, beta2, eps = 20, 0.99, 1e-6
    pre = adam_preconditioner(
        {"W": (5, 3), "b": (2, 2)},
        {"W": "outer", "b": "dense"},
        {"W": 15, "b": 4},
        {"W": V, "b": vec},
        step,
        beta2,
        eps,
    )
    corr = 1 - beta2**step
    torch.testing.assert_close(pre["b"], 1 / ((vec / corr).sqrt() + eps))
    vhat = V / corr
    R, C, S = vhat.sum(1), vhat.sum(0), vhat.sum()
    rho, gamma = (R / S.sqrt()).sqrt(), (C / S.sqrt()).sqrt()
    want = 1 / (vhat.sqrt() + math.sqrt(eps) * (rho[:, None] + gamma[None, :]) + eps)
    torch.testing.assert_close(torch.outer(*pre["W"]), want)
    torch.testing.assert_close(torch.outer(rho, gamma), vhat.sqrt())  # rank one: the factorisation is exact
    with pytest.raises(ValueError, match="step 0"):
        adam_preconditioner({"W": (5, 3)}, {"W": "outer"}, {"W": 15}, {"W": V}, 0, beta2, eps)


def test_influence_scores_match_a_plain_loop():
    g = torch.Generator().manual_seed(0)

    def unit(n, k):
        x = torch.randn(n, k, generator=g)
        return x / x.norm(dim=1, keepdim=True)

    N, M, k = 37, 7, 16
    train = [unit(N, k) for _ in range(3)]
    target = [unit(M, k) for _ in range(3)]
    w = [0.5, 0.3, 0.2]
    sub = torch.tensor([0, 1, 1, 2, 0, 2, 2])
    got = influence_scores(train, target, w, sub, chunk=10)
    want = torch.empty(N)
    for z in range(N):
        per_sub = {}
        for t in range(M):
            s = sum(w[i] * float(train[i][z] @ target[i][t]) for i in range(3))
            per_sub.setdefault(int(sub[t]), []).append(s)
        want[z] = max(sum(v) / len(v) for v in per_sub.values())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    sq = [torch.rand(N, generator=g) for _ in range(3)]
    torch.testing.assert_close(self_influence(sq, w), sum(w[i] * sq[i] for i in range(3)))
    # gradient similarity: cosine with the mean of the raw (unit * norm) vectors, per checkpoint, averaged
    norms = [torch.rand(M, generator=g) + 0.5 for _ in range(3)]
    dirs = [mean_direction(target[i], norms[i]) for i in range(3)]
    got = gradient_similarity(train, dirs)
    for z in range(N):
        cs = []
        for i in range(3):
            mean = sum(float(norms[i][t]) * target[i][t] for t in range(M)) / M
            cs.append(float(train[i][z] @ mean) / float(mean.norm()))
        assert abs(float(got[z]) - sum(cs) / 3) < 1e-5
    groups = torch.tensor([z % 4 for z in range(N)])
    tn = [torch.rand(N, generator=g) + 0.5 for _ in range(3)]
    gdirs = [mean_direction(train[i], tn[i], groups, 4) for i in range(3)]
    got = gradient_similarity(train, gdirs, groups)
    for z in (0, 5, 36):
        cs = []
        for i in range(3):
            mem = [y for y in range(N) if y % 4 == z % 4]
            mean = sum(float(tn[i][y]) * train[i][y] for y in mem) / len(mem)
            cs.append(float(train[i][z] @ mean) / float(mean.norm()))
        assert abs(float(got[z]) - sum(cs) / 3) < 1e-5


def _real_text_batch(n: int, length: int) -> list[torch.Tensor]:
    """Byte-level token ids of consecutive paragraphs of the Python language reference."""
    from pydoc_data.topics import topics

    text = " ".join(topics[k] for k in sorted(topics))
    data = torch.tensor(list(text.encode("utf-8")[: n * length * 3]), dtype=torch.long)
    return [data[i * 3 * length : i * 3 * length + length] for i in range(n)]


def test_projection_inner_products_have_the_jl_error(capsys):
    """On a transformers GPT-2 (byte vocabulary, real text), projected inner products of per-example
    gradients match the exact ones within the JL error at that dimension, and the error shrinks as
    1/sqrt(k): 16x the dimension, ~4x smaller."""
    cfg = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=256, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    examples = _real_text_batch(12, 48)
    names = list(select_parameters(model, "all"))
    G = flat(reference_grads(model, names, examples, causal_loss_alone), names)
    exact = G @ G.t()
    scale = torch.outer(G.norm(dim=1), G.norm(dim=1))
    batch = {"input_ids": torch.stack(examples), "attention_mask": torch.ones(12, 48, dtype=torch.long)}
    rms = {}
    for k in (64, 1024):
        errs = []
        for seed in range(4):
            with GradEngine(model, proj_dim=k, proj_seed=seed) as eng:
                p = eng.compute(lambda: per_example_loss(model, batch, "causal_lm"), project=True)["proj"]
            errs.append(((p.double() @ p.double().t() - exact) / scale).flatten())
        rms[k] = float(torch.cat(errs).square().mean().sqrt())
    ratio = rms[64] / rms[1024]
    with capsys.disabled():
        print(
            f"\n[JL] relative inner-product error (rms over pairs, 4 seeds): k=64 {rms[64]:.4f} "
            f"(dense Gaussian JL: {math.sqrt(2 / 64):.4f} at most), k=1024 {rms[1024]:.4f} "
            f"({math.sqrt(2 / 1024):.4f}); ratio {ratio:.2f} (1/sqrt(k) predicts 4)"
        )
    for k in rms:
        assert rms[k] < 2.0 * math.sqrt(2 / k)  # (1 + cos^2)/k <= 2/k for a dense map; Kronecker costs more
    assert 2.5 < ratio < 6.5


def _auroc_reference(pos: list[float], neg: list[float]) -> float:
    """P(pos > neg) + P(pos == neg) / 2 by counting every pair (Mann-Whitney)."""
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def test_heldout_target_auroc_against_pair_counting():
    from winnow.scorers.influence import heldout_target_auroc

    g = torch.Generator().manual_seed(3)
    k, C = 16, 2
    train = [_unit(torch.randn(40, k, generator=g)) for _ in range(C)]
    target = [_unit(torch.randn(10, k, generator=g)) for _ in range(C)]
    sub = torch.tensor([0, 1] * 5)
    w = [0.7, 0.3]
    got = heldout_target_auroc(train, target, w, sub, seed=5)
    # reference: the same split, LESS scores by plain loops, AUROC by counting pairs
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(5))
    a, b = perm[:5].tolist(), perm[5:].tolist()
    subs_a = sorted({int(sub[j]) for j in a})

    def score(vecs: list[torch.Tensor], i: int) -> float:
        best = -math.inf
        for s in subs_a:
            members = [j for j in a if int(sub[j]) == s]
            v = sum(sum(w[c] * float(vecs[c][i] @ target[c][j]) for c in range(C)) for j in members) / len(
                members
            )
            best = max(best, v)
        return best

    pos = [score(target, j) for j in b]
    neg = [score(train, i) for i in range(40)]
    assert got == pytest.approx(_auroc_reference(pos, neg), abs=1e-6)
    assert heldout_target_auroc([t[:3] for t in train], [t[:3] for t in target], w, sub[:3]) is None


def test_heldout_target_auroc_separates_a_cluster_from_random_directions():
    from winnow.scorers.influence import heldout_target_auroc

    g = torch.Generator().manual_seed(0)
    k = 64
    centre = _unit(torch.randn(1, k, generator=g))
    near = lambda n: _unit(centre + 0.5 * torch.randn(n, k, generator=g) / k**0.5)  # noqa: E731
    train = [torch.cat([near(20), _unit(torch.randn(180, k, generator=g))])]
    sub = torch.zeros(30, dtype=torch.long)
    assert heldout_target_auroc(train, [near(30)], [1.0], sub) > 0.85
    # a target with nothing in common with anything: random
    auc = heldout_target_auroc(train, [_unit(torch.randn(30, k, generator=g))], [1.0], sub)
    assert 0.3 < auc < 0.7
