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
2. ``proj``: ``P grad_b`` for a seeded random k x D matrix P (a Johnson-Lindenstrauss map,
   :mod:`winnow.grads.projection`);
3. ``group_gram`` / ``group_dot``: with S_c = sum_{b in group c} grad_b, the C x C Gram matrix
   <S_c, S_d> and the inner products <S_c, target> with a given gradient.

How. Forward hooks record each call of every module that owns a selected parameter (its inputs) and a
tensor hook on the call's output records the output gradient g in the backward. A per-layer-type rule
(:mod:`winnow.grads.rules`) turns a call into factors of the per-example gradient of each of its
parameters: ``Outer`` (the parameter as an (m, n) matrix, grad_b = sum_t L_bt R_bt^T, e.g. L = g and
R = a for a linear layer) or ``Dense`` (the per-example gradient of a vector parameter, (B, numel)).
A parameter used by several calls or modules gets the SUM of its uses' factors. One accumulator per
quantity (:mod:`winnow.grads.accumulators`) turns each parameter's factors into its part of the results,
with the kernels of :mod:`winnow.grads.kernels` (which gives the costs).

* the backward is one ordinary ``torch.autograd.grad`` of ``sum_b loss_b`` (``.grad`` attributes are not
  touched): with the consistency check w.r.t. the selected parameters (the batch gradient is the check's
  reference), else w.r.t. the recorded module outputs only;
* consistency check (``check=True``): two rank-1 probes u v^T per parameter, O(B T (m + n)).

Loss reduction. :meth:`GradEngine.compute` takes a closure returning the B per-example losses and
backpropagates their SUM, so the gradient recorded for example b is d loss_b / d theta, its own
gradient, not scaled by 1/B (:func:`winnow.grads.losses.per_example_loss`). Positions whose loss terms
are masked out receive an output gradient of exactly zero, so they add nothing to any factor; the
embedding rule also zeroes the ``padding_idx`` row, which autograd never updates.

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

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from winnow.grads.accumulators import (
    AdamUpdate,
    ConsistencyCheck,
    GradCoeffs,
    GroupSums,
    ParamFactors,
    Projections,
    SquaredNorms,
    add_group_coeffs,
    group_layout,
)
from winnow.grads.fast_paths import fast_paths
from winnow.grads.kernels import LOW_PRECISION
from winnow.grads.params import aliases, select_parameters
from winnow.grads.projection import (
    DEFAULT_PROJ_KIND,
    PROJ_KINDS,
    RotatedSample,
    SketchHashes,
    derived_seed,
    projection_factors,
    vector_view,
)
from winnow.grads.rules import RULES, Dense, Outer, Record, Rule, find_rule

__all__ = ["SQNORM_METHODS", "GradEngine"]

SQNORM_METHODS = ("auto", "gram", "direct")


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


def _check_losses(losses: Any) -> torch.Tensor:
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
    return losses


class GradEngine:
    """Per-example gradient quantities of ``model`` from one batched forward and backward.

    ``params``: which parameters (see :func:`select_parameters`): ``"all"``, ``"last_layer"``,
    ``"lora"`` or a list of names / prefixes / globs. ``proj_dim``: k of the random projection (None: no
    projection); ``proj_seed`` and ``proj_kind`` (``"tensor_sketch"``, the default, or the Kronecker
    maps ``"rademacher"`` and ``"gaussian"``) define it
    (:mod:`winnow.grads.projection`). ``sqnorm_method``: ``"auto"`` (cheaper of Gram and direct per
    parameter, the sparse form for embeddings), or force ``"gram"`` / ``"direct"``. ``check``: compare the
    per-example factors summed over the batch with the batch gradient (a safety net against uses of a
    parameter the rules do not see). ``chunk_elements``: bound on the elements of the temporary blocks
    (per-example gradients, Gram matrices, group sums) held at once. ``align``: while the engine is open,
    plain ``nn.Linear`` layers at least 4096 wide whose width is not a multiple of 64 (output vocabularies
    such as GPT-2's 50257) compute through their weight zero-padded to a multiple of 64 and return a view
    of the real columns: identical values and gradients, aligned matrix shapes for cuBLAS. ``"auto"``:
    on CUDA inputs only; ``True``: on every device (tests); ``False``: never. ``fuse_activations``: while
    the engine is open, transformers' ``NewGELUActivation`` (GPT-2's ``gelu_new``) runs as the identical
    ``F.gelu(approximate="tanh")`` (one kernel, rounded once). :meth:`close` restores both
    (:class:`~winnow.grads.fast_paths.fast_paths`).

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
        proj_kind: str = DEFAULT_PROJ_KIND,
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
        names = aliases(model)
        self.aliases: dict[str, list[str]] = {name: names[id(p)] for name, p in self.params.items()}
        self.kinds: dict[str, str] = {}
        self._owners: dict[str, list[tuple[str, str]]] = {name: [] for name in self.params}
        self._modules: dict[str, tuple[nn.Module, Rule[Any], set[str]]] = {}
        self._attach_rules(model)
        self.views: dict[str, tuple[int, int]] = {}
        for name, p in self.params.items():
            if self.kinds[name] == "outer":
                self.views[name] = (p.shape[0], p.numel() // max(1, p.shape[0]))
            else:
                self.views[name] = vector_view(p.numel())
        self._records: dict[str, list[Record]] = {}
        self._outputs: list[torch.Tensor] = []
        self._active = False
        self._proj_cache: dict[tuple, Any] = {}  # projections (factors or sketch hashes) and probe factors
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

    def _attach_rules(self, model: nn.Module) -> None:
        """Find the rule of every module that owns a selected parameter, and each parameter's kind."""
        by_id = {id(p): name for name, p in self.params.items()}
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

    def _proj(self, name: str, device: torch.device, dtype: torch.dtype) -> Any:
        key = (name, device, dtype)
        if key not in self._proj_cache:
            assert self.proj_dim is not None
            f = projection_factors(name, self.views[name], self.proj_dim, self.proj_seed, self.proj_kind)
            self._proj_cache[key] = (
                f.to(device, dtype)
                if isinstance(f, (SketchHashes, RotatedSample))
                else (f[0].to(device, dtype), f[1].to(device, dtype))
            )
        return self._proj_cache[key]

    def _probes(
        self, name: str, m: int, n: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The consistency check's two seeded rank-1 probes (u (m, 2), v (n, 2)) of parameter ``name``."""
        key = ("probe", name, device, dtype)
        if key not in self._proj_cache:
            gen = torch.Generator().manual_seed(derived_seed("probe", name))
            u = torch.randn(m, 2, generator=gen, dtype=torch.float64)
            v = torch.randn(n, 2, generator=gen, dtype=torch.float64)
            self._proj_cache[key] = (u.to(device, dtype), v.to(device, dtype))
        return self._proj_cache[key]

    def projection_matrix(self) -> torch.Tensor:
        """The dense k x D projection P (float64, CPU) that ``compute(project=True)`` applies: column block
        p is the sketch's matrix (:meth:`SketchHashes.dense`) or ``kron(P_L, P_R)``, cut to ``numel_p``, the blocks in :attr:`param_names` order, each parameter
        flattened row-major (``p.flatten()``). For small models and tests: it has k x D entries."""
        if self.proj_dim is None:
            raise ValueError("projection_matrix: the engine was built without proj_dim")
        blocks = []
        for name, p in self.params.items():
            f = projection_factors(name, self.views[name], self.proj_dim, self.proj_seed, self.proj_kind)
            full = f.dense() if isinstance(f, (SketchHashes, RotatedSample)) else torch.kron(f[0], f[1])
            blocks.append(full[:, : p.numel()])
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
        of its numel; or an :class:`~winnow.grads.accumulators.AdamUpdate` (LESS's per-example Adam update
        direction, not linear in the gradient: the example's gradient of that parameter is materialised, a
        few examples at a time). Squared norms and group sums stay those of the plain gradients.

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

    def _check_target(
        self, target: Mapping[str, torch.Tensor], device: torch.device, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
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
            if isinstance(d, AdamUpdate):
                if d.m.numel() != p.numel() or d.v.numel() != p.numel():
                    raise ValueError(
                        f"precondition[{alias!r}]: Adam moments of {p.numel()} elements expected"
                    )
                out[name] = d
                continue
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

    def _backward(self, losses: torch.Tensor) -> Sequence[torch.Tensor | None]:
        """ONE backward of the SUM of the per-example losses: example b's gradient is d loss_b / d theta.

        With the consistency check it is taken w.r.t. the parameters (the batch gradient is the check's
        reference, returned); without it, w.r.t. the recorded module outputs only, so autograd skips the
        batch weight-gradient products the rules do not need (about a third of a training step's work)."""
        names = list(self.params)
        if self.check or not self._outputs:
            return torch.autograd.grad(losses.sum(), [self.params[n] for n in names], allow_unused=True)
        torch.autograd.grad(losses.sum(), self._outputs, allow_unused=True)
        return [None] * len(names)

    def _factor_dtype(self, dtype: torch.dtype, fp32_factors: bool) -> torch.dtype:
        """Factors (activations and output gradients) are converted to ``dtype`` (fp32) by default. With
        factor_dtype="input" and half-precision records, squared norms and group sums keep the factors in
        their own precision (no fp32 copies of bf16 activations) and accumulate every sum in fp32;
        projections and grad_coeffs (``fp32_factors``) always use fp32 factors."""
        if self.factor_dtype == "input" and not fp32_factors:
            return self._record_half() or dtype
        return dtype

    def _record_half(self) -> torch.dtype | None:
        """The half precision the records were made in (autocast), or None."""
        low = [
            r.grad.dtype
            for recs in self._records.values()
            for r in recs
            if r.grad is not None and r.grad.dtype in LOW_PRECISION
        ]
        return low[0] if low else None

    def _compute(
        self,
        losses: Any,
        sqnorm: bool,
        per_param: bool,
        project: bool,
        groups: torch.Tensor | None,
        num_groups: int | None,
        target: Mapping[str, torch.Tensor] | None,
        pre: Mapping[str, Any] | None = None,
        grad_coeffs: Callable[[dict[str, Any]], torch.Tensor] | None = None,
        group_coeffs: Callable[[dict[str, Any]], torch.Tensor] | None = None,
    ) -> dict[str, Any]:
        losses = _check_losses(losses)
        B, device = losses.shape[0], losses.device
        dtype = (
            torch.float64 if any(p.dtype == torch.float64 for p in self.params.values()) else torch.float32
        )
        layout = group_layout(groups, num_groups, B, device) if groups is not None else None
        targets = self._check_target(target, device, dtype) if target is not None else None
        batch_grads = self._backward(losses)
        fdtype = self._factor_dtype(dtype, project or grad_coeffs is not None)
        alone = not (sqnorm or per_param or groups is not None or target is not None or pre is not None)
        if alone and project and self.proj_kind == "kfjlt" and device.type == "cuda" and grad_coeffs is None:
            # kfjlt forms its products in the records' half precision on CUDA anyway (Projections' low):
            # with nothing else asking for fp32 factors (the consistency check takes half factors, as
            # GraNd's does), they are not converted up and back down
            fdtype = self._record_half() or fdtype

        budget = self.chunk_elements
        check = ConsistencyCheck(self._probes, dtype, device) if self.check else None
        norms = SquaredNorms(B, dtype, device, self.sqnorm_method, budget) if sqnorm or per_param else None
        proj = None
        if project:
            assert self.proj_dim is not None
            proj = Projections(
                B,
                self.proj_dim,
                dtype,
                device,
                lambda n: self._proj(n, device, dtype),
                pre,
                budget,
                low=self._record_half() if device.type == "cuda" else None,
            )
        sums = None
        if layout is not None:
            sums = GroupSums(layout, targets, group_coeffs is not None, budget, dtype, device)
        coeffs = GradCoeffs(self.params) if grad_coeffs is not None else None
        accumulators = [a for a in (check, norms, proj, sums, coeffs) if a is not None]

        cache: dict[str, tuple[list[dict[str, Any]], bool]] = {}
        remaining = {key: len(attrs) for key, (_, _, attrs) in self._modules.items()}
        # the rules choose their own precision (factor_dtype): no caller's autocast applies to them
        with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
            for name, G in zip(self.params, batch_grads, strict=True):
                uses, low = self._uses(name, B, fdtype, cache, remaining)
                kind, numel = self.kinds[name], self.params[name].numel()
                p = ParamFactors.build(name, kind, uses, low, G, self.views[name], numel, B, dtype, device)
                for acc in accumulators:
                    acc.add(p)
        if check is not None:
            check.verify()

        out: dict[str, Any] = {"loss": losses.detach().float()}
        if norms is not None and sqnorm:
            out["sqnorm"] = norms.total.float()
        if norms is not None and per_param:
            out["param_sqnorm"] = {k: v.float() for k, v in norms.per.items()}
        if proj is not None:
            out["proj"] = proj.proj.float()
        if sums is not None:
            out["group_gram"] = sums.gram.float()
            if sums.dot is not None:
                out["group_dot"] = sums.dot.float()
        if coeffs is not None and grad_coeffs is not None:
            out["grad_coeffs"] = coeffs.apply(grad_coeffs(out), B, dtype, device)
        if sums is not None and group_coeffs is not None:
            out["group_coeffs"] = add_group_coeffs(
                self.params, sums.sums, group_coeffs(out), sums.layout.C, dtype, device
            )
        return out

    def _uses(
        self,
        name: str,
        B: int,
        dtype: torch.dtype,
        cache: dict[str, tuple[list[dict[str, Any]], bool]],
        remaining: dict[str, int],
    ) -> tuple[list[Any], bool]:
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
                    any(r.grad is not None and r.grad.dtype in LOW_PRECISION for r in recs),
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
