"""Domain-mixture optimisation runs: DoReMi, DoGE, DGA and static mixtures (recipe section ``mixture``).

The data's domains come from ``data.domain_column`` or, with ``data.source: {domain: source}``, from
which source a row was read. Each domain's rows are tokenized once and held in
memory (fine for proxy-scale runs: the proxy sees ``steps x batch_size`` examples); batches are drawn
per domain with a seeded generator:

* ``doremi``: a reference model is trained first on the reference mixture (``reference``: proportional to
  the domains' token counts by default, or uniform), then the proxy with batches drawn uniformly over the
  domains (DoReMi Algorithm 1), each step updating the weights from the per-token excess loss and training
  on the α-weighted per-domain token means (:mod:`winnow.selectors.mixture`);
* ``doge``: batches drawn uniformly over the training domains plus the target domains' examples; ONE
  batched backward gives, through the per-example gradient engine, the Gram matrix of the domains' mean
  gradients and the model's update sum_i α_i g_i with the weights updated on this very step
  (``GradEngine.compute(groups=..., group_coeffs=...)``: the group sums are kept, so the update costs no
  second product);
* ``dga``: online: batches drawn by the current weights (the run trains its model on the mixture it is
  learning); every ``update_every`` steps a batch holding every training domain and the target gives the
  alignments <g_i, g_target> from the engine's group Gram and the EMA-smoothed exponentiated update;
* ``uniform`` / ``proportional`` / ``temperature``: no training, the static weights.

Outputs (atomic): ``mixture.json`` ({"weights": {domain: weight}, ...}), ``mixture_trajectory.parquet``
(step, one column per domain, entropy), and, when a proxy is trained, its final model under
``mixture/model``. The selection step then gives every kept row of domain d the weight
``N alpha_d / n_d`` so that the emitted shards' weights, and the manifest's interleave probabilities and
Mosaic stream proportions, are the learned mixture.
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

import winnow
from winnow.errors import WinnowError
from winnow.pipeline.atomic import atomic_path, fingerprint, write_json
from winnow.pipeline.collate import Example, Featurizer
from winnow.pipeline.models import init_model, resolve_device
from winnow.pipeline.recipe import Recipe
from winnow.pipeline.sources import InputShard, iter_raw_batches
from winnow.pipeline.store import write_parquet
from winnow.pipeline.train import lr_lambda
from winnow.scorers.grad_engine import GradEngine, fast_paths, next_token_losses, per_example_loss

STATIC = ("uniform", "proportional", "temperature")


def mixture_fingerprint(recipe: Recipe, input_fp: str, tok_fp: str | None) -> str:
    assert recipe.mixture is not None
    return fingerprint(
        "mixture",
        recipe.mixture.model_dump(),
        recipe.model.model_dump(exclude={"tokenizer"}),
        recipe.data.model_dump(exclude={"read_batch_size", "source"}),
        input_fp,
        tok_fp,
        winnow.__version__,
    )


def _load_domains(recipe: Recipe, shards: list[InputShard], feat: Featurizer) -> dict[str, list[Example]]:
    out: dict[str, list[Example]] = {}
    for sh in shards:
        for raw in iter_raw_batches(recipe.data, sh):
            for e in feat.featurize(raw, sh.location):
                if e.domain is None or e.domain == "":
                    raise WinnowError(
                        f"{sh.location}: a row has no domain (data.domain_column "
                        f"{recipe.data.domain_column!r}); mixture runs need one for every row"
                    )
                if len(e.features) >= 2:
                    out.setdefault(str(e.domain), []).append(e)
    return dict(sorted(out.items()))


class _Sampler:
    def __init__(self, domains: dict[str, list[Example]], seed: int):
        self.names = list(domains)
        self.rows = [domains[n] for n in self.names]
        self.g = np.random.default_rng(seed)

    def draw(self, counts: list[int]) -> tuple[list[Example], torch.Tensor]:
        exs, dom = [], []
        for i, c in enumerate(counts):
            if c <= 0:
                continue
            idx = self.g.integers(0, len(self.rows[i]), c)
            exs += [self.rows[i][j] for j in idx]
            dom += [i] * c
        return exs, torch.tensor(dom, dtype=torch.long)

    def uniform_counts(self, b: int, which: list[int]) -> list[int]:
        c = [0] * len(self.names)
        base, extra = divmod(b, len(which))
        for j, i in enumerate(self.g.permutation(which)):
            c[int(i)] = base + (1 if j < extra else 0)
        return c

    def weighted_counts(self, b: int, w: np.ndarray) -> list[int]:
        return self.g.multinomial(b, w / w.sum()).tolist()


def _optimizer(model: Any, lr: float, weight_decay: float):
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=lr
    )


def _amp(device: torch.device):
    """bf16 autocast on GPUs that have it (as the spine's training), fp32 elsewhere."""
    on = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


def _train_reference(
    recipe: Recipe,
    sampler: _Sampler,
    w: np.ndarray,
    device: torch.device,
    tok: Any,
    feat: Featurizer,
    progress: Any,
    amp: Any,
) -> Any:
    m = recipe.mixture
    model = init_model(recipe, m.seed + 1, tok, None).to(device).train()
    opt = _optimizer(model, m.lr, m.weight_decay)
    f = lr_lambda(m.warmup_steps, m.reference_steps)
    for step in range(m.reference_steps):
        for gr in opt.param_groups:
            gr["lr"] = m.lr * f(step)
        exs, _ = sampler.draw(sampler.weighted_counts(m.batch_size, w))
        batch = {k: v.to(device) for k, v in feat.collate(exs).items()}
        with amp():
            nll, valid = next_token_losses(model, batch)
        loss = (nll * valid).sum() / valid.sum().clamp_min(1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), m.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if progress is not None:
            progress("reference", step + 1, m.reference_steps)
    return model.eval()


def run_mixture(
    recipe: Recipe,
    run_dir: Path,
    shards: list[InputShard],
    feat: Featurizer,
    tok: Any,
    fp: str,
    progress: Any = None,
) -> dict[str, Any]:
    """Run the recipe's mixture method; write mixture.json and mixture_trajectory.parquet."""
    from winnow.selectors.mixture import (
        dga_update,
        doge_update,
        doremi_excess,
        doremi_token_weights,
        doremi_update,
        entropy,
        static_weights,
    )

    m = recipe.mixture
    assert m is not None
    if recipe.model.task != "causal_lm" and m.method not in STATIC:
        raise WinnowError(
            f"mixture.method {m.method!r} trains a language-model proxy: model.task must be causal_lm"
        )
    out_json = run_dir / "mixture.json"
    traj_path = run_dir / "mixture_trajectory.parquet"
    if out_json.exists() and traj_path.exists():
        try:
            if json.loads(out_json.read_text()).get("fingerprint") == fp:
                return json.loads(out_json.read_text())
        except json.JSONDecodeError:
            pass
    t0 = time.time()
    domains = _load_domains(recipe, shards, feat)
    names = list(domains)
    targets = list(m.target_domains)
    unknown = [t for t in targets if t not in domains]
    if unknown:
        raise WinnowError(
            f"mixture.target_domains: {unknown} not among the data's domains ({', '.join(names)})"
        )
    train_ids = [i for i, n in enumerate(names) if n not in targets]
    tgt_ids = [i for i, n in enumerate(names) if n in targets]
    if len(train_ids) < 2:
        raise WinnowError(
            f"mixture: needs at least 2 training domains, the data has {len(train_ids)} "
            f"({', '.join(names[i] for i in train_ids)})"
        )
    if m.method == "dga" and not tgt_ids:
        raise WinnowError("mixture.method dga aligns with a target: set mixture.target_domains")
    k = len(train_ids)
    tokens = np.array([sum(e.n_tokens for e in domains[names[i]]) for i in train_ids], dtype=np.float64)
    rows: list[dict[str, Any]] = []

    def record(step: int, w: torch.Tensor | np.ndarray) -> None:
        w = np.asarray(w, dtype=np.float64)
        rows.append(
            {
                "step": step,
                **{names[i]: float(w[j]) for j, i in enumerate(train_ids)},
                "entropy": entropy(torch.as_tensor(w)),
            }
        )

    if m.method in STATIC:
        w = static_weights(tokens, m.method, m.temperature).numpy()
        record(0, w)
        final = avg = w
    else:
        device = resolve_device(m.device)
        amp = _amp(device)
        sampler = _Sampler(domains, m.seed)
        model = init_model(recipe, m.seed, tok, None).to(device).train()
        opt = _optimizer(model, m.lr, m.weight_decay)
        f = lr_lambda(m.warmup_steps, m.steps)
        alpha = torch.full((k,), 1.0 / k, dtype=torch.float64)
        alpha_hat = alpha.clone()
        total = torch.zeros(k, dtype=torch.float64)
        record(0, alpha)
        ref = None
        if m.method == "doremi":
            wref = (
                static_weights(tokens, "uniform")
                if m.reference == "uniform"
                else static_weights(tokens, "proportional")
            ).numpy()
            full = np.zeros(len(names))
            full[train_ids] = wref
            ref = _train_reference(recipe, sampler, full, device, tok, feat, progress, amp)
        lam_prev = None
        local = {i: j for j, i in enumerate(train_ids)}
        fast = ExitStack()  # exact speed substitutions (aligned wide head on CUDA, fused gelu_new)
        if m.method == "doremi":
            fast.enter_context(fast_paths(model))
            fast.enter_context(fast_paths(ref))
        eng = None
        if m.method in ("doge", "dga"):
            # bf16 factors under autocast (fp32 sums): the group products cost what a weight gradient does
            eng = GradEngine(model, params="all", check=False, factor_dtype="input")
        for step in range(1, m.steps + 1):
            lr_t = m.lr * f(step - 1)
            for gr in opt.param_groups:
                gr["lr"] = lr_t
            if m.method == "doremi":
                exs, dom = sampler.draw(sampler.uniform_counts(m.batch_size, train_ids))
                d = torch.tensor([local[int(x)] for x in dom])
                batch = {kk: v.to(device) for kk, v in feat.collate(exs).items()}
                with torch.no_grad(), amp():
                    ref_nll, _ = next_token_losses(ref, batch)
                with amp():
                    nll, valid = next_token_losses(model, batch)
                lam = doremi_excess(nll.detach(), ref_nll, valid, d.to(device), k, lam_prev, clip=m.clip)
                lam_prev = lam
                alpha = doremi_update(alpha, lam.cpu(), m.eta, m.smoothing)
                w_tok = doremi_token_weights(alpha.to(device), valid, d.to(device)).to(nll.dtype)
                (nll * w_tok).sum().backward()
            elif m.method == "doge" or (m.method == "dga" and (step - 1) % m.update_every == 0):
                which = train_ids + tgt_ids
                exs, dom = sampler.draw(sampler.uniform_counts(m.batch_size, which))
                batch = {kk: v.to(device) for kk, v in feat.collate(exs).items()}
                ntok = (batch["attention_mask"][:, :-1] * batch["attention_mask"][:, 1:]).sum(1).double()
                C = len(names)
                per_dom = torch.zeros(C, dtype=torch.float64, device=device).index_add_(
                    0, dom.to(device), ntok
                )
                scale = (ntok / per_dom[dom.to(device)].clamp_min(1)).float()
                present = torch.tensor([bool(per_dom[i] > 0) for i in train_ids])
                state: dict[str, Any] = {}

                def coeffs(
                    out: dict[str, Any],
                    lr_t: float = lr_t,
                    present: torch.Tensor = present,
                    state: dict = state,
                ) -> torch.Tensor:
                    G = out["group_gram"].double().cpu()
                    Gtr = G[train_ids][:, train_ids]
                    dots = G[train_ids][:, tgt_ids].sum(1) if tgt_ids else None
                    if m.method == "doge":
                        new, _ = doge_update(
                            state["alpha"],
                            Gtr,
                            lr_t,
                            target_dots=dots,
                            mu=m.mu,
                            w_min=m.w_min,
                            w_max=m.w_max,
                            smoothing=m.smoothing_doge,
                            present=present,
                        )
                        state["alpha"] = new
                    else:
                        new, hat = dga_update(
                            state["alpha"], state["alpha_hat"], dots, eta=m.eta_dga, beta=m.beta
                        )
                        state["alpha"], state["alpha_hat"] = new, hat
                    full = torch.zeros(len(names), dtype=torch.float64)  # target domains: no training weight
                    full[train_ids] = state["alpha"]
                    return full

                state["alpha"], state["alpha_hat"] = alpha, alpha_hat
                with amp():
                    eng.compute(
                        lambda b=batch, s=scale: per_example_loss(model, b, "causal_lm") * s,
                        sqnorm=False,
                        groups=dom.to(device),
                        num_groups=len(names),
                        group_coeffs=coeffs,
                    )
                alpha, alpha_hat = state["alpha"], state["alpha_hat"]
            else:  # dga between updates: train on the current mixture
                full = np.zeros(len(names))
                full[train_ids] = alpha.numpy()
                exs, _ = sampler.draw(sampler.weighted_counts(m.batch_size, full))
                batch = {kk: v.to(device) for kk, v in feat.collate(exs).items()}
                with amp():
                    nll, valid = next_token_losses(model, batch)
                ((nll * valid).sum() / valid.sum().clamp_min(1)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), m.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            total += alpha
            record(step, alpha)
            if progress is not None:
                progress(m.method, step, m.steps)
        if eng is not None:
            eng.close()
        fast.close()
        final = alpha.numpy()
        avg = (total / m.steps).numpy()
        with atomic_path(run_dir / "mixture" / "model") as tmp:
            model.save_pretrained(str(tmp), safe_serialization=True)
    output = m.output if m.output != "auto" else ("final" if m.method == "dga" else "average")
    out_w = avg if output == "average" else final
    res = {
        "method": m.method,
        "output": output,
        "weights": {names[i]: float(out_w[j]) for j, i in enumerate(train_ids)},
        "final_weights": {names[i]: float(final[j]) for j, i in enumerate(train_ids)},
        "average_weights": {names[i]: float(avg[j]) for j, i in enumerate(train_ids)},
        "target_domains": targets,
        "domain_tokens": {names[i]: int(tokens[j]) for j, i in enumerate(train_ids)},
        "entropy": entropy(torch.as_tensor(out_w)),
        "steps": 0 if m.method in STATIC else m.steps,
        "seconds": round(time.time() - t0, 2),
        "fingerprint": fp,
        "package_version": winnow.__version__,
    }
    write_parquet(pl.DataFrame(rows), traj_path, {"step_fingerprint": fp})
    write_json(out_json, res)
    return res


def mixture_weights_for_rows(run_dir: Path, domains: list[str | None], kept: np.ndarray) -> np.ndarray:
    """Per-row weights N alpha_d / n_d over kept rows (0 for pruned rows and for domains not in the mixture)."""
    mix = json.loads((run_dir / "mixture.json").read_text())["weights"]
    dom = np.array(["" if d is None else d for d in domains], dtype=object)
    out = np.zeros(len(dom))
    N = int(kept.sum())
    for d, a in mix.items():
        sel = (dom == d) & kept
        n = int(sel.sum())
        if n:
            out[sel] = N * a / n
    return out


__all__ = ["mixture_fingerprint", "mixture_weights_for_rows", "run_mixture"]
