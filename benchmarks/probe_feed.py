"""Why the pipeline's batches score slower than the kernel benchmark's: EL2N on GPT-2-small over batches
shaped as ``winnow run`` shapes them, against the kernel benchmark's batches, cold (first pass over
shapes never seen) and warm (the same batches again), under several attention set-ups.

RESULTS ("the scoring feed", run 2) found the pipeline's scoring thread waiting in transformers' call to
``scaled_dot_product_attention`` for over half the scoring step, at 0.26-0.37 of the kernel's speed,
while the kernel benchmark (the same model, scorer and a length-sorted sample of the same rows) runs
warm: its best of 3 repeats the same shapes. This probe separates the candidate causes, in one process:

* ``kernel``: bench_pipeline's kernel (the first 16,384 rows, length-sorted, batches of 64, always a mask);
* ``pipeline``: every row in 8,192-row windows, length-sorted inside a window, batches of 64, no mask on an
  unpadded batch, inside ``checks.deferred()`` (the pipeline's shapes and calls);
* ``pad16`` / ``pad64``: the pipeline's batches padded up to a multiple of 16 / 64 (``scoring.pad_multiple``);
* ``efficient`` / ``flash+efficient`` / ``cudnn`` / ``math``: the pipeline's batches with SDPA restricted to
  those backends (``torch.nn.attention.sdpa_kernel``);
* ``mask4d``: the pipeline's batches with a ready (B, 1, T, T) boolean causal-and-padding mask, which
  transformers uses as given (no ``padding_mask.all()`` host wait);
* ``exact``: batches of rows of exactly one length (no padding and no mask anywhere; flash's causal path).

For each: seconds cold and warm, real tokens/s warm and cold, batches, distinct (B, T) shapes. Written
to ``$OUT/probe_feed.json``. Needs torch, transformers, tokenizers, pyarrow and numpy only (the GPU
machine's image), and winnow's compute layer.

    python3 benchmarks/probe_feed.py --corpus .bench/pipe/corpus.parquet --rows 100000 --out $OUT
    .venv/bin/python benchmarks/probe_feed.py --smoke --out DIR          # CPU, tiny: checks the script
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _texts(a: argparse.Namespace) -> list[str]:
    if a.smoke:
        import pydoc_data.topics as t

        texts = [v for v in t.topics.values() if v.strip()]
        return [texts[i % len(texts)][: 20 + 37 * i % 300] for i in range(a.rows)]
    import pyarrow.parquet as pq

    base = pq.read_table(a.corpus, columns=["text"]).column("text").to_pylist()
    n = len(base)
    return [base[i % n] if i < n else f"{base[i % n]} [copy {i // n}]" for i in range(a.rows)]


def _tokenize(texts: list[str], vocab: int, max_length: int) -> list[list[int]]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts[:50_000], trainer=trainer)
    tok.enable_truncation(max_length)
    return [e.ids for e in tok.encode_batch(texts)]


def _batch(rows: list[list[int]], multiple: int, mask: str, device: Any) -> dict[str, Any]:
    """One batch: right-padded with 1 (the pad id), length up to a multiple; ``mask``: "always", "needed"
    (none on an unpadded batch) or "4d" (a (B, 1, T, T) bool causal-and-padding mask)."""
    import torch

    def put(x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(x)
        return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t

    lens = np.array([len(r) for r in rows])
    T = max(1, int(lens.max()))
    T = -(-T // multiple) * multiple
    ids = np.ones((len(rows), T), np.int64)
    valid = np.arange(T) < lens[:, None]
    ids[valid] = np.concatenate(rows)
    out = {"input_ids": put(ids)}
    if mask == "always" or (mask == "needed" and not valid.all()):
        out["attention_mask"] = put(valid.astype(np.int64))
    elif mask == "4d" and not valid.all():
        v = put(valid)
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        out["attention_mask"] = v.long()
        out["mask4d"] = (causal[None] & v[:, None, :])[:, None]
    return out


def _windows(enc: list[list[int]], window: int, bs: int) -> Iterator[list[list[int]]]:
    for w0 in range(0, len(enc), window):
        win = enc[w0 : w0 + window]
        order = sorted(range(len(win)), key=lambda i: len(win[i]))
        for k in range(0, len(order), bs):
            yield [win[i] for i in order[k : k + bs]]


def _exact(enc: list[list[int]], window: int, bs: int) -> Iterator[list[list[int]]]:
    for w0 in range(0, len(enc), window):
        by: dict[int, list[list[int]]] = {}
        for r in enc[w0 : w0 + window]:
            by.setdefault(len(r), []).append(r)
        for rows in by.values():
            for k in range(0, len(rows), bs):
                yield rows[k : k + bs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default=None)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--window", type=int, default=8192)
    ap.add_argument("--out", default=os.environ.get("OUT") or None)
    ap.add_argument("--smoke", action="store_true", help="tiny model and corpus on CPU")
    a = ap.parse_args()
    if a.smoke:
        a.rows, a.max_length, a.batch_size, a.window = 300, 64, 16, 128
    elif not a.corpus:
        ap.error("--corpus is needed (bench_pipeline.py prepare makes one)")
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import GPT2Config, GPT2LMHeadModel

    from winnow.grads import checks
    from winnow.scorers import get_scorer
    from winnow.scorers.el2n import causal_lm_el2n, lm_head_params

    device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    out = Path(a.out or tempfile.mkdtemp(prefix="probe-feed-"))
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    enc = _tokenize(_texts(a), 512 if a.smoke else 32000, a.max_length)
    print(f"{len(enc)} rows tokenized in {time.perf_counter() - t:.1f} s", flush=True)
    size = dict(n_layer=2, n_head=2, n_embd=64) if a.smoke else dict(n_layer=12, n_head=12, n_embd=768)
    cfg = GPT2Config(
        vocab_size=512 if a.smoke else 32000,
        n_positions=max(1024, a.max_length),
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=0,
        **size,
    )
    model = GPT2LMHeadModel(cfg).to(device).eval()
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    el2n = get_scorer("el2n", reduction="mean")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def score_4d(b: dict[str, Any]) -> Any:
        """The base model with the ready (B, 1, T, T) mask, then the scorer's own fused EL2N."""
        am = b["attention_mask"]
        hidden = model.transformer(
            input_ids=b["input_ids"],
            attention_mask=b["mask4d"],
            position_ids=(am.cumsum(-1) - 1).clamp(min=0),
            use_cache=False,
        ).last_hidden_state
        w, bias, scale, cap = lm_head_params(model)
        return causal_lm_el2n(hidden, w, bias, b["input_ids"], am, logit_scale=scale, softcap=cap)

    def run(batches: list[list[list[int]]], multiple: int, mask: str, ctx: Callable[[], Any]) -> float:
        sync()
        t0 = time.perf_counter()
        with ctx(), checks.deferred(), torch.inference_mode():
            for rows in batches:
                b = _batch(rows, multiple, mask, device)
                if "mask4d" in b:
                    score_4d(b)
                else:
                    el2n.score_batch(model, b, "causal_lm")
        sync()
        return time.perf_counter() - t0

    nothing = contextlib.nullcontext
    k = min(len(enc), 256 if a.smoke else 16384)
    kernel = [
        [enc[i] for i in order]
        for order in (
            sorted(range(k), key=lambda i: len(enc[i]))[j : j + a.batch_size]
            for j in range(0, k, a.batch_size)
        )
    ]
    pipe = list(_windows(enc, a.window, a.batch_size))
    exact = list(_exact(enc, a.window, a.batch_size))

    # the 4-D mask path scores what the scorer scores (the batch with the most padding)
    worst = max(pipe, key=lambda rows: max(map(len, rows)) * len(rows) - sum(map(len, rows)))
    with torch.inference_mode():
        want = el2n.score_batch(model, _batch(worst, 1, "needed", device), "causal_lm")["el2n"]
        got = score_4d(_batch(worst, 1, "4d", device))
    tol = 2e-2 if device.type == "cuda" else 1e-4
    if not torch.allclose(got.float(), want.float(), rtol=tol, atol=tol, equal_nan=True):
        raise SystemExit(f"probe_feed: the 4-D mask path disagrees with the scorer: {got[:4]} vs {want[:4]}")

    def backends(*bs: Any) -> Callable[[], Any]:
        return lambda: sdpa_kernel(list(bs))

    variants: list[tuple[str, list[list[list[int]]], int, str, Callable[[], Any]]] = [
        ("kernel", kernel, 1, "always", nothing),
        ("pipeline", pipe, 1, "needed", nothing),
        ("pad16", pipe, 16, "needed", nothing),
        ("pad64", pipe, 64, "needed", nothing),
        ("efficient", pipe, 1, "needed", backends(SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)),
        (
            "flash+efficient",
            pipe,
            1,
            "needed",
            backends(SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH),
        ),
        ("cudnn", pipe, 1, "needed", backends(SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH)),
        ("math", pipe, 1, "needed", backends(SDPBackend.MATH)),
        ("mask4d", pipe, 1, "4d", nothing),
        ("exact", exact, 1, "needed", nothing),
    ]
    res: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "rows": len(enc),
        "real_tokens": int(sum(map(len, enc))),
        "variants": {},
    }
    for name, batches, multiple, mask, ctx in variants:
        real = sum(len(r) for b in batches for r in b)
        shapes = {(len(b), -(-max(map(len, b)) // multiple) * multiple) for b in batches}
        try:
            cold = run(batches, multiple, mask, ctx)
            warm = run(batches, multiple, mask, ctx)
        except Exception as e:  # a backend that cannot run these shapes here (never in the smoke)
            if a.smoke:
                raise
            res["variants"][name] = {"error": str(e).splitlines()[0][:200]}
            print(name, "error:", res["variants"][name]["error"], flush=True)
            continue
        res["variants"][name] = {
            "batches": len(batches),
            "shapes": len(shapes),
            "real_tokens": real,
            "cold_s": cold,
            "warm_s": warm,
            "cold_tokens_per_s": real / cold,
            "warm_tokens_per_s": real / warm,
        }
        print(name, json.dumps(res["variants"][name]), flush=True)
    (out / "probe_feed.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
