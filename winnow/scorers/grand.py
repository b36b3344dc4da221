"""GraNd: the norm of each example's loss gradient (Paul et al. 2021).

Paul, Ganguli, Dziugaite, "Deep Learning on a Data Diet: Finding Important Examples Early in
Training" (NeurIPS 2021, arXiv 2107.07075), §2: the GraNd score of (x, y) at time t is
E‖g_t(x, y)‖₂, the norm of the gradient of the example's loss with respect to the weights,
averaged over independent runs. winnow computes ‖∇_w ℓ(x, y)‖₂ for every example of a batch from
ONE ordinary batched backward with the per-example gradient engine (`winnow.grads.GradEngine`),
exactly, without a per-example copy of the parameters; the pipeline averages it over seeds and
checkpoints like EL2N.

Choices and deviations:
- the model is scored in eval mode (dropout off), so the score is a deterministic function of the
  checkpoint; the paper's expectation is over training runs (seeds), not dropout masks;
- for causal LMs the example's loss is its mean next-token NLL over real tokens (padding adds
  nothing), so long and short examples are on one scale; classification uses the cross-entropy;
- `parameters` restricts the gradient to a subset (`all`, `last_layer`, `lora`, or comma-separated
  names / prefixes / globs), as the paper's GraNd can be computed for any set of weights;
- GraNd at initialisation (a checkpoint at step 0) is supported, but Kirsch (2023, arXiv
  2303.14753, "Does 'Deep Learning on a Data Diet' reproduce?") found that GraNd at initialisation
  does not beat random pruning, while EL2N and GraNd after some training did; winnow's default
  checkpoints are trained ones (the last proxy step).
"""

from __future__ import annotations

import weakref
from typing import Any, ClassVar

import torch

from winnow.grads import GradEngine, parse_params, per_example_loss
from winnow.scorers.base import TASKS, Param, Scorer, eval_mode, register


@register
class GraNd(Scorer):
    name: ClassVar[str] = "grand"
    tasks: ClassVar[frozenset[str]] = TASKS
    columns: ClassVar[tuple[str, ...]] = ("grand",)
    needs_grad: ClassVar[bool] = True
    parameters: str  # set from PARAMS by Scorer.__init__
    PARAMS: ClassVar[dict[str, Param]] = {
        "parameters": Param(
            "all", str, doc="all | last_layer | lora | comma-separated names, prefixes or globs"
        ),
    }

    def __init__(self, **params: Any):
        super().__init__(**params)
        self._selection = parse_params(self.parameters)
        self._engine: GradEngine | None = None
        self._model_ref: weakref.ref | None = None

    def _engine_for(self, model: torch.nn.Module) -> GradEngine:
        if self._model_ref is None or self._model_ref() is not model:
            if self._engine is not None:
                self._engine.close()
            try:
                # the engine's consistency check (per-example factors summed = the batch gradient) runs on
                # the first batch of each model, where a use of a parameter no rule sees would show
                # factors stay in the activations' precision (bf16 on GPU), sums in fp32: GraNd ranks examples,
                # and bf16 rounding of the factors moves norms by ~1e-3 relative (fp32 models are unaffected)
                self._engine = GradEngine(model, params=self._selection, check=True, factor_dtype="input")
            except ValueError as e:
                raise ValueError(f"scorer 'grand': {e}") from None
            self._model_ref = weakref.ref(model)
        assert self._engine is not None
        return self._engine

    def score_batch(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], task: str
    ) -> dict[str, torch.Tensor]:
        self.check_task(task)
        engine = self._engine_for(model)
        try:
            with eval_mode(model):
                out = engine.compute(lambda: per_example_loss(model, batch, task), sqnorm=True)
            engine.check = False
        finally:
            for p in model.parameters():
                p.grad = None
        return {"grand": out["sqnorm"].clamp_min(0).sqrt().float()}
