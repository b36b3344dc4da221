"""The math on factors: squared norms, projections, group sums and weighted sums of per-example
gradients given as :class:`~winnow.grads.rules.Outer` / :class:`~winnow.grads.rules.Dense` factors.
Short plain functions over tensors; the engine's accumulators (:mod:`winnow.grads.accumulators`) call
them once per parameter.

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
* projection, ``Outer``: Kronecker O(B T (k1 m + k2 n) + B T k) (one-hot L: a gather instead of k1 m);
  TensorSketch O(B T m n + B m n) materialised, or O(B T k log k) by FFT (:func:`_sketch_outer_project`);
  ``Dense``: O(B (k1 d1 d2 + k1 d2 k2)) (:mod:`winnow.grads.projection`).
* group sums: one C x m x n_slice block of group gradients at a time (the columns of the (m, n) view
  are sliced so that C m n_slice <= ``chunk_elements``), O(B T m n) time, the cost of the weight gradient
  itself, as C products over each group's positions (a slice of the batch when it is ordered by group,
  else one permuted copy per factor); an embedding-only parameter keeps only the rows of the ids present
  in the batch. With ``group_coeffs`` the whole C x m x n sums are kept, and the model's gradient
  sum_c a_c S_c is read off them (O(C m n)) instead of a second product of the factors.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from winnow.grads.projection import sketch_dense
from winnow.grads.rules import Dense, Outer

LOW_PRECISION = (torch.float16, torch.bfloat16)


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Sums of squares accumulate in fp32 at least (fp64 stays fp64)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# squared norms


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
    """Equation (1) by Gram matrices, c examples at a time (c T^2 <= ``budget``)."""
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


def _direct_grads(
    uses: list[Outer], lo: int, hi: int, m: int, n: int, acc: torch.dtype | None = None
) -> torch.Tensor:
    """Per-example gradients (hi - lo, m, n) of examples lo:hi, in the factors' dtype or in ``acc``
    (products then accumulate in ``acc``, :func:`_mm_acc`)."""
    f0 = uses[0].right
    dtype = acc or f0.dtype
    M = torch.zeros(hi - lo, m, n, dtype=dtype, device=f0.device)
    for f in uses:
        R = f.right[lo:hi]
        if f.onehot:
            rows = (torch.arange(hi - lo, device=R.device).unsqueeze(1) * m + f.left[lo:hi]).reshape(-1)
            M.view(-1, n).index_add_(0, rows, R.reshape(-1, n).to(dtype))
        elif dtype == R.dtype == f.left.dtype:
            M.baddbmm_(f.left[lo:hi].transpose(1, 2), R)
        else:
            M += _mm_acc(f.left[lo:hi].transpose(1, 2), R, dtype)
    return M


def _direct_sqnorm(uses: list[Outer], B: int, m: int, n: int, budget: int) -> torch.Tensor:
    """The per-example gradients materialised, c examples at a time (c m n <= ``budget``), and squared."""
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
    """(B,) ||grad_b||^2 of a parameter of view (m, n): ``method`` "gram", "direct", or "auto" (the sparse
    form when every use is one-hot, else the cheaper of the two by the operation counts above)."""
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


# ----------------------------------------------------------------------------------------------
# projections


def _outer_project(uses: list[Outer], PL: torch.Tensor, PR: torch.Tensor) -> torch.Tensor:
    """(B, k1 k2) vec(sum_t (P_L L_t)(P_R R_t)^T) over every use."""
    B = uses[0].right.shape[0]
    acc = torch.zeros(B, PL.shape[0], PR.shape[0], dtype=PL.dtype, device=PL.device)
    for f in uses:
        left = PL.t()[f.left] if f.onehot else f.left @ PL.t()  # (B, T, k1)
        acc.baddbmm_(left.transpose(1, 2), f.right @ PR.t())
    return acc.reshape(B, -1)


def _rotated_outer_project(
    uses: list[Outer], rs: Any, budget: int = 1 << 27, low: torch.dtype | None = None
) -> torch.Tensor:
    """(B, k) ``kfjlt`` projection (:class:`winnow.grads.projection.RotatedSample`) of sum_t L_t R_t^T over
    every use: each factor's rows rotated (A L_t, B R_t; a one-hot L_t is a column of A), the rotated
    per-example gradient (A L)^T (B R) materialised by one product over all uses' positions (c examples
    at a time, c m' n' <= ``budget``; fp32 accumulation, written in the factors' precision: half
    factors give a half Z, whose rounding, 2^-9 relative per entry, is far below the map's own error) and
    folded into k buckets in fp32. ``low`` (a half dtype): the factors are cast to it first (the engine
    passes the records' own precision, so fp32 copies of bf16 records lose nothing). O(B T (m'^2 + n'^2)) for the rotations (or (d1 + d2) per entry for a
    Kronecker pair), O(B T m' n') at matrix-product speed and O(B m' n') for the fold: no scattered adds."""
    B = uses[0].right.shape[0]
    low = low or next((f.right.dtype for f in uses if f.right.dtype in LOW_PRECISION), uses[0].right.dtype)
    lefts = [rs.left.onehot(f.left, low) if f.onehot else rs.left(f.left.to(low)) for f in uses]
    rights = [rs.right(f.right.to(low)) for f in uses]
    L = lefts[0] if len(lefts) == 1 else torch.cat(lefts, 1)
    R = rights[0] if len(rights) == 1 else torch.cat(rights, 1)
    del lefts, rights
    mp, np_ = L.shape[2], R.shape[2]
    acc = torch.float64 if low == torch.float64 else torch.float32
    out = torch.empty(B, rs.k, dtype=acc, device=R.device)
    c = max(1, budget // max(1, mp * np_))
    for lo in range(0, B, c):
        hi = min(B, lo + c)
        out[lo:hi] = rs.fold(torch.bmm(L[lo:hi].transpose(1, 2), R[lo:hi]))
    return out


def _count_sketch(x: torch.Tensor, h: torch.Tensor, sign: torch.Tensor, k: int) -> torch.Tensor:
    """(..., k) count sketch of x (..., d): x_i * sign_i added to bucket h_i."""
    out = torch.zeros(*x.shape[:-1], k, dtype=x.dtype, device=x.device)
    return out.index_add_(x.dim() - 1, h, x * sign)


def _onehot_sketch(
    ids: torch.Tensor, h: torch.Tensor, sign: torch.Tensor, k: int, dtype: torch.dtype
) -> torch.Tensor:
    """(..., k) count sketch of one-hot rows e_id: sign[id] in bucket h[id]."""
    out = torch.zeros(*ids.shape, k, dtype=dtype, device=ids.device)
    return out.scatter_(-1, h[ids].unsqueeze(-1), sign[ids].to(dtype).unsqueeze(-1))


SKETCH_METHODS = ("auto", "fft", "direct")
# "auto" takes the materialised gradient (``direct``) for a dense-factor parameter of view (m, n) when
# m n <= _SKETCH_DIRECT_RATIO * T k, T the positions of its uses: the direct path's cost is a GEMM of
# T m n (at matrix-product speed) plus one scatter of m n entries, the FFT path's two k-long spectra per
# position (memory-bound). Set from benchmarks/bench_sketch.py on an H200 (benchmarks/RESULTS.md): the two
# paths tie near m n = 4.5 T k (GPT-2's MLP at T = 512, k = 1024); not measured on CPUs.
_SKETCH_DIRECT_RATIO = 4.0
SKETCH_METHOD = {"method": "auto"}  # the engine's choice; benchmarks set "fft" to time the earlier path


def _sketch_outer_project(
    uses: list[Outer], sk: Any, budget: int = 1 << 25, method: str | None = None
) -> torch.Tensor:
    """(B, k) TensorSketch of sum_t L_t R_t^T over every use (:mod:`winnow.grads.projection`), by one of
    two exact evaluations of the same map (equal up to rounding):

    * ``fft``: per position the product of the two count sketches' spectra, summed over positions, one
      inverse FFT per example; O(B T k log k) time, memory-bound.
    * ``direct``: the per-example gradient L_b^T R_b materialised (c examples at a time, c m n <=
      ``budget``; a matrix product accumulating in fp32) and every entry added with its sign s1(i) s2(j)
      to its bucket (h1(i) + h2(j)) mod k; O(B T m n) at matrix-product speed plus O(B m n) scattered adds.
      One-hot uses (embeddings) never form the (vocabulary x n) matrix: each position's R_t goes straight
      to the buckets (h1(id_t) + h2(j)) mod k, O(B T n).

    ``auto`` (the default, ``SKETCH_METHOD``) takes ``direct`` for one-hot uses always and for dense ones
    when m n <= 4 T k, else ``fft``. Both work in fp32 (fp64 for fp64 factors)."""
    method = method or SKETCH_METHOD["method"]
    if method not in SKETCH_METHODS:
        raise ValueError(f"method must be one of {', '.join(SKETCH_METHODS)}, got {method!r}")
    B, k = uses[0].right.shape[0], sk.k
    work = torch.float64 if uses[0].right.dtype == torch.float64 else torch.float32
    m, n = sk.h1.numel(), sk.h2.numel()
    dense = [f for f in uses if not f.onehot]
    onehot = [f for f in uses if f.onehot]
    T = sum(f.right.shape[1] for f in dense)
    direct = method == "direct" or (method == "auto" and m * n <= _SKETCH_DIRECT_RATIO * T * k)
    out = torch.zeros(B, k, dtype=work, device=uses[0].right.device)
    if onehot and method != "fft":
        out += _sketch_onehot_direct(onehot, sk, work, budget)
    elif onehot:
        dense = uses
    if dense and direct and method != "fft":
        c = max(1, budget // max(1, m * n))
        for lo in range(0, B, c):
            hi = min(B, lo + c)
            out[lo:hi] += sketch_dense(_direct_grads(dense, lo, hi, m, n, acc=work), sk)
    elif dense:
        out += _sketch_fft(dense, sk, work, budget)
    return out


def _sketch_fft(uses: list[Outer], sk: Any, work: torch.dtype, budget: int) -> torch.Tensor:
    """The ``fft`` evaluation of :func:`_sketch_outer_project`: positions in chunks of B x c x k <=
    ``budget``."""
    B, k = uses[0].right.shape[0], sk.k
    h1, s1, h2, s2 = sk.h1, sk.s1.to(work), sk.h2, sk.s2.to(work)
    spec = torch.zeros(
        B,
        k // 2 + 1,
        dtype=torch.complex128 if work == torch.float64 else torch.complex64,
        device=uses[0].right.device,
    )
    for f in uses:
        T = f.right.shape[1]
        c = max(1, budget // max(1, B * k))
        for lo in range(0, T, c):
            hi = min(T, lo + c)
            if f.onehot:
                cl = _onehot_sketch(f.left[:, lo:hi], h1, s1, k, work)
            else:
                cl = _count_sketch(f.left[:, lo:hi].to(work), h1, s1, k)
            cr = _count_sketch(f.right[:, lo:hi].to(work), h2, s2, k)
            spec += (torch.fft.rfft(cl, dim=-1) * torch.fft.rfft(cr, dim=-1)).sum(1)
    return torch.fft.irfft(spec, n=k, dim=-1)


def _sketch_onehot_direct(uses: list[Outer], sk: Any, work: torch.dtype, budget: int) -> torch.Tensor:
    """(B, k) TensorSketch of sum_t e_{id_t} R_t^T: R_t[j] s1(id_t) s2(j) added to bucket
    (h1(id_t) + h2(j)) mod k, positions in chunks of B x c x n <= ``budget``."""
    B, k = uses[0].right.shape[0], sk.k
    n = sk.h2.numel()
    out = torch.zeros(B * k, dtype=work, device=uses[0].right.device)
    base = (torch.arange(B, device=out.device) * k).view(B, 1, 1)
    s2 = sk.s2.to(work)
    for f in uses:
        T = f.right.shape[1]
        c = max(1, budget // max(1, B * n))
        for lo in range(0, T, c):
            ids = f.left[:, lo : lo + c]
            idx = (sk.h1[ids].unsqueeze(-1) + sk.h2) % k + base
            val = f.right[:, lo : lo + ids.shape[1]].to(work) * s2 * sk.s1.to(work)[ids].unsqueeze(-1)
            out.index_add_(0, idx.reshape(-1), val.reshape(-1))
    return out.view(B, k)


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
    """(B, k1 k2) P_L V_b P_R^T of per-example vectors v (B, D) viewed as zero-padded (d1, d2) matrices."""
    B, D = v.shape
    d1, d2 = PL.shape[1], PR.shape[1]
    V = F.pad(v, (0, d1 * d2 - D)).view(B, d1, d2)
    return torch.matmul(torch.matmul(PL, V), PR.t()).reshape(B, -1)


# ----------------------------------------------------------------------------------------------
# group sums, their Gram and their dot with a target

_MM_OUT_DTYPE = {"ok": True}  # torch.mm/bmm(..., out_dtype=) exist for CUDA half inputs in recent torch


def _mm_acc(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``a @ b`` (2-D, or 3-D batched) as ``acc``: half-precision inputs multiply in their own precision
    (fp32 accumulation in the kernel) and, on CUDA, write an fp32 result directly (``out_dtype``);
    elsewhere the product is cast."""
    if a.dtype == acc and b.dtype == acc:
        return a @ b
    if a.dtype != b.dtype:
        low = a.dtype if a.dtype in LOW_PRECISION else b.dtype
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


def _compact_rows(uses: list[Outer]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """An embedding-only parameter: the ids present in the batch, and each use's ids as positions in them."""
    ids, inv = torch.unique(torch.cat([f.left.reshape(-1) for f in uses]), return_inverse=True)
    invs, start = [], 0
    for f in uses:
        invs.append(inv[start : start + f.left.numel()].view_as(f.left))
        start += f.left.numel()
    return ids, invs


def _grouped_factors(
    uses: list[Outer], perm: torch.Tensor | None
) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """The dense uses' (L widened over padded zero columns, R), ordered by group (``perm``); None for a
    one-hot use (it is added by example, unpermuted)."""
    dense: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    for f in uses:
        if f.onehot:
            dense.append(None)
            continue
        L, R = f.wide_left(), f.right
        if perm is not None:
            L, R = L.index_select(0, perm), R.index_select(0, perm)
        dense.append((L, R))
    return dense


def _group_sums(
    uses: list[Outer],
    dense: list[tuple[torch.Tensor, torch.Tensor] | None],
    keys: list[torch.Tensor],
    groups: torch.Tensor,
    spans: list[tuple[int, int, int]],
    C: int,
    rows: int,
    c0: int,
    c1: int,
    acc: torch.dtype,
    batched: bool,
) -> torch.Tensor:
    """(C, rows, c1 - c0) columns c0:c1 of the group sums S_c, dense uses first: one batched product per
    use when ``batched`` (every group present with as many examples), else one product per group over its
    span; a one-hot use adds its R rows at (group, row ``keys[i]``)."""
    dev = uses[0].right.device
    S = None
    for i in sorted(range(len(uses)), key=lambda i: uses[i].onehot):  # dense uses first
        f = uses[i]
        pair = dense[i]
        if pair is None:
            if S is None:
                S = torch.zeros(C, rows, c1 - c0, dtype=acc, device=dev)
            key = (groups.unsqueeze(1) * rows + keys[i]).reshape(-1)
            S.view(-1, c1 - c0).index_add_(0, key, f.right[..., c0:c1].reshape(-1, c1 - c0).to(acc))
            continue
        L, R = pair
        w = L.shape[-1]
        if batched and w == rows:
            prod = _mm_acc(L.reshape(C, -1, w).transpose(1, 2), R[..., c0:c1].reshape(C, -1, c1 - c0), acc)
            if S is None:
                S = prod
            else:
                S += prod
            continue
        if S is None:
            S = torch.zeros(C, rows, c1 - c0, dtype=acc, device=dev)
        for c, s, e in spans:
            S[c, :w] += _mm_acc(L[s:e].reshape(-1, w).t(), R[s:e, :, c0:c1].reshape(-1, c1 - c0), acc)
    assert S is not None  # uses is not empty
    return S


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
        ids, keys = _compact_rows(uses)
        rows = ids.numel()
    else:
        # an aligned layer's padded output gradient: products over its aligned width (zero extra rows)
        rows = max([m] + [f.left.stride(-2) for f in uses if f.padded])
        keys = [f.left for f in uses]
    dense = _grouped_factors(uses, perm)
    ns = n if keep else max(1, min(n, budget // max(1, C * rows)))
    gram = torch.zeros(C, C, dtype=acc, device=dev)
    dot = None if target is None else torch.zeros(C, dtype=acc, device=dev)
    # every group present with as many examples, in order: one batched product per use, no zero fill
    batched = len(spans) == C and len({e - s for _, s, e in spans}) == 1
    S = None
    for c0 in range(0, n, ns):
        c1 = min(n, c0 + ns)
        S = _group_sums(uses, dense, keys, groups, spans, C, rows, c0, c1, acc, batched)
        Sf = S.reshape(C, -1)
        gram += _rows_gram(Sf)
        if dot is not None and target is not None:
            tgt = target[ids, c0:c1] if compact else target[:, c0:c1]
            r = rows if compact else m  # the real rows: the first r * n_slice entries of each group's block
            dot += Sf[:, : r * (c1 - c0)] @ tgt.reshape(-1)
    return gram, dot, (S if keep else None)


# ----------------------------------------------------------------------------------------------
# weighted sums (the model's gradient sum_b c_b grad_b)


def _dense_weighted_sum(uses: list[Dense], c: torch.Tensor, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """sum_b c_b grad_b of a vector parameter, (numel,)."""
    return sum(
        ((f.value.to(dtype) * c.unsqueeze(1)).sum(0) for f in uses),
        torch.zeros(numel, dtype=dtype, device=c.device),
    )


def _outer_weighted_sum(
    uses: list[Outer], c: torch.Tensor, m: int, n: int, dtype: torch.dtype
) -> torch.Tensor:
    """sum_b c_b grad_b of a parameter of view (m, n)."""
    acc = torch.zeros(m, n, dtype=dtype, device=c.device)
    for f in uses:
        R = (f.right.to(dtype) * c.view(-1, 1, 1)).reshape(-1, n)
        if f.onehot:
            acc.index_add_(0, f.left.reshape(-1), R)
        else:
            acc.addmm_(f.left.to(dtype).reshape(-1, m).t(), R)
    return acc
