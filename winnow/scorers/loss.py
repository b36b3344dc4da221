"""Loss: per-example negative log-likelihood and per-token loss statistics.

The score of an example is the model's cross-entropy on it. For a classifier that is one number,
``-log softmax(z)_y``. For a causal language model every position t predicts token t+1 and has its own
negative log-likelihood

    NLL_t = logsumexp(z_t) - z_{t, y_{t+1}}

and the example is summarised by statistics over its scored positions (a position counts when both
token t and token t+1 are real, ``attention_mask`` 1; the same rule as EL2N's):

``loss``
    mean NLL over the scored positions: the per-sample loss that loss-based reweighting uses (Sow et
    al., ICLR 2025, arXiv:2502.06733: the per-sample loss is the token-summed NLL divided by the
    number of active tokens) and the log-perplexity of the example.
``loss_max``
    the largest token NLL: one very surprising token (a typo, a hash, a table cell) shows here even
    when the mean is low.
``loss_std``
    the population standard deviation (``ddof=0``) of the token NLLs around ``loss``: uniformly
    predictable text has a small spread, text mixing boilerplate with surprising content a large one.
    0 for an example with one scored position.
``loss_pctl``
    the ``percentile``-th percentile (default 90) of the token NLLs with linear interpolation between
    order statistics (numpy's default ``method="linear"``): a tail statistic less fragile than the
    max. The column name does not carry the percentile, because a scorer's columns are fixed per
    class (recipes validate score names against them); the value used is in the scorer's params,
    recorded as provenance.
``n_scored``
    how many positions were scored (float32, as every score column), so that the pipeline can weight
    or filter by it; ``loss * n_scored`` is the example's total NLL.

An example with no scored position (fewer than two real tokens) gets NaN in every statistic and 0 in
``n_scored``.

Classification (``sequence_classification``, ``image_classification``). There is one prediction per
example, so the statistics are those of a single value: ``loss = loss_max = loss_pctl`` = the
cross-entropy, ``loss_std = 0`` and ``n_scored = 1``. A label < 0 (e.g. -100, "ignore") gives NaN in
the four loss columns and ``n_scored = 0``; a label >= the number of classes raises ``ValueError``.
Logits are upcast to fp32 before the log-softmax.

Computation (causal LM). The (tokens, vocab) logits are never formed: the final hidden states come
from the model's base model (:func:`winnow.scorers.el2n.causal_lm_hidden_states`, which also derives
``position_ids`` from the padding mask, so left- and right-padded rows score as unpadded ones) and the
output embedding (:func:`winnow.scorers.el2n.lm_head_params`, with Cohere's ``logit_scale`` and
Gemma's ``final_logit_softcapping``) is applied in vocabulary chunks of ``vocab_chunk`` for token
chunks of ``token_chunk``, exactly as EL2N does. Per token we keep, in fp32, the running max M' of the
non-target logits, S1 = sum_{i != y} exp(z_i - M') and the target logit z_y, and finish with

    NLL = log1p(S1 * exp(M' - z_y))                      if z_y >= M'
    NLL = (M' - z_y) + log(S1 + exp(z_y - M'))           otherwise

which equals ``logsumexp(z) - z_y`` but does not subtract two nearly equal numbers when the target
is almost certain (the plain form loses every digit of an NLL below ~1e-7 in fp32). Chunk logits are
computed in the model's dtype (as its ``lm_head`` does), everything after in fp32; the per-example
statistics are reduced in fp32 by two-pass formulas.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from winnow.grads.checks import require
from winnow.scorers.base import (
    Param,
    Scorer,
    classification_inputs,
    eval_mode,
    model_logits,
    next_token_positions,
    register,
)
from winnow.scorers.el2n import _config_attr, causal_lm_hidden_states, lm_head_params
from winnow.scorers.token_softmax import apply_token_kernel, finish_nll, stream_softmax

__all__ = [
    "LOSS_COLUMNS",
    "LossScorer",
    "causal_lm_loss_stats",
    "causal_lm_token_nll",
    "nll_from_logits",
    "token_loss_stats",
]

LOSS_COLUMNS = ("loss", "loss_max", "loss_std", "loss_pctl", "n_scored")


# ----------------------------------------------------------------------------------------------
# classification


def nll_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each example, ``-log softmax(logits.float())[label]``.

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
    logp = torch.log_softmax(logits.float(), dim=-1)
    out = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return out.masked_fill(ignored, math.nan)


# ----------------------------------------------------------------------------------------------
# causal LM: fused output embedding + NLL


def _token_chunk_nll(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    y: torch.Tensor,
    vocab_chunk: int,
    logit_scale: float | None,
    softcap: float | None,
) -> torch.Tensor:
    """NLL of ``n`` tokens: ``h`` (n, H) hidden, ``y`` (n,) targets in [0, V). Returns fp32 (n,)."""
    run_max, s1, _, z_y = stream_softmax(h, weight, bias, y, vocab_chunk, logit_scale, softcap, squares=False)
    return finish_nll(run_max, s1, z_y)


_COMPILED: Any = None


def _compiled_token_chunk_nll() -> Any:
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(_token_chunk_nll, dynamic=False)
    return _COMPILED


def causal_lm_token_nll(
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
    """Per-token NLL ``logsumexp(z) - z[target]`` with ``z = hidden @ weight.T + bias``.

    ``hidden`` (..., H); ``weight`` (V, H) and ``bias`` (V,) or None, the output embedding; ``targets``
    (...) token ids; ``mask`` (...) bool, the positions to score (None: all). Returns float32 (...) with
    NaN where ``mask`` is False. ``logit_scale`` multiplies the logits, then ``softcap`` applies
    ``cap * tanh(z / cap)``. Never holds more than ``token_chunk x vocab_chunk`` logits at once.
    ``compile=True`` runs each token chunk through ``torch.compile`` (token dimension dynamic).
    """
    return apply_token_kernel(
        _token_chunk_nll,
        _compiled_token_chunk_nll,
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


def token_loss_stats(
    nll: torch.Tensor, mask: torch.Tensor, percentile: float = 90.0
) -> dict[str, torch.Tensor]:
    """Per-row statistics of token NLLs (B, T) over the positions where ``mask`` is True.

    Returns ``{column: float32 (B,)}`` for :data:`LOSS_COLUMNS`: mean, max, population std, the
    ``percentile``-th percentile (linear interpolation, as ``numpy.percentile``) and the count. Rows
    with no True position get NaN statistics and a count of 0.
    """
    if not (0.0 <= float(percentile) <= 100.0):
        raise ValueError(f"percentile must be in [0, 100], got {percentile!r}")
    if nll.shape != mask.shape or nll.dim() != 2:
        raise ValueError(f"nll {tuple(nll.shape)} and mask {tuple(mask.shape)} must be the same (B, T) shape")
    mask = mask.bool()
    x = nll.float()
    count = mask.sum(dim=1)
    none = count == 0
    n = count.clamp(min=1).to(torch.float32)
    zero = x.masked_fill(~mask, 0.0)
    mean = zero.sum(dim=1) / n
    dev = (x - mean.unsqueeze(1)).masked_fill(~mask, 0.0)
    std = (dev.square().sum(dim=1) / n).sqrt()
    mx = x.masked_fill(~mask, -math.inf).amax(dim=1) if x.shape[1] else torch.full_like(mean, math.nan)
    if x.shape[1]:
        srt = x.masked_fill(~mask, math.inf).sort(dim=1).values
        pos = (float(percentile) / 100.0) * (n - 1.0)  # 0-based rank among the row's valid values
        lo = pos.floor().long().clamp(min=0)
        hi = pos.ceil().long().clamp(min=0)
        frac = pos - lo.to(torch.float32)
        x_lo = srt.gather(1, lo.unsqueeze(1)).squeeze(1)
        x_hi = srt.gather(1, hi.unsqueeze(1)).squeeze(1)
        pct = x_lo + frac * (x_hi - x_lo)
    else:
        pct = torch.full_like(mean, math.nan)
    nan = torch.full_like(mean, math.nan)
    return {
        "loss": torch.where(none, nan, mean),
        "loss_max": torch.where(none, nan, mx),
        "loss_std": torch.where(none, nan, std),
        "loss_pctl": torch.where(none, nan, pct),
        "n_scored": count.to(torch.float32),
    }


def causal_lm_loss_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    percentile: float = 90.0,
    **kwargs: Any,
) -> dict[str, torch.Tensor]:
    """Per-example causal-LM loss statistics from final hidden states (B, T, H).

    Position t predicts ``input_ids[:, t + 1]``; it counts when ``attention_mask`` is 1 at t and t+1.
    ``kwargs`` go to :func:`causal_lm_token_nll` (chunk sizes, logit_scale, softcap, compile).
    """
    valid = next_token_positions(input_ids, attention_mask)
    tok = causal_lm_token_nll(hidden[:, :-1], weight, bias, input_ids[:, 1:], valid, **kwargs)
    return token_loss_stats(tok, valid, percentile)


# ----------------------------------------------------------------------------------------------
# the scorer


@register
class LossScorer(Scorer):
    """Per-example loss (cross-entropy / mean next-token NLL) and per-token loss statistics.

    Columns :data:`LOSS_COLUMNS` = ``loss``, ``loss_max``, ``loss_std``, ``loss_pctl``, ``n_scored``
    (see the module docstring; for classification the last four are those of one prediction). For
    ``causal_lm`` the output embedding is applied in ``token_chunk x vocab_chunk`` blocks as in EL2N
    (same memory bound), and ``compile=True`` compiles that block computation.
    """

    name = "loss"
    tasks = frozenset({"causal_lm", "sequence_classification", "image_classification"})
    columns = LOSS_COLUMNS
    PARAMS = {
        "percentile": Param(
            90.0, float, min=0, max=100, doc="percentile of token NLLs in loss_pctl (causal_lm)"
        ),
        "vocab_chunk": Param(8192, int, min=0, min_exclusive=True, doc="vocabulary entries per chunk"),
        "token_chunk": Param(16384, int, min=0, min_exclusive=True, doc="tokens per chunk"),
        "compile": Param(False, bool, doc="torch.compile the fused chunk computation (causal_lm)"),
    }
    percentile: float
    vocab_chunk: int
    token_chunk: int
    compile: bool

    def score_batch(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], task: str
    ) -> dict[str, torch.Tensor]:
        self.check_task(task)
        with eval_mode(model), torch.inference_mode():
            if task == "causal_lm":
                return self._causal_lm(model, batch)
            return self._classification(model, batch, task)

    def _causal_lm(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        scaling = _config_attr(model, "logits_scaling")
        if scaling is not None and float(scaling) != 1.0:
            raise ValueError(
                f"loss: {type(model).__name__} has config.logits_scaling={scaling}, which model families "
                "apply differently (divide or multiply); the fused loss refuses it rather than guess"
            )
        input_ids = batch["input_ids"]
        attention_mask = batch.get("attention_mask")
        weight, bias, scale, softcap = lm_head_params(model)
        hidden = causal_lm_hidden_states(model, input_ids, attention_mask)
        return causal_lm_loss_stats(
            hidden,
            weight,
            bias,
            input_ids,
            attention_mask,
            percentile=self.percentile,
            vocab_chunk=self.vocab_chunk,
            token_chunk=self.token_chunk,
            logit_scale=scale,
            softcap=softcap,
            compile=self.compile,
        )

    def _classification(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], task: str
    ) -> dict[str, torch.Tensor]:
        logits = model_logits(model(**classification_inputs(batch, task, "loss")))
        labels = batch["labels"]
        ce = nll_from_logits(logits, labels)
        scored = labels.to(ce.device) >= 0
        return {
            "loss": ce,
            "loss_max": ce.clone(),
            "loss_std": torch.zeros_like(ce).masked_fill(~scored, math.nan),
            "loss_pctl": ce.clone(),
            "n_scored": scored.to(torch.float32),
        }
