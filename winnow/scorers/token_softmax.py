"""One streaming softmax over an output embedding, for per-token scores that need the target excluded.

``stream_softmax(h, weight, bias, y, vocab_chunk, logit_scale, softcap, squares)`` computes the logits
``z = h @ weight.T + bias`` of ``n`` tokens in vocabulary chunks (never more than ``n x vocab_chunk`` at
once, in the model's dtype as its ``lm_head`` would, then scaled and soft-capped in fp32) and keeps, per
token, in fp32: the running max ``M'`` of the non-target logits, ``S1 = sum_{i != y} exp(z_i - M')``, with
``squares`` also ``S2 = sum_{i != y} exp(2 (z_i - M'))``, and the target logit ``z_y``. Two finishing steps
turn these into scores without subtracting nearly equal numbers (the derivations are in the scorers'
module docstrings): :func:`finish_el2n` (``||softmax(z) - e_y||``, :mod:`winnow.scorers.el2n`) and
:func:`finish_nll` (``logsumexp(z) - z_y``, :mod:`winnow.scorers.loss`).

:func:`apply_token_kernel` is the driver both scorers share: shape and target checks, the masked
positions only, ``token_chunk`` positions at a time, optionally through ``torch.compile``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from winnow.grads.checks import is_deferred, require


def stream_softmax(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    y: torch.Tensor,
    vocab_chunk: int,
    logit_scale: float | None,
    softcap: float | None,
    squares: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(M', S1, S2 or None, z_y)`` of ``n`` tokens: ``h`` (n, H) hidden, ``y`` (n,) targets in [0, V)."""
    n = h.shape[0]
    vocab = weight.shape[0]
    dev = h.device
    neg_inf = -math.inf
    run_max = torch.full((n,), neg_inf, dtype=torch.float32, device=dev)  # M': max_{i != y} z_i so far
    s1 = torch.zeros(n, dtype=torch.float32, device=dev)  # sum_{i != y} exp(z_i - M')
    s2 = (
        torch.zeros(n, dtype=torch.float32, device=dev) if squares else None
    )  # sum_{i != y} exp(2 (z_i - M'))
    z_y = torch.zeros(n, dtype=torch.float32, device=dev)
    for v0 in range(0, vocab, vocab_chunk):
        v1 = min(v0 + vocab_chunk, vocab)
        b = None if bias is None else bias[v0:v1]
        z = F.linear(h, weight[v0:v1], b)  # (n, vc) in the model's dtype, as the model's lm_head computes it
        if logit_scale is not None or softcap is not None:
            z = z.float()
            if logit_scale is not None:
                z.mul_(logit_scale)
            if softcap is not None:
                z.div_(softcap).tanh_().mul_(softcap)
        in_chunk = (y >= v0) & (y < v1)
        local = (y - v0).clamp(0, v1 - v0 - 1).unsqueeze(1)
        zt = z.gather(1, local).squeeze(1)
        z_y = torch.where(in_chunk, zt.float(), z_y)
        # drop the target: -inf at its place when it lies in this chunk (otherwise rewrite the value
        # already there), so that the max and the sums run over the other classes only
        z.scatter_(1, local, torch.where(in_chunk, neg_inf, zt).unsqueeze(1))
        m = z.amax(dim=1).float()  # -inf only when the chunk holds nothing but the target
        empty = torch.isneginf(m)
        m_safe = torch.where(empty, 0.0, m)
        # fp32 from here on: a bf16 z is promoted by the subtraction, an fp32 one is shifted in place
        e = z.sub_(m_safe.unsqueeze(1)) if z.dtype == torch.float32 else z - m_safe.unsqueeze(1)
        e.exp_()
        c1 = e.sum(dim=1)
        new_max = torch.maximum(run_max, m)
        new_safe = torch.where(torch.isneginf(new_max), 0.0, new_max)
        a_old = torch.exp(run_max - new_safe)
        a_new = torch.where(empty, 0.0, torch.exp(m_safe - new_safe))
        s1 = s1 * a_old + c1 * a_new
        if s2 is not None:
            c2 = torch.linalg.vector_norm(e, dim=1).square()
            s2 = s2 * (a_old * a_old) + c2 * (a_new * a_new)
        run_max = new_max
    return run_max, s1, s2, z_y


def finish_el2n(run_max: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, z_y: torch.Tensor) -> torch.Tensor:
    """``||p - e_y|| = sqrt(S2 + S1^2) / (S1 + exp(z_y))`` with the sums over i != y, both scaled by
    ``exp(-R)``, ``R = max(M', z_y)``, and the numerator kept in logs: ``S1 >= 1`` at ``M'``, so nothing
    underflows however close ``p_y`` is to 1 (down to fp32's smallest numbers)."""
    ref = torch.maximum(run_max, z_y)
    log_num = (run_max - ref) + 0.5 * torch.log(s2 + s1 * s1)
    den = s1 * torch.exp(run_max - ref) + torch.exp(z_y - ref)
    return torch.exp(log_num) / den


def finish_nll(run_max: torch.Tensor, s1: torch.Tensor, z_y: torch.Tensor) -> torch.Tensor:
    """``logsumexp(z) - z_y`` without cancellation; with a vocabulary of one entry ``S1 = 0`` and
    ``M' = -inf``, and the first branch gives ``log1p(0) = 0``."""
    target_top = z_y >= run_max
    d = torch.where(target_top, run_max - z_y, z_y - run_max)  # <= 0 on the branch that uses it
    top = torch.log1p(s1 * torch.exp(d))
    below = (run_max - z_y) + torch.log(s1 + torch.exp(d))
    return torch.where(target_top, top, below)


def apply_token_kernel(
    kernel: Callable[..., torch.Tensor],
    compiled: Callable[[], Callable[..., torch.Tensor]],
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    vocab_chunk: int,
    token_chunk: int,
    logit_scale: float | None,
    softcap: float | None,
    compile: bool,
) -> torch.Tensor:
    """The shared driver of the chunked per-token kernels (EL2N, NLL): checks shapes and target ids, keeps
    only the masked positions (inside :func:`winnow.grads.checks.deferred`: computes every position, so
    that the host never waits for the mask's count), runs ``kernel(h, weight, bias, y, vocab_chunk, logit_scale, softcap)`` (or
    ``compiled()``'s version) on ``token_chunk`` positions at a time, and scatters the float32 results
    back, NaN where ``mask`` is False."""
    if vocab_chunk <= 0 or token_chunk <= 0:
        raise ValueError(f"vocab_chunk and token_chunk must be > 0, got {vocab_chunk}, {token_chunk}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} does not match output embedding {tuple(weight.shape)}"
        )
    if hidden.shape[:-1] != targets.shape or (mask is not None and mask.shape != targets.shape):
        raise ValueError(
            f"shapes differ: hidden {tuple(hidden.shape)}, targets {tuple(targets.shape)}, "
            f"mask {None if mask is None else tuple(mask.shape)}"
        )
    vocab = weight.shape[0]
    lead = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1).long()
    if mask is not None and is_deferred():
        # no host wait: every position is computed (targets of masked ones replaced by 0) and the masked
        # ones set to NaN; length-sorted batches make the extra positions few (winnow/grads/checks.py)
        keep = mask.reshape(-1)
        require(
            ~(((y < 0) | (y >= vocab)) & keep).any(),
            f"target token id out of range for a vocabulary of {vocab} at a scored position",
        )
        vals = _run_chunks(
            kernel,
            compiled,
            h,
            y.masked_fill(~keep, 0),
            weight,
            bias,
            vocab_chunk,
            token_chunk,
            logit_scale,
            softcap,
            compile,
        )
        return torch.where(keep, vals, torch.full((), math.nan, device=vals.device)).reshape(lead)
    out = torch.full((y.numel(),), math.nan, dtype=torch.float32, device=hidden.device)
    idx = None
    if mask is not None:
        idx = mask.reshape(-1).nonzero().squeeze(1)
        h = h.index_select(0, idx)
        y = y.index_select(0, idx)
    if y.numel() == 0:
        return out.reshape(lead)
    require(
        ~((y < 0) | (y >= vocab)).any(),
        f"target token id out of range for a vocabulary of {vocab} at a scored position",
    )
    vals = _run_chunks(
        kernel, compiled, h, y, weight, bias, vocab_chunk, token_chunk, logit_scale, softcap, compile
    )
    if idx is None:
        out = vals
    else:
        out.index_copy_(0, idx, vals)
    return out.reshape(lead)


def _run_chunks(
    kernel: Callable[..., torch.Tensor],
    compiled: Callable[[], Callable[..., torch.Tensor]],
    h: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    vocab_chunk: int,
    token_chunk: int,
    logit_scale: float | None,
    softcap: float | None,
    compile: bool,
) -> torch.Tensor:
    """``kernel`` on ``token_chunk`` rows of ``h`` (n, H) and ``y`` (n,) at a time: (n,) float32."""
    n = y.numel()
    h = h.to(weight.dtype)
    fn = compiled() if compile else kernel
    vals = torch.empty(n, dtype=torch.float32, device=h.device)
    for t0 in range(0, n, token_chunk):
        t1 = min(t0 + token_chunk, n)
        hc, yc = h[t0:t1], y[t0:t1]
        if compile and t1 - t0 > 1:
            # one compiled graph for every chunk length (a length of 1 is always specialised)
            torch._dynamo.mark_dynamic(hc, 0)
            torch._dynamo.mark_dynamic(yc, 0)
        vals[t0:t1] = fn(hc, weight, bias, yc, vocab_chunk, logit_scale, softcap)
    return vals
