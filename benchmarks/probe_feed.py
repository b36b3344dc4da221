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
* ``exact``: batches of rows of exactly one length (no padding and no mask anywhere; flash's causal path);
* ``graphs``: the pipeline's batches padded to a multiple of 16, each (B, T) shape run as a CUDA graph
  captured once (the 4-D mask path: no host wait inside), one replay per batch (run only when named in
  ``--variants``: on the H200 the first capture killed the process, RESULTS "the scoring feed", run 3);
* ``fed-*``: the pipeline's batches made from the text while scoring, as ``winnow run`` makes them:
  ``fed-threads`` 8 featurizing threads (Rust tokenizer, then Python per row: a sha256 id, a preview,
  a key) ahead of the scoring thread, ``fed-inline`` the same work in the scoring thread,
  ``fed-switch`` threads with ``sys.setswitchinterval(1e-4)``, ``fed-graphs`` threads feeding CUDA graphs.

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


def _tokenize(texts: list[str], vocab: int, max_length: int) -> tuple[Any, list[list[int]]]:
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
    return tok, [e.ids for e in tok.encode_batch(texts)]


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
    ap.add_argument("--variants", default=None, help="comma-separated names to run (default: all)")
    a = ap.parse_args()
    if a.smoke:
        a.rows, a.max_length, a.batch_size, a.window = 300, 64, 16, 128
        # one variant of each kind of feed and scoring (the backends and paddings only change arguments)
        a.variants = a.variants or "kernel,pad16,mask4d,exact,graphs,fed-inline,fed-threads"
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
    texts = _texts(a)
    tok, enc = _tokenize(texts, 512 if a.smoke else 32000, a.max_length)
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

    class Graphs:
        """One CUDA graph per (B, T) batch shape, captured at its first batch (in a check block of its own:
        the graph's checks are not the run's), replayed from static inputs."""

        def __init__(self) -> None:
            self.graphs: dict[tuple[int, ...], tuple[Any, Any, Any, Any]] = {}
            self.pool: Any = None
            self.causal = (
                torch.ones(8192, 8192, dtype=torch.bool, device=device).tril()
                if device.type == "cuda"
                else None
            )

        def inner(self, ids: Any, am: Any) -> Any:
            T = ids.shape[1]
            m4 = (self.causal[:T, :T][None] & am.bool()[:, None, :])[:, None]
            return score_4d({"input_ids": ids, "attention_mask": am, "mask4d": m4})

        def __call__(self, b: dict[str, Any]) -> Any:
            key = tuple(b["input_ids"].shape)
            if key not in self.graphs:
                sid, sm = b["input_ids"].clone(), b["attention_mask"].clone()
                saved = checks._local.pending
                checks._local.pending = {}
                try:
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        self.inner(sid, sm)
                    torch.cuda.current_stream().wait_stream(side)
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, pool=self.pool):
                        out = self.inner(sid, sm)
                finally:
                    checks._local.pending = saved
                self.pool = g.pool()
                self.graphs[key] = (g, sid, sm, out)
            g, sid, sm, out = self.graphs[key]
            sid.copy_(b["input_ids"], non_blocking=True)
            sm.copy_(b["attention_mask"], non_blocking=True)
            g.replay()
            return out.clone()

    def fed(threads: int) -> Callable[[], Iterator[list[list[int]]]]:
        """The pipeline's batches made from the text as they are scored: ``threads`` featurizing threads
        (0: in the scoring thread), 512-row read batches, 2 per thread ahead."""
        import hashlib
        import threading
        from concurrent.futures import ThreadPoolExecutor

        spec = tok.to_str()
        local = threading.local()

        def work(chunk: list[str]) -> list[list[int]]:
            if not hasattr(local, "tok"):
                from tokenizers import Tokenizer

                local.tok = Tokenizer.from_str(spec)
            ids = [e.ids for e in local.tok.encode_batch(chunk)]
            for x, i in zip(chunk, ids, strict=True):  # what featurize does per row, in Python
                _ = (
                    hashlib.sha256(x.encode()).hexdigest(),
                    x[:500],
                    hashlib.sha256(repr(i).encode()).hexdigest(),
                )
            return ids

        def gen() -> Iterator[list[list[int]]]:
            chunks = [texts[o : o + 512] for o in range(0, len(texts), 512)]
            buf: list[list[int]] = []

            def drain(final: bool) -> Iterator[list[list[int]]]:
                nonlocal buf
                while len(buf) >= a.window or (final and buf):
                    yield from _windows(buf[: a.window], a.window, a.batch_size)
                    buf = buf[a.window :]

            if threads == 0:
                for c in chunks:
                    buf += work(c)
                    yield from drain(False)
            else:
                with ThreadPoolExecutor(threads) as pool:
                    futs = [pool.submit(work, c) for c in chunks[: 2 * threads]]
                    nxt = len(futs)
                    while futs:
                        f = futs.pop(0)
                        if nxt < len(chunks):
                            futs.append(pool.submit(work, chunks[nxt]))
                            nxt += 1
                        buf += f.result()
                        yield from drain(False)
            yield from drain(True)

        return gen

    def run(
        batches: Callable[[], Any], multiple: int, mask: str, ctx: Callable[[], Any], graphs: Graphs | None
    ) -> tuple[float, int]:
        sync()
        t0 = time.perf_counter()
        real = 0
        with ctx(), checks.deferred(), torch.inference_mode():
            for rows in batches():
                real += sum(map(len, rows))
                b = _batch(rows, multiple, mask, device)
                if graphs is not None:
                    graphs(b)
                elif "mask4d" in b:
                    score_4d(b)
                else:
                    el2n.score_batch(model, b, "causal_lm")
        sync()
        return time.perf_counter() - t0, real

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

    def fixed(batches: list[list[list[int]]]) -> Callable[[], Any]:
        return lambda: iter(batches)

    cuda = device.type == "cuda"
    switch = sys.getswitchinterval()

    @contextlib.contextmanager
    def short_switch() -> Iterator[None]:
        sys.setswitchinterval(1e-4)
        try:
            yield
        finally:
            sys.setswitchinterval(switch)

    variants: list[tuple[str, Callable[[], Any], int, str, Callable[[], Any], bool]] = [
        ("kernel", fixed(kernel), 1, "always", nothing, False),
        ("pipeline", fixed(pipe), 1, "needed", nothing, False),
        ("pad16", fixed(pipe), 16, "needed", nothing, False),
        ("pad64", fixed(pipe), 64, "needed", nothing, False),
        (
            "efficient",
            fixed(pipe),
            1,
            "needed",
            backends(SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH),
            False,
        ),
        (
            "flash+efficient",
            fixed(pipe),
            1,
            "needed",
            backends(SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH),
            False,
        ),
        ("cudnn", fixed(pipe), 1, "needed", backends(SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH), False),
        ("math", fixed(pipe), 1, "needed", backends(SDPBackend.MATH), False),
        ("mask4d", fixed(pipe), 1, "4d", nothing, False),
        ("exact", fixed(exact), 1, "needed", nothing, False),
        ("graphs", fixed(pipe), 16, "always", nothing, cuda),
        ("fed-inline", fed(0), 1, "needed", nothing, False),
        ("fed-threads", fed(8), 1, "needed", nothing, False),
        ("fed-threads-pad16", fed(8), 16, "needed", nothing, False),
        ("fed-switch", fed(8), 1, "needed", short_switch, False),
        ("fed-graphs", fed(8), 16, "always", nothing, cuda),
    ]
    if not a.variants:  # capturing a graph killed the process on the H200 (RESULTS, run 3): by name only
        a.variants = ",".join(v[0] for v in variants if not v[0].endswith("graphs"))
    if a.variants:
        want = set(a.variants.split(","))
        unknown = want - {v[0] for v in variants}
        if unknown:
            raise SystemExit(f"probe_feed: unknown --variants {sorted(unknown)}")
        variants = [v for v in variants if v[0] in want]
    res: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "rows": len(enc),
        "real_tokens": int(sum(map(len, enc))),
        "variants": {},
    }
    for name, batches, multiple, mask, ctx, use_graphs in variants:
        made = list(batches()) if not name.startswith("fed") else None
        shapes = (
            len({(len(b), -(-max(map(len, b)) // multiple) * multiple) for b in made})
            if made is not None
            else None
        )
        graphs = Graphs() if use_graphs else None
        try:
            cold, real = run(batches, multiple, mask, ctx, graphs)
            warm, _ = run(batches, multiple, mask, ctx, graphs)
        except Exception as e:  # a backend that cannot run these shapes here (never in the smoke)
            if a.smoke:
                raise
            res["variants"][name] = {"error": str(e).splitlines()[0][:200]}
            print(name, "error:", res["variants"][name]["error"], flush=True)
            continue
        res["variants"][name] = {
            "batches": len(made) if made is not None else None,
            "shapes": shapes,
            "real_tokens": real,
            "cold_s": cold,
            "warm_s": warm,
            "cold_tokens_per_s": real / cold,
            "warm_tokens_per_s": real / warm,
        }
        if graphs is not None:
            res["variants"][name]["graphs"] = len(graphs.graphs)
        print(name, json.dumps(res["variants"][name]), flush=True)
    (out / "probe_feed.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
