"""Influence and gradient-similarity scoring against a target set (LESS / TracIn / DVGS-style).

Steps (one Prefect task each, see flows/run.py):

1. ``features_shard``: per input shard (and once for the target set), at each chosen proxy checkpoint,
   every example's projected gradient from the engine (one batched backward per batch; Adam-
   preconditioned with the checkpoint's optimizer state unless ``precondition: none``), unit-normalised,
   stored as ``influence/parts/feat-<shard>-<fp>.npy`` (float16, (checkpoints, rows, k)) with
   ``meta-<shard>-<fp>.parquet`` (id, domain, and per checkpoint the projected norm and the exact
   squared gradient norm). The projection is seeded by (proj_seed, parameter name) only, so shards
   scored in different processes or on different machines share one feature space.
2. ``merge_influence``: streams the parts (memory-mapped, block by block, on the GPU where there is
   one) into the scores ``scores/influence.parquet`` (``influence``, ``self_influence``,
   ``gradsim_target``, ``gradsim_domain``), ``influence/features.npy`` + ``influence/ids.parquet`` (the
   merged features, written block by block) and each target example's top-k training examples as
   ``influence/neighbours.parquet``: exact, from the same products as the scores (the learning-rate-
   weighted sums of cosines), kept as a running top-k; memory is one block plus (targets x k).

Checkpoints: those of the first seed with step > 0 (``checkpoints: all``) or its last (``last``); the
weight of checkpoint i at step s_i is the mean learning rate of the steps (s_{i-1}, s_i] (LESS's
average learning rate of the epoch ending at the checkpoint; TracIn's step size).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

import winnow
from winnow.errors import WinnowError
from winnow.pipeline.atomic import atomic_path, fingerprint, save_npy
from winnow.pipeline.collate import Featurizer
from winnow.pipeline.layout import RunLayout
from winnow.pipeline.models import load_checkpoint, resolve_device
from winnow.pipeline.recipe import Recipe
from winnow.pipeline.sources import InputShard, iter_raw_batches, list_shards
from winnow.pipeline.steps import (
    Checkpoint,
    FeaturePart,
    RunContext,
    Step,
    WeightedCheckpoint,
    progress,
    register_step,
)
from winnow.pipeline.store import ScoreStore, read_parquet, read_provenance, write_parquet
from winnow.pipeline.train import lr_lambda

COLUMNS = ("influence", "self_influence", "gradsim_target", "gradsim_domain")
TARGET_DOMAIN = "target"


# -- configuration ---------------------------------------------------------------------------------
def influence_checkpoints(recipe: Recipe, ckpts: list[Checkpoint]) -> list[WeightedCheckpoint]:
    """The checkpoints features are taken at, each with its learning-rate ``weight``."""
    cfg = recipe.scoring.influence
    assert cfg is not None
    ckpts = [Checkpoint.of(c) for c in ckpts]
    first = ckpts[0].seed
    mine = sorted((c for c in ckpts if c.seed == first and c.step > 0), key=lambda c: c.step)
    if not mine:
        raise WinnowError(
            "scoring.influence needs a trained proxy checkpoint (train.steps > 0 and a "
            "train.checkpoints step above 0)"
        )
    if cfg.checkpoints == "last":
        mine = mine[-1:]
    tc = recipe.train
    f = lr_lambda(tc.warmup_steps, tc.steps)
    out, prev = [], 0
    for c in mine:
        # optimizer step j (1-based) uses the scheduler's factor at j - 1
        w = float(np.mean([tc.lr * f(j - 1) for j in range(prev + 1, c.step + 1)]))
        out.append(WeightedCheckpoint(c.seed, c.step, c.path, c.fingerprint, w))
        prev = c.step
    return out


def target_recipe(recipe: Recipe) -> Recipe:
    """The recipe whose data section reads the target set: the data's format and columns, the target's
    files, and the subtask column as its domain."""
    cfg = recipe.scoring.influence
    assert cfg is not None
    data = recipe.data.model_copy(update={"source": cfg.target, "domain_column": cfg.subtask_column})
    return recipe.model_copy(update={"data": data})


def target_shards(recipe: Recipe) -> list[InputShard]:
    tr = target_recipe(recipe)
    try:
        return list_shards(tr.data)
    except WinnowError as e:
        raise WinnowError(f"scoring.influence.target: {e}") from None


def features_fingerprint(
    recipe: Recipe, shard: InputShard, ickpts: list[WeightedCheckpoint], tok_fp: str | None, role: str
) -> str:
    cfg = recipe.scoring.influence
    assert cfg is not None
    return fingerprint(
        "influence-features",
        role,
        shard.fingerprint,
        cfg.model_dump(exclude={"batch_size", "device", "neighbours", "target"}),
        recipe.data.model_dump(exclude={"read_batch_size", "source", "domain_column"}),
        recipe.model.max_length,
        [(c.fingerprint, c.weight) for c in ickpts],
        tok_fp,
        winnow.__version__,
    )


# -- features --------------------------------------------------------------------------------------
def _load_optimizer(ckpt_dir: Path) -> dict[str, Any]:
    """The optimizer state in a checkpoint's optimizer.pt: tensors and plain values only."""
    path = ckpt_dir / "optimizer.pt"
    if not path.exists():
        raise WinnowError(
            f"{path}: not found; scoring.influence.precondition 'less' and 'adam' need the optimizer "
            f"state the proxy training saves (or set precondition: none)"
        )
    try:  # tensors and plain values only: a run folder is data, never code
        return torch.load(path, map_location="cpu", weights_only=True)["optimizer"]
    except Exception:
        raise WinnowError(
            f"{path}: does not load as a tensor-only optimizer state (corrupt, or holding objects); "
            f"delete that checkpoint folder and rerun"
        ) from None


def _adam_state(
    ckpt_dir: Path, model: torch.nn.Module, what: str = "exp_avg_sq", st: dict[str, Any] | None = None
) -> tuple[dict[str, torch.Tensor], int, float, float]:
    """``what`` (``exp_avg_sq`` or ``exp_avg``) by parameter name, the step, beta2 and eps from the
    checkpoint's optimizer.pt (the training loop's parameter groups: matrices and embeddings first, then
    vectors, each in named_parameters order). ``st``: that file's state already read by
    :func:`_load_optimizer`, so that both moments cost one read of it."""
    path = ckpt_dir / "optimizer.pt"
    if st is None:
        st = _load_optimizer(ckpt_dir)
    named = list(model.named_parameters())
    order = [n for n, p in named if p.ndim >= 2] + [n for n, p in named if p.ndim < 2]
    ids = [i for g in st["param_groups"] for i in g["params"]]
    if len(ids) != len(order):
        raise WinnowError(f"{path}: the optimizer holds {len(ids)} parameters, the model {len(order)}")
    group = st["param_groups"][0]
    sq: dict[str, torch.Tensor] = {}
    step = 0
    for name, i in zip(order, ids, strict=True):
        s = st["state"].get(i)
        if s and what in s:
            sq[name] = s[what].float()
            step = max(step, int(torch.as_tensor(s["step"]).item()))
    return sq, step, float(group["betas"][1]), float(group["eps"])


FLUSH_BYTES = 1 << 26
"""compute_features keeps up to this many bytes of unit features on the device between copies to the host."""


def _flush(pending: list[Any], units: np.ndarray, norms: np.ndarray, sqn: np.ndarray) -> None:
    """Copy the pending (rows, units, norms, sqnorms) batches to the host arrays in one copy each."""
    if not pending:
        return
    at = np.concatenate([np.asarray(i, dtype=np.int64) for i, _, _, _ in pending])
    units[at] = torch.cat([u for _, u, _, _ in pending]).cpu().numpy()
    norms[at] = torch.cat([r for _, _, r, _ in pending]).cpu().numpy()
    sqn[at] = torch.cat([q for _, _, _, q in pending]).cpu().numpy()
    pending.clear()


def compute_features(
    recipe: Recipe,
    run_dir: Path,
    shard: InputShard,
    feat: Featurizer,
    ickpts: list[dict[str, Any]],
    progress: Any = None,
    role: str = "train",
) -> dict[str, Any]:
    """ids, domains, units (C, n, k) float16, norms (C, n), sqnorms (C, n) of one shard.

    ``scoring.influence.precondition``: ``less`` (default) gives training examples LESS's Adam update
    direction (:class:`winnow.grads.AdamUpdate`: the checkpoint's moments, the example's own g², as the
    authors' code) and target examples their plain gradients, as LESS does; ``adam`` scales both sides'
    gradients by the rank-one Adafactor form of 1 / (sqrt(v_hat) + eps) (:func:`adam_preconditioner`, the
    variant winnow had before: linear in g, no momentum); ``none``: plain gradients on both sides."""
    from winnow.grads import AdamUpdate, GradEngine, parse_params, per_example_loss
    from winnow.scorers.influence import adam_preconditioner

    cfg = recipe.scoring.influence
    assert cfg is not None
    device = resolve_device(cfg.device)
    task = recipe.model.task
    exs = [e for raw in iter_raw_batches(feat.data, shard) for e in feat.featurize(raw, shard.location)]
    n, C, k = len(exs), len(ickpts), cfg.proj_dim
    units = np.zeros((C, n, k), dtype=np.float16)
    norms = np.zeros((C, n), dtype=np.float32)
    sqn = np.zeros((C, n), dtype=np.float32)
    order = sorted(range(n), key=lambda i: exs[i].n_tokens)  # length-sorted batches, less padding
    amp = dict(
        device_type=device.type,
        dtype=torch.bfloat16,
        enabled=device.type == "cuda" and torch.cuda.is_bf16_supported(),
    )
    for ci, ck in enumerate(ickpts):
        model = load_checkpoint(run_dir / ck.path, task, recipe.model.trust_remote_code).to(device).eval()
        try:
            eng = GradEngine(
                model,
                params=parse_params(cfg.parameters),
                proj_dim=k,
                proj_seed=cfg.proj_seed,
                proj_kind=cfg.proj_kind,
            )
        except ValueError as e:
            raise WinnowError(f"scoring.influence.parameters: {e}") from None
        pre = None
        if cfg.precondition == "less" and role == "train":
            st = _load_optimizer(run_dir / ck.path)  # both moments from one read of optimizer.pt
            sq, _, _, _ = _adam_state(run_dir / ck.path, model, st=st)
            avg, _, _, _ = _adam_state(run_dir / ck.path, model, "exp_avg", st=st)
            del st
            pre = {}
            for nm, p_ in eng.params.items():
                zero = torch.zeros_like(p_, dtype=torch.float32, device="cpu")
                pre[nm] = AdamUpdate(avg.get(nm, zero).to(device), sq.get(nm, zero).to(device))
        elif cfg.precondition == "adam":
            sq, step, beta2, eps = _adam_state(run_dir / ck.path, model)
            pre = adam_preconditioner(
                eng.views, eng.kinds, {nm: p.numel() for nm, p in eng.params.items()}, sq, step, beta2, eps
            )
        # results stay on the device until FLUSH_BYTES of them are pending, then come back in one copy:
        # a copy per batch would make the host wait for every batch's kernels before queueing the next
        pending: list[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]] = []
        with eng:
            for lo in range(0, n, cfg.batch_size):
                idx = order[lo : lo + cfg.batch_size]
                batch = {key: v.to(device) for key, v in feat.collate([exs[i] for i in idx]).items()}
                with torch.autocast(**amp):
                    out = eng.compute(
                        lambda b=batch, m=model: per_example_loss(m, b, task),
                        sqnorm=True,
                        project=True,
                        precondition=pre,
                    )
                eng.check = False  # the consistency check ran on the first batch
                p = out["proj"].float()
                nrm = p.norm(dim=1)
                pending.append(
                    (idx, (p / nrm.clamp_min(1e-30).unsqueeze(1)).half(), nrm, out["sqnorm"].float())
                )
                if len(pending) * len(idx) * k * 2 >= FLUSH_BYTES:
                    _flush(pending, units[ci], norms[ci], sqn[ci])
                if progress is not None:
                    progress(len(idx))
            _flush(pending, units[ci], norms[ci], sqn[ci])
    return {
        "ids": [e.id for e in exs],
        "domains": [e.domain for e in exs],
        "previews": [e.preview for e in exs],
        "units": units,
        "norms": norms,
        "sqnorms": sqn,
    }


def features_shard(
    recipe: Recipe,
    run_dir: Path,
    shard: InputShard,
    feat: Featurizer,
    ickpts: list[WeightedCheckpoint],
    fp: str,
    role: str = "train",
    progress: Any = None,
) -> FeaturePart:
    """Write one shard's features and metadata (module docstring); skip if already written."""
    vec_path, meta_path = RunLayout(run_dir).influence_part(role, shard.index, fp)
    if vec_path.exists() and meta_path.exists():
        return FeaturePart(
            shard.index, role, RunLayout(run_dir).rel(vec_path), RunLayout(run_dir).rel(meta_path)
        )
    t0 = time.time()
    f = compute_features(recipe, run_dir, shard, feat, ickpts, progress, role=role)
    if role == "target" and not f["ids"]:
        raise WinnowError(f"scoring.influence.target: {shard.location} holds no rows")
    cols: dict[str, Any] = {"id": f["ids"], "domain": f["domains"], "preview": f["previews"]}
    for ci in range(len(ickpts)):
        cols[f"norm@{ci}"] = f["norms"][ci]
        cols[f"sqnorm@{ci}"] = f["sqnorms"][ci]
    meta = pl.DataFrame(cols, schema_overrides={"id": pl.Utf8, "domain": pl.Utf8, "preview": pl.Utf8})
    save_npy(vec_path, f["units"])
    write_parquet(
        meta,
        meta_path,
        {
            "fingerprint": fp,
            "seconds": round(time.time() - t0, 3),
            "checkpoints": [c.to_dict() for c in ickpts],
        },
    )
    return FeaturePart(
        shard.index,
        role,
        RunLayout(run_dir).rel(vec_path),
        RunLayout(run_dir).rel(meta_path),
        rows=meta.height,
    )


MERGE_BLOCK_BYTES = 1 << 28
"""The merge reads training features ``MERGE_BLOCK_BYTES`` (in float32, with their products against the
target) at a time from the memory-mapped parts: its memory is set by this and the target set, never by
the number of training rows."""


def _load_parts(run_dir: Path, parts: list[FeaturePart]) -> tuple[pl.DataFrame, np.ndarray]:
    """Every part's metadata and features, whole (the target set: small)."""
    parts = sorted(parts, key=lambda p: p.shard)
    metas = [read_parquet(run_dir / p.meta) for p in parts]
    vecs = [np.load(run_dir / p.vectors) for p in parts]
    meta = pl.concat(metas, how="vertical") if metas else pl.DataFrame()
    units = np.concatenate(vecs, axis=1) if vecs else np.zeros((0, 0, 0), np.float16)
    return meta, units


def _train_rows(run_dir: Path, parts: list[FeaturePart]) -> tuple[list[FeaturePart], pl.DataFrame]:
    """The training parts in shard order and their rows' metadata without previews, one row per distinct
    id (its first occurrence), with ``_p`` (the part's position) and ``_r`` (the row in the part)."""
    parts = sorted(parts, key=lambda p: p.shard)
    metas = [
        pl.scan_parquet(run_dir / p.meta)
        .drop("preview")
        .with_row_index("_r")
        .with_columns(pl.lit(i, pl.Int64).alias("_p"))
        .collect()
        for i, p in enumerate(parts)
    ]
    if not metas:
        return parts, pl.DataFrame(schema={"id": pl.Utf8, "domain": pl.Utf8, "_r": pl.UInt32, "_p": pl.Int64})
    meta = pl.concat(metas, how="vertical").unique(subset="id", keep="first", maintain_order=True)
    return parts, meta


def _blocks(
    run_dir: Path, parts: list[FeaturePart], meta: pl.DataFrame, rows: int, device: torch.device
) -> Any:
    """(output positions, (C, b, k) float32 features on ``device``) for the kept training rows, ``rows`` at a
    time, in ``meta``'s order. Each block is read from its part's file by offset (the rows of a part are
    kept in order, so a block is one span per checkpoint): nothing is memory-mapped, so the process holds a
    block, never a whole part, however large the parts are."""
    p_col, r_col = meta["_p"].to_numpy(), meta["_r"].to_numpy().astype(np.int64)
    starts = np.flatnonzero(np.r_[True, p_col[1:] != p_col[:-1]]) if len(p_col) else np.zeros(0, int)
    ends = np.r_[starts[1:], len(p_col)]
    for lo, hi in zip(starts, ends, strict=True):
        with open(run_dir / parts[int(p_col[lo])].vectors, "rb") as f:
            version = np.lib.format.read_magic(f)
            fmt = np.lib.format
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, fortran, dtype = read(f)
            if fortran or len(shape) != 3:
                raise WinnowError(
                    f"{parts[int(p_col[lo])].vectors}: expected a C-ordered (checkpoints, rows, k) array"
                )
            C, n, k = shape
            head = f.tell()
            for b0 in range(lo, hi, rows):
                b1 = min(hi, b0 + rows)
                want = r_col[b0:b1]
                r0, r1 = int(want[0]), int(want[-1]) + 1
                block = np.empty((C, b1 - b0, k), dtype)
                for c in range(C):
                    f.seek(head + (c * n + r0) * k * dtype.itemsize)
                    span = np.fromfile(f, dtype, count=(r1 - r0) * k).reshape(r1 - r0, k)
                    block[c] = span[want - r0]
                yield np.arange(b0, b1), torch.from_numpy(block).to(device).float()


def merge_influence(
    recipe: Recipe,
    run_dir: Path,
    parts: list[FeaturePart],
    target_parts: list[FeaturePart],
    ickpts: list[WeightedCheckpoint],
    step_fingerprint: str,
) -> dict[str, Any]:
    """The influence scores, neighbours and merged features from the parts, streamed: the training
    features are read block by block from the memory-mapped parts (``MERGE_BLOCK_BYTES``), on the GPU
    where ``scoring.influence.device`` gives one, and the merged ``features.npy`` is written block by block.
    Two passes: the first sums each domain's gradients (``gradsim_domain``'s directions), the second scores
    every block against the target set and keeps each target example's running top-k neighbours. The
    neighbours come from the same products as the scores (``sum_i w_i <train_i, target_i>``), so they are
    exact: no approximate index is built, and the memory is the block's plus (targets x k)."""
    from winnow.scorers.influence import auroc, heldout_split, self_influence

    cfg = recipe.scoring.influence
    assert cfg is not None
    device = resolve_device(cfg.device)
    parts, meta = _train_rows(run_dir, parts)
    tmeta, tunits = _load_parts(run_dir, target_parts)
    C = len(ickpts)
    w = [float(c.weight) for c in ickpts]
    N, M = meta.height, tmeta.height
    k_dim = int(tunits.shape[2]) if tunits.ndim == 3 else 0
    tgt = [torch.from_numpy(tunits[i]).to(device).float() for i in range(C)]
    sub_names = ["" if x is None else str(x) for x in tmeta["domain"].to_list()]
    uniq = sorted(set(sub_names))
    sub = torch.tensor([uniq.index(x) for x in sub_names], dtype=torch.long)
    avg = _averaging(sub, len(uniq), device)
    held = heldout_split(sub) if M >= 4 and N else None
    if held is not None:
        a_pos, b_pos, sub_a = held
        avg_a = _averaging(sub_a, int(sub_a.max()) + 1, device)
        a_dev = a_pos.to(device)
    # target directions (gradsim_target): the target set is small, so these are computed whole
    tnorms = [torch.tensor(tmeta[f"norm@{i}"].to_numpy(), device=device) for i in range(C)]
    tdirs = [_unit((tgt[i].double() * tnorms[i].double()[:, None]).sum(0)) for i in range(C)]
    doms = ["" if d is None else str(d) for d in meta["domain"].to_list()]
    dnames = sorted(set(doms))
    groups = torch.tensor([dnames.index(d) for d in doms], dtype=torch.long)
    norms = [torch.tensor(meta[f"norm@{i}"].to_numpy()) for i in range(C)]
    rows = max(1, MERGE_BLOCK_BYTES // max(1, 4 * (C * k_dim + 2 * M)))
    # pass 1: each domain's summed gradient (norm x unit), float64
    dsum = [torch.zeros(len(dnames), k_dim, dtype=torch.float64, device=device) for _ in range(C)]
    for pos, x in _blocks(run_dir, parts, meta, rows, device):
        g = groups[pos].to(device)
        for i in range(C):
            raw = x[i].double() * norms[i][pos].to(device).double()[:, None]
            dsum[i].index_add_(0, g, raw)
    ddirs = [_unit(d) for d in dsum]
    # pass 2: scores, neighbours and the merged features
    infl, s_a = np.empty(N, np.float32), np.empty(N, np.float32)
    gs_t, gs_d = np.empty(N, np.float32), np.empty(N, np.float32)
    kk = min(cfg.neighbours, N)
    top_v = torch.full((M, 0), -torch.inf, device=device)
    top_i = torch.zeros((M, 0), dtype=torch.long, device=device)
    layout = RunLayout(run_dir)
    with atomic_path(layout.influence_features) as tmp, open(tmp, "wb") as out:
        # (rows, checkpoints, k) float16, written block by block in row order (blocks come in that order)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False}
        np.lib.format.write_array_header_1_0(out, {**header, "shape": (N, C, k_dim)})
        for pos, x in _blocks(run_dir, parts, meta, rows, device):
            s = torch.zeros(len(pos), M, device=device)
            for i in range(C):
                s += w[i] * (x[i] @ tgt[i].t())
            infl[pos] = (s @ avg).max(1).values.cpu().numpy() if M else np.nan
            if held is not None:
                s_a[pos] = (s.index_select(1, a_dev) @ avg_a).max(1).values.cpu().numpy()
            g = groups[pos].to(device)
            gs_t[pos] = (sum((x[i] @ tdirs[i].float()).double() for i in range(C)) / C).float().cpu().numpy()
            gs_d[pos] = (
                (sum((x[i] * ddirs[i].float()[g]).sum(1).double() for i in range(C)) / C)
                .float()
                .cpu()
                .numpy()
            )
            if kk and M:
                v = torch.cat([top_v, s.t()], dim=1)
                ix = torch.cat([top_i, torch.as_tensor(pos, device=device).expand(M, -1)], dim=1)
                top_v, j = v.topk(min(kk, v.shape[1]), dim=1)
                top_i = ix.gather(1, j)
            out.write(np.ascontiguousarray(x.transpose(0, 1).half().cpu().numpy()).tobytes())
    heldout = None
    if held is not None:
        tgt_a = [t.index_select(0, a_dev) for t in tgt]
        sh = torch.zeros(len(b_pos), len(a_pos), device=device)
        for i in range(C):
            sh += w[i] * (tgt[i].index_select(0, b_pos.to(device)) @ tgt_a[i].t())
        heldout = auroc((sh @ avg_a).max(1).values.cpu(), torch.from_numpy(s_a))
    selfi = self_influence([torch.tensor(meta[f"sqnorm@{i}"].to_numpy()) for i in range(C)], w)
    scores = pl.DataFrame(
        {
            "id": meta["id"],
            "influence": infl.astype(np.float64),
            "self_influence": selfi.double().numpy(),
            "gradsim_target": gs_t.astype(np.float64),
            "gradsim_domain": gs_d.astype(np.float64),
        },
        schema_overrides={"id": pl.Utf8},
    )
    neighbours = _neighbour_rows(run_dir, parts, meta, tmeta, top_v.cpu().numpy(), top_i.cpu().numpy())
    where = f"exact, blocked products on {device.type}"
    write_parquet(neighbours, layout.neighbours, {"step_fingerprint": step_fingerprint})
    write_parquet(meta.select("id", "domain"), layout.influence_ids, {"step_fingerprint": step_fingerprint})
    prov = {
        "scorer": "influence",
        "columns": list(COLUMNS),
        "checkpoints": [c.to_dict() for c in ickpts],
        "params": cfg.model_dump(),
        "target_rows": M,
        "subtasks": uniq,
        "heldout_target_auroc": heldout,
        "neighbours_by": where,
        "package_version": winnow.__version__,
        "step_fingerprint": step_fingerprint,
    }
    path = ScoreStore(run_dir).write_scores("influence", scores, prov)
    return {
        "rows": scores.height,
        "target_rows": M,
        "subtasks": uniq,
        "neighbours_by": where,
        "files": [layout.rel(path), layout.rel(layout.neighbours)],
    }


def _averaging(sub: torch.Tensor, J: int, device: torch.device) -> torch.Tensor:
    """(M, J): column j averages the target examples of subtask j (every subtask present)."""
    M = sub.numel()
    avg = torch.zeros(M, J, device=device)
    if M:
        avg[torch.arange(M, device=device), sub.to(device)] = 1.0
        avg /= avg.sum(0, keepdim=True)
    return avg


def _unit(v: torch.Tensor) -> torch.Tensor:
    """Rows (or a vector) scaled to unit length, a zero one left zero: :func:`mean_direction`'s directions."""
    if v.dim() == 1:
        return (v / v.norm().clamp_min(1e-300)).float()
    return (v / v.norm(dim=1, keepdim=True).clamp_min(1e-300)).float()


def _neighbour_rows(
    run_dir: Path,
    parts: list[FeaturePart],
    meta: pl.DataFrame,
    tmeta: pl.DataFrame,
    top_v: np.ndarray,
    top_i: np.ndarray,
) -> pl.DataFrame:
    """``influence/neighbours.parquet``: per target example its top-k training rows by influence, with
    previews read from the parts for those rows only."""
    schema = {
        "target_id": pl.Utf8,
        "subtask": pl.Utf8,
        "target_preview": pl.Utf8,
        "rank": pl.Int64,
        "id": pl.Utf8,
        "domain": pl.Utf8,
        "preview": pl.Utf8,
        "influence": pl.Float64,
    }
    if top_i.size == 0:
        return pl.DataFrame(schema=schema)
    M, k = top_i.shape
    chosen = meta.with_row_index("_o").filter(pl.col("_o").is_in(np.unique(top_i).tolist()))
    previews: dict[int, str | None] = {}
    for p, grp in chosen.group_by("_p"):
        pv = pl.read_parquet(run_dir / parts[int(p[0])].meta, columns=["preview"])["preview"]
        for o, r in zip(grp["_o"].to_list(), grp["_r"].to_list(), strict=True):
            previews[o] = pv[r]
    ids, doms = meta["id"], meta["domain"]
    flat = top_i.reshape(-1)
    return pl.DataFrame(
        {
            "target_id": np.repeat(np.asarray(tmeta["id"].to_list(), dtype=object), k).tolist(),
            "subtask": np.repeat(np.asarray(tmeta["domain"].to_list(), dtype=object), k).tolist(),
            "target_preview": np.repeat(np.asarray(tmeta["preview"].to_list(), dtype=object), k).tolist(),
            "rank": np.tile(np.arange(1, k + 1), M).tolist(),
            "id": ids.gather(flat).to_list(),
            "domain": doms.gather(flat).to_list(),
            "preview": [previews[int(j)] for j in flat],
            "influence": top_v.reshape(-1).astype(np.float64).tolist(),
        },
        schema=schema,
    )


def merged_fingerprint_ok(run_dir: Path, fp: str) -> bool:
    p, n = RunLayout(run_dir).influence_scores, RunLayout(run_dir).neighbours
    if not (p.exists() and n.exists()):
        return False
    return (read_provenance(p) or {}).get("step_fingerprint") == fp and (read_provenance(n) or {}).get(
        "step_fingerprint"
    ) == fp


@register_step
class FeaturesStep(Step):
    """One shard's projected gradient features (``influence-features``): a training input shard
    (``role: train``) or a shard of the target set (``role: target``)."""

    name = "influence-features"
    result = FeaturePart

    def device(self, ctx: RunContext) -> str:
        return ctx.config.scoring.influence.device if ctx.config.scoring.influence else "cpu"

    def fingerprint(
        self,
        ctx: RunContext,
        shard: Any = None,
        ickpts: Any = (),
        tok_fp: str | None = None,
        role: str = "train",
    ) -> str:
        return features_fingerprint(
            ctx.config, shard, [WeightedCheckpoint.of(c) for c in ickpts], tok_fp, role
        )

    def run(self, ctx: RunContext, fp: str, shard: Any = None, ickpts: Any = (), role: str = "train") -> Any:
        recipe = ctx.setup(ctx.threads)
        feat, _, _ = ctx.featurizer(target_recipe(recipe) if role == "target" else recipe)
        sh = InputShard.from_dict(shard)
        bar = progress(f"gradient features {'target ' if role == 'target' else ''}{sh.name}", None, "row")
        try:
            part = features_shard(
                recipe,
                ctx.root,
                sh,
                feat,
                [WeightedCheckpoint.of(c) for c in ickpts],
                fp,
                role=role,
                progress=bar.update,
            )
        finally:
            bar.close()
        return self.dump(part)

    def present(self, ctx: RunContext, result: Any, fp: str) -> bool:
        part = self.load(result)
        return (ctx.root / part.vectors).exists() and (ctx.root / part.meta).exists()


@register_step
class MergeInfluenceStep(Step):
    """Influence, self-influence and gradient similarities of every row, and the target examples'
    nearest training examples (``merge-influence``): ``scores/influence.parquet``, ``influence/``."""

    name = "merge-influence"

    def fingerprint(self, ctx: RunContext, parts: Any = (), target_parts: Any = ()) -> str:
        cfg = ctx.config.scoring.influence
        return fingerprint(
            "merge-influence",
            [FeaturePart.of(p).vectors for p in target_parts],
            [FeaturePart.of(p).vectors for p in parts],
            cfg.neighbours,
        )

    def run(self, ctx: RunContext, fp: str, parts: Any = (), target_parts: Any = (), ickpts: Any = ()) -> Any:
        return merge_influence(
            ctx.setup(),
            ctx.root,
            [FeaturePart.of(p) for p in parts],
            [FeaturePart.of(p) for p in target_parts],
            [WeightedCheckpoint.of(c) for c in ickpts],
            fp,
        )

    def present(self, ctx: RunContext, result: Any, fp: str) -> bool:
        return merged_fingerprint_ok(ctx.root, fp)
