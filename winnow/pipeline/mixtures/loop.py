"""The shared loop of every trained mixture method, and the outputs of every mixture run.

The data's domains come from ``data.domain_column`` or, with ``data.source: {domain: source}``, from which
source a row was read. Each domain's rows are tokenized once into ``mixture/tokens-<fp12>/`` (token ids and
row offsets per domain, memory-mapped: :class:`DomainRows`), so a run holds none of the rows' tokens and a
rerun does not tokenize again; batches are drawn per domain with a seeded generator (:class:`Sampler`),
each drawn row read from its domain's file. A trained method's step (:class:`~winnow.pipeline.mixtures.base.MixtureMethod`) leaves
the proxy's gradient in ``.grad`` and returns the weights; the loop sets the learning rate (warm-up, then
cosine), clips, steps AdamW, and records the weights.

Outputs (atomic): ``mixture.json`` ({"weights": {domain: weight}, ...}), ``mixture_trajectory.parquet``
(step, one column per domain, entropy), and, when a proxy is trained, its final model under
``mixture/model``. The selection step then gives every kept row of domain d the weight ``N alpha_d / n_d``
so that the emitted shards' weights, and the manifest's interleave probabilities and Mosaic stream
proportions, are the learned mixture.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

import winnow
from winnow.errors import WinnowError
from winnow.pipeline.atomic import atomic_path, fingerprint, write_json
from winnow.pipeline.collate import Example, Featurizer
from winnow.pipeline.layout import RunLayout
from winnow.pipeline.mixtures.base import MIXTURE_METHODS, MixtureRun
from winnow.pipeline.models import init_model, resolve_device
from winnow.pipeline.recipe import Recipe
from winnow.pipeline.scoring import sdpa_backends
from winnow.pipeline.sources import InputShard, iter_raw_batches
from winnow.pipeline.steps import RunContext, Step, progress, register_step
from winnow.pipeline.store import write_parquet
from winnow.pipeline.train import lr_lambda


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


class DomainRows:
    """One domain's rows as the proxy sees them, on disk: ``tokens.bin`` (int32 token ids end to end) and
    ``offsets.bin`` (int64, rows + 1), memory-mapped; a row is read when it is drawn. A mixture run over
    10^7 rows holds none of their tokens."""

    def __init__(self, folder: Path, name: str):
        self.name = name
        self.offsets = np.memmap(folder / "offsets.bin", dtype=np.int64, mode="r")
        n_tok = int(self.offsets[-1])
        self.tokens = (
            np.memmap(folder / "tokens.bin", dtype=np.int32, mode="r") if n_tok else np.zeros(0, np.int32)
        )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def example(self, j: int) -> Example:
        lo, hi = int(self.offsets[j]), int(self.offsets[j + 1])
        ids = self.tokens[lo:hi].tolist()
        return Example("", self.name, None, None, ids, "", len(ids))


class _DomainWriter:
    def __init__(self, folder: Path):
        folder.mkdir(parents=True)
        self.tokens = open(folder / "tokens.bin", "wb")  # noqa: SIM115  (closed by close)
        self.offsets = open(folder / "offsets.bin", "wb")  # noqa: SIM115
        self.at = 0
        self.offsets.write(np.zeros(1, np.int64).tobytes())

    def add(self, rows: list[list[int]]) -> None:
        lens = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        flat = np.fromiter((t for r in rows for t in r), dtype=np.int32, count=int(lens.sum()))
        self.tokens.write(flat.tobytes())
        self.offsets.write((self.at + np.cumsum(lens)).tobytes())
        self.at += int(lens.sum())

    def close(self) -> None:
        self.tokens.close()
        self.offsets.close()


def tokens_fingerprint(recipe: Recipe, input_fp: str, tok_fp: str | None) -> str:
    """What the domains' tokens depend on: the data, its columns, the tokenizer and max_length (not the
    mixture's own settings, so a new learning rate reuses them)."""
    return fingerprint(
        "mixture-tokens",
        recipe.data.model_dump(exclude={"read_batch_size", "source"}),
        recipe.model.max_length,
        input_fp,
        tok_fp,
        winnow.__version__,
    )


def load_domains(
    recipe: Recipe, shards: list[InputShard], feat: Featurizer, folder: Path
) -> dict[str, DomainRows]:
    """Every row with at least two tokens, by domain, written once to ``folder`` (one sub-folder per
    domain, atomically; a folder already there is read back: the fingerprint in its name covers the data,
    the tokenizer and the columns) and memory-mapped."""
    if not folder.exists():
        with atomic_path(folder) as tmp:
            tmp.mkdir(parents=True)
            writers: dict[str, _DomainWriter] = {}
            names: list[str] = []
            try:
                for sh in shards:
                    for raw in iter_raw_batches(recipe.data, sh):
                        by: dict[str, list[list[int]]] = {}
                        for e in feat.featurize(raw, sh.location):
                            if e.domain is None or e.domain == "":
                                raise WinnowError(
                                    f"{sh.location}: a row has no domain (data.domain_column "
                                    f"{recipe.data.domain_column!r}); mixture runs need one for every row"
                                )
                            if len(e.features) >= 2:
                                by.setdefault(str(e.domain), []).append(e.features)
                        for d, rows in by.items():
                            if d not in writers:
                                writers[d] = _DomainWriter(tmp / f"d{len(names):05d}")
                                names.append(d)
                            writers[d].add(rows)
            finally:
                for wr in writers.values():
                    wr.close()
            write_json(tmp / "domains.json", {"domains": names})
        for old in folder.parent.glob("tokens-*"):
            if old != folder and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)  # an earlier data's or tokenizer's: never read again
    names = json.loads((folder / "domains.json").read_text())["domains"]
    rows = {d: DomainRows(folder / f"d{i:05d}", d) for i, d in enumerate(names)}
    return dict(sorted(rows.items()))


class Sampler:
    """Seeded per-domain draws (with replacement) of batches, in domain order."""

    def __init__(self, domains: dict[str, DomainRows], seed: int):
        self.names = list(domains)
        self.rows = [domains[n] for n in self.names]
        self.g = np.random.default_rng(seed)

    def draw(self, counts: list[int]) -> tuple[list[Example], torch.Tensor]:
        exs, dom = [], []
        for i, c in enumerate(counts):
            if c <= 0:
                continue
            idx = self.g.integers(0, len(self.rows[i]), c)
            exs += [self.rows[i].example(int(j)) for j in idx]
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


def optimizer(model: Any, lr: float, weight_decay: float):
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=lr
    )


def autocast_for(device: torch.device):
    """bf16 autocast on GPUs that have it (as the spine's training), fp32 elsewhere."""
    on = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


def _cached(layout: RunLayout, fp: str) -> dict[str, Any] | None:
    if layout.mixture_json.exists() and layout.mixture_trajectory.exists():
        try:
            res = json.loads(layout.mixture_json.read_text())
        except json.JSONDecodeError:
            return None
        if res.get("fingerprint") == fp:
            return res
    return None


def run_mixture(
    recipe: Recipe,
    run_dir: Path,
    shards: list[InputShard],
    feat: Featurizer,
    tok: Any,
    fp: str,
    progress: Any = None,
    tokens_fp: str | None = None,
) -> dict[str, Any]:
    """Run the recipe's mixture method; write mixture.json and mixture_trajectory.parquet. The domains'
    tokens go to ``mixture/tokens-<tokens_fp12>/`` (default: under the mixture's own fingerprint)."""
    from winnow.selectors.mixture import entropy

    m = recipe.mixture
    assert m is not None
    method = MIXTURE_METHODS[m.method]
    if recipe.model.task != "causal_lm" and method.trains:
        raise WinnowError(
            f"mixture.method {m.method!r} trains a language-model proxy: model.task must be causal_lm"
        )
    layout = RunLayout(run_dir)
    done = _cached(layout, fp)
    if done is not None:
        return done
    t0 = time.time()
    timing: dict[str, float] = {}  # where the seconds went, kept in mixture.json (read by bench_pipeline)
    domains = load_domains(recipe, shards, feat, layout.mixture_tokens(tokens_fp or fp))
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
    k = len(train_ids)
    tokens = np.array([domains[names[i]].n_tokens for i in train_ids], dtype=np.float64)
    run = MixtureRun(
        recipe, m, names, train_ids, tgt_ids, tokens, feat=feat, tokenizer=tok, progress=progress
    )
    problem = method.check(run)
    if problem:
        raise WinnowError(problem)
    rows: list[dict[str, Any]] = []
    timing["domains_s"] = round(time.time() - t0, 3)

    def record(step: int, w: torch.Tensor | np.ndarray) -> None:
        w = np.asarray(w, dtype=np.float64)
        rows.append(
            {
                "step": step,
                **{names[i]: float(w[j]) for j, i in enumerate(train_ids)},
                "entropy": entropy(torch.as_tensor(w)),
            }
        )

    if not method.trains:
        w = method.static_weights(run)
        record(0, w)
        final = avg = w
    else:
        run.device = resolve_device(m.device)
        run.amp = autocast_for(run.device)
        run.sampler = Sampler(domains, m.seed)
        run.model = model = init_model(recipe, m.seed, tok, None).to(run.device).train()
        opt = optimizer(model, m.lr, m.weight_decay)
        f = lr_lambda(m.warmup_steps, m.steps)
        alpha = torch.full((k,), 1.0 / k, dtype=torch.float64)
        total = torch.zeros(k, dtype=torch.float64)
        record(0, alpha)
        start = min(max(1, method.average_from(run)), m.steps)
        # the attention kernels the spine's proxy trains with (train.sdpa_backends: no cuDNN on CUDA by default)
        with sdpa_backends(recipe.train.sdpa_backends, run.device):
            try:
                t_setup = time.time()
                method.setup(run)  # DoReMi: the reference model's training
                timing["setup_s"] = round(time.time() - t_setup, 3)
                t_steps = time.time()
                for step in range(1, m.steps + 1):
                    lr_t = m.lr * f(step - 1)
                    for gr in opt.param_groups:
                        gr["lr"] = lr_t
                    alpha = method.step(run, step, alpha, lr_t)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), m.grad_clip)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    if step >= start:
                        total += alpha
                    record(step, alpha)
                    if progress is not None:
                        progress(m.method, step, m.steps)
                timing["steps_s"] = round(time.time() - t_steps, 3)
            finally:
                method.close(run)
        final = alpha.numpy()
        avg = (total / (m.steps - start + 1)).numpy()
        with atomic_path(layout.mixture_model) as tmp:
            model.save_pretrained(str(tmp), safe_serialization=True)
    output = m.output if m.output != "auto" else method.default_output
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
        "steps": m.steps if method.trains else 0,
        "seconds": round(time.time() - t0, 2),
        "timing": timing,
        "fingerprint": fp,
        "package_version": winnow.__version__,
    }
    write_parquet(pl.DataFrame(rows), layout.mixture_trajectory, {"step_fingerprint": fp})
    write_json(layout.mixture_json, res)
    return res


def mixture_weights_for_rows(run_dir: Path, domains: list[str | None], kept: np.ndarray) -> np.ndarray:
    """Per-row weights N alpha_d / n_d over kept rows (0 for pruned rows and for domains not in the mixture)."""
    mix = json.loads(RunLayout(run_dir).mixture_json.read_text())["weights"]
    dom = np.array(["" if d is None else d for d in domains], dtype=object)
    out = np.zeros(len(dom))
    N = int(kept.sum())
    for d, a in mix.items():
        sel = (dom == d) & kept
        n = int(sel.sum())
        if n:
            out[sel] = N * a / n
    return out


@register_step
class MixtureStep(Step):
    """The recipe's domain mixture (``mixture``): ``mixture.json``, its trajectory and the proxy."""

    name = "mixture"

    def device(self, ctx: RunContext) -> str:
        return ctx.config.mixture.device if ctx.config.mixture else "cpu"

    def fingerprint(self, ctx: RunContext, input_fp: str = "", tok_fp: str | None = None) -> str:
        return mixture_fingerprint(ctx.config, input_fp, tok_fp)

    def run(
        self, ctx: RunContext, fp: str, input_fp: str = "", tok_fp: str | None = None, **_: Any
    ) -> dict[str, Any]:
        recipe = ctx.setup(ctx.all_threads)
        feat, tok, _ = ctx.featurizer()
        bar = progress(f"mixture {recipe.mixture.method}", None, "step")
        state: dict[str, Any] = {"phase": None}

        def cb(phase: str, step: int, total: int) -> None:
            if state["phase"] != phase:
                state["phase"] = phase
                bar.reset(total=total)
                bar.set_description(f"mixture {phase}")
            bar.update(1)

        try:
            tokens_fp = tokens_fingerprint(recipe, input_fp, tok_fp)
            return run_mixture(
                recipe, ctx.root, ctx.input_shards(), feat, tok, fp, progress=cb, tokens_fp=tokens_fp
            )
        finally:
            bar.close()

    def present(self, ctx: RunContext, result: Any, fp: str) -> bool:
        return _cached(ctx.layout, fp) is not None
