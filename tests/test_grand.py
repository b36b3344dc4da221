"""The GraNd scorer against a plain per-example autograd loop, and through the pipeline."""

from __future__ import annotations

import pytest
import torch

from winnow.grads import per_example_loss
from winnow.scorers import get_scorer


def _reference_norms(model, batch, task, names=None):
    """Plain per-example loop: each example's own loss, autograd, flattened norm."""
    params = [p for n, p in model.named_parameters() if p.requires_grad and (names is None or n in names)]
    out = []
    for b in range(batch["input_ids"].shape[0] if "input_ids" in batch else batch["pixel_values"].shape[0]):
        one = {k: v[b : b + 1] for k, v in batch.items()}
        if "attention_mask" in one:  # strip this example's padding
            keep = one["attention_mask"][0].bool()
            one = {k: (v[:, keep] if k in ("input_ids", "attention_mask") else v) for k, v in one.items()}
        loss = per_example_loss(model, one, task).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        out.append(torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None)))
    return torch.stack(out)


def test_grand_matches_per_example_loop_on_gpt2_with_padding():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=101, n_layer=2, n_embd=32, n_head=4, n_positions=32))
    model.train()  # the scorer must switch to eval itself and restore this
    ids = torch.randint(0, 101, (5, 14))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[3, 11:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    s = get_scorer("grand")
    got = s.score_batch(model, batch, "causal_lm")["grand"]
    assert model.training
    model.eval()
    ref = _reference_norms(model, batch, "causal_lm")
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=0)
    assert all(p.grad is None for p in model.parameters())
    got2 = s.score_batch(model, batch, "causal_lm")["grand"]  # unchecked path after the first batch
    torch.testing.assert_close(got2, got, rtol=1e-5, atol=0)


def test_grand_on_a_subset_of_parameters_for_classification():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(1)
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=90,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=3,
            max_position_embeddings=32,
        )
    ).eval()
    ids = torch.randint(0, 90, (4, 10))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 2, 1, 2])}
    got = get_scorer("grand", parameters="classifier").score_batch(model, batch, "sequence_classification")
    ref = _reference_norms(
        model, batch, "sequence_classification", names={"classifier.weight", "classifier.bias"}
    )
    torch.testing.assert_close(got["grand"].double(), ref, rtol=1e-4, atol=0)


def test_grand_parameters_are_checked():
    with pytest.raises(ValueError, match="parameter 'parameters' must be a str"):
        get_scorer("grand", parameters=3)
    with pytest.raises(ValueError, match="unknown parameter 'params'"):
        get_scorer("grand", params="all")


@pytest.mark.parametrize("side", ["right", "left"])
def test_grand_inside_a_deferred_pass_gives_sdpa_models_a_ready_mask_and_the_same_norms(side, monkeypatch):
    """The pipeline scores inside checks.deferred: there an SDPA model gets winnow's 4-D mask (transformers'
    own mask builders, which ask the device, are refused here) and the per-example gradient norms are the
    per-example loop's, padded either side."""
    from transformers import masking_utils

    from tests.grads._harness import LENGTHS, gpt2, llama, seqs, text_batch
    from winnow.grads import checks

    def refuse(*a, **k):
        raise AssertionError("transformers built a mask from a 2-D one inside a deferred pass")

    for build in (gpt2, llama):
        model = build(0).eval()
        assert model.config._attn_implementation == "sdpa"
        batch = text_batch(seqs(LENGTHS, 1), side)
        ref = _reference_norms(model, batch, "causal_lm")
        with monkeypatch.context() as m:
            for name in ("find_packed_sequence_indices", "_ignore_causal_mask_sdpa", "sdpa_mask"):
                m.setattr(masking_utils, name, refuse)
            with checks.deferred():
                got = get_scorer("grand").score_batch(model, batch, "causal_lm")["grand"]
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-7)
