"""What :meth:`GradEngine.compute <winnow.grads.engine.GradEngine.compute>` computes from one batch's
factors: one accumulator per quantity, each fed every selected parameter's factors in turn
(:class:`ParamFactors`) and holding its own result.

* :class:`SquaredNorms`: ||grad_b||^2 per example, in total and per parameter;
* :class:`Projections`: P grad_b in the shared k-dimensional space (optionally preconditioned);
* :class:`GroupSums`: the Gram of the group sums S_c, their dots with a target, and (for
  ``group_coeffs``) the sums themselves;
* :class:`ConsistencyCheck`: the per-example factors summed over the batch against autograd's batch
  gradient (``check=True``);
* :class:`GradCoeffs` and :func:`add_group_coeffs`: the model's gradient sum_b c_b grad_b, or
  sum_c a_c S_c, added to ``.grad``.

The accumulators keep separate results, so the order they see a parameter in does not matter; each
sees the parameters in the engine's order (:attr:`GradEngine.param_names`), which fixes the order of
every floating-point sum.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from winnow.grads.kernels import (
    LOW_PRECISION,
    _dense_project,
    _dense_weighted_sum,
    _direct_grads,
    _outer_groups,
    _outer_project,
    _outer_sqnorm,
    _outer_weighted_sum,
    _rotated_outer_project,
    _scale_uses,
    _sketch_outer_project,
)
from winnow.grads.projection import RotatedSample, SketchHashes, sketch_dense
from winnow.grads.rules import Dense, Outer

__all__ = [
    "ConsistencyCheck",
    "GradCoeffs",
    "GroupLayout",
    "GroupSums",
    "ParamFactors",
    "Projections",
    "SquaredNorms",
    "add_group_coeffs",
    "group_layout",
]

ProjFactors = Callable[[str], Any]  # (P_L, P_R) of a Kronecker map, or SketchHashes


@dataclass
class ParamFactors:
    """One selected parameter's factors in this batch: ``uses`` (one :class:`Outer` or :class:`Dense` per
    recorded use), whether a recorded output gradient was in half precision (``low``), autograd's batch
    gradient (``batch_grad``, with the check), its (m, n) view, and for a dense parameter ``value``, the
    sum of its uses' per-example gradients (B, numel)."""

    name: str
    kind: str
    uses: list[Any]
    low: bool
    batch_grad: torch.Tensor | None
    view: tuple[int, int]
    value: torch.Tensor | None = None

    @classmethod
    def build(
        cls,
        name: str,
        kind: str,
        uses: list[Any],
        low: bool,
        batch_grad: torch.Tensor | None,
        view: tuple[int, int],
        numel: int,
        B: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> ParamFactors:
        value = None
        if kind == "dense":
            value = torch.zeros(B, numel, dtype=dtype, device=device)
            for f in uses:
                value += f.value
        return cls(name, kind, uses, low, batch_grad, view, value)


class SquaredNorms:
    """||grad_b||^2: ``total`` (B,) over the parameters and ``per`` {name: (B,)}, in ``dtype``."""

    def __init__(self, B: int, dtype: torch.dtype, device: torch.device, method: str, budget: int) -> None:
        self.B, self.dtype, self.device, self.method, self.budget = B, dtype, device, method, budget
        self.total = torch.zeros(B, dtype=dtype, device=device)
        self.per: dict[str, torch.Tensor] = {}

    def add(self, p: ParamFactors) -> None:
        if p.value is not None:
            sq = p.value.square().sum(1, dtype=self.dtype)
        elif not p.uses:
            sq = torch.zeros(self.B, dtype=self.dtype, device=self.device)
        else:
            m, n = p.view
            sq = _outer_sqnorm(p.uses, self.B, m, n, self.method, self.budget)
        self.per[p.name] = sq.to(self.dtype)
        self.total += self.per[p.name]


@dataclass(frozen=True)
class AdamUpdate:
    """The per-example Adam update direction of one parameter, as LESS computes its training-side features
    (Xia et al. 2024, arXiv:2402.04333, Section 3.1; ``obtain_gradients_with_adam`` in the authors' code):

        Γ(g) = (β1 m + (1 − β1) g) / sqrt(β2 v + (1 − β2) g² + ε)       elementwise,

    with m, v the checkpoint's Adam moments (``exp_avg``, ``exp_avg_sq``, in the parameter's layout) and, as
    in that code, no bias correction and ε inside the square root. Γ is not linear in g (the example's own
    g² enters the denominator), so the engine materialises each example's gradient of the parameter, a few
    examples at a time, to apply it."""

    m: torch.Tensor
    v: torch.Tensor
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __call__(self, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (self.beta1 * m + (1 - self.beta1) * g) / (
            self.beta2 * v + (1 - self.beta2) * g * g + self.eps
        ).sqrt()


def _project_matrices(G: torch.Tensor, proj: Any) -> torch.Tensor:
    """(B, k) P vec(G_b) of materialised per-example matrices G (B, m, n) in the parameter's view."""
    if isinstance(proj, SketchHashes):
        return sketch_dense(G, proj)
    if isinstance(proj, RotatedSample):
        return proj.project_matrices(G)
    PL, PR = proj
    return torch.matmul(torch.matmul(PL, G), PR.t()).reshape(G.shape[0], -1)


def _view_of(proj: Any) -> tuple[int, int]:
    if isinstance(proj, SketchHashes):
        return proj.h1.numel(), proj.h2.numel()
    if isinstance(proj, RotatedSample):
        return proj.view
    return proj[0].shape[1], proj[1].shape[1]


def _proj_dim(proj: Any) -> int:
    return proj.k if isinstance(proj, (SketchHashes, RotatedSample)) else proj[0].shape[0] * proj[1].shape[0]


def _adam_project(
    p: ParamFactors, upd: AdamUpdate, proj: Any, budget: int, dtype: torch.dtype
) -> torch.Tensor:
    """(B, k) P vec(Γ(grad_b)) for one parameter, its per-example gradients materialised c at a time."""
    m_, n_ = _view_of(proj)  # the parameter's (m, n) view, zero-padded for vectors
    numel = upd.m.numel()
    pad = m_ * n_ - numel
    dev = (
        proj.h1.device
        if isinstance(proj, SketchHashes)
        else proj.device
        if isinstance(proj, RotatedSample)
        else proj[0].device
    )
    M = torch.nn.functional.pad(upd.m.reshape(-1).to(dev, dtype), (0, pad)).view(m_, n_)
    V = torch.nn.functional.pad(upd.v.reshape(-1).to(dev, dtype), (0, pad)).view(m_, n_)
    if p.value is not None:
        B = p.value.shape[0]
        G = torch.nn.functional.pad(p.value.to(dtype), (0, pad)).view(B, m_, n_)
        gam = upd(G, M, V)
        if pad:  # padding is not part of the parameter: its Γ (β1 m / sqrt(ε) with m = 0) is 0 anyway
            gam.view(B, -1)[:, numel:] = 0
        return _project_matrices(gam, proj)
    B = p.uses[0].right.shape[0]
    out = torch.zeros(B, _proj_dim(proj), dtype=dtype, device=dev)
    c = max(1, budget // max(1, m_ * n_))
    for lo in range(0, B, c):
        hi = min(B, lo + c)
        G = _direct_grads(p.uses, lo, hi, m_, n_).to(dtype)
        out[lo:hi] = _project_matrices(upd(G, M, V), proj)
    return out


class Projections:
    """``proj`` (B, k): sum_p P_p vec(D_p * grad_{b,p}), ``factors(name)`` giving (P_L, P_R) and
    ``pre`` the optional preconditioner (:meth:`GradEngine.compute`, ``precondition``): a scale D_p, or an
    :class:`AdamUpdate` (then the sum is over P_p vec(Γ_p(grad_{b,p}))). ``low``: the records' half
    precision, if they were recorded in one (autocast): ``kfjlt`` rotates the factors and forms their
    product in it (fp32 accumulation), which is the records' own precision."""

    def __init__(
        self,
        B: int,
        k: int,
        dtype: torch.dtype,
        device: torch.device,
        factors: ProjFactors,
        pre: Mapping[str, Any] | None,
        budget: int = 1 << 26,
        low: torch.dtype | None = None,
    ) -> None:
        self.dtype, self.device, self.factors, self.pre = dtype, device, factors, pre
        self.budget, self.low = budget, low
        self.proj = torch.zeros(B, k, dtype=dtype, device=device)

    def add(self, p: ParamFactors) -> None:
        dtype, device, pre = self.dtype, self.device, self.pre
        proj = self.factors(p.name)
        if pre is not None and isinstance(pre[p.name], AdamUpdate):
            if p.value is not None or p.uses:
                self.proj += _adam_project(p, pre[p.name], proj, self.budget, dtype)
            return
        sketch = isinstance(proj, SketchHashes)
        if p.value is not None:
            pv = p.value if pre is None else p.value * pre[p.name].to(device, dtype)
            if sketch or isinstance(proj, RotatedSample):
                m_, n_ = _view_of(proj)
                V = torch.nn.functional.pad(pv, (0, m_ * n_ - pv.shape[1])).view(-1, m_, n_)
                self.proj += _project_matrices(V, proj).to(dtype)
            else:
                self.proj += _dense_project(pv, *proj)
        elif p.uses:
            pu = p.uses if pre is None else _scale_uses(p.uses, *(t.to(device, dtype) for t in pre[p.name]))
            if sketch:
                self.proj += _sketch_outer_project(pu, proj).to(dtype)
            elif isinstance(proj, RotatedSample):
                self.proj += _rotated_outer_project(pu, proj, low=self.low).to(dtype)
            else:
                self.proj += _outer_project(pu, *proj)


@dataclass
class GroupLayout:
    """The batch's groups: ids (B,) on the device, their number C, ``perm`` ordering the batch by group
    (None when it already is) and ``spans`` (group, start, end) of each group's rows in that order."""

    groups: torch.Tensor
    C: int
    spans: list[tuple[int, int, int]]
    perm: torch.Tensor | None


def group_layout(groups: Any, num_groups: int | None, B: int, device: torch.device) -> GroupLayout:
    """Check ``groups`` (an integer tensor (B,) of ids >= 0) and ``num_groups`` and order the batch by group:
    each group's rows are one slice (a view when the batch is already ordered)."""
    if not isinstance(groups, torch.Tensor) or groups.shape != (B,) or groups.is_floating_point():
        shape = tuple(groups.shape) if isinstance(groups, torch.Tensor) else type(groups).__name__
        raise ValueError(f"groups must be an integer tensor of shape ({B},), got {shape}")
    groups = groups.to(device=device, dtype=torch.long)
    if B and int(groups.min()) < 0:
        raise ValueError(f"groups must be ids >= 0, got {int(groups.min())}")
    top = int(groups.max()) + 1 if B else 0
    if num_groups is None:
        num_groups = top
    elif isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < top:
        raise ValueError(f"num_groups must be an int >= the largest group id + 1 ({top}), got {num_groups!r}")
    perm = None
    if B > 1 and not bool((groups[1:] >= groups[:-1]).all()):
        perm = torch.argsort(groups, stable=True)
    ordered = groups if perm is None else groups[perm]
    ids, counts = torch.unique_consecutive(ordered, return_counts=True)
    ends = counts.cumsum(0).tolist()
    spans = [(c, e - n, e) for c, n, e in zip(ids.tolist(), counts.tolist(), ends, strict=True)]
    return GroupLayout(groups, num_groups, spans, perm)


class GroupSums:
    """``gram`` (C, C) <S_c, S_d> of the group sums S_c = sum_{b in c} grad_b, ``dot`` (C,) <S_c, target>
    (None without targets), and with ``keep`` the sums themselves, ``sums`` {name: (C, ...)}, from which
    :func:`add_group_coeffs` reads the model's gradient."""

    def __init__(
        self,
        layout: GroupLayout,
        targets: Mapping[str, torch.Tensor] | None,
        keep: bool,
        budget: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.layout, self.targets, self.keep, self.budget = layout, targets, keep, budget
        self.dtype, self.device = dtype, device
        C = layout.C
        self.gram = torch.zeros(C, C, dtype=dtype, device=device)
        self.dot = torch.zeros(C, dtype=dtype, device=device) if targets is not None else None
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, p: ParamFactors) -> None:
        lay, dtype, device = self.layout, self.dtype, self.device
        if p.value is not None:
            S = torch.zeros(lay.C, p.value.shape[1], dtype=dtype, device=device).index_add_(
                0, lay.groups, p.value
            )
            self.gram += S @ S.t()
            if self.dot is not None and self.targets is not None:
                self.dot += S @ self.targets[p.name].reshape(-1)
            if self.keep:
                self.sums[p.name] = S
            return
        m, n = p.view
        if not p.uses:
            if self.keep:
                self.sums[p.name] = torch.zeros(lay.C, m, n, dtype=dtype, device=device)
            return
        tg = self.targets[p.name].reshape(m, n) if self.targets is not None else None
        g2, d2, kept = _outer_groups(
            p.uses, m, n, lay.groups, lay.spans, lay.perm, lay.C, tg, self.budget, dtype, keep=self.keep
        )
        self.gram += g2
        if self.dot is not None and d2 is not None:
            self.dot += d2
        if kept is not None:
            self.sums[p.name] = kept


def add_group_coeffs(
    params: Mapping[str, nn.Parameter],
    sums: dict[str, torch.Tensor],
    a: Any,
    C: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Add sum_c a_c S_c to each parameter's ``.grad`` from the kept group sums; returns a (fp32). The sums
    are released."""
    if not isinstance(a, torch.Tensor) or a.shape != (C,):
        raise ValueError(
            f"group_coeffs must return a tensor of shape ({C},) (one per group), got "
            f"{tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__}"
        )
    with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
        a = a.detach().to(device, dtype)
        for name, S in sums.items():
            p = params[name]
            g = (a.unsqueeze(0) @ S.reshape(C, -1)).reshape(-1)[: p.numel()].reshape(p.shape).to(p.dtype)
            p.grad = g if p.grad is None else p.grad.add_(g)
    sums.clear()
    return a.float()


class GradCoeffs:
    """Keeps every parameter's factors; :meth:`apply` adds sum_b c_b grad_b to its ``.grad``."""

    def __init__(self, params: Mapping[str, nn.Parameter]) -> None:
        self.params = params
        self.kept: dict[str, ParamFactors] = {}

    def add(self, p: ParamFactors) -> None:
        self.kept[p.name] = p

    def apply(self, c: Any, B: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Check ``c`` (B,), add the weighted gradients, return c (fp32)."""
        if not isinstance(c, torch.Tensor) or c.shape != (B,):
            raise ValueError(
                f"grad_coeffs must return a tensor of shape ({B},), got "
                f"{tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__}"
            )
        with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
            for name, f in self.kept.items():
                p = self.params[name]
                cw = c.to(device, dtype)
                if f.kind == "dense":
                    w = _dense_weighted_sum(f.uses, cw, p.numel(), dtype)
                else:
                    w = _outer_weighted_sum(f.uses, cw, *f.view, dtype)
                g = w.reshape(p.shape).to(p.dtype)
                p.grad = g if p.grad is None else p.grad.add_(g)
        return c.detach().float()


# ----------------------------------------------------------------------------------------------
# the consistency check

Probes = Callable[[str, int, int, torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]]


def _abs_terms(f: Dense) -> torch.Tensor:
    """The dense factor's sum of absolute terms when the rule gave one, else its value."""
    scale = f.scale_value()
    return f.value if scale is None else scale


def _tolerance(G: torch.Tensor | None, low: bool) -> float:
    if low or (G is not None and G.dtype in LOW_PRECISION):
        return 3e-2
    return 1e-6 if G is not None and G.dtype == torch.float64 else 1e-3


def mismatch(name: str, detail: str) -> ValueError:
    """The error for a parameter whose per-example factors do not add up to its batch gradient."""
    return ValueError(
        f"parameter {name!r}: the per-example gradients from the rules do not add up to the batch gradient "
        f"({detail}); some use of this parameter is not seen by its module's rule: a functional use outside "
        f"the module's forward (e.g. F.linear(x, module.weight)) or a module called on tensors that are not "
        f"batch-first. Pass check=False to skip this test"
    )


class ConsistencyCheck:
    """The per-example factors summed over the batch against autograd's batch gradient: the whole vector
    for a dense parameter, two seeded rank-1 probes u v^T (``probes``) for an outer one. Every comparison
    stays on the device until :meth:`verify` (one sync for all the parameters)."""

    def __init__(self, probes: Probes, dtype: torch.dtype, device: torch.device) -> None:
        self.probes, self.dtype, self.device = probes, dtype, device
        self.checks: list[
            tuple[str, torch.Tensor, torch.Tensor, str]
        ] = []  # name, |est - ref|, allowed, what

    def add(self, p: ParamFactors) -> None:
        G = p.batch_grad
        if p.value is not None:
            self.checks.append(self._dense(p.name, p.value, p.uses, G, p.low))
        elif p.uses:
            self.checks.append(self._outer(p.name, p.uses, G, *p.view, p.low))
        elif G is not None:
            self.checks.append(
                (
                    p.name,
                    G.detach().abs().max().to(self.dtype),
                    torch.zeros((), dtype=self.dtype, device=self.device),
                    "no recorded use, but a nonzero batch gradient",
                )
            )

    def verify(self) -> None:
        """Raise :func:`mismatch` for the first parameter whose difference exceeds its tolerance."""
        if not self.checks:
            return
        bad = torch.stack([(diff > allowed).any() for _, diff, allowed, _ in self.checks])
        if bool(bad.any()):
            name, diff, allowed, what = self.checks[int(bad.nonzero()[0, 0])]
            raise mismatch(
                name, f"{what}: difference {diff.max().item():.3g}, allowed {allowed.max().item():.3g}"
            )

    @staticmethod
    def _dense(
        name: str, v: torch.Tensor, uses: list[Dense], G: torch.Tensor | None, low: bool
    ) -> tuple[str, torch.Tensor, torch.Tensor, str]:
        est = v.sum(0)
        scale = sum((_abs_terms(f).abs().sum(0) for f in uses), torch.zeros_like(est))
        ref = torch.zeros_like(est) if G is None else G.detach().reshape(-1).to(est.dtype)
        return (
            name,
            (est - ref).norm(),
            _tolerance(G, low) * (scale + ref.abs()).norm(),
            "|sum_b grad_b - batch gradient|",
        )

    def _outer(
        self, name: str, uses: list[Outer], G: torch.Tensor | None, m: int, n: int, low: bool
    ) -> tuple[str, torch.Tensor, torch.Tensor, str]:
        """Two rank-1 probes u v^T: sum_{b,t} (L.u)(R.v) from the factors vs u^T G v from autograd."""
        dev, dtype = uses[0].right.device, uses[0].right.dtype
        u, v = self.probes(name, m, n, dev, dtype)
        est = torch.zeros(2, dtype=dtype, device=dev)
        scale = torch.zeros(2, dtype=dtype, device=dev)
        for f in uses:
            lu = u[f.left] if f.onehot else f.left @ u
            prod = lu * (f.right @ v)
            est += prod.sum((0, 1))
            scale += prod.abs().sum((0, 1))
        ref = torch.zeros_like(est) if G is None else (u * (G.detach().reshape(m, n).to(dtype) @ v)).sum(0)
        return (
            name,
            (est - ref).abs(),
            _tolerance(G, low) * (scale + ref.abs()),
            "rank-1 probes of the gradient",
        )
