"""The per-example gradient engine: squared norms, random projections and group sums of per-example
gradients, from ONE ordinary batched forward and backward, without materialising per-example copies of
the parameters.

GraNd (Paul et al., arXiv:2107.07075, Section 2: GraNd_t(x, y) = E ||g_t(x, y)||_2), influence and
gradient-similarity features (TRAK, Park et al., arXiv:2303.14186, Section 3: random projections of
per-example gradients; LoGra, Choe et al., arXiv:2405.13954, Section 3: projections applied to the
factors of linear layers), and the domain-mixture optimisers DoGE (Fan et al., arXiv:2310.15393,
Section 2: inner products of domain gradients) and DGA (Fan et al., arXiv:2410.02498: alignment of
domain gradients with a target gradient) all reduce to three quantities of the
per-example gradients ``grad_b = dloss_b / dtheta``, which :class:`GradEngine` computes:

1. ``sqnorm``: ``||grad_b||^2`` per example (and per parameter);
2. ``proj``: ``P grad_b`` for a seeded random k x D matrix P (a Johnson-Lindenstrauss map);
3. ``group_gram`` / ``group_dot``: with S_c = sum_{b in group c} grad_b, the C x C Gram matrix
   <S_c, S_d> and the inner products <S_c, target> with a given gradient.

How. Forward hooks record each call of every module that owns a selected parameter (its inputs) and a
tensor hook on the call's output records the output gradient g in the backward. A per-layer-type rule
(:mod:`winnow.scorers.grad_rules`) turns a call into factors of the per-example gradient of each of its
parameters: ``Outer`` (the parameter as an (m, n) matrix, grad_b = sum_t L_bt R_bt^T, e.g. L = g and
R = a for a linear layer) or ``Dense`` (the per-example gradient of a vector parameter, (B, numel)).
A parameter used by several calls or modules (a module called twice; GPT-2's ``wte`` that is both the
input embedding and the output layer) gets the SUM of its uses' factors; concatenating the uses along t,

    ||grad_b||^2 = sum_{t,s} (L_t . L_s) (R_t . R_s)                                            (1)

which contains the cross terms 2 <use1, use2>. For one linear layer (1) is the "ghost norm"
||G^T A||_F^2 = <G G^T, A A^T> of Li et al., "Large Language Models Can Be Strong Differentially
Private Learners", arXiv:2110.05679, Section 4. Costs, per parameter of view (m, n), B examples with
T = sum over uses of the positions T_u:

* squared norm, ``Outer``, chosen per parameter by ``sqnorm_method="auto"`` as the cheaper of
  - "gram": equation (1) by Gram matrices, O(B T^2 (m + n)) time, O(c T^2) memory for a chunk of c
    examples (a one-hot L is handled by comparing ids or gathering, never a dense V-vector);
  - "direct": grad_b = L_b^T R_b materialised for c examples at a time, O(B T m n) time, O(c m n) memory;
  - an embedding-only parameter (every L one-hot): the rows of grad_b are the sums of g over equal ids,
    so ||grad_b||^2 comes from one ``unique`` + ``index_add`` over (example, id) keys: O(B T n) time.
  ``Dense``: O(B numel).
* projection, ``Outer``: O(B T (k1 m + k2 n) + B T k) (one-hot L: a gather instead of k1 m);
  ``Dense``: O(B (k1 d1 d2 + k1 d2 k2)), see "Projection" below.
* group sums: one C x m x n_slice block of group gradients at a time (the columns of the (m, n) view
  are sliced so that C m n_slice <= ``chunk_elements``), O(B T m n) time, the cost of the weight gradient
  itself, as C products over each group's positions (a slice of the batch when it is ordered by group,
  else one permuted copy per factor); an embedding-only parameter keeps only the rows of the ids present
  in the batch. With ``group_coeffs`` the whole C x m x n sums are kept, and the model's gradient
  sum_c a_c S_c is read off them (O(C m n)) instead of a second product of the factors.
* consistency check (``check=True``): two rank-1 probes u v^T per parameter, O(B T (m + n)).
* the backward is one ordinary ``torch.autograd.grad`` of ``sum_b loss_b`` with respect to the selected
  parameters (so the batch gradient is computed too, which the check compares against; ``.grad``
  attributes are not touched).

Loss reduction. :meth:`GradEngine.compute` takes a closure returning the B per-example losses and
backpropagates their SUM, so the gradient recorded for example b is d loss_b / d theta, its own
gradient, not scaled by 1/B. :func:`per_example_loss` gives each example the loss the pipeline trains on
(mean token NLL over its real next-token positions for ``causal_lm``, cross-entropy for classification).

Padding. Positions whose loss terms are masked out receive an output gradient of exactly zero (the loss
uses ``torch.where``, attention masks exclude padded keys), so they add nothing to any factor; the
embedding rule also zeroes the ``padding_idx`` row, which autograd never updates.

Projection. Each parameter p, viewed as an (m, n) matrix, gets its own P_p = P_L (x) P_R (Kronecker
product) with P_L (k1 x m), P_R (k2 x n), k1 k2 = k (k1 the largest divisor of k not above sqrt(k)),
entries Rademacher +-1 or standard Gaussian scaled by 1/sqrt(k1) and 1/sqrt(k2); then
P_p vec(grad_b) = vec(P_L grad_b P_R^T) = vec(sum_t (P_L L_t)(P_R R_t)^T), computed from the factors.
A vector parameter of length D is viewed as a zero-padded (d1, d2) matrix, d1 = ceil(sqrt(D)),
d2 = ceil(D / d1). All parameters project into ONE shared k-dimensional space:
proj_b = sum_p P_p vec(grad_{b,p}) = P vec(grad_b) with P = [P_1 | P_2 | ...] (k x D). Since the blocks
are independent with zero mean and E[P_L^T P_L] = I, E[P_R^T P_R] = I, E[P^T P] = I: for any two
gradients E <P x, P y> = <x, y> (an unbiased JL map; a Kronecker-structured map has a larger variance
than a dense one of the same k, so use a generous k, with a balanced factorisation: a power of two).
Summing rather than concatenating keeps k independent of the number of layers. P_L and P_R are drawn by
torch's CPU generator from seeds derived with SHA-256 from (``proj_seed``, parameter name, side), so a
projection is the same in every process and on every machine (with the same torch version), whatever
other parameters are selected. :meth:`GradEngine.projection_matrix` materialises P for small models.

Assumptions (what the engine cannot see). Examples must not interact in the forward: no BatchNorm in
training mode, no batch-level loss; call ``model.eval()`` for deterministic per-example gradients
(dropout). Modules must be called on batch-first tensors: a call on a tensor of leading dimension 1
shared by the whole batch (position ids of shape (1, T)) has only the batch's summed output gradient and
is refused with ``ValueError`` (:func:`per_example_loss` passes (B, T) position ids). Every use of a
selected parameter must go through its module's forward: a functional use elsewhere
(``F.linear(x, module.weight)``) is caught by the consistency check, which compares the per-example
factors summed over the batch with the batch gradient autograd computed (two random rank-1 probes per
matrix, the whole vector otherwise) with one device sync for all parameters, and raises ``ValueError``
on a mismatch. A trainable selected parameter owned by a module no rule covers is refused at
construction. Non-reentrant gradient checkpointing works (the recomputed forward is not recorded; the
original calls' outputs receive their gradients); reentrant checkpointing refuses ``torch.autograd.grad``
itself (a ``RuntimeError`` from torch).
"""

from __future__ import annotations

import hashlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from fnmatch import fnmatchcase
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from winnow.scorers.base import classification_inputs, model_logits, next_token_positions
from winnow.scorers.grad_rules import RULES, Dense, Outer, Record, Rule, find_rule

__all__ = [
    "PROJ_KINDS",
    "SQNORM_METHODS",
    "GradEngine",
    "fast_paths",
    "next_token_losses",
    "per_example_loss",
    "projection_factors",
    "select_parameters",
    "token_nll",
]

PROJ_KINDS = ("rademacher", "gaussian")
SQNORM_METHODS = ("auto", "gram", "direct")
SELECTIONS = ("all", "last_layer", "lora")
_LOW_PRECISION = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# parameter selection


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every name it has (a tied parameter has several), canonical name first."""
    out: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), []).append(name)
    return out


def _last_layer_ids(model: nn.Module) -> set[int]:
    mods = list(model.named_modules())
    lists = [(i, name, m) for i, (name, m) in enumerate(mods) if isinstance(m, nn.ModuleList) and len(m) >= 2]
    if lists:
        i, lname, blocks = max(lists, key=lambda x: (len(x[2]), x[0]))
        chosen = list(blocks[-1].modules())
        inside = lname + "."
        chosen += [m for name, m in mods[i + 1 :] if not name.startswith(inside)]
        return {id(p) for m in chosen for p in m.parameters(recurse=False)}
    for _, m in reversed(mods):
        own = [p for p in m.parameters(recurse=False) if p.requires_grad]
        if own:
            return {id(p) for p in own}
    return set()


def _entry_matches(entry: str, name: str) -> bool:
    module = name.rpartition(".")[0]
    return (
        name == entry
        or name.startswith(entry + ".")
        or module == entry
        or fnmatchcase(name, entry)
        or fnmatchcase(module, entry)
    )


def select_parameters(model: nn.Module, params: str | Sequence[str] = "all") -> dict[str, nn.Parameter]:
    """The trainable parameters ``params`` names, as ``{canonical name: parameter}`` in model order.

    ``params``:

    * ``"all"``: every parameter;
    * ``"last_layer"``: the last block of the model's longest ``nn.ModuleList`` of at least two modules
      (its transformer blocks; on a tie the later list) plus every module registered after that list (final
      norm, output layer, pooler, classifier); a model without such a list selects the parameters of its
      last module that has any (e.g. a CNN's final ``nn.Linear``). A tied output layer selects the shared
      tensor, whose gradient includes its use as the input embedding;
    * ``"lora"``: parameters whose name contains ``lora_``;
    * a list of entries, each an exact parameter name, a prefix ending at a dot (``"transformer.h.1"``),
      a module name, or an ``fnmatch`` glob over parameter or module names (``"*.attn.*"``).

    Frozen parameters (``requires_grad=False``) are skipped. A tied parameter appears once, under its
    first name in ``model.named_parameters()``, and is matched by any of its names. Raises
    ``ValueError`` for an unknown selection, a list entry that matches no parameter, or an empty result.
    """
    aliases = _aliases(model)
    ordered = list(model.named_parameters())
    if isinstance(params, str):
        if params == "all":
            ids = {id(p) for _, p in ordered}
        elif params == "lora":
            ids = {id(p) for _, p in ordered if any("lora_" in a for a in aliases[id(p)])}
            if not ids:
                raise ValueError("params='lora': the model has no parameter whose name contains 'lora_'")
        elif params == "last_layer":
            ids = _last_layer_ids(model)
        else:
            raise ValueError(
                f"params must be one of {', '.join(map(repr, SELECTIONS))} or a list of parameter names, "
                f"prefixes or globs; got {params!r}"
            )
    else:
        if not isinstance(params, Sequence) or not all(isinstance(e, str) and e for e in params):
            raise ValueError(f"params must be a string or a list of non-empty strings; got {params!r}")
        ids = set()
        for entry in params:
            hit = {id(p) for _, p in ordered if any(_entry_matches(entry, a) for a in aliases[id(p)])}
            if not hit:
                raise ValueError(f"params entry {entry!r} matches no parameter of {type(model).__name__}")
            ids |= hit
    out = {name: p for name, p in ordered if id(p) in ids and p.requires_grad}
    if not out:
        raise ValueError(f"params={params!r} selects no trainable parameter of {type(model).__name__}")
    return out


# ----------------------------------------------------------------------------------------------
# projections


def _split_dim(k: int) -> tuple[int, int]:
    k1 = max(d for d in range(1, math.isqrt(k) + 1) if k % d == 0)
    return k1, k // k1


def _vector_view(numel: int) -> tuple[int, int]:
    d1 = math.isqrt(numel)
    if d1 * d1 < numel:
        d1 += 1
    return d1, -(-numel // d1)


def _derived_seed(*parts: Any) -> int:
    digest = hashlib.sha256("/".join(map(str, ("winnow.grad_engine", *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def projection_factors(
    name: str, view: tuple[int, int], proj_dim: int, seed: int = 0, kind: str = "rademacher"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P_L, P_R)``, float64 on the CPU, (k1 x m) and (k2 x n), of the parameter ``name`` of view (m, n).

    Entries are Rademacher +-1 or standard Gaussian, scaled by 1/sqrt(k1) and 1/sqrt(k2), drawn from
    seeds derived from (``seed``, ``name``, side) only: the same in every process and on every machine.
    """
    if kind not in PROJ_KINDS:
        raise ValueError(f"proj_kind must be one of {', '.join(PROJ_KINDS)}, got {kind!r}")
    k1, k2 = _split_dim(proj_dim)
    out = []
    for side, rows, cols in (("left", k1, view[0]), ("right", k2, view[1])):
        gen = torch.Generator().manual_seed(_derived_seed(seed, name, side))
        if kind == "rademacher":
            mat = torch.randint(0, 2, (rows, cols), generator=gen).to(torch.float64).mul_(2).sub_(1)
        else:
            mat = torch.randn((rows, cols), generator=gen, dtype=torch.float64)
        out.append(mat.div_(math.sqrt(rows)))
    return out[0], out[1]


# ----------------------------------------------------------------------------------------------
# the math on factors


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Sums of squares accumulate in fp32 at least (fp64 stays fp64)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _left_gram(lu: Outer, lv: Outer) -> torch.Tensor:
    """(c, Tu, Tv) inner products L_u[t] . L_v[s]; one-hot sides by comparison or gather."""
    if lu.onehot and lv.onehot:
        return (lu.left.unsqueeze(2) == lv.left.unsqueeze(1)).to(lu.right.dtype)
    if lu.onehot:  # L_v[s, id_u[t]]
        idx = lu.left.unsqueeze(1).expand(-1, lv.left.shape[1], -1)
        return torch.gather(lv.left, 2, idx).transpose(1, 2)
    if lv.onehot:
        idx = lv.left.unsqueeze(1).expand(-1, lu.left.shape[1], -1)
        return torch.gather(lu.left, 2, idx)
    if lu.padded and lv.padded and lu.left.stride(-2) == lv.left.stride(-2):
        return torch.bmm(lu.wide_left(), lv.wide_left().transpose(1, 2))
    return torch.bmm(lu.left, lv.left.transpose(1, 2))


def _chunk(f: Outer, lo: int, hi: int) -> Outer:
    return Outer(f.left[lo:hi], f.right[lo:hi], padded=f.padded)


def _gram_sqnorm(uses: list[Outer], B: int, budget: int) -> torch.Tensor:
    T = sum(f.right.shape[1] for f in uses)
    c = max(1, budget // max(1, T * T))
    out = []
    for lo in range(0, B, c):
        hi = min(B, lo + c)
        part = [_chunk(f, lo, hi) for f in uses]
        acc = torch.zeros(hi - lo, dtype=_acc_dtype(uses[0].right), device=uses[0].right.device)
        for i, fu in enumerate(part):
            for j in range(i, len(part)):
                fv = part[j]
                k = _left_gram(fu, fv) * torch.bmm(fu.right, fv.right.transpose(1, 2))
                acc += (1.0 if i == j else 2.0) * k.sum((1, 2), dtype=acc.dtype)
        out.append(acc)
    return torch.cat(out)


def _direct_grads(uses: list[Outer], lo: int, hi: int, m: int, n: int) -> torch.Tensor:
    """Per-example gradients (hi - lo, m, n) of examples lo:hi."""
    f0 = uses[0].right
    M = torch.zeros(hi - lo, m, n, dtype=f0.dtype, device=f0.device)
    for f in uses:
        R = f.right[lo:hi]
        if f.onehot:
            rows = (torch.arange(hi - lo, device=R.device).unsqueeze(1) * m + f.left[lo:hi]).reshape(-1)
            M.view(-1, n).index_add_(0, rows, R.reshape(-1, n))
        else:
            M.baddbmm_(f.left[lo:hi].transpose(1, 2), R)
    return M


def _direct_sqnorm(uses: list[Outer], B: int, m: int, n: int, budget: int) -> torch.Tensor:
    c = max(1, budget // max(1, m * n))
    acc = _acc_dtype(uses[0].right)
    return torch.cat(
        [
            _direct_grads(uses, lo, min(B, lo + c), m, n).square().sum((1, 2), dtype=acc)
            for lo in range(0, B, c)
        ]
    )


def _sparse_sqnorm(uses: list[Outer], B: int, m: int, n: int) -> torch.Tensor:
    """All uses one-hot: sum the rows of each example's gradient by (example, id) key, then square."""
    dev = uses[0].right.device
    base = torch.arange(B, device=dev).unsqueeze(1) * m
    keys = torch.cat([(base + f.left).reshape(-1) for f in uses])
    vals = torch.cat([f.right.reshape(-1, n) for f in uses])
    uniq, inv = torch.unique(keys, return_inverse=True)
    acc = _acc_dtype(vals)
    rows = torch.zeros(uniq.numel(), n, dtype=acc, device=dev).index_add_(0, inv, vals.to(acc))
    out = torch.zeros(B, dtype=acc, device=dev)
    return out.index_add_(0, uniq // m, rows.square().sum(1))


def _outer_sqnorm(uses: list[Outer], B: int, m: int, n: int, method: str, budget: int) -> torch.Tensor:
    if method == "auto":
        if all(f.onehot for f in uses):
            return _sparse_sqnorm(uses, B, m, n)
        gram = sum(
            fu.right.shape[1] * fv.right.shape[1] * ((1 if fu.onehot or fv.onehot else m) + n)
            for fu in uses
            for fv in uses
        )
        direct = sum(f.right.shape[1] * (n if f.onehot else m * n) for f in uses) + m * n
        method = "gram" if gram < direct else "direct"
    if method == "gram":
        return _gram_sqnorm(uses, B, budget)
    return _direct_sqnorm(uses, B, m, n, budget)


def _outer_project(uses: list[Outer], PL: torch.Tensor, PR: torch.Tensor) -> torch.Tensor:
    B = uses[0].right.shape[0]
    acc = torch.zeros(B, PL.shape[0], PR.shape[0], dtype=PL.dtype, device=PL.device)
    for f in uses:
        left = PL.t()[f.left] if f.onehot else f.left @ PL.t()  # (B, T, k1)
        acc.baddbmm_(left.transpose(1, 2), f.right @ PR.t())
    return acc.reshape(B, -1)


def _scale_uses(uses: list[Outer], row: torch.Tensor, col: torch.Tensor) -> list[Outer]:
    """The factors of (row col^T) * grad_b: L * row and R * col (a one-hot L scales R by row[id])."""
    out = []
    for f in uses:
        if f.onehot:
            out.append(Outer(f.left, f.right * col * row[f.left].unsqueeze(-1)))
        else:
            out.append(Outer(f.left * row, f.right * col))
    return out


def _dense_project(v: torch.Tensor, PL: torch.Tensor, PR: torch.Tensor) -> torch.Tensor:
    B, D = v.shape
    d1, d2 = PL.shape[1], PR.shape[1]
    V = F.pad(v, (0, d1 * d2 - D)).view(B, d1, d2)
    return torch.matmul(torch.matmul(PL, V), PR.t()).reshape(B, -1)


_MM_OUT_DTYPE = {"ok": True}  # torch.mm/bmm(..., out_dtype=) exist for CUDA half inputs in recent torch


def _mm_acc(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``a @ b`` (2-D, or 3-D batched) as ``acc``: half-precision inputs multiply in their own precision
    (fp32 accumulation in the kernel) and, on CUDA, write an fp32 result directly (``out_dtype``);
    elsewhere the product is cast."""
    if a.dtype == acc and b.dtype == acc:
        return a @ b
    if a.dtype != b.dtype:
        low = a.dtype if a.dtype in _LOW_PRECISION else b.dtype
        a, b = a.to(low), b.to(low)
    if a.is_cuda and _MM_OUT_DTYPE["ok"]:
        try:
            return (torch.bmm if a.dim() == 3 else torch.mm)(a, b, out_dtype=acc)
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE["ok"] = False
    return (a @ b).to(acc)


_GRAM_SLICE = 8192  # columns per batched slice of a long Gram


def _rows_gram(X: torch.Tensor) -> torch.Tensor:
    """X X^T for a short, very long X (C, P). A plain product of that shape runs far below memory speed on
    CUDA (one fp32 GEMM with an 8 x 8 output and K in the millions); on CUDA it is computed as a batch of
    (C, 8192) slices, one read of X."""
    C, P = X.shape
    if not X.is_cuda or P < 4 * _GRAM_SLICE or X.stride(1) != 1:
        return X @ X.t()
    R = P // _GRAM_SLICE
    head = X[:, : R * _GRAM_SLICE].as_strided((R, C, _GRAM_SLICE), (_GRAM_SLICE, X.stride(0), 1))
    G = torch.bmm(head, head.transpose(1, 2)).sum(0)
    if R * _GRAM_SLICE < P:
        tail = X[:, R * _GRAM_SLICE :]
        G += tail @ tail.t()
    return G


def _outer_groups(
    uses: list[Outer],
    m: int,
    n: int,
    groups: torch.Tensor,
    spans: list[tuple[int, int, int]],
    perm: torch.Tensor | None,
    C: int,
    target: torch.Tensor | None,
    budget: int,
    acc: torch.dtype,
    keep: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(C, C) Gram of the group sums S_c of the per-example gradients, their dot with ``target`` (m, n),
    and with ``keep`` the sums themselves, (C, rows, n) in ``acc`` (rows >= m: an aligned layer's padded
    width; the real gradient is the first m rows, i.e. the first m * n entries of each group's block).

    ``spans``: (group, start, end) over the batch after ``perm`` (None: the batch is already ordered by
    group, so each group's positions are a view, not a copy). Products take the factors in their own
    precision and accumulate in ``acc``. Without ``keep``, S is built one block of columns at a time
    (C * rows * n_slice <= ``budget``), and an embedding-only parameter keeps only the rows of the ids
    present in the batch."""
    dev = uses[0].right.device
    compact = all(f.onehot for f in uses) and not keep
    if compact:  # keep only the rows of ids present in the batch
        ids, inv = torch.unique(torch.cat([f.left.reshape(-1) for f in uses]), return_inverse=True)
        rows = ids.numel()
        invs, start = [], 0
        for f in uses:
            invs.append(inv[start : start + f.left.numel()].view_as(f.left))
            start += f.left.numel()
    else:
        # an aligned layer's padded output gradient: products over its aligned width (zero extra rows)
        rows = max([m] + [f.left.stride(-2) for f in uses if f.padded])
    dense = []
    for f in uses:
        if f.onehot:
            dense.append(None)
            continue
        L, R = f.wide_left(), f.right
        if perm is not None:
            L, R = L.index_select(0, perm), R.index_select(0, perm)
        dense.append((L, R))
    ns = n if keep else max(1, min(n, budget // max(1, C * rows)))
    gram = torch.zeros(C, C, dtype=acc, device=dev)
    dot = None if target is None else torch.zeros(C, dtype=acc, device=dev)
    # every group present with as many examples, in order: one batched product per use, no zero fill
    sizes = {e - s for _, s, e in spans}
    batched = len(spans) == C and len(sizes) == 1
    order = sorted(range(len(uses)), key=lambda i: uses[i].onehot)  # dense uses first
    for c0 in range(0, n, ns):
        c1 = min(n, c0 + ns)
        S = None
        for i in order:
            f = uses[i]
            if f.onehot:
                if S is None:
                    S = torch.zeros(C, rows, c1 - c0, dtype=acc, device=dev)
                idx = invs[i] if compact else f.left
                key = (groups.unsqueeze(1) * rows + idx).reshape(-1)
                S.view(-1, c1 - c0).index_add_(0, key, f.right[..., c0:c1].reshape(-1, c1 - c0).to(acc))
                continue
            L, R = dense[i]
            w = L.shape[-1]
            if batched and w == rows:
                prod = _mm_acc(
                    L.reshape(C, -1, w).transpose(1, 2), R[..., c0:c1].reshape(C, -1, c1 - c0), acc
                )
                if S is None:
                    S = prod
                else:
                    S += prod
                continue
            if S is None:
                S = torch.zeros(C, rows, c1 - c0, dtype=acc, device=dev)
            for c, s, e in spans:
                S[c, :w] += _mm_acc(L[s:e].reshape(-1, w).t(), R[s:e, :, c0:c1].reshape(-1, c1 - c0), acc)
        Sf = S.reshape(C, -1)
        gram += _rows_gram(Sf)
        if dot is not None:
            tgt = target[ids, c0:c1] if compact else target[:, c0:c1]
            r = rows if compact else m  # the real rows: the first r * n_slice entries of each group's block
            dot += Sf[:, : r * (c1 - c0)] @ tgt.reshape(-1)
    return gram, dot, (S if keep else None)


# ----------------------------------------------------------------------------------------------
# aligned wide linear layers

_ALIGN = 64  # pad output widths to a multiple of this many features
_ALIGN_MIN_WIDTH = 4096  # only layers at least this wide (output vocabularies) are worth it


def _aligned_linear(module: nn.Linear, cuda_only: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """A forward for ``module`` that multiplies by its weight zero-padded to a multiple of ``_ALIGN`` rows
    and returns the first ``out_features`` columns (a strided view): the same values and gradients (the
    padded rows are constants; their outputs are dropped), but cuBLAS gets aligned leading dimensions for
    the forward product and the backward's product with the output gradient. ``cuda_only``: other devices
    use the plain ``F.linear``."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        w, b = module.weight, module.bias
        if cuda_only and not x.is_cuda:
            return F.linear(x, w, b)
        width = w.shape[0]
        pad = -width % _ALIGN
        wp = F.pad(w, (0, 0, 0, pad))
        bp = None if b is None else F.pad(b, (0, pad))
        full = F.linear(x, wp, bp)
        out = full[..., :width]
        out._winnow_padded = full  # the engine records the padded output's gradient (aligned rows)
        return out

    return forward


def _is_new_gelu(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "NewGELUActivation" and cls.__module__ == "transformers.activations"


def _tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    """transformers' ``NewGELUActivation`` (GPT-2's ``gelu_new``), 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715
    x^3))), is exactly ``F.gelu(approximate="tanh")``: one fused kernel (each way) instead of eight
    elementwise passes that round to bf16 in between (~15% of a GPT-2-small forward and backward)."""
    return F.gelu(x, approximate="tanh")


class fast_paths:
    """Context manager: the engine's exact speed substitutions, usable without the engine (a frozen reference
    model, a proxy's training step; the engine applies them itself while open): plain ``nn.Linear`` layers at
    least 4096 wide whose width is not a multiple of 64 compute through a zero-padded weight (``align``:
    ``"auto"`` on CUDA inputs only, ``True`` everywhere, ``False`` never; ``linears``: only these modules),
    and transformers' ``gelu_new`` runs as the identical fused ``F.gelu(approximate="tanh")``
    (``fuse_activations``). Modules that already have an instance ``forward`` are left alone; exit restores
    the patched modules' ``forward``."""

    def __init__(
        self,
        model: nn.Module,
        align: str | bool = "auto",
        fuse_activations: bool = True,
        linears: Sequence[nn.Module] | None = None,
    ) -> None:
        if align not in ("auto", True, False):
            raise ValueError(f"align must be 'auto', True or False, got {align!r}")
        self.model, self.align, self.fuse = model, align, fuse_activations
        self.linears = None if linears is None else {id(m) for m in linears}
        self.patched: list[nn.Module] = []

    def __enter__(self) -> fast_paths:
        for module in self.model.modules():
            if "forward" in module.__dict__:
                continue
            if self.fuse and _is_new_gelu(module):
                module.forward = _tanh_gelu
            elif (
                self.align is not False
                and type(module) is nn.Linear
                and module.out_features % _ALIGN
                and module.out_features >= _ALIGN_MIN_WIDTH
                and (self.linears is None or id(module) in self.linears)
            ):
                module.forward = _aligned_linear(module, cuda_only=self.align == "auto")
            else:
                continue
            self.patched.append(module)
        return self

    def __exit__(self, *exc: Any) -> None:
        for module in self.patched:
            module.__dict__.pop("forward", None)
        self.patched = []


# ----------------------------------------------------------------------------------------------
# the engine


def _detach(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, tuple):
        return tuple(_detach(v) for v in x)
    if isinstance(x, list):
        return [_detach(v) for v in x]
    if isinstance(x, dict):
        return {k: _detach(v) for k, v in x.items()}
    return x


class GradEngine:
    """Per-example gradient quantities of ``model`` from one batched forward and backward.

    ``params``: which parameters (see :func:`select_parameters`): ``"all"``, ``"last_layer"``,
    ``"lora"`` or a list of names / prefixes / globs. ``proj_dim``: k of the random projection (None: no
    projection); ``proj_seed`` and ``proj_kind`` (``"rademacher"`` or ``"gaussian"``) define it (module
    docstring, "Projection"). ``sqnorm_method``: ``"auto"`` (cheaper of Gram and direct per parameter,
    the sparse form for embeddings), or force ``"gram"`` / ``"direct"``. ``check``: compare the
    per-example factors summed over the batch with the batch gradient (a safety net against uses of a
    parameter the rules do not see). ``chunk_elements``: bound on the elements of the temporary blocks
    (per-example gradients, Gram matrices, group sums) held at once. ``align``: while the engine is open,
    plain ``nn.Linear`` layers at least 4096 wide whose width is not a multiple of 64 (output vocabularies
    such as GPT-2's 50257) compute through their weight zero-padded to a multiple of 64 and return a view
    of the real columns: identical values and gradients, aligned matrix shapes for cuBLAS. ``"auto"``:
    on CUDA inputs only; ``True``: on every device (tests); ``False``: never. ``fuse_activations``: while
    the engine is open, transformers' ``NewGELUActivation`` (GPT-2's ``gelu_new``) runs as the identical
    ``F.gelu(approximate="tanh")`` (one kernel, rounded once). :meth:`close` restores both.

    Hooks are installed on construction and removed by :meth:`close` (or on leaving a ``with`` block);
    they record only inside :meth:`compute`. Raises ``ValueError`` when a selected trainable parameter
    belongs to a module that no rule covers, naming the module and its type.

    ::

        with GradEngine(model, params="all", proj_dim=1024) as eng:
            out = eng.compute(lambda: per_example_loss(model, batch, "causal_lm"), project=True)
        out["sqnorm"], out["proj"]        # (B,), (B, 1024), float32
    """

    def __init__(
        self,
        model: nn.Module,
        params: str | Sequence[str] = "all",
        proj_dim: int | None = None,
        proj_seed: int = 0,
        proj_kind: str = "rademacher",
        *,
        sqnorm_method: str = "auto",
        check: bool = True,
        factor_dtype: str = "fp32",
        chunk_elements: int = 1 << 25,
        align: str | bool = "auto",
        fuse_activations: bool = True,
    ) -> None:
        if proj_dim is not None and (
            isinstance(proj_dim, bool) or not isinstance(proj_dim, int) or proj_dim < 1
        ):
            raise ValueError(f"proj_dim must be a positive int or None, got {proj_dim!r}")
        if proj_kind not in PROJ_KINDS:
            raise ValueError(f"proj_kind must be one of {', '.join(PROJ_KINDS)}, got {proj_kind!r}")
        if sqnorm_method not in SQNORM_METHODS:
            raise ValueError(
                f"sqnorm_method must be one of {', '.join(SQNORM_METHODS)}, got {sqnorm_method!r}"
            )
        if not isinstance(chunk_elements, int) or chunk_elements < 1:
            raise ValueError(f"chunk_elements must be a positive int, got {chunk_elements!r}")
        fast_paths(model, align=align)  # validates align before anything is installed
        self.model = model
        self.proj_dim = proj_dim
        self.proj_seed = int(proj_seed)
        self.proj_kind = proj_kind
        self.sqnorm_method = sqnorm_method
        self.check = check
        if factor_dtype not in ("fp32", "input"):
            raise ValueError(f"factor_dtype must be 'fp32' or 'input', got {factor_dtype!r}")
        self.factor_dtype = factor_dtype
        self.chunk_elements = chunk_elements
        self.params: dict[str, nn.Parameter] = select_parameters(model, params)
        aliases = _aliases(model)
        self.aliases: dict[str, list[str]] = {name: aliases[id(p)] for name, p in self.params.items()}
        by_id = {id(p): name for name, p in self.params.items()}
        self.kinds: dict[str, str] = {}
        self._owners: dict[str, list[tuple[str, str]]] = {name: [] for name in self.params}
        self._modules: dict[str, tuple[nn.Module, Rule, set[str]]] = {}
        for mname, module in model.named_modules():
            own = [
                (attr, by_id[id(p)]) for attr, p in module.named_parameters(recurse=False) if id(p) in by_id
            ]
            if not own:
                continue
            label = mname or "<root>"
            rule = find_rule(module)
            if rule is None:
                names = ", ".join(repr(n) for _, n in own)
                known = ", ".join(r.name for r in RULES)
                raise ValueError(
                    f"module {label!r} ({type(module).__name__}) holds selected trainable parameter(s) {names} "
                    f"but no per-example gradient rule covers {type(module).__name__} (rules: {known}); "
                    f"leave it out of params, freeze it, or register a rule"
                )
            problem = rule.problem(module)
            if problem is not None:
                raise ValueError(f"module {label!r} ({type(module).__name__}): {problem}")
            kinds = rule.kinds(module)
            for attr, name in own:
                kind = kinds.get(attr)
                if kind is None:
                    raise ValueError(
                        f"module {label!r} ({type(module).__name__}): parameter {attr!r} is not covered by the "
                        f"{rule.name!r} rule"
                    )
                if self.kinds.setdefault(name, kind) != kind:
                    raise ValueError(
                        f"parameter {name!r} is used by rules of different kinds (outer and dense)"
                    )
                self._owners[name].append((mname, attr))
            self._modules[mname] = (module, rule, {attr for attr, _ in own})
        self.views: dict[str, tuple[int, int]] = {}
        for name, p in self.params.items():
            if self.kinds[name] == "outer":
                self.views[name] = (p.shape[0], p.numel() // max(1, p.shape[0]))
            else:
                self.views[name] = _vector_view(p.numel())
        self._records: dict[str, list[Record]] = {}
        self._outputs: list[torch.Tensor] = []
        self._active = False
        self._proj_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # projection and probe factors
        self._handles = [
            module.register_forward_hook(partial(self._on_forward, key), with_kwargs=True)
            for key, (module, _, _) in self._modules.items()
        ]
        # Linear layers with an output width cuBLAS handles badly (GPT-2's 50257-way head: 7x slower than
        # at 50304 on an H100) compute through a zero-padded weight while the engine is open; gelu_new fused.
        self._fast = fast_paths(
            model,
            align=align,
            fuse_activations=fuse_activations,
            linears=[m for m, _, _ in self._modules.values()],
        ).__enter__()

    # -- hooks ---------------------------------------------------------------------------------
    def _on_forward(self, key: str, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self._active:
            return
        if not isinstance(output, torch.Tensor):
            raise ValueError(
                f"module {key!r} ({type(module).__name__}) returned {type(output).__name__}, "
                f"not a tensor; its rule cannot record the output gradient"
            )
        rec = Record(_detach(args), _detach(kwargs))
        if output.requires_grad:
            padded = getattr(output, "_winnow_padded", None)
            if padded is not None and padded.requires_grad:
                # an aligned linear layer: record the padded output's gradient, seen through a view of the
                # real columns, so that the rules' products keep the aligned row stride
                width = output.shape[-1]

                def keep_padded(grad: torch.Tensor, rec: Record = rec) -> None:
                    rec.grad = grad[..., :width]
                    rec.zero_padded = bool(grad.is_contiguous())

                padded.register_hook(keep_padded)
                self._outputs.append(padded)
            else:

                def keep(grad: torch.Tensor, rec: Record = rec) -> None:
                    rec.grad = grad

                output.register_hook(keep)
                self._outputs.append(output)
        self._records[key].append(rec)

    def close(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._fast.__exit__()

    @property
    def _patched(self) -> list[nn.Module]:
        """Modules whose forward the engine's fast paths replaced (restored by close)."""
        return self._fast.patched

    def __enter__(self) -> GradEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- projections ---------------------------------------------------------------------------
    @property
    def param_names(self) -> list[str]:
        """Selected parameters, in the order of the flattened gradient (and of :meth:`projection_matrix`)."""
        return list(self.params)

    def _proj(self, name: str, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (name, device, dtype)
        if key not in self._proj_cache:
            assert self.proj_dim is not None
            PL, PR = projection_factors(name, self.views[name], self.proj_dim, self.proj_seed, self.proj_kind)
            self._proj_cache[key] = (PL.to(device, dtype), PR.to(device, dtype))
        return self._proj_cache[key]

    def projection_matrix(self) -> torch.Tensor:
        """The dense k x D projection P (float64, CPU) that ``compute(project=True)`` applies: column block
        p is ``kron(P_L, P_R)[:, :numel_p]``, the blocks in :attr:`param_names` order, each parameter
        flattened row-major (``p.flatten()``). For small models and tests: it has k x D entries."""
        if self.proj_dim is None:
            raise ValueError("projection_matrix: the engine was built without proj_dim")
        blocks = []
        for name, p in self.params.items():
            PL, PR = projection_factors(name, self.views[name], self.proj_dim, self.proj_seed, self.proj_kind)
            blocks.append(torch.kron(PL, PR)[:, : p.numel()])
        return torch.cat(blocks, dim=1)

    # -- compute -------------------------------------------------------------------------------
    def compute(
        self,
        per_example_loss: Callable[[], torch.Tensor],
        *,
        sqnorm: bool = True,
        per_param: bool = False,
        project: bool = False,
        groups: torch.Tensor | None = None,
        num_groups: int | None = None,
        target: Mapping[str, torch.Tensor] | None = None,
        precondition: Mapping[str, Any] | None = None,
        grad_coeffs: Callable[[dict[str, Any]], torch.Tensor] | None = None,
        group_coeffs: Callable[[dict[str, Any]], torch.Tensor] | None = None,
    ) -> dict[str, Any]:
        """Run ``per_example_loss()`` (a forward returning the B per-example losses) and ONE backward of their
        sum, and return, float32 on the loss's device:

        * ``"loss"``: the per-example losses (B,), detached;
        * ``"sqnorm"`` (``sqnorm=True``): ||grad_b||^2 over the selected parameters (B,);
        * ``"param_sqnorm"`` (``per_param=True``): ``{name: (B,)}`` per parameter;
        * ``"proj"`` (``project=True``, needs ``proj_dim``): P grad_b (B, k);
        * ``"group_gram"`` (``groups`` given): (C, C) with entry (c, d) = <S_c, S_d>, S_c the sum of the
          gradients of the examples of group c; ``groups`` is a long tensor (B,) of ids in [0, C),
          C = ``num_groups`` or ``groups.max() + 1`` (an empty group has a zero sum);
        * ``"group_dot"`` (``groups`` and ``target`` given): (C,) <S_c, target>; ``target`` maps the name
          (any alias of a tied parameter) of every selected parameter to a tensor of its shape; other
          entries are ignored.

        ``precondition`` (projections only): ``{name: scale}`` for every selected parameter; the projection
        is then ``P (D * grad_b)`` with D the elementwise scale of each parameter: for a parameter of
        ``Outer`` kind a rank-one ``(row (m,), col (n,))`` pair, D = row col^T (applied to the factors:
        L * row, R * col, so nothing of size m x n per example exists), for a vector parameter a tensor
        of its numel. Squared norms and group sums stay those of the plain gradients.

        ``grad_coeffs``: a function of the results (the dict described above, before returning) that gives
        (B,) coefficients c; the engine then ADDS ``sum_b c_b grad_b`` to each selected parameter's
        ``.grad`` (as ``backward`` of ``sum_b c_b loss_b`` would), computed from the recorded factors: a
        training step whose loss weights depend on this step's per-example or per-group gradients (DoGE,
        DGA) costs one backward, not two. The coefficients are returned as ``"grad_coeffs"``.

        ``group_coeffs`` (needs ``groups``): the same for coefficients that are constant within a group: a
        function of the results giving (C,) coefficients a; the engine ADDS ``sum_c a_c S_c`` to ``.grad``.
        The group sums S_c that the Gram was built from are kept (C times the selected parameters' size, in
        fp32), so the model's gradient costs no second product of the factors: a DoGE/DGA step costs a
        plain step plus O(C * parameters) (benchmarks/RESULTS.md). Returned as ``"group_coeffs"``.
        """
        if project and self.proj_dim is None:
            raise ValueError("compute(project=True) needs an engine built with proj_dim")
        if target is not None and groups is None:
            raise ValueError(
                "compute(target=...) needs groups: the target is compared with group gradient sums"
            )
        if group_coeffs is not None and groups is None:
            raise ValueError("compute(group_coeffs=...) needs groups: the coefficients weight the group sums")
        if group_coeffs is not None and grad_coeffs is not None:
            raise ValueError("compute: give grad_coeffs (per example) or group_coeffs (per group), not both")
        if not callable(per_example_loss):
            raise ValueError(
                f"per_example_loss must be a callable returning the (B,) losses, got {per_example_loss!r}"
            )
        if not self._handles:
            raise ValueError("this GradEngine is closed")
        self._records = {key: [] for key in self._modules}
        self._outputs = []
        self._active = True
        try:
            with torch.enable_grad():
                losses = per_example_loss()
        finally:
            self._active = False
        pre = self._check_precondition(precondition) if precondition is not None else None
        try:
            return self._compute(
                losses, sqnorm, per_param, project, groups, num_groups, target, pre, grad_coeffs, group_coeffs
            )
        finally:
            self._records = {}
            self._outputs = []

    def _check_groups(self, groups: torch.Tensor, num_groups: int | None, B: int, device: torch.device):
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
            raise ValueError(
                f"num_groups must be an int >= the largest group id + 1 ({top}), got {num_groups!r}"
            )
        return groups, num_groups

    def _check_target(self, target: Mapping[str, torch.Tensor], device: torch.device, dtype: torch.dtype):
        if not isinstance(target, Mapping):
            raise ValueError(
                f"target must be a dict of parameter name -> tensor, got {type(target).__name__}"
            )
        out: dict[str, torch.Tensor] = {}
        missing = []
        for name, p in self.params.items():
            alias = next((a for a in self.aliases[name] if a in target), None)
            if alias is None:
                missing.append(name)
                continue
            t = target[alias]
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(p.shape):
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"target[{alias!r}] has shape {shape}; the parameter has {tuple(p.shape)}")
            out[name] = t.detach().to(device=device, dtype=dtype)
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise ValueError(
                f"target has no entry for selected parameter(s) {', '.join(map(repr, missing[:5]))}{more}"
            )
        return out

    def _check_precondition(self, pre: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(pre, Mapping):
            raise ValueError(
                f"precondition must be a dict of parameter name -> scale, got {type(pre).__name__}"
            )
        out: dict[str, Any] = {}
        for name, p in self.params.items():
            alias = next((a for a in self.aliases[name] if a in pre), None)
            if alias is None:
                raise ValueError(f"precondition has no entry for selected parameter {name!r}")
            d = pre[alias]
            if self.kinds[name] == "outer":
                m, n = self.views[name]
                ok = (
                    isinstance(d, tuple | list)
                    and len(d) == 2
                    and all(isinstance(t, torch.Tensor) for t in d)
                    and d[0].numel() == m
                    and d[1].numel() == n
                )
                if not ok:
                    raise ValueError(
                        f"precondition[{alias!r}] must be a (row ({m},), col ({n},)) pair of tensors"
                    )
                out[name] = (d[0].reshape(m), d[1].reshape(n))
            else:
                if not isinstance(d, torch.Tensor) or d.numel() != p.numel():
                    raise ValueError(f"precondition[{alias!r}] must be a tensor of {p.numel()} elements")
                out[name] = d.reshape(-1)
        return out

    def _compute(
        self,
        losses,
        sqnorm,
        per_param,
        project,
        groups,
        num_groups,
        target,
        pre=None,
        grad_coeffs=None,
        group_coeffs=None,
    ) -> dict[str, Any]:
        if not isinstance(losses, torch.Tensor) or losses.dim() != 1 or not losses.is_floating_point():
            what = (
                f"shape {tuple(losses.shape)} {losses.dtype}"
                if isinstance(losses, torch.Tensor)
                else type(losses).__name__
            )
            raise ValueError(
                f"per_example_loss must return a 1-D float tensor of per-example losses (B,), got {what}"
            )
        if not losses.requires_grad:
            raise ValueError(
                "the per-example losses do not require grad: computed under torch.no_grad() / "
                "inference_mode, or the selected parameters do not affect them"
            )
        B, device = losses.shape[0], losses.device
        dtype = (
            torch.float64 if any(p.dtype == torch.float64 for p in self.params.values()) else torch.float32
        )
        C = 0
        spans: list[tuple[int, int, int]] = []
        perm = None
        if groups is not None:
            groups, C = self._check_groups(groups, num_groups, B, device)
            # the batch ordered by group: each group's rows are one slice (a view when already ordered)
            if B > 1 and not bool((groups[1:] >= groups[:-1]).all()):
                perm = torch.argsort(groups, stable=True)
            ordered = groups if perm is None else groups[perm]
            ids, counts = torch.unique_consecutive(ordered, return_counts=True)
            ends = counts.cumsum(0).tolist()
            spans = [(c, e - n, e) for c, n, e in zip(ids.tolist(), counts.tolist(), ends, strict=True)]
        targets = self._check_target(target, device, dtype) if target is not None else None

        names = list(self.params)
        # ONE backward of the SUM of the per-example losses: example b's gradient is d loss_b / d theta.
        # With the consistency check it is taken w.r.t. the parameters (the batch gradient is the check's
        # reference); without it, w.r.t. the recorded module outputs only, so autograd skips the batch
        # weight-gradient products the rules do not need (about a third of a training step's work).
        if self.check or not self._outputs:
            batch_grads = torch.autograd.grad(
                losses.sum(), [self.params[n] for n in names], allow_unused=True
            )
        else:
            torch.autograd.grad(losses.sum(), self._outputs, allow_unused=True)
            batch_grads = [None] * len(names)

        # Factors (activations and output gradients) are converted to `dtype` (fp32) by default. With
        # factor_dtype="input" and half-precision records, squared norms and group sums keep the factors in
        # their own precision (no fp32 copies of bf16 activations) and accumulate every sum in fp32;
        # projections and grad_coeffs always use fp32 factors.
        fdtype = dtype
        if self.factor_dtype == "input" and not project and grad_coeffs is None:
            low = [
                r.grad.dtype
                for recs in self._records.values()
                for r in recs
                if r.grad is not None and r.grad.dtype in _LOW_PRECISION
            ]
            if low:
                fdtype = low[0]
        total = torch.zeros(B, dtype=dtype, device=device)
        per: dict[str, torch.Tensor] = {}
        proj = torch.zeros(B, self.proj_dim, dtype=dtype, device=device) if project else None
        gram = torch.zeros(C, C, dtype=dtype, device=device) if groups is not None else None
        dot = torch.zeros(C, dtype=dtype, device=device) if targets is not None else None
        cache: dict[str, tuple[list[dict[str, Any]], bool]] = {}
        checks: list[tuple[str, torch.Tensor, torch.Tensor, str]] = []  # name, |est - ref|, allowed, what
        remaining = {key: len(attrs) for key, (_, _, attrs) in self._modules.items()}
        # the rules choose their own precision (factor_dtype): no caller's autocast applies to them
        with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
            kept: dict[str, list[Any]] = {}
            sums: dict[str, torch.Tensor] = {}  # group_coeffs: each parameter's group sums S (C, ...)
            for name, G in zip(names, batch_grads, strict=True):
                uses, low = self._uses(name, B, fdtype, cache, remaining)
                if grad_coeffs is not None:
                    kept[name] = uses
                numel = self.params[name].numel()
                if self.kinds[name] == "dense":
                    v = torch.zeros(B, numel, dtype=dtype, device=device)
                    for f in uses:
                        v += f.value
                    if self.check:
                        checks.append(self._check_dense(name, v, uses, G, low))
                    sq = v.square().sum(1, dtype=dtype) if sqnorm or per_param else None
                    if proj is not None:
                        pv = v if pre is None else v * pre[name].to(device, dtype)
                        proj += _dense_project(pv, *self._proj(name, device, dtype))
                    if gram is not None:
                        S = torch.zeros(C, numel, dtype=dtype, device=device).index_add_(0, groups, v)
                        gram += S @ S.t()
                        if dot is not None:
                            dot += S @ targets[name].reshape(-1)
                        if group_coeffs is not None:
                            sums[name] = S
                else:
                    m, n = self.views[name]
                    if not uses:
                        if self.check and G is not None:
                            checks.append(
                                (
                                    name,
                                    G.detach().abs().max().to(dtype),
                                    torch.zeros((), dtype=dtype, device=device),
                                    "no recorded use, but a nonzero batch gradient",
                                )
                            )
                        if sqnorm or per_param:
                            per[name] = torch.zeros(B, dtype=dtype, device=device)
                            total += per[name]
                        if group_coeffs is not None:
                            sums[name] = torch.zeros(C, m, n, dtype=dtype, device=device)
                        continue
                    if self.check:
                        checks.append(self._check_outer(name, uses, G, m, n, low))
                    sq = (
                        _outer_sqnorm(uses, B, m, n, self.sqnorm_method, self.chunk_elements)
                        if sqnorm or per_param
                        else None
                    )
                    if proj is not None:
                        pu = (
                            uses
                            if pre is None
                            else _scale_uses(uses, *(t.to(device, dtype) for t in pre[name]))
                        )
                        proj += _outer_project(pu, *self._proj(name, device, dtype))
                    if gram is not None:
                        tg = targets[name].reshape(m, n) if targets is not None else None
                        g2, d2, S = _outer_groups(
                            uses,
                            m,
                            n,
                            groups,
                            spans,
                            perm,
                            C,
                            tg,
                            self.chunk_elements,
                            dtype,
                            keep=group_coeffs is not None,
                        )
                        gram += g2
                        if dot is not None:
                            dot += d2
                        if S is not None:
                            sums[name] = S
                if sq is not None:
                    per[name] = sq.to(dtype)
                    total += per[name]
        if checks:  # one device sync for all the parameters
            bad = torch.stack([(diff > allowed).any() for _, diff, allowed, _ in checks])
            if bool(bad.any()):
                name, diff, allowed, what = checks[int(bad.nonzero()[0, 0])]
                raise self._mismatch(
                    name, f"{what}: difference {diff.max().item():.3g}, allowed {allowed.max().item():.3g}"
                )
        out: dict[str, Any] = {"loss": losses.detach().float()}
        if sqnorm:
            out["sqnorm"] = total.float()
        if per_param:
            out["param_sqnorm"] = {k: v.float() for k, v in per.items()}
        if proj is not None:
            out["proj"] = proj.float()
        if gram is not None:
            out["group_gram"] = gram.float()
        if dot is not None:
            out["group_dot"] = dot.float()
        if grad_coeffs is not None:
            c = grad_coeffs(out)
            if not isinstance(c, torch.Tensor) or c.shape != (B,):
                raise ValueError(
                    f"grad_coeffs must return a tensor of shape ({B},), got "
                    f"{tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__}"
                )
            with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
                for name, uses in kept.items():
                    p = self.params[name]
                    g = (
                        self._weighted_grad(name, uses, c.to(device, dtype), dtype)
                        .reshape(p.shape)
                        .to(p.dtype)
                    )
                    p.grad = g if p.grad is None else p.grad.add_(g)
            out["grad_coeffs"] = c.detach().float()
        if group_coeffs is not None:
            a = group_coeffs(out)
            if not isinstance(a, torch.Tensor) or a.shape != (C,):
                raise ValueError(
                    f"group_coeffs must return a tensor of shape ({C},) (one per group), got "
                    f"{tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__}"
                )
            with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
                a = a.detach().to(device, dtype)
                for name, S in sums.items():
                    p = self.params[name]
                    g = (
                        (a.unsqueeze(0) @ S.reshape(C, -1))
                        .reshape(-1)[: p.numel()]
                        .reshape(p.shape)
                        .to(p.dtype)
                    )
                    p.grad = g if p.grad is None else p.grad.add_(g)
            sums.clear()
            out["group_coeffs"] = a.float()
        return out

    def _weighted_grad(self, name: str, uses: list[Any], c: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """sum_b c_b grad_b of parameter ``name`` from its factors, as its (m, n) view or flat vector."""
        if self.kinds[name] == "dense":
            return sum(
                ((f.value.to(dtype) * c.unsqueeze(1)).sum(0) for f in uses),
                torch.zeros(self.params[name].numel(), dtype=dtype, device=c.device),
            )
        m, n = self.views[name]
        acc = torch.zeros(m, n, dtype=dtype, device=c.device)
        for f in uses:
            R = (f.right.to(dtype) * c.view(-1, 1, 1)).reshape(-1, n)
            if f.onehot:
                acc.index_add_(0, f.left.reshape(-1), R)
            else:
                acc.addmm_(f.left.to(dtype).reshape(-1, m).t(), R)
        return acc

    def _uses(self, name, B, dtype, cache, remaining) -> tuple[list[Any], bool]:
        """The factors of every recorded use of parameter ``name`` and whether any recorded output gradient
        was in half precision; a module's factors are freed once all its selected parameters are done."""
        uses: list[Any] = []
        low = False
        for key, attr in self._owners[name]:
            module, rule, attrs = self._modules[key]
            if key not in cache:
                recs = [r for r in self._records.get(key, []) if r.grad is not None]
                cache[key] = (
                    [rule.factors(module, r, attrs, B, dtype) for r in recs],
                    any(r.grad.dtype in _LOW_PRECISION for r in recs),
                )
            factors, half = cache[key]
            uses += [fs[attr] for fs in factors]
            low = low or half
            remaining[key] -= 1
            if remaining[key] == 0:
                del cache[key]
        kind = self.kinds[name]
        if any(not isinstance(f, Dense if kind == "dense" else Outer) for f in uses):
            raise ValueError(f"parameter {name!r}: a rule returned factors of the wrong kind for {kind!r}")
        return uses, low

    # -- consistency check ---------------------------------------------------------------------
    def _mismatch(self, name: str, detail: str) -> ValueError:
        return ValueError(
            f"parameter {name!r}: the per-example gradients from the rules do not add up to the batch gradient "
            f"({detail}); some use of this parameter is not seen by its module's rule: a functional use outside "
            f"the module's forward (e.g. F.linear(x, module.weight)) or a module called on tensors that are not "
            f"batch-first. Pass check=False to skip this test"
        )

    @staticmethod
    def _tol(G: torch.Tensor | None, low: bool) -> float:
        if low or (G is not None and G.dtype in _LOW_PRECISION):
            return 3e-2
        return 1e-6 if G is not None and G.dtype == torch.float64 else 1e-3

    def _check_dense(self, name: str, v: torch.Tensor, uses: list[Dense], G: torch.Tensor | None, low: bool):
        est = v.sum(0)
        scale = sum(
            ((f.value if f.scale is None else f.scale_value()).abs().sum(0) for f in uses),
            torch.zeros_like(est),
        )
        ref = torch.zeros_like(est) if G is None else G.detach().reshape(-1).to(est.dtype)
        return (
            name,
            (est - ref).norm(),
            self._tol(G, low) * (scale + ref.abs()).norm(),
            "|sum_b grad_b - batch gradient|",
        )

    def _probes(self, name: str, m: int, n: int, device: torch.device, dtype: torch.dtype):
        key = ("probe", name, device, dtype)
        if key not in self._proj_cache:
            gen = torch.Generator().manual_seed(_derived_seed("probe", name))
            u = torch.randn(m, 2, generator=gen, dtype=torch.float64)
            v = torch.randn(n, 2, generator=gen, dtype=torch.float64)
            self._proj_cache[key] = (u.to(device, dtype), v.to(device, dtype))
        return self._proj_cache[key]

    def _check_outer(self, name: str, uses: list[Outer], G: torch.Tensor | None, m: int, n: int, low: bool):
        """Two rank-1 probes u v^T: sum_{b,t} (L.u)(R.v) from the factors vs u^T G v from autograd."""
        dev, dtype = uses[0].right.device, uses[0].right.dtype
        u, v = self._probes(name, m, n, dev, dtype)
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
            self._tol(G, low) * (scale + ref.abs()),
            "rank-1 probes of the gradient",
        )


# ----------------------------------------------------------------------------------------------
# per-example losses of the pipeline's tasks


class _TokenNLL(torch.autograd.Function):
    """Next-token NLL from (B, T, V) logits, in chunks of examples, never a full-size fp32 copy."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, y: torch.Tensor, rows: int) -> torch.Tensor:
        B, T, V = logits.shape
        cdtype = torch.promote_types(logits.dtype, torch.float32)
        lse = torch.empty(B, T - 1, dtype=cdtype, device=logits.device)
        nll = torch.empty_like(lse)
        for b0 in range(0, B, rows):
            x = logits[b0 : b0 + rows, :-1].to(cdtype)
            lse[b0 : b0 + rows] = torch.logsumexp(x, -1)
            nll[b0 : b0 + rows] = lse[b0 : b0 + rows] - x.gather(2, y[b0 : b0 + rows, :, None]).squeeze(2)
        ctx.save_for_backward(logits, y, lse)
        ctx.rows = rows
        return nll

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, y, lse = ctx.saved_tensors
        rows = ctx.rows
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        grad[:, -1] = 0
        g = g.to(lse.dtype)
        for b0 in range(0, logits.shape[0], rows):
            gb = g[b0 : b0 + rows, :, None]
            p = (logits[b0 : b0 + rows, :-1].to(lse.dtype) - lse[b0 : b0 + rows, :, None]).exp_().mul_(gb)
            p.scatter_add_(2, y[b0 : b0 + rows, :, None], -gb)
            grad[b0 : b0 + rows, :-1] = p
        return grad, None, None


def token_nll(logits: torch.Tensor, targets: torch.Tensor, chunk_elements: int = 1 << 25) -> torch.Tensor:
    """(B, T-1) next-token NLL ``-log softmax(logits[:, t])[targets[:, t]]`` in at least fp32, equal to
    ``F.cross_entropy(logits[:, :-1].float(), targets, reduction="none")``, computed a few examples at a
    time (at most ``chunk_elements`` logits): the forward keeps only the log-normalisers, the backward
    recomputes the softmax, and neither holds an fp32 copy of the (B, T, V) logits (at GPT-2's vocabulary
    that copy and its gradient were ~15% of a per-example-gradient step). ``targets``: (B, T-1) ids in
    [0, V). The gradient w.r.t. the logits has the logits' dtype; the last position's is zero."""
    B, T, V = logits.shape
    if targets.shape != (B, T - 1):
        raise ValueError(f"token_nll: targets must have shape {(B, T - 1)}, got {tuple(targets.shape)}")
    rows = max(1, chunk_elements // max(1, (T - 1) * V))
    return _TokenNLL.apply(logits, targets.long(), rows)


def _accepts(module: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _positions(input_ids: torch.Tensor) -> torch.Tensor:
    """``arange(T)`` for every row, (B, T): the models' default positions, but batch-shaped, so that the
    position embedding is called on per-example ids (a (1, T) call is shared by the batch; see the engine)."""
    B, T = input_ids.shape
    return torch.arange(T, device=input_ids.device).unsqueeze(0).expand(B, T)


def next_token_losses(
    model: nn.Module, batch: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal LM: the (B, T-1) next-token NLL (fp32, :func:`token_nll`; exactly 0 where not counted) and the
    (B, T-1) bool mask of counted positions (position t predicts token t + 1, both real). The model gets
    batch-shaped ``position_ids`` (``cumsum(attention_mask) - 1`` with padding) when its forward takes them
    (see :func:`per_example_loss`)."""
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    kwargs: dict[str, Any] = {"input_ids": input_ids}
    padded = mask is not None and not bool(mask.bool().all())
    if padded:
        kwargs["attention_mask"] = mask
    if _accepts(model, "position_ids"):
        kwargs["position_ids"] = (
            (mask.long().cumsum(-1) - 1).clamp(min=0) if padded else _positions(input_ids)
        )
    if _accepts(model, "use_cache"):
        kwargs["use_cache"] = False
    logits = model_logits(model(**kwargs))
    B, T = input_ids.shape
    valid = next_token_positions(input_ids, mask)
    if T < 2:
        return logits.float()[:, :0, 0] * 0.0, valid  # no counted position; keeps the graph
    y = input_ids[:, 1:]
    vocab = logits.shape[-1]
    if bool((((y < 0) | (y >= vocab)) & valid).any()):
        raise ValueError(f"target token id out of range for a vocabulary of {vocab} at a counted position")
    nll = token_nll(logits, y.masked_fill(~valid, 0))
    return torch.where(valid, nll, torch.zeros((), dtype=nll.dtype, device=nll.device)), valid


def per_example_loss(model: nn.Module, batch: Mapping[str, torch.Tensor], task: str) -> torch.Tensor:
    """The (B,) per-example losses of ``batch`` (docs/ARCHITECTURE.md, "Batches"), the engine's input.

    * ``causal_lm``: mean token NLL of each example over its real next-token positions (position t
      predicts token t + 1 and counts when ``attention_mask`` is 1 at t and t + 1), in fp32 from the
      model's logits; an example with no such position has loss 0 and a zero gradient. With padding the
      model gets ``position_ids = cumsum(attention_mask) - 1`` (when its forward takes them), so a
      left- or right-padded row has the positions of its unpadded self; padded positions are excluded
      with ``torch.where`` and so get an output gradient of exactly zero.
    * Text tasks get batch-shaped ``position_ids`` (B, T) when the forward takes them (the default
      positions when there is no padding): models otherwise embed positions of shape (1, T) once for the
      whole batch, and that call has no per-example output gradient (the engine refuses it).
    * ``sequence_classification`` / ``image_classification``: cross-entropy of the logits (fp32) with
      ``labels``; labels < 0 (ignore) give loss 0; labels >= the number of classes raise ``ValueError``.

    Training (``pipeline/train.py``) averages the same token losses over the whole batch; here each
    example keeps its own mean, so that summing these losses gives every example its own gradient.
    """
    if task == "causal_lm":
        nll, valid = next_token_losses(model, batch)
        return nll.sum(1) / valid.sum(1).clamp(min=1)
    if task in ("sequence_classification", "image_classification"):
        inputs = classification_inputs(batch, task, "per_example_loss")
        if (
            task != "image_classification"
            and "position_ids" not in inputs
            and "input_ids" in inputs
            and _accepts(model, "position_ids")
        ):
            inputs["position_ids"] = _positions(inputs["input_ids"])
        logits = model_logits(model(**inputs)).float()
        labels = batch["labels"].long()
        classes = logits.shape[-1]
        if labels.numel() and bool((labels >= classes).any()):
            raise ValueError(f"label {int(labels.max())} out of range for {classes} classes")
        loss = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
        return torch.where(labels >= 0, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
    raise ValueError(
        f"per_example_loss: unknown task {task!r}; valid: causal_lm, image_classification, sequence_classification"
    )
