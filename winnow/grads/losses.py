"""Per-example losses of the pipeline's tasks, the engine's input: the (B,) losses whose SUM the engine
backpropagates, so that example b's recorded gradient is d loss_b / d theta, its own gradient (not
scaled by 1/B). :func:`per_example_loss` gives each example the loss the pipeline trains on (mean token
NLL over its real next-token positions for ``causal_lm``, cross-entropy for classification).

Padding. Positions whose loss terms are masked out receive an output gradient of exactly zero (the loss
uses ``torch.where``, attention masks exclude padded keys), so they add nothing to any factor.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from winnow.grads.checks import is_deferred, require

__all__ = [
    "attn_implementation",
    "causal_mask_4d",
    "classification_inputs",
    "model_logits",
    "next_token_losses",
    "next_token_positions",
    "per_example_loss",
    "token_nll",
]


# ----------------------------------------------------------------------------------------------
# batch helpers (the scorers use them too, through winnow.scorers.base)


def classification_inputs(batch: Mapping[str, torch.Tensor], task: str, who: str) -> dict[str, torch.Tensor]:
    """The model inputs of a classification batch (docs/ARCHITECTURE.md, "Batches"); `who` names the
    caller in the error for a batch without labels."""
    if "labels" not in batch:
        raise ValueError(f"{who}: task {task!r} needs 'labels' in the batch")
    if task == "image_classification":
        return {"pixel_values": batch["pixel_values"]}
    keys = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
    return {k: batch[k] for k in keys if k in batch}


def model_logits(out: Any) -> torch.Tensor:
    """The logits of a transformers output (or of a plain tensor / tuple output)."""
    return out.logits if hasattr(out, "logits") else (out if isinstance(out, torch.Tensor) else out[0])


def next_token_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T-1) bool: position t predicts token t+1 and counts when both are real (mask 1)."""
    if attention_mask is None:
        return torch.ones_like(input_ids[:, 1:], dtype=torch.bool)
    am = attention_mask.bool()
    return am[:, :-1] & am[:, 1:]


def _accepts(module: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _positions(input_ids: torch.Tensor) -> torch.Tensor:
    """``arange(T)`` for every row, (B, T): the models' default positions, but batch-shaped, so that the
    position embedding is called on per-example ids (a (1, T) call is shared by the batch; see the engine)."""
    B, T = input_ids.shape
    return torch.arange(T, device=input_ids.device).unsqueeze(0).expand(B, T)


# ----------------------------------------------------------------------------------------------
# the chunked next-token NLL


class _TokenNLL(torch.autograd.Function):
    """Next-token NLL from (B, T, V) logits, in chunks of examples, never a full-size fp32 copy."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, y: torch.Tensor, rows: int) -> torch.Tensor:
        B, T, V = logits.shape
        cdtype = torch.promote_types(logits.dtype, torch.float32)
        lse = torch.empty(B, T - 1, dtype=cdtype, device=logits.device)
        nll = torch.empty_like(lse)
        for b0 in range(0, B, rows):
            x = logits[b0 : b0 + rows, :-1].to(cdtype)
            lse[b0 : b0 + rows] = torch.logsumexp(x, -1)
            nll[b0 : b0 + rows] = lse[b0 : b0 + rows] - x.gather(2, y[b0 : b0 + rows, :, None]).squeeze(2)
        ctx.save_for_backward(logits, y, lse)
        ctx.rows = rows
        return nll

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, y, lse = ctx.saved_tensors
        rows = ctx.rows
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        grad[:, -1] = 0
        g = g.to(lse.dtype)
        for b0 in range(0, logits.shape[0], rows):
            gb = g[b0 : b0 + rows, :, None]
            p = (logits[b0 : b0 + rows, :-1].to(lse.dtype) - lse[b0 : b0 + rows, :, None]).exp_().mul_(gb)
            p.scatter_add_(2, y[b0 : b0 + rows, :, None], -gb)
            grad[b0 : b0 + rows, :-1] = p
        return grad, None, None


def token_nll(logits: torch.Tensor, targets: torch.Tensor, chunk_elements: int = 1 << 25) -> torch.Tensor:
    """(B, T-1) next-token NLL ``-log softmax(logits[:, t])[targets[:, t]]`` in at least fp32, equal to
    ``F.cross_entropy(logits[:, :-1].float(), targets, reduction="none")``, computed a few examples at a
    time (at most ``chunk_elements`` logits): the forward keeps only the log-normalisers, the backward
    recomputes the softmax, and neither holds an fp32 copy of the (B, T, V) logits (at GPT-2's vocabulary
    that copy and its gradient were ~15% of a per-example-gradient step). ``targets``: (B, T-1) ids in
    [0, V). The gradient w.r.t. the logits has the logits' dtype; the last position's is zero."""
    B, T, V = logits.shape
    if targets.shape != (B, T - 1):
        raise ValueError(f"token_nll: targets must have shape {(B, T - 1)}, got {tuple(targets.shape)}")
    rows = max(1, chunk_elements // max(1, (T - 1) * V))
    return cast(torch.Tensor, _TokenNLL.apply(logits, targets.long(), rows))


# ----------------------------------------------------------------------------------------------
# per-example losses


def causal_mask_4d(
    shape: torch.Size | tuple[int, ...], attention_mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """A (B, 1, T, T) boolean SDPA mask, True where query t may attend to key s: s <= t and key s is not
    padding (``attention_mask`` (B, T), 1 on real tokens; None: no padding). Each position also attends
    to itself, so a padding query's row is never empty (an empty row is NaN in SDPA; padding positions'
    outputs are never scored)."""
    B, T = int(shape[0]), int(shape[1])
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    if attention_mask is None:
        return causal[None, None].expand(B, 1, T, T)
    m = causal[None] & attention_mask.bool()[:, None, :]
    return (m | torch.eye(T, dtype=torch.bool, device=device)[None])[:, None]


def attn_implementation(module: nn.Module) -> str | None:
    """``config._attn_implementation`` of a transformers model ("sdpa", "eager", ...), or None."""
    config = getattr(module, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    return impl if isinstance(impl, str) else None


def next_token_losses(
    model: nn.Module, batch: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal LM: the (B, T-1) next-token NLL (fp32, :func:`token_nll`; exactly 0 where not counted) and the
    (B, T-1) bool mask of counted positions (position t predicts token t + 1, both real). The model gets
    batch-shaped ``position_ids`` (``cumsum(attention_mask) - 1`` with padding) when its forward takes them
    (see :func:`per_example_loss`)."""
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    kwargs: dict[str, Any] = {"input_ids": input_ids}
    # inside checks.deferred() a mask is taken as padding without asking the device (the same result),
    # and an SDPA model gets it ready in 4-D (transformers would ask the device while building its own)
    padded = mask is not None and (is_deferred() or not bool(mask.bool().all()))
    ready = is_deferred() and attn_implementation(model) == "sdpa" and _accepts(model, "position_ids")
    if ready:
        kwargs["attention_mask"] = causal_mask_4d(input_ids.shape, mask, input_ids.device)
    elif padded:
        kwargs["attention_mask"] = mask
    if _accepts(model, "position_ids"):
        kwargs["position_ids"] = (
            (mask.long().cumsum(-1) - 1).clamp(min=0)
            if padded and mask is not None
            else _positions(input_ids)
        )
    if _accepts(model, "use_cache"):
        kwargs["use_cache"] = False
    logits = model_logits(model(**kwargs))
    B, T = input_ids.shape
    valid = next_token_positions(input_ids, mask)
    if T < 2:
        return logits.float()[:, :0, 0] * 0.0, valid  # no counted position; keeps the graph
    y = input_ids[:, 1:]
    vocab = logits.shape[-1]
    require(
        ~(((y < 0) | (y >= vocab)) & valid).any(),
        f"target token id out of range for a vocabulary of {vocab} at a counted position",
    )
    nll = token_nll(logits, y.masked_fill(~valid, 0))
    return torch.where(valid, nll, torch.zeros((), dtype=nll.dtype, device=nll.device)), valid


def per_example_loss(model: nn.Module, batch: Mapping[str, torch.Tensor], task: str) -> torch.Tensor:
    """The (B,) per-example losses of ``batch`` (docs/ARCHITECTURE.md, "Batches"), the engine's input.

    * ``causal_lm``: mean token NLL of each example over its real next-token positions (position t
      predicts token t + 1 and counts when ``attention_mask`` is 1 at t and t + 1), in fp32 from the
      model's logits; an example with no such position has loss 0 and a zero gradient. With padding the
      model gets ``position_ids = cumsum(attention_mask) - 1`` (when its forward takes them), so a
      left- or right-padded row has the positions of its unpadded self; padded positions are excluded
      with ``torch.where`` and so get an output gradient of exactly zero.
    * Text tasks get batch-shaped ``position_ids`` (B, T) when the forward takes them (the default
      positions when there is no padding): models otherwise embed positions of shape (1, T) once for the
      whole batch, and that call has no per-example output gradient (the engine refuses it).
    * ``sequence_classification`` / ``image_classification``: cross-entropy of the logits (fp32) with
      ``labels``; labels < 0 (ignore) give loss 0; labels >= the number of classes raise ``ValueError``.

    Training (``pipeline/train.py``) averages the same token losses over the whole batch; here each
    example keeps its own mean, so that summing these losses gives every example its own gradient.
    """
    if task == "causal_lm":
        nll, valid = next_token_losses(model, batch)
        return nll.sum(1) / valid.sum(1).clamp(min=1)
    if task in ("sequence_classification", "image_classification"):
        inputs = classification_inputs(batch, task, "per_example_loss")
        if (
            task != "image_classification"
            and "position_ids" not in inputs
            and "input_ids" in inputs
            and _accepts(model, "position_ids")
        ):
            inputs["position_ids"] = _positions(inputs["input_ids"])
        logits = model_logits(model(**inputs)).float()
        labels = batch["labels"].long()
        classes = logits.shape[-1]
        if labels.numel():
            require(
                ~(labels >= classes).any(),
                lambda: f"label {int(labels.max())} out of range for {classes} classes",
            )
        loss = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
        return torch.where(labels >= 0, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
    raise ValueError(
        f"per_example_loss: unknown task {task!r}; valid: causal_lm, image_classification, sequence_classification"
    )
