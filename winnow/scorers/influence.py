"""Influence and gradient-similarity scores from projected per-example gradients (torch only).

Features. For a checkpoint i, an example z's feature is the unit vector
``u_i(z) = P Γ_i(z) / ||P Γ_i(z)||`` where P is the engine's seeded k x D projection (a JL map, see
:mod:`winnow.grads.projection`) and Γ_i(z) is the example's loss gradient at checkpoint i, either
plain or Adam-preconditioned (:func:`adam_preconditioner`).

Scores (w_i: the checkpoint's learning-rate weight, chosen by the pipeline):

* LESS / TracIn influence on a target set (Xia et al. 2024, "LESS: Selecting Influential Data for
  Targeted Instruction Tuning", arXiv:2402.04333, Section 3, eq. (2) with the Adam gradient features of
  Section 3.1 and the subtask matching of Section 3.3; TracIn, Pruthi et al. 2020, arXiv:2002.08484,
  eq. (3) with cosine in place of the dot product, as LESS does):
  ``Inf(z, D_j) = mean over z' in subtask j of sum_i w_i <u_i(z), u_i(z')>``, score = max over j.
* TracIn self-influence (Pruthi et al. 2020, Section 3.2, used to find mislabelled and rare examples):
  ``sum_i w_i ||g_i(z)||^2`` with the exact squared norm of the plain gradient (not projected).
* Gradient similarity (as in DVGS, Evans et al. 2024, arXiv:2311.14741: similarity of an example's
  gradient with the target's): ``mean over i of cos(P g_i(z), mean over targets of P g_i(z'))``, the
  cosine with the projected mean target gradient (P is linear, so that is P of the mean gradient), and
  the same with the mean gradient of the example's own domain ("typicality").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "adam_preconditioner",
    "gradient_similarity",
    "heldout_target_auroc",
    "influence_scores",
    "mean_direction",
    "self_influence",
]


def adam_preconditioner(
    views: Mapping[str, tuple[int, int]],
    kinds: Mapping[str, str],
    numel: Mapping[str, int],
    exp_avg_sq: Mapping[str, torch.Tensor],
    step: int,
    beta2: float,
    eps: float,
) -> dict[str, Any]:
    """Diagonal Adam preconditioner 1 / (sqrt(v_hat) + eps) from an optimizer state, in the form
    :meth:`GradEngine.compute(precondition=...)` takes.

    ``v_hat = exp_avg_sq / (1 - beta2^step)`` is Adam's bias-corrected second moment (Kingma & Ba 2015,
    Algorithm 1). A vector parameter gets it exactly: ``1 / (sqrt(v_hat) + eps)``. A parameter of kind
    ``outer`` (viewed as m x n) gets the rank-one factorisation of Adafactor (Shazeer & Stern 2018,
    arXiv:1804.04235, Section 4, eq. (5)): ``v_hat ~ R C^T / S`` with the row sums R, column sums C and
    total S, so ``sqrt(v_hat) ~ rho gamma^T`` with ``rho = sqrt(R / sqrt(S))``, ``gamma = sqrt(C / sqrt(S))``,
    and the scale is ``row = 1 / (rho + sqrt(eps))``, ``col = 1 / (gamma + sqrt(eps))`` (so
    ``row_i col_j = 1 / (sqrt(v_hat_ij) + sqrt(eps) (rho_i + gamma_j) + eps)``). The rank-one form is what
    lets the engine precondition the factors without forming any per-example m x n gradient.

    How this differs from LESS (Xia et al. 2024, Section 3.1): LESS uses the full Adam update direction
    for the example, ``Γ = m' / (sqrt(v') + eps)`` with ``m' = (beta1 m + (1 - beta1) g) / (1 - beta1^t)``
    and ``v' = (beta2 v + (1 - beta2) g^2) / (1 - beta2^t)``: it adds the optimizer's momentum m (the same
    vector for every example) and the example's own g^2 to v, both of which make Γ non-linear in g and
    need the materialised gradient (LESS computes it one example at a time). Here Γ = D g, linear in g,
    with D from the saved second moments only, and rank-one for matrices.

    ``views``/``kinds``: the engine's ``views`` and ``kinds``; ``numel``: each parameter's size; ``exp_avg_sq``: {name: tensor} for every
    selected parameter (a parameter the optimizer never stepped may be absent: it gets a uniform scale).
    """
    if step < 1:
        raise ValueError(
            f"adam_preconditioner: the optimizer state is from step {step}; it has no second moments"
        )
    corr = 1.0 - beta2**step
    delta = eps**0.5
    out: dict[str, Any] = {}
    for name, (m, n) in views.items():
        v = exp_avg_sq.get(name)
        if kinds[name] == "outer":
            if v is None:
                out[name] = (torch.ones(m, dtype=torch.float64), torch.ones(n, dtype=torch.float64))
                continue
            V = v.detach().double().reshape(m, n) / corr
            R, C = V.sum(1), V.sum(0)
            S = R.sum()
            if float(S) <= 0:
                out[name] = (torch.ones(m, dtype=torch.float64), torch.ones(n, dtype=torch.float64))
                continue
            rho, gamma = (R / S.sqrt()).sqrt(), (C / S.sqrt()).sqrt()
            out[name] = (1.0 / (rho + delta), 1.0 / (gamma + delta))
        else:
            if v is None:
                out[name] = torch.ones(numel[name], dtype=torch.float64)
                continue
            out[name] = 1.0 / ((v.detach().double().reshape(-1) / corr).sqrt() + eps)
    return out


def _chunks(n: int, size: int):
    for lo in range(0, n, size):
        yield lo, min(n, lo + size)


def influence_scores(
    train: Sequence[torch.Tensor],
    target: Sequence[torch.Tensor],
    weights: Sequence[float],
    subtasks: torch.Tensor,
    chunk: int = 8192,
) -> torch.Tensor:
    """LESS matching (module docstring): ``max_j mean_{z' in j} sum_i w_i <train_i[z], target_i[z']>``.

    ``train[i]``: (N, k) unit features at checkpoint i; ``target[i]``: (M, k); ``weights``: one per
    checkpoint; ``subtasks``: (M,) long ids in [0, J). Returns (N,) float32. Computed ``chunk`` rows of
    ``train`` at a time in float32."""
    if not (len(train) == len(target) == len(weights)) or not train:
        raise ValueError("influence_scores: train, target and weights need one entry per checkpoint")
    N, M = train[0].shape[0], target[0].shape[0]
    sub = subtasks.long().reshape(-1)
    if sub.numel() != M:
        raise ValueError(f"influence_scores: {sub.numel()} subtask ids for {M} target examples")
    J = int(sub.max()) + 1 if M else 0
    counts = torch.bincount(sub, minlength=J).float()
    if bool((counts == 0).any()):
        raise ValueError("influence_scores: subtask ids must be 0..J-1 with every id present")
    # (M, J) averaging matrix: column j averages the targets of subtask j
    avg = torch.zeros(M, J)
    avg[torch.arange(M), sub] = 1.0
    avg /= counts
    out = torch.empty(N)
    for lo, hi in _chunks(N, chunk):
        s = torch.zeros(hi - lo, M)
        for tr, tg, w in zip(train, target, weights, strict=True):
            s += float(w) * (tr[lo:hi].float() @ tg.float().t())
        out[lo:hi] = (s @ avg).max(1).values
    return out


def heldout_target_auroc(
    train: Sequence[torch.Tensor],
    target: Sequence[torch.Tensor],
    weights: Sequence[float],
    subtasks: torch.Tensor,
    seed: int = 0,
) -> float | None:
    """Does influence rank unseen target examples above the training examples? A signal check.

    The target set is split in two halves at random (``seed``); the training examples and the second
    half are scored with :func:`influence_scores` against the first half, and the result is the AUROC of
    the second half against the training examples: P(score of a held-out target example > score of a
    training example), ties counting half. 0.5 is what a random score gets; a working influence signal
    puts held-out target examples near the top (unless most of the training data is like the target).
    None with fewer than 4 target examples."""
    M = target[0].shape[0]
    if M < 4 or train[0].shape[0] == 0:
        return None
    a, b, sub_a = heldout_split(subtasks, seed)
    tgt_a = [t[a] for t in target]
    s_train = influence_scores(train, tgt_a, weights, sub_a).double()
    s_held = influence_scores([t[b] for t in target], tgt_a, weights, sub_a).double()
    return auroc(s_held, s_train)


def heldout_split(subtasks: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`heldout_target_auroc`'s random halves of the M target examples: (first half's positions, second
    half's, the first half's subtask ids renumbered 0..J'-1)."""
    sub = subtasks.long().reshape(-1)
    M = sub.numel()
    perm = torch.randperm(M, generator=torch.Generator().manual_seed(seed))
    a, b = perm[: M // 2], perm[M // 2 :]
    _, sub_a = torch.unique(sub[a], return_inverse=True)
    return a, b, sub_a


def auroc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(a score of ``pos`` > one of ``neg``), ties counting half (the Mann-Whitney U over |pos| |neg|)."""
    allv = torch.cat([pos.double(), neg.double()])
    order = torch.argsort(allv, stable=True)
    ranks = torch.empty_like(allv)
    ranks[order] = torch.arange(1, allv.numel() + 1, dtype=torch.float64)
    # average ranks over ties
    uniq, inv = torch.unique(allv, return_inverse=True)
    sums = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inv, ranks)
    cnt = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inv, torch.ones_like(ranks))
    ranks = (sums / cnt)[inv]
    p, n = pos.numel(), neg.numel()
    return float((ranks[:p].sum() - p * (p + 1) / 2) / (p * n))


def self_influence(sqnorms: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """TracIn self-influence ``sum_i w_i ||g_i(z)||^2`` from per-checkpoint exact squared norms (N,)."""
    if len(sqnorms) != len(weights) or not sqnorms:
        raise ValueError("self_influence: one squared-norm vector and one weight per checkpoint")
    total = torch.zeros_like(sqnorms[0], dtype=torch.float64)
    for s, w in zip(sqnorms, weights, strict=True):
        total = total + float(w) * s.double()
    return total.float()


def mean_direction(
    units: torch.Tensor,
    norms: torch.Tensor,
    groups: torch.Tensor | None = None,
    num_groups: int | None = None,
) -> torch.Tensor:
    """Unit direction of the mean projected gradient ``mean(norm * unit)``: (k,), or (C, k) per group.
    A group whose mean is zero gets a zero row."""
    raw = units.double() * norms.double().unsqueeze(1)
    if groups is None:
        m = raw.mean(0)
        return (m / m.norm().clamp_min(1e-300)).float()
    C = num_groups if num_groups is not None else int(groups.max()) + 1
    sums = torch.zeros(C, raw.shape[1], dtype=torch.float64).index_add_(0, groups.long(), raw)
    return (sums / sums.norm(dim=1, keepdim=True).clamp_min(1e-300)).float()


def gradient_similarity(
    train: Sequence[torch.Tensor], directions: Sequence[torch.Tensor], groups: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over checkpoints of ``<train_i[z], direction_i>`` (cosines, the features being unit):
    ``directions[i]`` is (k,) for one direction, or (C, k) with ``groups`` (N,) choosing each row's."""
    if len(train) != len(directions) or not train:
        raise ValueError("gradient_similarity: one direction per checkpoint")
    acc = torch.zeros(train[0].shape[0], dtype=torch.float64)
    for tr, d in zip(train, directions, strict=True):
        if d.dim() == 1:
            acc += (tr.float() @ d.float()).double()
        else:
            if groups is None:
                raise ValueError("gradient_similarity: (C, k) directions need groups")
            acc += (tr.float() * d.float()[groups.long()]).sum(1).double()
    return (acc / len(train)).float()
