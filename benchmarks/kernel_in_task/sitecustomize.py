"""The EL2N kernel timed inside ``winnow run``'s own scoring task, for benchmarks: put this folder first on
PYTHONPATH and set WINNOW_KERNEL_IN_TASK to a file prefix. Before the shard a process scores as its
WINNOW_KERNEL_IN_TASK_SHARD-th (default 2: the third, once the model and most shapes are warm), the hook
takes the pass's own model (``scoring._scoring_model``, the kept one) and the run's scorers, tokenizes the
shard's first 16,384 texts with the run's featurizer into bench_pipeline's kernel batches (length-sorted,
64 a batch, a 2-D mask, on the GPU) and times one warm-up and the best of 2 passes of ``score_batch``
inside ``checks.deferred()``:

* ``task-thread``: in the scoring task's own thread, with the run's other threads alive (Prefect's, the
  feed's);
* ``fresh-thread``: the same batches in a new thread started for it (a thread's cuDNN caches start empty);
* ``task-thread-no-cudnn``: in the task's thread, SDPA restricted to flash, mem-efficient and math.

If the kernel is as fast here as in bench_pipeline's own process after the run, the product's data path
costs the difference; if it is as slow as the product's scoring, the process's context does. Written to
``<prefix>-<pid>.json``; the shard is then scored as usual (its time includes the hook's, so read the
other shards' times)."""

import importlib.abc
import importlib.machinery
import json
import os
import sys
import threading
import time

_PREFIX = os.environ.get("WINNOW_KERNEL_IN_TASK")
_TARGET = "winnow.pipeline.scoring"


def _measure(mod, recipe, run_dir, shard, ckpts, feat) -> dict:
    import pyarrow.parquet as pq
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from winnow.grads import checks

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    path = run_dir / ckpts[0].path
    model = mod._scoring_model(recipe, path, device, use_bf16)
    scorers = mod.build_scorers(recipe)
    texts = pq.read_table(shard.location, columns=[recipe.data.text_column]).column(0).to_pylist()[:16384]
    enc = feat.tok(texts, truncation=True, max_length=recipe.model.max_length)["input_ids"]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    bs = recipe.scoring.batch_size
    batches = []
    for k in range(0, len(enc), bs):
        grp = [enc[i] for i in order[k : k + bs]]
        T = max(1, max(map(len, grp)))
        ids = torch.full((len(grp), T), feat.pad_id, dtype=torch.long)
        mask = torch.zeros((len(grp), T), dtype=torch.long)
        for j, e in enumerate(grp):
            ids[j, : len(e)] = torch.tensor(e)
            mask[j, : len(e)] = 1
        batches.append({"input_ids": ids.to(device), "attention_mask": mask.to(device)})
    real = sum(len(e) for e in enc)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def once() -> None:
        with checks.deferred():
            for b in batches:
                for s in scorers:
                    with torch.set_grad_enabled(bool(getattr(s, "needs_grad", False))):
                        s.score_batch(model, b, recipe.model.task)

    def timed(fn) -> dict:
        sync()
        t = time.perf_counter()
        fn()
        sync()
        cold = time.perf_counter() - t
        best = float("inf")
        for _ in range(2):
            t = time.perf_counter()
            fn()
            sync()
            best = min(best, time.perf_counter() - t)
        return {"first_s": cold, "best_s": best, "real_tokens_per_s": real / best}

    out = {"rows": len(enc), "real_tokens": real, "batches": len(batches)}
    out["task-thread"] = timed(once)
    box: dict = {}
    th = threading.Thread(target=lambda: box.update(timed(once)), name="kernel-in-task-fresh")
    th.start()
    th.join()
    out["fresh-thread"] = box

    def no_cudnn() -> None:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            once()

    out["task-thread-no-cudnn"] = timed(no_cudnn)
    out["threads_alive"] = sorted(t.name for t in threading.enumerate())
    mod._release_model(mod._model_key(recipe, path, device, use_bf16), model)
    return out


def _install(mod) -> None:
    original = mod.score_shard
    which = int(os.environ.get("WINNOW_KERNEL_IN_TASK_SHARD", "2"))
    seen = [0]
    lock = threading.Lock()

    def score_shard(recipe, run_dir, shard, ckpts, feat, *args, **kwargs):
        with lock:
            n = seen[0]
            seen[0] += 1
        if n == which:
            try:
                res = _measure(mod, recipe, run_dir, shard, ckpts, feat)
            except Exception as e:  # the run goes on; the file says why there is no figure
                res = {"error": f"{type(e).__name__}: {e}"}
            with open(f"{_PREFIX}-{os.getpid()}.json", "w") as fh:
                json.dump(res, fh, indent=2)
        return original(recipe, run_dir, shard, ckpts, feat, *args, **kwargs)

    mod.score_shard = score_shard


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _install(module)

        spec.loader.exec_module = exec_module
        return spec


if _PREFIX:
    sys.meta_path.insert(0, _Finder())
