"""From raw column batches to validated examples and model batches.

`Featurizer.featurize` checks every row (label in range, content present), computes ids and
previews, and tokenizes; `collate` pads a list of examples into the tensors the scorers take
(see docs/ARCHITECTURE.md, "Scorer interface").
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from winnow.errors import WinnowError
from winnow.pipeline.recipe import Recipe
from winnow.pipeline.sources import check_columns, content_id

CHARS_PER_TOKEN = 64  # characters kept per token of max_length before tokenizing
PREVIEW_CHARS = 500


@dataclass
class Example:
    id: str
    domain: str | None
    label: int | None
    label_name: str | None
    features: Any  # list[int] of token ids, or a float32 array (C, H, W)
    preview: str
    n_tokens: int


def example_key(e: Example) -> str:
    """The cache key of an example: sha256 of what the model sees (features and label)."""
    h = hashlib.sha256()
    f = e.features
    h.update(np.asarray(f, dtype=np.int64 if isinstance(f, list) else None).tobytes())
    h.update(f"|{e.label}".encode())
    return h.hexdigest()[:32]


ROWS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("domain", pa.string()),
        ("label", pa.string()),
        ("n_tokens", pa.int64()),
        ("preview", pa.string()),
    ]
)


@dataclass
class Columns:
    """What the model sees of n examples, by column: ``lengths`` (n,) tokens per row and ``flat``, their
    token ids end to end (text tasks), or ``pixels`` (n, C, H, W) float32; ``labels`` (n,) int64 class
    labels or None. Cheap to pickle (a few arrays), so featurizing processes hand these to the scorer."""

    lengths: np.ndarray
    flat: np.ndarray
    pixels: np.ndarray | None = None
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def starts(self) -> np.ndarray:
        """(n,) where each row's tokens begin in ``flat`` (computed once: a window is collated batch by
        batch)."""
        got = self.__dict__.get("_starts")
        if got is None or len(got) != len(self.lengths):
            got = np.zeros(len(self.lengths), np.int64)
            np.cumsum(self.lengths[:-1], out=got[1:])
            self.__dict__["_starts"] = got
        return got

    @property
    def nbytes(self) -> int:
        arrays = (self.lengths, self.flat, self.pixels, self.labels)
        return sum(a.nbytes for a in arrays if a is not None)

    @classmethod
    def of(cls, examples: list[Example]) -> Columns:
        n = len(examples)
        labels = None
        if n and examples[0].label is not None:
            labels = np.fromiter((e.label for e in examples), dtype=np.int64, count=n)
        if n and isinstance(examples[0].features, np.ndarray):
            return cls(
                np.zeros(n, np.int64), np.zeros(0, np.int64), np.stack([e.features for e in examples]), labels
            )
        lengths = np.fromiter((len(e.features) for e in examples), dtype=np.int64, count=n)
        flat = np.fromiter(
            itertools.chain.from_iterable(e.features for e in examples),
            dtype=np.int64,
            count=int(lengths.sum()),
        )
        return cls(lengths, flat, None, labels)

    def take(self, idx: np.ndarray) -> Columns:
        """The examples at ``idx`` (int positions), in that order."""
        labels = None if self.labels is None else self.labels[idx]
        if self.pixels is not None:
            return Columns(self.lengths[idx], self.flat[:0], self.pixels[idx], labels)
        starts = self.starts
        lens = self.lengths[idx]
        # every kept row's token positions, end to end: start of its row + 0..len-1
        pos = np.repeat(starts[idx] - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens) + np.arange(
            lens.sum()
        )
        return Columns(lens, self.flat[pos], None, labels)

    @staticmethod
    def concat(parts: list[Columns]) -> Columns:
        labels = None if parts[0].labels is None else np.concatenate([p.labels for p in parts])  # type: ignore[misc]
        if parts[0].pixels is not None:
            return Columns(
                np.concatenate([p.lengths for p in parts]),
                parts[0].flat,
                np.concatenate([p.pixels for p in parts]),  # type: ignore[misc]
                labels,
            )
        return Columns(
            np.concatenate([p.lengths for p in parts]), np.concatenate([p.flat for p in parts]), None, labels
        )


@dataclass
class FeatBatch:
    """One read batch featurized: its rows' ids and cache keys (:func:`example_key`), its rows part
    (``ROWS_SCHEMA``: id, domain, label, n_tokens, preview) and what the model sees (:class:`Columns`)."""

    ids: list[str]
    keys: list[str]
    rows: pa.Table
    columns: Columns

    @classmethod
    def of(cls, examples: list[Example]) -> FeatBatch:
        cols = [
            [e.id for e in examples],
            [e.domain for e in examples],
            [e.label_name for e in examples],
            [e.n_tokens for e in examples],
            [e.preview for e in examples],
        ]
        rows = pa.Table.from_arrays(
            [pa.array(c, f.type) for c, f in zip(cols, ROWS_SCHEMA, strict=True)], schema=ROWS_SCHEMA
        )
        return cls(cols[0], [example_key(e) for e in examples], rows, Columns.of(examples))


class Featurizer:
    def __init__(
        self,
        recipe: Recipe,
        tokenizer: Any | None,
        label_names: list[str] | None,
        num_labels: int | None,
        vocab_size: int | None = None,
    ):
        self.r = recipe
        self.data = recipe.data
        self.task = recipe.model.task
        self.tok = tokenizer
        self.label_names = label_names
        self.num_labels = num_labels
        self.vocab_size = vocab_size
        self.max_length = recipe.model.max_length
        self._label_index = {n: i for i, n in enumerate(label_names or [])}
        self.pad_id = 0
        if tokenizer is not None and tokenizer.pad_token_id is not None:
            self.pad_id = int(tokenizer.pad_token_id)

    def identity(self) -> str:
        """What this featurizer makes of a row, as a sha256: two featurizers with the same identity give
        the same examples (the recipe, the classes, the token ids' bounds and the tokenizer's own state;
        a pickle is no such key: a tokenizer loaded twice pickles to different bytes)."""
        import pickle

        h = hashlib.sha256(self.r.model_dump_json().encode())
        h.update(
            repr((self.label_names, self.num_labels, self.vocab_size, self.max_length, self.pad_id)).encode()
        )
        backend = getattr(self.tok, "_tokenizer", None)
        if backend is not None and hasattr(backend, "to_str"):
            h.update(backend.to_str().encode())
        elif self.tok is not None:
            h.update(pickle.dumps(self.tok))
        return h.hexdigest()

    # -- rows -------------------------------------------------------------------------------
    def _label(self, value: Any, where: str) -> tuple[int, str]:
        col = self.data.label_column
        if value is None:
            raise WinnowError(f"{where}: empty label in column {col!r}")
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, (int, np.integer)):
            y = int(value)
        elif isinstance(value, float) and value.is_integer():
            y = int(value)
        elif isinstance(value, str) and value in self._label_index:
            y = self._label_index[value]
        elif isinstance(value, str) and value.strip().lstrip("-").isdigit() and not self._label_index:
            y = int(value)
        else:
            known = (
                f" (known: {', '.join(self.label_names)})"
                if self.label_names
                else " (set data.label_names to map string labels to classes)"
            )
            raise WinnowError(
                f"{where}: label {value!r} in column {col!r} is not a class of the model{known}"
            )
        if self.num_labels is not None and not 0 <= y < self.num_labels:
            raise WinnowError(
                f"{where}: label {value!r} in column {col!r} is outside the model's "
                f"classes 0..{self.num_labels - 1}"
            )
        name = self.label_names[y] if self.label_names and y < len(self.label_names) else str(y)
        return y, name

    def featurize(self, batch: dict[str, list], where: str, row_offset: int = 0) -> list[Example]:
        d = self.data
        check_columns(d, list(batch), where)
        n = len(next(iter(batch.values()))) if batch else 0
        out: list[Example] = []
        texts: list[str] | None = None
        if d.text_column is not None and d.input_ids_column is None and self.task != "image_classification":
            texts = []
            for i, t in enumerate(batch[d.text_column]):
                if t is None:
                    raise WinnowError(
                        f"{where} row {row_offset + i}: empty value in column {d.text_column!r}"
                    )
                if not isinstance(t, str):
                    raise WinnowError(
                        f"{where} row {row_offset + i}: column {d.text_column!r} holds "
                        f"{type(t).__name__}, expected text"
                    )
                texts.append(t)
            # truncate by characters before tokenizing: a 5 MB row is not tokenized whole to keep its
            # first max_length tokens (CHARS_PER_TOKEN characters a token is far more than any real text
            # needs; the id and the preview still come from the whole text)
            cap = self.max_length * CHARS_PER_TOKEN
            token_lists = self.encode([t[:cap] for t in texts])
        for i in range(n):
            w = f"{where} row {row_offset + i}"
            if texts is not None:
                feats = token_lists[i]
                content: Any = texts[i]
                preview = texts[i][:PREVIEW_CHARS]
                n_tok = len(feats)
            elif d.input_ids_column is not None:
                ids = batch[d.input_ids_column][i]
                if ids is None or not isinstance(ids, (list, tuple, np.ndarray)):
                    raise WinnowError(f"{w}: column {d.input_ids_column!r} must hold lists of token ids")
                ids = [int(x) for x in ids]
                if self.vocab_size is not None and ids and (max(ids) >= self.vocab_size or min(ids) < 0):
                    raise WinnowError(
                        f"{w}: token id outside the model's vocabulary 0..{self.vocab_size - 1}"
                    )
                content = ids
                feats = ids[: self.max_length]
                n_tok = len(feats)
                preview = (self.tok.decode(feats[:200]) if self.tok is not None else str(feats[:50]))[
                    :PREVIEW_CHARS
                ]
            else:
                raw = batch[d.image_column][i]
                if raw is None:
                    raise WinnowError(f"{w}: empty value in column {d.image_column!r}")
                arr = _image_array(raw, d.image_shape, w, d.image_column)
                content = arr.tobytes()
                feats = arr * np.float32(d.pixel_scale)
                n_tok = int(arr.size)
                preview = f"image {'x'.join(str(s) for s in arr.shape)}"
            ident = str(batch[d.id_column][i]) if d.id_column else content_id(content)
            if d.id_column and batch[d.id_column][i] is None:
                raise WinnowError(f"{w}: empty id in column {d.id_column!r}")
            label = label_name = None
            if d.label_column is not None and self.task == "causal_lm":
                # a language model has no classes: the label is the row's metadata (stratify, report)
                v = batch[d.label_column][i]
                label_name = None if v is None else str(v)
            elif d.label_column is not None:
                label, label_name = self._label(batch[d.label_column][i], w)
            dom = None
            if d.domain_column is not None:
                v = batch[d.domain_column][i]
                dom = None if v is None else str(v)
            out.append(Example(ident, dom, label, label_name, feats, preview, n_tok))
        return out

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of ``texts``, truncated to ``max_length``, with the tokenizer's special tokens. A fast
        tokenizer's Rust encoder is called directly (the ids transformers' ``__call__`` returns, without
        its per-row conversion to Python dicts: about 55 us a row, under the GIL, in a 32k BPE's
        featurize); any other tokenizer through ``__call__``."""
        backend = getattr(self.tok, "_tokenizer", None)
        if backend is None or not hasattr(backend, "encode_batch"):
            enc = self.tok(texts, truncation=True, max_length=self.max_length, add_special_tokens=True)
            return enc["input_ids"]
        want = {"max_length": self.max_length, "stride": 0, "strategy": "longest_first", "direction": "right"}
        have = backend.truncation
        if have is None or any(have.get(k) != v for k, v in want.items()):
            backend.enable_truncation(**want)
        if backend.padding is not None:
            backend.no_padding()
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=True)]

    def row_ids(self, batch: dict[str, list], where: str) -> list[str]:
        """The ids `featurize` gives these rows, without tokenizing (for re-reading the source)."""
        check_columns(self.data, list(batch), where)
        return self.ids_of(batch, where)

    def id_columns(self) -> list[str]:
        """The one column the rows' ids are made of (:meth:`ids_of` reads nothing else)."""
        d = self.data
        if d.id_column is not None:
            return [d.id_column]
        col = d.image_column if self.task == "image_classification" else d.input_ids_column or d.text_column
        assert col is not None  # the recipe's validation requires one
        return [col]

    def ids_of(self, batch: dict[str, list], where: str) -> list[str]:
        """:meth:`row_ids` of a batch whose columns were checked (it may hold the :meth:`id_columns` alone)."""
        d = self.data
        if d.id_column is not None:
            return [str(v) for v in batch[d.id_column]]
        if self.task == "image_classification":
            return [
                content_id(_image_array(v, d.image_shape, where, d.image_column).tobytes())
                for v in batch[d.image_column]
            ]
        if d.input_ids_column is not None:
            return [content_id([int(x) for x in v]) for v in batch[d.input_ids_column]]
        return [content_id(t) for t in batch[d.text_column]]

    # -- tensors ----------------------------------------------------------------------------
    def collate(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        if self.task == "image_classification":
            px = torch.from_numpy(np.stack([e.features for e in examples]).astype(np.float32))
            return {"pixel_values": px, "labels": torch.tensor([e.label for e in examples], dtype=torch.long)}
        lens = np.fromiter((len(e.features) for e in examples), dtype=np.int64, count=len(examples))
        T = max(1, int(lens.max()) if len(lens) else 1)
        flat = np.fromiter(
            itertools.chain.from_iterable(e.features for e in examples), dtype=np.int64, count=int(lens.sum())
        )
        valid = np.arange(T) < lens[:, None]  # row-major: the True cells in order are each row's tokens
        ids = np.full((len(examples), T), self.pad_id, dtype=np.int64)
        ids[valid] = flat
        batch = {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": torch.from_numpy(valid.astype(np.int64)),
        }
        if self.task == "sequence_classification":
            batch["labels"] = torch.tensor([e.label for e in examples], dtype=torch.long)
        return batch


def _image_array(raw: Any, shape: list[int] | None, where: str, col: str) -> np.ndarray:
    try:
        if hasattr(raw, "convert"):  # a PIL image from an `Image` feature
            raw = np.asarray(raw.convert("RGB")).transpose(2, 0, 1)
        arr = np.asarray(raw, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise WinnowError(f"{where}: column {col!r} does not hold a numeric pixel array ({e})") from None
    if not np.isfinite(arr).all():
        raise WinnowError(f"{where}: column {col!r} holds NaN or infinite pixel values")
    if shape is not None:
        if arr.size != int(np.prod(shape)):
            raise WinnowError(
                f"{where}: column {col!r} holds {arr.size} values, data.image_shape "
                f"{shape} needs {int(np.prod(shape))}"
            )
        arr = arr.reshape(shape)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise WinnowError(
            f"{where}: column {col!r} holds an array of shape {arr.shape}; expected (C, H, W), "
            f"(H, W), or a flat array with data.image_shape"
        )
    return arr


def length_groups(
    lengths: np.ndarray, batch_size: int, batch_tokens: int = 0, multiple: int = 1
) -> list[np.ndarray]:
    """Positions grouped in length order (stable), similar lengths together so that little padding is
    scored: ``batch_size`` at a time, or with ``batch_tokens`` > 0 as many as fit that many padded tokens
    (rows x the group's longest, rounded up to ``multiple`` as :func:`collate_columns` pads it; one row
    at least)."""
    order = np.argsort(lengths, kind="stable")
    if batch_tokens <= 0:
        return [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    padded = np.maximum(1, lengths[order].astype(np.int64))
    padded = -(-padded // multiple) * multiple
    groups, k, n = [], 0, len(order)
    while k < n:
        # lengths ascend, so rows x the last row's length grows with the rows taken: the first that
        # overflows ends the group
        span = padded[k : k + batch_tokens]
        cost = np.arange(1, len(span) + 1) * span
        take = max(1, int(np.searchsorted(cost, batch_tokens, side="right")))
        groups.append(order[k : k + take])
        k += take
    return groups


def collate_columns(
    cols: Columns,
    idx: np.ndarray,
    task: str,
    pad_id: int,
    drop_full_mask: bool = True,
    multiple: int = 1,
) -> dict[str, torch.Tensor]:
    """The model batch of the examples at ``idx`` of ``cols``, as :meth:`Featurizer.collate` makes it,
    without a Python loop over tokens, its length padded up to a multiple of ``multiple`` (capped at the
    longest row rounded up; padding is masked, so scores do not change). With ``drop_full_mask`` a text
    batch without padding has no ``attention_mask`` (every scorer reads a missing mask as all ones):
    neither the scorer nor the model then asks the device whether the mask is all ones."""
    if task == "image_classification":
        assert cols.pixels is not None and cols.labels is not None
        return {
            "pixel_values": torch.from_numpy(np.ascontiguousarray(cols.pixels[idx], dtype=np.float32)),
            "labels": torch.from_numpy(cols.labels[idx]),
        }
    starts = cols.starts
    lens = cols.lengths[idx]
    T = max(1, int(lens.max()) if len(lens) else 1)
    T = -(-T // multiple) * multiple
    valid = np.arange(T) < lens[:, None]
    ids = np.full((len(idx), T), pad_id, dtype=np.int64)
    ids[valid] = cols.flat[(starts[idx][:, None] + np.arange(T))[valid]]
    batch = {"input_ids": torch.from_numpy(ids)}
    if not (drop_full_mask and bool(valid.all())):
        batch["attention_mask"] = torch.from_numpy(valid.astype(np.int64))
    if task == "sequence_classification":
        assert cols.labels is not None
        batch["labels"] = torch.from_numpy(cols.labels[idx])
    return batch


def length_batches(examples: list[Example], batch_size: int) -> list[list[Example]]:
    """Group examples of similar length to cut padding (order inside the result is restored by id)."""
    order = sorted(
        range(len(examples)),
        key=lambda i: len(examples[i].features) if not isinstance(examples[i].features, np.ndarray) else 0,
    )
    return [[examples[i] for i in order[k : k + batch_size]] for k in range(0, len(order), batch_size)]
