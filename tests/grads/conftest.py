"""Fixtures of the gradient engine's tests: the error report printed with -s, the causal-LM cases with
their float64 references (built once per module)."""

from __future__ import annotations

import copy

import pytest

from tests.grads._harness import ERRORS, LENGTHS, causal_loss_alone, gpt2, llama, reference_grads, seqs
from winnow.grads import select_parameters


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    print("\nmax relative errors (engine fp32 vs per-example autograd fp64):")
    for key, val in sorted(ERRORS.items()):
        print(f"  {key:60s} {val:.2e}")


@pytest.fixture(scope="module")
def causal_cases():
    cases = {}
    for name, build in (("gpt2", gpt2), ("llama", llama)):
        model = build()
        model64 = copy.deepcopy(model).double()
        names = list(select_parameters(model, "all"))
        examples = seqs(LENGTHS, seed=1)
        ref = reference_grads(model64, names, examples, causal_loss_alone)
        cases[name] = (model, examples, ref)
    return cases
