"""The engine end to end against per-example autograd: exactness on GPT-2, Llama and BERT with padding,
refusals of what it cannot see, lower precision (winnow/grads/engine.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.grads._harness import (
    GROUPS,
    RTOL,
    C,
    K,
    LoraNet,
    V,
    _note,
    bert,
    check_all,
    cls_loss_alone,
    flat,
    gpt2,
    random_target,
    reference_grads,
    rel,
    rel_rows,
    seqs,
    text_batch,
)
from winnow.grads import GradEngine, per_example_loss, select_parameters

# ---------------------------------------------------------------------------------------------
# exactness on the transformers models


@pytest.mark.parametrize("method", ["auto", "gram", "direct"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_causal_lm_exact(causal_cases, arch, side, method):
    model, examples, ref = causal_cases[arch]
    batch = text_batch(examples, side)
    with GradEngine(model, "all", proj_dim=K, proj_seed=3, sqnorm_method=method) as eng:
        target = random_target(eng, 5)
        out = eng.compute(
            lambda: per_example_loss(model, batch, "causal_lm"),
            per_param=True,
            project=True,
            groups=GROUPS,
            num_groups=C,
            target=target,
        )
    assert out["sqnorm"].dtype == torch.float32 and out["proj"].shape == (len(examples), K)
    assert out["sqnorm"][2] == 0  # the single-token example
    check_all(f"{arch} {method}", eng, out, ref, GROUPS, C, target)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_padding_contributes_nothing(causal_cases, arch):
    """Garbage token ids at padded positions change nothing: their output gradients are exactly zero."""
    model, examples, _ = causal_cases[arch]
    for side in ("right", "left"):
        batch = text_batch(examples, side)
        noisy = dict(batch)
        noisy["input_ids"] = torch.where(
            batch["attention_mask"] == 1, batch["input_ids"], torch.randint(0, V, batch["input_ids"].shape)
        )
        with GradEngine(model, proj_dim=K) as eng:
            a = eng.compute(lambda b=batch: per_example_loss(model, b, "causal_lm"), project=True)
            b = eng.compute(lambda b=noisy: per_example_loss(model, b, "causal_lm"), project=True)
            records: dict = {}

            def grab(b=batch, records=records):
                losses = per_example_loss(model, b, "causal_lm")
                records.update(
                    eng._records
                )  # the calls recorded in this forward (grads arrive in the backward)
                return losses

            eng.compute(grab)
        real = batch["attention_mask"].bool()
        seen = []
        torch.testing.assert_close(a["sqnorm"], b["sqnorm"], rtol=1e-6, atol=0)
        torch.testing.assert_close(a["proj"], b["proj"], rtol=1e-6, atol=1e-9)
        for recs in records.values():
            for r in recs:
                if r.grad is not None and r.grad.dim() >= 2 and r.grad.shape[:2] == real.shape:
                    seen.append(r)
                    assert float(r.grad[~real].abs().max()) == 0.0
        assert len(seen) > 5


def test_bert_sequence_classification_exact():
    model = bert()
    model64 = copy.deepcopy(model).double()
    examples = seqs([8, 3, 6, 5, 2, 7], seed=2)
    examples[0][3] = 0  # a real token equal to padding_idx: its embedding row gets no gradient
    labels = torch.tensor([0, 2, 1, 1, 0, 2])
    names = list(select_parameters(model, "all"))
    ref = reference_grads(model64, names, list(zip(examples, labels, strict=True)), cls_loss_alone)
    # right padding (BERT pools the first token, so a left-padded row is another input)
    batch = {**text_batch(examples, "right"), "labels": labels}
    batch["input_ids"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 0)
    for method in ("auto", "gram", "direct"):
        with GradEngine(model, "all", proj_dim=K, proj_kind="gaussian", sqnorm_method=method) as eng:
            target = random_target(eng, 6)
            out = eng.compute(
                lambda: per_example_loss(model, batch, "sequence_classification"),
                per_param=True,
                project=True,
                groups=GROUPS,
                num_groups=C,
                target=target,
            )
        check_all(f"bert {method}", eng, out, ref, GROUPS, C, target)


# ---------------------------------------------------------------------------------------------
# refusals


class SneakyHead(nn.Module):
    """Uses the embedding's weight functionally, outside any module the engine hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 8)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids).mean(1)
        return F.linear(h, self.emb.weight)


def test_unseen_use_is_caught_by_the_check():
    torch.manual_seed(0)
    model = SneakyHead()
    x = torch.randint(0, V, (4, 5))
    y = torch.randint(0, V, (4,))
    with GradEngine(model) as eng, pytest.raises(ValueError, match="do not add up to the batch gradient"):
        eng.compute(lambda: F.cross_entropy(model(x), y, reduction="none"))


class Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 8)
        self.lin = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = torch.utils.checkpoint.checkpoint(
            lambda t: torch.tanh(self.lin(t)), self.emb(input_ids), use_reentrant=False
        )
        return self.head(h.mean(1))


def test_non_reentrant_checkpointing_is_exact():
    """The recomputed forward is not recorded; the original calls get their output gradients."""
    torch.manual_seed(0)
    model = Checkpointed()
    x = torch.randint(0, V, (4, 5), generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 0])
    names = list(select_parameters(model, "all"))
    ref = reference_grads(
        copy.deepcopy(model).double(),
        names,
        list(zip(x, y, strict=True)),
        lambda m, ex: F.cross_entropy(m(ex[0][None]), ex[1].view(1)),
    )
    with GradEngine(model) as eng:
        out = eng.compute(lambda: F.cross_entropy(model(x), y, reduction="none"))
    assert _note("checkpointed: total sqnorm", rel(out["sqnorm"], flat(ref, names).square().sum(1))) <= RTOL


def test_bad_calls():
    model = LoraNet()
    x = torch.randint(0, V, (3, 4))
    with GradEngine(model) as eng:
        with pytest.raises(ValueError, match="1-D float tensor"):
            eng.compute(lambda: model(x).sum())
        with pytest.raises(ValueError, match="do not require grad"):
            eng.compute(lambda: model(x).detach().sum(1))
        with pytest.raises(ValueError, match="needs an engine built with proj_dim"):
            eng.compute(lambda: model(x).sum(1), project=True)
        with pytest.raises(ValueError, match="groups must be"):
            eng.compute(lambda: model(x).sum(1), groups=torch.tensor([0, 1]))
        with pytest.raises(ValueError, match="target has no entry"):
            eng.compute(lambda: model(x).sum(1), groups=torch.tensor([0, 1, 0]), target={})
    with pytest.raises(ValueError, match="closed"):
        eng.compute(lambda: model(x).sum(1))
    with pytest.raises(ValueError, match="proj_kind"):
        GradEngine(model, proj_dim=8, proj_kind="sparse")
    with pytest.raises(ValueError, match="unknown task"):
        per_example_loss(model, {"input_ids": x}, "translation")


# ---------------------------------------------------------------------------------------------
# the backward and lower precision


def test_bfloat16_model_passes_the_check_and_is_close():
    model = gpt2()
    batch = text_batch(seqs([8, 5, 3], seed=9), "right")
    with GradEngine(model, proj_dim=K) as eng:
        full = eng.compute(lambda: per_example_loss(model, batch, "causal_lm"), project=True)
    model_bf = copy.deepcopy(model).to(torch.bfloat16)
    with GradEngine(model_bf, proj_dim=K) as eng:
        half = eng.compute(lambda: per_example_loss(model_bf, batch, "causal_lm"), project=True)
    assert half["sqnorm"].dtype == torch.float32
    assert rel(half["sqnorm"], full["sqnorm"]) < 0.1
    assert rel_rows(half["proj"], full["proj"]) < 0.1


def test_output_only_backward_equals_the_checked_one():
    """check=False backpropagates to the recorded module outputs only (no batch weight gradients);
    the per-example quantities must not change."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=97,
            n_layer=2,
            n_embd=32,
            n_head=4,
            n_positions=32,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    ).eval()
    ids = torch.randint(0, 97, (4, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, :3] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    outs = []
    for check in (True, False):
        with GradEngine(model, proj_dim=64, check=check) as eng:
            outs.append(
                eng.compute(
                    lambda: per_example_loss(model, batch, "causal_lm"),
                    project=True,
                    groups=torch.tensor([0, 1, 0, 1]),
                )
            )
    for key in ("sqnorm", "proj", "group_gram"):
        torch.testing.assert_close(outs[0][key], outs[1][key], rtol=1e-5, atol=1e-7)


def test_factor_dtype_input_keeps_bf16_factors_and_stays_close():
    """factor_dtype='input' under bf16 autocast: squared norms within bf16 rounding of the fp32-factor path."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=97,
            n_layer=2,
            n_embd=64,
            n_head=4,
            n_positions=32,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    ).eval()
    ids = torch.randint(0, 97, (4, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    outs = {}
    for fd in ("fp32", "input"):
        with (
            GradEngine(model, check=False, factor_dtype=fd) as eng,
            torch.autocast("cpu", dtype=torch.bfloat16),
        ):
            outs[fd] = eng.compute(lambda: per_example_loss(model, batch, "causal_lm"))["sqnorm"]
    assert outs["input"].dtype == torch.float32
    torch.testing.assert_close(outs["input"], outs["fp32"], rtol=2e-2, atol=0)
    with pytest.raises(ValueError, match="factor_dtype"):
        GradEngine(model, factor_dtype="fp8")


def test_callers_autocast_does_not_reach_the_rules():
    """A forward under bf16 autocast (as the pipeline runs on GPUs): projections, norms and group sums
    still run in the engine's own precision (no in-place fp32 accumulation into autocast bf16 products)."""
    torch.manual_seed(0)
    model = gpt2().eval()
    batch = text_batch(seqs([7, 5, 3, 6], seed=4), "right")
    with GradEngine(model, proj_dim=16, check=False) as eng:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = eng.compute(
                lambda: per_example_loss(model, batch, "causal_lm"),
                project=True,
                groups=torch.tensor([0, 1, 0, 1]),
            )
        ref = eng.compute(
            lambda: per_example_loss(model, batch, "causal_lm"),
            project=True,
            groups=torch.tensor([0, 1, 0, 1]),
        )
    assert out["proj"].dtype == torch.float32
    for key in ("sqnorm", "proj", "group_gram"):
        assert rel_rows(out[key].reshape(len(out[key]), -1), ref[key].reshape(len(ref[key]), -1)) < 0.1, key
