"""Domain-mixture weights: static baselines and the update rules of DoReMi, DoGE and DGA (torch only).

Every function here is one step of an algorithm on quantities the training loop records (per-token
losses, per-domain gradient inner products); the loops themselves live in the pipeline. Weights are
float64 tensors of shape (k,) summing to 1.

Static baselines
    uniform, size-proportional, and temperature-scaled sizes p_i ∝ n_i^(1/τ) (the multilingual sampling of
    Arivazhagan et al. 2019, arXiv:1907.05019, §4.2 and XLM-R's α = 1/τ = 0.3; τ = 1 is proportional, τ → ∞
    uniform).

DoReMi (Xie et al. 2023, "DoReMi: Optimizing Data Mixtures Speeds Up Language Model Pretraining",
arXiv:2305.10429, Algorithm 1)
    λ_t[i] = (1 / Σ_{x ∈ B_i} |x|) Σ_{x ∈ B_i} Σ_j max(ℓ_θ,j(x) − ℓ_ref,j(x), 0)      (per-token clipping)
    α'_t = α_{t−1} ⊙ exp(η λ_t);  α_t = (1 − c) α'_t / Σ α'_t + c / k                     (η = 1, c = 1e-3)
    proxy objective Σ_i α_t[i] · (1 / Σ_{x ∈ B_i} |x|) Σ_{x ∈ B_i} Σ_j ℓ_θ,j(x); output ᾱ = mean_t α_t.
    Differences from the public code (github.com/sangmichaelxie/doremi, ``doremi/trainer.py``): both clip
    per token; the code normalises the proxy loss by the α-weighted token count of the whole batch,
    Σ_tokens α_d(x) ℓ / Σ_tokens α_d(x), where we keep the paper's per-domain token means weighted by α
    (:func:`doremi_token_weights`); a domain absent from a batch keeps its previous λ in the code, and here
    too (the paper samples every domain in every batch, so it does not arise there).

DoGE (Fan, Pagliardini, Jaggi 2023, "DoGE: Domain Reweighting with Generalization Estimation",
arXiv:2310.15393, Algorithm 1) as its public code computes it (github.com/Olivia-fsm/DoGE, ``src/trainer.py``):
    with g_i the gradient of domain i's mean token loss and η_t the model's learning rate at step t,
    s_i = η_t Σ_{j ≠ i} <g_i, g_j>              universal target (every training domain), self term excluded
    s_i = η_t Σ_{j ∈ target} <g_i, g_j>         out-of-domain target domains
    s_i ← s_i / (mean_i ||g_i|| + 1e-6), clipped to [η_t w_min, η_t w_max] (w_min = 0, w_max = 5)
    α_t = softmax(log α_{t−1} + s / μ) (μ = 0.05), then (1 − ε) α_t + ε / k (ε = 0); the model steps on
    Σ_i α_t[i] g_i, and the output is the average of α_t over steps. The paper's universal score is
    <g_i, Σ_j g_j>, self term included; the code's exclusion, the norm scaling and the clipping are kept here
    because they are what produced its published weights.

DGA (Fan, Grangier, Ablin 2024, "Dynamic Gradient Alignment for Online Data Mixing", arXiv:2410.02498)
    every T steps, with g_i the domain gradients and g_tgt the target set's gradient at the current model:
    a_i = <g_i, g_tgt>;  α̂_t = α̂_{t−1} ⊙ exp(η a) / Z   (exponentiated-gradient step on the target loss
    after one step of the mixture, the first-order alignment) and the weights in use
    α_t = β α_{t−1} + (1 − β) α̂_t (an exponential moving average that keeps them stable when generic domains
    are small or noisy). This is our reading of the paper's online update; its equation numbers were not
    available offline, and β, η are parameters (defaults β = 0.9, η = 1 / (mean_i |a_i|) per update unless
    η is given, so that the step does not depend on the gradients' scale).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "dga_update",
    "doge_update",
    "doremi_excess",
    "doremi_token_weights",
    "doremi_update",
    "entropy",
    "static_weights",
]


def _as_weights(x: Sequence[float] | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float64).reshape(-1)
    if t.numel() == 0 or bool((t < 0).any()) or not math.isfinite(float(t.sum())) or float(t.sum()) <= 0:
        raise ValueError(f"weights must be non-negative with a positive finite sum, got {t.tolist()}")
    return t / t.sum()


def static_weights(
    sizes: Sequence[float], kind: str = "proportional", temperature: float = 1.0
) -> torch.Tensor:
    """``uniform``, ``proportional`` (to sizes, e.g. token counts) or ``temperature`` (p ∝ n^(1/τ))."""
    n = torch.as_tensor(sizes, dtype=torch.float64).reshape(-1)
    if n.numel() == 0 or bool((n < 0).any()):
        raise ValueError(f"sizes must be non-negative, got {n.tolist()}")
    if kind == "uniform":
        return torch.full_like(n, 1.0 / n.numel())
    if kind == "proportional":
        return _as_weights(n)
    if kind == "temperature":
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        return _as_weights(n ** (1.0 / temperature))
    raise ValueError(f"kind must be uniform, proportional or temperature, got {kind!r}")


def entropy(w: torch.Tensor) -> float:
    """Shannon entropy (nats) of a weight vector."""
    w = _as_weights(w)
    nz = w[w > 0]
    return float(-(nz * nz.log()).sum())


def doremi_excess(
    token_loss: torch.Tensor,
    ref_token_loss: torch.Tensor,
    mask: torch.Tensor,
    domains: torch.Tensor,
    k: int,
    previous: torch.Tensor | None = None,
    clip: str = "token",
) -> torch.Tensor:
    """λ (k,): per domain, the mean over its counted tokens of max(ℓ_proxy − ℓ_ref, 0) (``clip="token"``,
    the paper and its code), or max(mean over its tokens of ℓ_proxy − ℓ_ref, 0) (``clip="domain"``).

    Per-token clipping has a bias: for a domain where the proxy cannot beat the reference (pure noise),
    the per-token differences are zero-mean but spread, and E max(X, 0) > 0 (σ/√(2π) for a Gaussian X), so
    the noisier the domain's per-token losses, the more "excess" it collects. Clipping the domain's mean
    removes that bias. ``token_loss``/``ref_token_loss``/``mask``: (B, T); ``domains``: (B,) ids in [0, k).
    A domain with no counted token in the batch gets ``previous[i]`` (0 without it)."""
    if clip not in ("token", "domain"):
        raise ValueError(f"clip must be 'token' or 'domain', got {clip!r}")
    m = mask.to(torch.float64)
    diff = token_loss.double() - ref_token_loss.double()
    ex = (diff.clamp_min(0) if clip == "token" else diff) * m
    d = domains.long().reshape(-1)
    num = torch.zeros(k, dtype=torch.float64, device=ex.device).index_add_(0, d, ex.sum(1))
    den = torch.zeros(k, dtype=torch.float64, device=ex.device).index_add_(0, d, m.sum(1))
    prev = (
        torch.zeros(k, dtype=torch.float64, device=ex.device)
        if previous is None
        else previous.double().to(ex.device)
    )
    lam = num / den.clamp_min(1)
    if clip == "domain":
        lam = lam.clamp_min(0)
    return torch.where(den > 0, lam, prev)


def doremi_update(
    alpha: torch.Tensor, lam: torch.Tensor, eta: float = 1.0, smoothing: float = 1e-3
) -> torch.Tensor:
    """α_t = (1 − c) softmax(log α_{t−1} + η λ) + c / k."""
    a = _as_weights(alpha)
    new = torch.softmax(a.log() + eta * lam.double().to(a.device), 0)
    return (1 - smoothing) * new + smoothing / a.numel()


def doremi_token_weights(alpha: torch.Tensor, mask: torch.Tensor, domains: torch.Tensor) -> torch.Tensor:
    """(B, T) per-token weights w with Σ w ℓ = Σ_i α_i · mean of ℓ over domain i's counted tokens."""
    k = alpha.numel()
    m = mask.to(torch.float64)
    d = domains.long().reshape(-1)
    den = torch.zeros(k, dtype=torch.float64, device=m.device).index_add_(0, d, m.sum(1))
    per = alpha.double().to(m.device) / den.clamp_min(1)
    return m * per[d].unsqueeze(1)


def doge_update(
    alpha: torch.Tensor,
    gram: torch.Tensor,
    lr: float,
    *,
    target_dots: torch.Tensor | None = None,
    mu: float = 0.05,
    w_min: float = 0.0,
    w_max: float = 5.0,
    smoothing: float = 0.0,
    present: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DoGE weight update (module docstring). ``gram``: (k, k) inner products of the training domains'
    gradients; ``target_dots``: (k,) <g_i, g_target> for an out-of-domain target (None: universal).
    ``present``: (k,) bool, domains with a gradient this step (absent ones keep their log-weight: score 0).
    Returns (new weights, scores)."""
    a = _as_weights(alpha)
    G = gram.double().to(a.device)
    k = a.numel()
    if target_dots is None:
        s = lr * (G.sum(1) - G.diagonal())
    else:
        s = lr * target_dots.double().to(a.device)
    pres = (
        torch.ones(k, dtype=torch.bool, device=a.device) if present is None else present.bool().to(a.device)
    )
    norms = G.diagonal().clamp_min(0).sqrt()
    avg = norms[pres].mean() if bool(pres.any()) else torch.zeros((), dtype=torch.float64)
    s = (s / (avg + 1e-6)).clamp(lr * w_min, lr * w_max)
    s = torch.where(pres, s, torch.zeros_like(s))
    new = torch.softmax(a.log() + s / mu, 0)
    return (1 - smoothing) * new + smoothing / k, s


def dga_update(
    alpha: torch.Tensor,
    alpha_hat: torch.Tensor,
    dots: torch.Tensor,
    *,
    eta: float | None = None,
    beta: float = 0.9,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DGA update (module docstring): returns (weights in use α_t, mirror-descent iterate α̂_t).
    ``dots``: (k,) <g_i, g_target>; ``eta`` None: 1 / mean |dots|."""
    a, ah = _as_weights(alpha), _as_weights(alpha_hat)
    d = dots.double().to(a.device)
    if eta is None:
        scale = float(d.abs().mean())
        eta = 1.0 / scale if scale > 0 else 0.0
    ah_new = torch.softmax(ah.log() + eta * d, 0)
    return beta * a + (1 - beta) * ah_new, ah_new
