"""EL2N: the error L2-norm score.

Reference: Mansheej Paul, Surya Ganguli, Gintare Karolina Dziugaite, "Deep Learning on a Data Diet:
Finding Important Examples Early in Training", NeurIPS 2021, arXiv:2107.07075, Section 2, the
definition of the EL2N score of a training example (x, y) at training time t:

    EL2N_t(x, y) = E_{w_t} || p(w_t, x) - y ||_2

where p(w_t, x) = softmax(f(w_t, x)) is the model's predicted class distribution and y the one-hot
label. The expectation over weights (several seeds / checkpoints) is the pipeline's job: a scorer call
computes the inner norm for one model, and the pipeline averages the columns of its checkpoints.

Deviations and extensions, all deliberate:

* Causal language models. The paper scores classifiers. Here every next-token prediction is a
  classification over the vocabulary: position t predicts token t+1, and a position counts when both
  token t and token t+1 are real (``attention_mask`` 1). The per-token norms are reduced per example by
  ``reduction``: ``mean`` (default), ``sum`` or ``max``. An example with no valid position (fewer than
  two real tokens) gets NaN under every reduction, ``sum`` included, so that it cannot pass as "easy".
* The full (tokens, vocab) fp32 softmax is never formed. The final hidden states come from the model's
  base model and the output embedding is applied in vocabulary chunks; per token we keep, in fp32, a
  running max M' of the non-target logits, the target-excluded sums S1 = sum_{i != y} exp(z_i - M')
  and S2 = sum_{i != y} exp(2 (z_i - M')), and the target logit z_y. With S = S1 + exp(z_y - M'):

      ||p - e_y||^2 = sum_i p_i^2 - 2 p_y + 1 = sum_{i != y} p_i^2 + (1 - p_y)^2 = (S2 + S1^2) / S^2

  This is the identity ``sum p_i^2 - 2 p_y + 1`` with sum p_i^2 = exp(lse(2z) - 2 lse(z)), rearranged
  so that no two nearly equal numbers are subtracted: when p_y is close to 1 the plain form loses all
  digits (an absolute error of ~1e-7 in the squared norm is ~3e-4 in the norm), this form does not.
  Taking the sums relative to the non-target max (S1 >= 1) and forming the norm in logs keeps full
  relative precision even for scores far below 1e-19, where squares of fp32 numbers would underflow.
* Precision. Logits of a chunk (bias included) are computed by the output embedding in the model's
  dtype, as the model's own ``lm_head`` does, so bf16 models give bf16-rounded logits; everything after
  that (scaling, soft-capping, exponentials, sums) runs in fp32. Classification logits are upcast to
  fp32 before the softmax.
* Logit post-processing. ``config.logit_scale`` (Cohere: logits * scale) and
  ``config.final_logit_softcapping`` (Gemma 2/3: cap * tanh(logits / cap)) are applied, scale first, in
  fp32. ``config.logits_scaling`` is refused when it is not 1, because models disagree on what it means
  (Granite divides by it, HyperCLOVA X multiplies). Any other post-processing of logits between the base
  model and the output of ``forward`` is not seen by the fused path.
* Labels. Classification labels < 0 (e.g. -100, "ignore") give NaN; labels >= the number of classes
  raise ``ValueError``. Causal-LM targets outside [0, vocab) at valid positions raise ``ValueError``.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch

from winnow.grads.checks import is_deferred, require
from winnow.grads.losses import attn_implementation, causal_mask_4d
from winnow.scorers.base import (
    Param,
    Scorer,
    classification_inputs,
    eval_mode,
    model_logits,
    next_token_positions,
    register,
)
from winnow.scorers.token_softmax import apply_token_kernel, finish_el2n, stream_softmax

REDUCTIONS = ("mean", "sum", "max")

__all__ = [
    "EL2N",
    "REDUCTIONS",
    "causal_lm_el2n",
    "causal_lm_hidden_states",
    "causal_lm_token_el2n",
    "el2n_from_logits",
    "lm_head_params",
    "reduce_token_scores",
]


# ----------------------------------------------------------------------------------------------
# classification


def el2n_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """EL2N of each example from its logits: ``||softmax(logits.float()) - onehot(labels)||_2``.

    ``logits`` (..., C), ``labels`` (...) integer. Returns float32 (...). Labels < 0 give NaN;
    labels >= C raise ``ValueError``.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match")
    num_classes = logits.shape[-1]
    labels = labels.long()
    if labels.numel():
        require(
            ~(labels >= num_classes).any(),
            lambda: f"label {int(labels.max())} out of range for {num_classes} classes",
        )
    ignored = labels < 0
    safe = labels.clamp(min=0)
    # the causal-LM path's stable form (module docstring): the target excluded from the max and both
    # sums, the norm kept in logs; the plain ||softmax(z) - e_y|| loses every digit when p_y is near 1
    z = logits.float().reshape(-1, num_classes)
    y = safe.reshape(-1, 1)
    z_y = z.gather(1, y).squeeze(1)
    rest = z.scatter(1, y, -math.inf)
    run_max = rest.amax(dim=1)
    shift = torch.where(torch.isneginf(run_max), 0.0, run_max)
    e = (rest - shift.unsqueeze(1)).exp()
    s1, s2 = e.sum(dim=1), e.square().sum(dim=1)
    out = finish_el2n(run_max, s1, s2, z_y).reshape(labels.shape)
    return out.masked_fill(ignored, float("nan"))


# ----------------------------------------------------------------------------------------------
# causal LM: fused output embedding + EL2N


def _token_chunk_el2n(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    y: torch.Tensor,
    vocab_chunk: int,
    logit_scale: float | None,
    softcap: float | None,
) -> torch.Tensor:
    """EL2N of ``n`` tokens: ``h`` (n, H) hidden, ``y`` (n,) targets in [0, V). Returns fp32 (n,)."""
    run_max, s1, s2, z_y = stream_softmax(h, weight, bias, y, vocab_chunk, logit_scale, softcap, squares=True)
    assert s2 is not None
    return finish_el2n(run_max, s1, s2, z_y)


_COMPILED: Any = None


def _compiled_token_chunk_el2n() -> Any:
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(_token_chunk_el2n, dynamic=False)
    return _COMPILED


def causal_lm_token_el2n(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    vocab_chunk: int = 8192,
    token_chunk: int = 16384,
    logit_scale: float | None = None,
    softcap: float | None = None,
    compile: bool = False,
) -> torch.Tensor:
    """Per-token EL2N ``||softmax(z) - onehot(target)||_2`` with ``z = hidden @ weight.T + bias``.

    ``hidden`` (..., H); ``weight`` (V, H) and ``bias`` (V,) or None, the output embedding; ``targets``
    (...) token ids; ``mask`` (...) bool, the positions to score (None: all). Returns float32 (...) with
    NaN where ``mask`` is False. ``logit_scale`` multiplies the logits, then ``softcap`` applies
    ``cap * tanh(z / cap)``. Never holds more than ``token_chunk x vocab_chunk`` logits at once.
    ``compile=True`` runs each token chunk through ``torch.compile`` with the token dimension marked
    dynamic, so one graph serves every chunk length (one compile per chunk size, dtype and output layer).
    """
    return apply_token_kernel(
        _token_chunk_el2n,
        _compiled_token_chunk_el2n,
        hidden,
        weight,
        bias,
        targets,
        mask,
        vocab_chunk=vocab_chunk,
        token_chunk=token_chunk,
        logit_scale=logit_scale,
        softcap=softcap,
        compile=compile,
    )


def reduce_token_scores(scores: torch.Tensor, mask: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Reduce per-token scores (B, T) over positions where ``mask`` is True to (B,) float32.

    ``reduction`` is ``mean``, ``sum`` or ``max``; a row with no True position gives NaN.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    mask = mask.bool()
    scores = scores.float()
    count = mask.sum(dim=1)
    if reduction == "max":
        out = scores.masked_fill(~mask, -math.inf).amax(dim=1)
    else:
        out = scores.masked_fill(~mask, 0.0).sum(dim=1)
        if reduction == "mean":
            out = out / count.clamp(min=1)
    return out.masked_fill(count == 0, math.nan)


def _accepts(module: torch.nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    if not isinstance(base, torch.nn.Module) and hasattr(model, "get_decoder"):
        base = getattr(model, "get_decoder")()  # noqa: B009  (a transformers method, not a tensor)
    if not isinstance(base, torch.nn.Module) or base is model:
        raise ValueError(
            f"cannot find the base model of {type(model).__name__} (tried .{prefix or '<base_model_prefix>'} "
            "and .get_decoder()); the fused causal-LM EL2N needs a model with a base model and an output embedding"
        )
    return base


def causal_lm_hidden_states(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Final hidden states (B, T, H) of a transformers causal LM, from its base model.

    With padding, ``position_ids`` are derived from ``attention_mask`` (cumsum - 1) so that left- and
    right-padded rows see the same positions as unpadded ones. An all-ones mask is dropped, which lets
    attention take its plain causal (flash) path.

    Inside :func:`winnow.grads.checks.deferred` (the scoring pipeline's passes), a model whose attention is
    PyTorch's SDPA gets a ready 4-D boolean mask (:func:`causal_mask_4d`) and its positions instead: a
    transformers model builds its own mask from a 2-D one only after asking the device three questions
    (does the unmasked input hold a pad id, is the padding mask all ones, are the positions packed), each
    a wait for the GPU that stops the host from preparing the next batch. A 4-D mask is used as given.
    """
    base = _base_model(model)
    kwargs: dict[str, Any] = {"input_ids": input_ids}
    if is_deferred() and attn_implementation(base) == "sdpa" and _accepts(base, "position_ids"):
        kwargs["attention_mask"] = causal_mask_4d(input_ids.shape, attention_mask, input_ids.device)
        kwargs["position_ids"] = (
            (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            if attention_mask is not None
            else torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand(
                input_ids.shape[0], -1
            )
        )
    # inside checks.deferred() the mask is passed without asking the device whether it is all ones (the
    # same result, without the flash path); the scoring pipeline drops a mask it knows to be all ones
    elif attention_mask is not None and (is_deferred() or not bool(attention_mask.bool().all())):
        kwargs["attention_mask"] = attention_mask
        if _accepts(base, "position_ids"):
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    if _accepts(base, "use_cache"):
        kwargs["use_cache"] = False
    out = base(**kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden


def _config_attr(model: torch.nn.Module, name: str) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        return None
    value = getattr(config, name, None)
    if value is None and hasattr(config, "get_text_config"):
        try:
            value = getattr(config.get_text_config(), name, None)
        except Exception:  # configs without a usable text config
            value = None
    return value


def lm_head_params(
    model: torch.nn.Module,
) -> tuple[torch.Tensor, torch.Tensor | None, float | None, float | None]:
    """``(weight, bias, logit_scale, softcap)`` of a transformers causal LM's output layer.

    Raises ``ValueError`` for a model without an output embedding or with ``config.logits_scaling``
    other than 1 (its meaning differs between model families).
    """
    head = getattr(model, "get_output_embeddings")() if hasattr(model, "get_output_embeddings") else None  # noqa: B009
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{type(model).__name__} has no output embedding with a 2-D weight")
    bias = getattr(head, "bias", None)
    if not isinstance(bias, torch.Tensor):
        bias = None
    scaling = _config_attr(model, "logits_scaling")
    if scaling is not None and float(scaling) != 1.0:
        raise ValueError(
            f"el2n: {type(model).__name__} has config.logits_scaling={scaling}, which model families apply "
            "differently (divide or multiply); the fused EL2N refuses it rather than guess"
        )
    scale = _config_attr(model, "logit_scale")
    softcap = _config_attr(model, "final_logit_softcapping")
    scale = None if scale is None or float(scale) == 1.0 else float(scale)
    softcap = None if softcap is None or float(softcap) == 0.0 else float(softcap)
    return weight, bias, scale, softcap


def causal_lm_el2n(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    reduction: str = "mean",
    **kwargs: Any,
) -> torch.Tensor:
    """Per-example causal-LM EL2N (B,) float32 from final hidden states (B, T, H).

    Position t predicts ``input_ids[:, t + 1]``; it counts when ``attention_mask`` is 1 at t and t+1.
    ``kwargs`` go to :func:`causal_lm_token_el2n` (chunk sizes, logit_scale, softcap, compile).
    """
    valid = next_token_positions(input_ids, attention_mask)
    tok = causal_lm_token_el2n(hidden[:, :-1], weight, bias, input_ids[:, 1:], valid, **kwargs)
    return reduce_token_scores(tok, valid, reduction)


# ----------------------------------------------------------------------------------------------
# the scorer


@register
class EL2N(Scorer):
    """EL2N score (Paul et al. 2021): ``||softmax(logits) - onehot(y)||_2`` per example.

    Column ``el2n``. For ``causal_lm`` the per-token scores are reduced by ``reduction`` and computed
    with the fused chunked output embedding (see the module docstring): at most
    ``token_chunk x vocab_chunk`` logits exist at a time (defaults: 16384 x 8192, about 1.3 GiB of
    working memory eager, measured on an H100). ``compile=True`` compiles that chunk computation with
    torch.compile (3x faster on an H100, benchmarks/RESULTS.md); compiling the base model itself
    (``model.get_decoder().compile()``) is the caller's choice.
    """

    name = "el2n"
    tasks = frozenset({"causal_lm", "sequence_classification", "image_classification"})
    columns = ("el2n",)
    PARAMS = {
        "reduction": Param(
            "mean", str, choices=REDUCTIONS, doc="per-example reduction over tokens (causal_lm)"
        ),
        "vocab_chunk": Param(8192, int, min=0, min_exclusive=True, doc="vocabulary entries per chunk"),
        "token_chunk": Param(16384, int, min=0, min_exclusive=True, doc="tokens per chunk"),
        "compile": Param(False, bool, doc="torch.compile the fused chunk computation (causal_lm)"),
    }
    reduction: str
    vocab_chunk: int
    token_chunk: int
    compile: bool

    def score_batch(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], task: str
    ) -> dict[str, torch.Tensor]:
        self.check_task(task)
        with eval_mode(model), torch.inference_mode():
            if task == "causal_lm":
                scores = self._causal_lm(model, batch)
            else:
                scores = self._classification(model, batch, task)
        return {"el2n": scores}

    def _causal_lm(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        input_ids = batch["input_ids"]
        attention_mask = batch.get("attention_mask")
        weight, bias, scale, softcap = lm_head_params(model)
        hidden = causal_lm_hidden_states(model, input_ids, attention_mask)
        return causal_lm_el2n(
            hidden,
            weight,
            bias,
            input_ids,
            attention_mask,
            reduction=self.reduction,
            vocab_chunk=self.vocab_chunk,
            token_chunk=self.token_chunk,
            logit_scale=scale,
            softcap=softcap,
            compile=self.compile,
        )

    def _classification(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], task: str
    ) -> torch.Tensor:
        logits = model_logits(model(**classification_inputs(batch, task, "el2n")))
        return el2n_from_logits(logits, batch["labels"])
