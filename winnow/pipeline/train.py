"""Proxy training: short runs whose early checkpoints EL2N, GraNd and influence score with.

AdamW with linear warm-up then cosine decay to 10% of the peak rate, gradient clipping, bf16
autocast on GPU and fp32 on CPU. Each requested step is saved as a folder
`checkpoints/<fingerprint>/seed-S/step-K/` holding the model (safetensors), `optimizer.pt`
(optimizer, scheduler and RNG states) and `state.json`; folders appear atomically. A run that
was killed resumes from its latest saved checkpoint: the example stream is deterministic per
seed, so the resumed run sees the same batches as an uninterrupted one.

The example stream interleaves the input shards (at most 8 open at once) through a seeded
shuffle buffer, so a corpus stored one domain per file still trains on mixed batches.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from winnow.errors import WinnowError
from winnow.pipeline.atomic import atomic_path, fingerprint
from winnow.pipeline.collate import Example, Featurizer
from winnow.pipeline.faults import fault_point
from winnow.pipeline.layout import RunLayout
from winnow.pipeline.models import init_model, resolve_device
from winnow.pipeline.recipe import Recipe
from winnow.pipeline.scoring import sdpa_backends
from winnow.pipeline.sources import InputShard, iter_raw_batches
from winnow.pipeline.steps import Checkpoint, RunContext, Step, progress, register_step

SHUFFLE_BUFFER = 4096
MAX_OPEN_SHARDS = 8

log = logging.getLogger("winnow")


def shard_examples(recipe: Recipe, shard: InputShard, feat: Featurizer) -> Iterator[Example]:
    offset = 0
    for raw in iter_raw_batches(recipe.data, shard):
        exs = feat.featurize(raw, shard.location, offset)
        offset += len(exs)
        yield from exs


def example_stream(
    recipe: Recipe, shards: list[InputShard], feat: Featurizer, seed: int
) -> Iterator[Example]:
    """Endless, deterministic (per seed) stream of examples over all shards, epoch after epoch."""
    epoch = 0
    while True:
        rng = random.Random(seed * 1_000_003 + epoch)
        order = list(range(len(shards)))
        rng.shuffle(order)
        pending = order[::-1]
        active: list[Iterator[Example]] = []
        buffer: list[Example] = []
        produced = 0
        while pending or active:
            while pending and len(active) < MAX_OPEN_SHARDS:
                active.append(shard_examples(recipe, shards[pending.pop()], feat))
            for it in list(active):
                ex = next(it, None)
                if ex is None:
                    active.remove(it)
                    continue
                produced += 1
                if len(buffer) < SHUFFLE_BUFFER:
                    buffer.append(ex)
                else:
                    j = rng.randrange(SHUFFLE_BUFFER)
                    yield buffer[j]
                    buffer[j] = ex
        rng.shuffle(buffer)
        yield from buffer
        if produced == 0:
            raise WinnowError(f"data.source: {recipe.data.source!r} holds no rows")
        epoch += 1


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def model_loss(model: Any, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    if task == "causal_lm":
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
    return model(**batch).loss


def train_fingerprint(recipe: Recipe, input_fp: str, tokenizer_fp: str | None, model_fp: str) -> str:
    t = recipe.train.model_dump(exclude={"seeds", "checkpoints", "device", "sdpa_backends"})
    # train.steps 0: the checkpoint is the loaded (or seeded random) model; the data does not enter it, so
    # new rows keep the model's fingerprint (and the scores cached under it). train.refit never: the proxy
    # trained on the inputs of the folder's first run stays the proxy when they change
    data = input_fp if recipe.train.steps > 0 and recipe.train.refit == "inputs" else None
    return fingerprint(
        "train", t, recipe.model.model_dump(exclude={"tokenizer"}), data, tokenizer_fp, model_fp
    )


def checkpoint_dir(run_dir: Path, train_fp: str, seed: int, step: int) -> Path:
    return RunLayout(run_dir).checkpoint(train_fp, seed, step)


def _complete(path: Path, train_fp: str) -> bool:
    state = path / "state.json"
    if not state.exists():
        return False
    try:
        return json.loads(state.read_text()).get("fingerprint") == train_fp
    except json.JSONDecodeError:
        return False


def _training_state(ckpt: Path, device: torch.device) -> dict[str, Any] | None:
    """The optimizer, scheduler and RNG state of a checkpoint, loaded with torch's tensor-only unpickler
    (``weights_only=True``: tensors, numbers, strings and containers; nothing is imported or called);
    None when it does not load so, or lacks a key."""
    try:
        st = torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True)
    except Exception:  # UnpicklingError for anything but data, or a truncated / corrupt file
        return None
    if not isinstance(st, dict) or not {"optimizer", "scheduler", "rng"} <= set(st):
        return None
    return st


def train_proxy(
    recipe: Recipe,
    run_dir: Path,
    shards: list[InputShard],
    feat: Featurizer,
    seed: int,
    train_fp: str,
    tokenizer: Any | None,
    num_labels: int | None,
    progress: Callable[[int, int, float], None] | None = None,
) -> list[Checkpoint]:
    """Train one seed's proxy; return its checkpoints."""
    tc = recipe.train
    steps_wanted = tc.checkpoint_steps()
    wanted = {k: checkpoint_dir(run_dir, train_fp, seed, k) for k in steps_wanted}
    done = [k for k, p in wanted.items() if _complete(p, train_fp)]

    def result() -> list[Checkpoint]:
        return [
            Checkpoint(seed, k, str(wanted[k].relative_to(run_dir)), fingerprint(train_fp, seed, k))
            for k in steps_wanted
        ]

    if len(done) == len(wanted):
        return result()

    device = resolve_device(tc.device)
    # where the seconds go (kept in the last checkpoint's state.json, read by benchmarks/bench_pipeline.py)
    timing: dict[str, float] = {"init_s": 0.0, "first_step_s": 0.0, "steps_s": 0.0, "save_s": 0.0}
    t_init = time.perf_counter()
    model = init_model(recipe, seed, tokenizer, num_labels).to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tc.lr,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc.warmup_steps, tc.steps))
    torch.manual_seed(seed)
    start = 0
    # resume from the latest complete checkpoint whose state loads as data; an unusable one (corrupt, or
    # holding anything but tensors and plain values: a run folder is data, never code) is removed and
    # trained again
    for k in sorted(done, reverse=True):
        st = _training_state(wanted[k], device)
        if st is None:
            log.warning(f"{wanted[k]}: its training state does not load as data; training that step again")
            shutil.rmtree(wanted[k], ignore_errors=True)
            done.remove(k)
            continue
        from safetensors.torch import load_model

        start = k
        load_model(model, str(wanted[start] / "model.safetensors"), strict=False, device=str(device))
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        torch.set_rng_state(st["rng"])
        if device.type == "cuda" and st.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(st["cuda_rng"])
        break
    stream = example_stream(recipe, shards, feat, seed)
    for _ in range(start * tc.batch_size):
        next(stream)

    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    losses: list[float] = []

    def save(step: int) -> None:
        path = wanted[step]
        t_save = time.perf_counter()
        with atomic_path(path) as tmp:
            model.save_pretrained(str(tmp), safe_serialization=True)
            torch.save(
                {
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state() if device.type == "cuda" else None,
                },
                tmp / "optimizer.pt",
            )
            tail = losses[-20:]
            (tmp / "state.json").write_text(
                json.dumps(
                    {
                        "fingerprint": train_fp,
                        "seed": seed,
                        "step": step,
                        "examples_seen": step * tc.batch_size,
                        "loss_last20": sum(tail) / len(tail) if tail else None,
                        "lr": sched.get_last_lr()[0],
                        "timing": {k: round(v, 3) for k, v in timing.items()},
                    },
                    indent=2,
                )
            )
        timing["save_s"] += time.perf_counter() - t_save

    timing["init_s"] = time.perf_counter() - t_init
    if start == 0 and 0 in wanted and not _complete(wanted[0], train_fp):
        save(0)
    model.train()
    pin = device.type == "cuda"
    batches = _prefetch(
        (feat.collate([next(stream) for _ in range(tc.batch_size)]) for _ in range(start + 1, tc.steps + 1)),
        depth=4,
        pin=pin,
    )
    # the loss is read one step late: reading step k's loss waits for step k to finish, so step k + 1's
    # kernels are queued first and the device never idles between steps
    prev: tuple[int, torch.Tensor, dict[str, torch.Tensor]] | None = None
    t_loop, saved_before = time.perf_counter(), timing["save_s"]
    # the attention kernels (train.sdpa_backends): cuDNN's plans, built per batch length, cost a proxy on
    # dynamic lengths 0.21 s a step against 0.047 s for the plain step (RESULTS, `winnow run` on the GPU, run 6)
    try:
        with sdpa_backends(tc.sdpa_backends, device):
            for step in range(start + 1, tc.steps + 1):
                if step == start + 2:
                    timing["first_step_s"] = time.perf_counter() - t_loop  # the first batch and step, queued
                batch = {k: v.to(device, non_blocking=pin) for k, v in next(batches).items()}
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    loss = model_loss(model, batch, recipe.model.task)
                loss.backward()
                if prev is not None:
                    _record(prev, losses, recipe, seed, tc.batch_size, progress, tc.steps)
                prev = (step, loss.detach(), batch)
                if tc.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                if step in wanted and not _complete(wanted[step], train_fp):
                    _record(prev, losses, recipe, seed, tc.batch_size, progress, tc.steps)
                    prev = None
                    timing["steps_s"] = time.perf_counter() - t_loop - (timing["save_s"] - saved_before)
                    save(step)
                    fault_point(f"train:seed{seed}:step{step}")
    finally:
        # the feed's thread stops first, then the endless example stream closes its shard readers now,
        # not at the interpreter's exit (where a reader's error handler found its module torn down)
        batches.close()
        stream.close()
    if prev is not None:
        _record(prev, losses, recipe, seed, tc.batch_size, progress, tc.steps)
    return result()


def _record(
    prev: tuple[int, torch.Tensor, dict[str, torch.Tensor]],
    losses: list[float],
    recipe: Recipe,
    seed: int,
    batch_size: int,
    progress: Callable[[int, int, float], None] | None,
    total: int,
) -> None:
    """Step ``prev``'s loss read (a wait for that step only), checked and reported."""
    step, loss, batch = prev
    value = float(loss)
    if not math.isfinite(value):
        if recipe.model.task == "causal_lm" and "attention_mask" in batch:
            am = batch["attention_mask"]
            if int((am[:, :-1] * am[:, 1:]).sum()) == 0:
                col = recipe.data.text_column or recipe.data.input_ids_column
                raise WinnowError(
                    f"train: none of the {batch_size} examples of step {step} has two tokens to learn "
                    f"from: is data column {col!r} empty?"
                )
        raise WinnowError(f"train: loss is {value} at step {step} (seed {seed}); lower train.lr")
    losses.append(value)
    if progress is not None:
        progress(step, total, value)


def _prefetch(
    gen: Iterator[dict[str, torch.Tensor]], depth: int, pin: bool
) -> Iterator[dict[str, torch.Tensor]]:
    """``gen``'s batches made by one thread up to ``depth`` ahead of the training loop, in order (pinned
    for a copy that does not wait, on CUDA), so that reading, tokenizing and collating overlap the steps."""
    from winnow.pipeline.background import ahead

    def pinned(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.pin_memory() for k, v in b.items()} if pin else b

    return ahead((pinned(b) for b in gen), depth, "winnow-train-feed")


# Dropout draws from torch's process-wide RNG, so two seeds training in threads of one process
# would interleave their draws and neither would be reproducible: within a process, seeds train
# one after another (each with all the torch threads). On Ray each task is its own process.
_TRAIN_LOCK = threading.Lock()


def _train_lock() -> threading.Lock:
    # Tasks are pickled by value for Ray (their module name points at the Task object, not the
    # function), so they must reach the lock through a function that pickles by reference.
    return _TRAIN_LOCK


@register_step
class TrainStep(Step):
    """One seed's proxy (``train``): its checkpoints under ``RUN/checkpoints/<train fp12>/seed-S/``."""

    name = "train"
    result = Checkpoint
    many = True

    def device(self, ctx: RunContext) -> str:
        return ctx.config.train.device

    def fingerprint(self, ctx: RunContext, train_fp: str = "", seed: int = 0) -> str:
        return fingerprint(train_fp, seed, ctx.config.train.checkpoint_steps())

    def run(self, ctx: RunContext, fp: str, seed: int = 0, train_fp: str = "") -> list[dict[str, Any]]:
        recipe = ctx.setup(ctx.all_threads)
        feat, tok, n = ctx.featurizer()
        bar = progress(f"train seed {seed}", recipe.train.steps, "step")

        def cb(step: int, total: int, loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

        try:
            with _train_lock():
                if ctx.all_threads:
                    torch.set_num_threads(ctx.all_threads)
                ckpts = train_proxy(
                    recipe, ctx.root, ctx.input_shards(), feat, seed, train_fp, tok, n, progress=cb
                )
        finally:
            bar.close()
        return self.dump(ckpts)

    def present(self, ctx: RunContext, result: Any, fp: str) -> bool:
        return all((ctx.root / c.path / "state.json").exists() for c in self.load(result))
