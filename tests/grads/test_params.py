"""Parameter selection: subsets, frozen parameters, LoRA (winnow/grads/params.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from tests.grads._harness import (
    RTOL,
    K,
    LoraNet,
    V,
    _note,
    flat,
    gpt2,
    jiggle,
    reference_grads,
    rel_floored,
    rel_rows,
    text_batch,
)
from winnow.grads import GradEngine, per_example_loss, select_parameters


def test_parameter_subsets(causal_cases):
    model, examples, ref = causal_cases["gpt2"]
    batch = text_batch(examples, "left")
    last = list(select_parameters(model, "last_layer"))
    assert last == ["transformer.wte.weight"] + [
        n for n in ref if n.startswith(("transformer.h.1.", "transformer.ln_f"))
    ]
    subsets = {
        "last_layer": "last_layer",
        "globs": ["transformer.h.0.attn.*", "transformer.ln_f", "*.mlp.c_fc.bias"],
    }
    whole = flat(ref, list(ref)).square().sum(1)  # each example's whole squared norm: the floor's scale
    for label, sel in subsets.items():
        with GradEngine(model, sel, proj_dim=K) as eng:
            out = eng.compute(
                lambda: per_example_loss(model, batch, "causal_lm"), per_param=True, project=True
            )
        names = eng.param_names
        if label == "globs":
            assert names == [
                n
                for n in ref
                if n.startswith(("transformer.h.0.attn.", "transformer.ln_f.")) or n.endswith("mlp.c_fc.bias")
            ]
        for n in names:
            assert (
                _note(
                    f"subset {label}: per-parameter sqnorm",
                    rel_floored(out["param_sqnorm"][n], ref[n].flatten(1).square().sum(1), whole),
                )
                <= RTOL
            )
        G = flat(ref, names)
        assert (
            _note(f"subset {label}: projection", rel_rows(out["proj"], G @ eng.projection_matrix().t()))
            <= RTOL
        )
    # a parameter's projection does not depend on what else is selected
    with (
        GradEngine(model, ["transformer.ln_f.bias"], proj_dim=K) as a,
        GradEngine(model, "all", proj_dim=K) as b,
    ):
        pa, pb = a.projection_matrix(), b.projection_matrix()
        start = sum(
            p.numel()
            for n, p in b.params.items()
            if n != "transformer.ln_f.bias"
            and b.param_names.index(n) < b.param_names.index("transformer.ln_f.bias")
        )
        assert torch.equal(pa, pb[:, start : start + pa.shape[1]])


def test_frozen_parameters_are_skipped(causal_cases):
    model = gpt2()
    model.transformer.wpe.weight.requires_grad_(False)
    assert "transformer.wpe.weight" not in select_parameters(model, "all")
    with pytest.raises(ValueError, match="selects no trainable parameter"):
        select_parameters(model, ["transformer.wpe"])
    with pytest.raises(ValueError, match="matches no parameter"):
        select_parameters(model, ["transformer.nope"])
    with pytest.raises(ValueError, match="'all', 'last_layer', 'lora'"):
        select_parameters(model, "everything")
    with pytest.raises(ValueError, match="no parameter whose name contains 'lora_'"):
        select_parameters(model, "lora")


def test_lora_selection_exact():
    torch.manual_seed(0)
    model = jiggle(LoraNet(), 1, scale=0.5)
    x = torch.randint(0, V, (5, 6), generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 1, 0])
    names = list(select_parameters(model, "lora"))
    assert names == [
        "blocks.0.lora_A.weight",
        "blocks.0.lora_B.weight",
        "blocks.1.lora_A.weight",
        "blocks.1.lora_B.weight",
    ]
    assert list(select_parameters(model, "last_layer")) == [
        "blocks.1.lora_A.weight",
        "blocks.1.lora_B.weight",
        "head.weight",
        "head.bias",
    ]
    ref = reference_grads(
        copy.deepcopy(model).double(),
        names,
        list(zip(x, y, strict=True)),
        lambda m, ex: F.cross_entropy(m(ex[0][None]), ex[1].view(1)),
    )
    with GradEngine(model, "lora", proj_dim=K) as eng:
        out = eng.compute(
            lambda: F.cross_entropy(model(x), y, reduction="none"), per_param=True, project=True
        )
    for n in names:
        assert (
            _note(
                "lora: per-parameter sqnorm",
                rel_floored(
                    out["param_sqnorm"][n],
                    ref[n].flatten(1).square().sum(1),
                    flat(ref, names).square().sum(1),
                ),
            )
            <= RTOL
        )
    assert (
        _note("lora: projection", rel_rows(out["proj"], flat(ref, names) @ eng.projection_matrix().t()))
        <= RTOL
    )
