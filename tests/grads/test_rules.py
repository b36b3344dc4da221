"""One test per layer rule on the shared harness (winnow/grads/rules/): each against per-example autograd."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.grads._harness import (
    RTOL,
    DigitsCNN,
    K,
    V,
    _note,
    check_all,
    flat,
    jiggle,
    random_target,
    reference_grads,
    rel,
    rel_floored,
    rel_rows,
    text_batch,
    wide_gpt2,
)
from winnow.grads import GradEngine, per_example_loss, select_parameters

# ---------------------------------------------------------------------------------------------
# linear (the aligned head's padded rows)


def test_aligned_layer_records_padded_rows_in_every_factor_dtype(monkeypatch):
    """The aligned head's recorded output gradient keeps the padded row stride (fp32 casts too), and the
    squared norms agree with the unaligned engine in both factor precisions."""
    from winnow.grads.rules import linear

    x = torch.randn(2, 3, 70)[..., :65]
    y = linear._cast_rows(x, torch.float64)
    assert y.stride() == (210, 70, 1) and torch.equal(y, x.double())
    assert linear._cast_rows(x.contiguous(), torch.float64).is_contiguous()
    seen = []
    cast = linear._cast_rows

    def spy(g, dtype):
        out = cast(g, dtype)
        if g.shape[-1] == 4100:
            seen.append((g.stride(-2), out.stride(-2)))
        return out

    monkeypatch.setattr(linear, "_cast_rows", spy)
    widened = []
    wide = linear.Outer.wide_left

    def wide_spy(self):
        out = wide(self)
        widened.append(out.shape[-1])
        return out

    monkeypatch.setattr(linear.Outer, "wide_left", wide_spy)
    model = wide_gpt2(1).eval().bfloat16()
    ids = torch.randint(1, 4100, (3, 9))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    for fdt in ("fp32", "input"):
        for method in ("gram", "direct"):
            outs = []
            for al in (False, True):
                with GradEngine(model, align=al, factor_dtype=fdt, check=False, sqnorm_method=method) as eng:
                    outs.append(eng.compute(lambda: per_example_loss(model, batch, "causal_lm"))["sqnorm"])
            torch.testing.assert_close(outs[1], outs[0], rtol=1e-3, atol=0)
    assert seen == [(4100, 4100), (4160, 4160)] * 4
    assert widened and set(widened) == {4160}  # the aligned gram products ran over the padded width


# ---------------------------------------------------------------------------------------------
# embedding (tied with the output layer)


def test_gpt2_tied_embedding_cross_term(causal_cases):
    """wte is the input embedding and the output layer: its norm needs 2<use1, use2>, not just the parts."""
    model, examples, ref = causal_cases["gpt2"]
    assert model.lm_head.weight is model.transformer.wte.weight
    batch = text_batch(examples, "right")
    with GradEngine(model, ["transformer.wte.weight"]) as eng:
        assert eng.aliases["transformer.wte.weight"] == ["transformer.wte.weight", "lm_head.weight"]
        assert len(eng._owners["transformer.wte.weight"]) == 2
        out = eng.compute(lambda: per_example_loss(model, batch, "causal_lm"))
    want = ref["transformer.wte.weight"].flatten(1).square().sum(1)
    assert _note("gpt2 tied wte alone", rel(out["sqnorm"], want)) <= RTOL


# ---------------------------------------------------------------------------------------------
# norms


class OnePlusNorm(nn.Module):
    """A Gemma-style RMS norm with a bias: xhat * (1 + weight) + bias, computed in fp32 (jvp path)."""

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d))
        self.bias = nn.Parameter(torch.zeros(d))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xhat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (xhat * (1.0 + self.weight.float()) + self.bias).to(x.dtype)


class NormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 8, padding_idx=0)
        self.rms = nn.RMSNorm(8, eps=1e-5)
        self.ln = nn.LayerNorm(8)
        self.custom = OnePlusNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.custom(torch.tanh(self.ln(self.rms(self.emb(input_ids)))))
        return self.head(h.mean(1))


def test_norm_rules_exact():
    """torch's RMSNorm and LayerNorm (recomputed xhat) and a custom (1 + weight) norm with a bias (jvp)."""
    torch.manual_seed(0)
    model = jiggle(NormNet(), 2, scale=0.5)
    x = torch.randint(0, V, (5, 6), generator=torch.Generator().manual_seed(1))
    x[0, 2] = 0  # padding_idx inside a sequence
    y = torch.tensor([0, 1, 2, 1, 0])
    names = list(select_parameters(model, "all"))
    ref = reference_grads(
        copy.deepcopy(model).double(),
        names,
        list(zip(x, y, strict=True)),
        lambda m, ex: F.cross_entropy(m(ex[0][None]), ex[1].view(1)),
    )
    with GradEngine(model, proj_dim=K) as eng:
        out = eng.compute(
            lambda: F.cross_entropy(model(x), y, reduction="none"), per_param=True, project=True
        )
    for n in names:
        assert (
            _note(
                "norms: per-parameter sqnorm",
                rel_floored(
                    out["param_sqnorm"][n],
                    ref[n].flatten(1).square().sum(1),
                    flat(ref, names).square().sum(1),
                ),
            )
            <= RTOL
        )
    assert (
        _note("norms: projection", rel_rows(out["proj"], flat(ref, names) @ eng.projection_matrix().t()))
        <= RTOL
    )


# ---------------------------------------------------------------------------------------------
# conv2d


def test_cnn_on_digits_exact():
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x = torch.tensor(digits.images[:12], dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target[:12])
    torch.manual_seed(0)
    model = jiggle(DigitsCNN(), 0)
    model64 = copy.deepcopy(model).double()
    names = list(select_parameters(model, "all"))

    def loss_alone(m, ex):
        return F.cross_entropy(m(ex[0][None]), ex[1].view(1))

    ref = reference_grads(model64, names, list(zip(x.double(), y, strict=True)), loss_alone)
    groups = torch.arange(12) % 3
    batch = {"pixel_values": x, "labels": y}
    for method in ("auto", "gram", "direct"):
        with GradEngine(model, "all", proj_dim=K, sqnorm_method=method) as eng:
            target = random_target(eng, 7)
            out = eng.compute(
                lambda: per_example_loss(model, batch, "image_classification"),
                per_param=True,
                project=True,
                groups=groups,
                num_groups=4,
                target=target,
            )
        check_all(f"cnn digits {method}", eng, out, ref, groups, 4, target)


# ---------------------------------------------------------------------------------------------
# learned tokens and position tables


def test_vit_embeddings_token_parameters_are_exact():
    """ViT's cls_token and position_embeddings (TokenParamsRule) plus its patch Conv2d, on real digits."""
    from sklearn.datasets import load_digits
    from transformers import ViTConfig, ViTForImageClassification

    x, y = load_digits(return_X_y=True)
    torch.manual_seed(0)
    model = ViTForImageClassification(
        ViTConfig(
            image_size=8,
            patch_size=2,
            num_channels=1,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            num_labels=10,
        )
    ).eval()
    px = torch.tensor(x[:5], dtype=torch.float32).reshape(5, 1, 8, 8) / 16
    batch = {"pixel_values": px, "labels": torch.tensor(y[:5])}
    with GradEngine(model, check=True) as eng:
        got = eng.compute(lambda: per_example_loss(model, batch, "image_classification"), per_param=True)
    params = dict(model.named_parameters())
    for b in range(5):
        one = {k: v[b : b + 1] for k, v in batch.items()}
        grads = torch.autograd.grad(
            per_example_loss(model, one, "image_classification").sum(), list(params.values())
        )
        for (name, _), gr in zip(params.items(), grads, strict=True):
            want = gr.double().pow(2).sum()
            torch.testing.assert_close(got["param_sqnorm"][name][b].double(), want, rtol=1e-4, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# refused modules


class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.alpha


class ScaledLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2.0


def test_unsupported_modules_are_refused():
    model = nn.Sequential(nn.Linear(4, 4), Scale())
    with pytest.raises(ValueError, match=r"module '1' \(Scale\).*'1.alpha'.*no per-example gradient rule"):
        GradEngine(model)
    GradEngine(model, ["0"]).close()  # leaving it out is fine
    with pytest.raises(ValueError, match=r"\(ScaledLinear\)"):
        GradEngine(nn.Sequential(ScaledLinear(4, 4)))
    with pytest.raises(ValueError, match=r"\(MultiheadAttention\)"):
        GradEngine(nn.MultiheadAttention(4, 2))
    with pytest.raises(ValueError, match="scale_grad_by_freq"):
        GradEngine(nn.Embedding(5, 3, scale_grad_by_freq=True))
    with pytest.raises(ValueError, match="groups=2"):
        GradEngine(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="BatchNorm2d"):
        GradEngine(nn.BatchNorm2d(3))
