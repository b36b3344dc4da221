"""Per-example gradient engine against a plain reference: for each example alone (unpadded, a batch of
one), ``torch.autograd.grad`` of its own loss in a float64 copy of the model, flattened. The engine runs
on the float32 model, on padded batches (left and right), in one forward and one backward."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from winnow.scorers.grad_engine import GradEngine, per_example_loss, projection_factors, select_parameters
from winnow.scorers.grad_rules import Outer

transformers = pytest.importorskip("transformers")

V = 61  # vocabulary of the tiny language models
PAD = V - 1
K = 64  # projection dimension (8 x 8)
RTOL = 1e-4  # the exactness bar
FLOOR = 1e-10  # per-example values below this fraction of the example's whole squared norm: compared to it
ERRORS: dict[str, float] = {}  # largest relative error seen per check (printed with -s)


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    print("\nmax relative errors (engine fp32 vs per-example autograd fp64):")
    for key, val in sorted(ERRORS.items()):
        print(f"  {key:60s} {val:.2e}")


def _note(key: str, err: float) -> float:
    ERRORS[key] = max(ERRORS.get(key, 0.0), err)
    return err


# ---------------------------------------------------------------------------------------------
# reference


def reference_grads(model: nn.Module, names: list[str], examples: list, loss_of) -> dict[str, torch.Tensor]:
    """{name: (B, *shape)}: per example, autograd.grad of that example's loss alone (float64 model)."""
    params = dict(model.named_parameters())
    plist = [params[n] for n in names]
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for ex in examples:
        loss = loss_of(model, ex)
        grads = torch.autograd.grad(loss, plist, allow_unused=True)
        for n, p, g in zip(names, plist, grads, strict=True):
            out[n].append(torch.zeros_like(p) if g is None else g.detach())
    return {n: torch.stack(v) for n, v in out.items()}


def flat(ref: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([ref[n].flatten(1) for n in names], dim=1)


def causal_loss_alone(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids[None]).logits[0]
    if ids.numel() < 2:
        return logits.sum() * 0.0
    return F.cross_entropy(logits[:-1], ids[1:])


def cls_loss_alone(model: nn.Module, ex) -> torch.Tensor:
    ids, label = ex
    logits = model(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None]).logits
    return F.cross_entropy(logits, label.view(1))


def text_batch(seqs: list[torch.Tensor], side: str) -> dict[str, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), PAD, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        ids[i, sl] = s
        mask[i, sl] = 1
    return {"input_ids": ids, "attention_mask": mask}


def jiggle(model: nn.Module, seed: int, scale: float = 0.2) -> nn.Module:
    """Perturb every parameter (norm weights away from 1, biases away from 0) so no rule is trivially right."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest relative error of the values a vs b (positive), elementwise; a zero b needs a tiny a."""
    a, b = a.double(), b.double()
    assert a.shape == b.shape
    zero = b == 0
    if zero.any():
        assert float(a[zero].abs().max()) < 1e-12
    if (~zero).any():
        return float(((a - b).abs()[~zero] / b[~zero].abs()).max())
    return 0.0


def rel_floored(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, floor: float = FLOOR) -> float:
    """Largest |a_i - b_i| / max(|b_i|, floor * scale_i): the relative error of each example's value, with
    values far below that example's own scale (its whole gradient's squared norm) compared against the
    scale instead. A part of one example's gradient can be ~1e-32 in float64 where fp32 rounding leaves
    ~1e-14 (a saturated attention softmax): right to fp32 precision, but 'wrong' by 1e18 elementwise."""
    a, b, scale = a.double(), b.double(), scale.double()
    assert a.shape == b.shape == scale.shape
    den = torch.maximum(b.abs(), floor * scale.abs())
    zero = den == 0
    if zero.any():
        assert float(a[zero].abs().max()) < 1e-12
    return float(((a - b).abs()[~zero] / den[~zero]).max()) if (~zero).any() else 0.0


def rel_rows(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest ||a_i - b_i|| / ||b_i|| over rows (vectors compared as a whole)."""
    a, b = a.double().reshape(a.shape[0], -1), b.double().reshape(b.shape[0], -1)
    nb = b.norm(dim=1)
    err = (a - b).norm(dim=1)
    if (nb == 0).any():
        assert float(err[nb == 0].max()) < 1e-12
    return float((err[nb > 0] / nb[nb > 0]).max()) if (nb > 0).any() else 0.0


def check_all(case: str, eng: GradEngine, out: dict, ref: dict[str, torch.Tensor], groups, C, target) -> None:
    """Every quantity the engine returned against the reference gradients."""
    names = eng.param_names
    G = flat(ref, names)
    # per-parameter and total squared norms
    for n in names:
        want = ref[n].flatten(1).square().sum(1)
        got = out["param_sqnorm"][n]
        if float(want.max()) < 1e-20 * float(G.square().sum(1).max()):
            # a gradient that is exactly 0 in exact arithmetic (BERT's key biases: softmax ignores a
            # constant added to every score) is rounding noise in fp32; it must stay negligible
            assert float(got.max()) < 1e-12 * float(G.square().sum(1).max()), n
            continue
        # per example: relative to the value, floored at FLOOR x that example's whole squared norm
        assert _note(f"{case}: per-parameter sqnorm", rel_floored(got, want, G.square().sum(1))) <= RTOL, n
    assert _note(f"{case}: total sqnorm", rel(out["sqnorm"], G.square().sum(1))) <= RTOL
    # projection: dense P times the materialised per-example gradient
    P = eng.projection_matrix()
    assert P.shape == (K, G.shape[1])
    assert _note(f"{case}: projection", rel_rows(out["proj"], G @ P.t())) <= RTOL
    # group sums
    onehot = F.one_hot(groups, C).double()
    S = onehot.t() @ G
    gram = S @ S.t()
    err = float((out["group_gram"].double() - gram).norm() / gram.norm())
    assert _note(f"{case}: group Gram", err) <= RTOL
    tflat = torch.cat([target[n].double().flatten() for n in names])
    dot = S @ tflat
    assert (
        _note(f"{case}: group . target", float((out["group_dot"].double() - dot).norm() / dot.norm())) <= RTOL
    )
    assert float(out["group_gram"][C - 1].abs().max()) == 0.0  # the empty group


def random_target(eng: GradEngine, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g) for n, p in eng.params.items()}


# ---------------------------------------------------------------------------------------------
# models


def gpt2(seed: int = 0):
    cfg = transformers.GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=16,
        n_positions=32,
        vocab_size=V,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=PAD,
    )
    torch.manual_seed(seed)
    return jiggle(transformers.GPT2LMHeadModel(cfg), seed)


def wide_gpt2(seed: int = 0):
    """A 1-layer GPT-2 with a tied 4100-word head: at least 4096 wide and not a multiple of 64, so the
    engine's aligned (zero-padded) output layer applies."""
    cfg = transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=8, n_positions=16, vocab_size=4100, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg)


def llama(seed: int = 0):
    cfg = transformers.LlamaConfig(
        num_hidden_layers=2,
        hidden_size=16,
        intermediate_size=24,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=V,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=PAD,
    )
    torch.manual_seed(seed)
    return jiggle(transformers.LlamaForCausalLM(cfg), seed)


def bert(seed: int = 0):
    cfg = transformers.BertConfig(
        num_hidden_layers=2,
        hidden_size=16,
        intermediate_size=24,
        num_attention_heads=2,
        vocab_size=V,
        max_position_embeddings=32,
        num_labels=3,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return jiggle(transformers.BertForSequenceClassification(cfg), seed)


class DigitsCNN(nn.Module):
    """Conv2d (zero 'same' padding, reflect padding, stride 2) + LayerNorm + Linear, on 8x8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding="same")
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode="reflect")
        self.norm = nn.LayerNorm(6 * 4 * 4)
        self.fc = nn.Linear(6 * 4 * 4, 10)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv1(pixel_values))
        h = torch.tanh(self.conv2(h))
        return self.fc(self.norm(h.flatten(1)))


def seqs(lengths: list[int], seed: int, low: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(low, PAD, (n,), generator=g) for n in lengths]


# ---------------------------------------------------------------------------------------------
# exactness on the three transformers models and the CNN


LENGTHS = [9, 4, 1, 7, 2, 6]  # one example with a single token: no next-token position, zero gradient
GROUPS = torch.tensor([0, 2, 0, 1, 2, 0])
C = 4  # group 3 is empty


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
# parameter selection


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


class LoraLinear(nn.Module):
    def __init__(self, d_in: int, d_out: int, r: int = 2) -> None:
        super().__init__()
        self.base = nn.Linear(d_in, d_out)
        self.lora_A = nn.Linear(d_in, r, bias=False)
        self.lora_B = nn.Linear(r, d_out, bias=False)
        self.base.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x))


class LoraNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 8)
        self.blocks = nn.ModuleList([LoraLinear(8, 8), LoraLinear(8, 8)])
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids)
        for blk in self.blocks:
            h = torch.tanh(blk(h))
        return self.head(h.mean(1))


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
# refusals


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
# projections: reproducible, unbiased


def test_projection_is_reproducible_across_processes():
    mine = projection_factors("transformer.h.0.attn.c_attn.weight", (16, 48), 64, seed=7)
    code = (
        "import torch; from winnow.scorers.grad_engine import projection_factors as f; "
        "a, b = f('transformer.h.0.attn.c_attn.weight', (16, 48), 64, seed=7); "
        "print(float((a * torch.arange(a.numel()).view_as(a)).sum()), float((b * b.cumsum(1)).sum()))"
    )
    got = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert [float(v) for v in got] == [
        float((mine[0] * torch.arange(mine[0].numel()).view_as(mine[0])).sum()),
        float((mine[1] * mine[1].cumsum(1)).sum()),
    ]
    other = projection_factors("transformer.h.0.attn.c_attn.weight", (16, 48), 64, seed=8)
    assert not torch.equal(mine[0], other[0])


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_projection_is_unbiased(kind):
    """E[P^T P] = I: the mean of ||P x||^2 and <P x, P y> over seeds approach ||x||^2 and <x, y>."""
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5))
    g = torch.Generator().manual_seed(0)
    D = sum(p.numel() for p in model.parameters())
    x, y = torch.randn(D, generator=g, dtype=torch.float64), torch.randn(D, generator=g, dtype=torch.float64)
    acc = torch.zeros(D, D, dtype=torch.float64)
    seeds = 400
    for s in range(seeds):
        eng = GradEngine(model, proj_dim=16, proj_seed=s, proj_kind=kind)
        P = eng.projection_matrix()
        eng.close()
        acc += P.t() @ P
    acc /= seeds
    # an entry of P^T P has variance 1/16 per seed (Rademacher; Gaussian products: up to 8/16 on the
    # diagonal), so the mean over 400 seeds has sd <= 0.035: 0.2 is over 5 sd
    assert float((acc - torch.eye(D, dtype=torch.float64)).abs().max()) < 0.2
    assert abs(float(x @ acc @ x) / float(x @ x) - 1) < 0.05
    assert abs(float(x @ acc @ y) - float(x @ y)) < 0.05 * float(x.norm() * y.norm())


# ---------------------------------------------------------------------------------------------
# the loss helper and lower precision


def test_per_example_loss_matches_the_models_own_loss():
    model = gpt2()
    examples = seqs([7, 3, 5], seed=4)
    for side in ("right", "left"):
        batch = text_batch(examples, side)
        with torch.no_grad():
            got = per_example_loss(model, batch, "causal_lm")
            want = torch.stack([model(input_ids=s[None], labels=s[None]).loss for s in examples])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


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


def test_outer_factor_kinds():
    """One-hot and dense left factors give the same Gram whichever side is one-hot."""
    from winnow.scorers.grad_engine import _left_gram

    ids = torch.tensor([[1, 3, 1]])
    dense = torch.randn(1, 2, 5, dtype=torch.float64)
    oh = F.one_hot(ids, 5).double()
    a = Outer(ids, torch.zeros(1, 3, 1, dtype=torch.float64))
    b = Outer(dense, torch.zeros(1, 2, 1, dtype=torch.float64))
    torch.testing.assert_close(_left_gram(a, b), oh @ dense.transpose(1, 2))
    torch.testing.assert_close(_left_gram(b, a), dense @ oh.transpose(1, 2))
    torch.testing.assert_close(_left_gram(a, a), oh @ oh.transpose(1, 2))


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


def test_token_nll_equals_cross_entropy_with_its_gradient():
    """The chunked next-token NLL the engine's causal-LM loss uses, against F.cross_entropy (float64)."""
    from winnow.scorers.grad_engine import token_nll

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 6, 11, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(0, 11, (5, 5), generator=g)
    ref = F.cross_entropy(x[:, :-1].reshape(-1, 11), y.reshape(-1), reduction="none").view(5, 5)
    for chunk in (1, 55, 10_000):  # one example per chunk (rows rounded up), two, all
        torch.testing.assert_close(token_nll(x, y, chunk_elements=chunk), ref, rtol=0, atol=1e-12)
    w = torch.randn(5, 5, dtype=torch.float64, generator=g)
    (gx,) = torch.autograd.grad((token_nll(x, y, chunk_elements=55) * w).sum(), x)
    (rx,) = torch.autograd.grad((ref * w).sum(), x)
    torch.testing.assert_close(gx, rx, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: token_nll(t, y, chunk_elements=55), (x,))
    xb = x.detach().bfloat16().requires_grad_()  # low precision logits: fp32 math, gradient in bf16
    out = token_nll(xb, y)
    assert out.dtype == torch.float32
    torch.testing.assert_close(
        out,
        F.cross_entropy(xb[:, :-1].float().reshape(-1, 11), y.reshape(-1), reduction="none").view(5, 5),
        rtol=1e-6,
        atol=1e-6,
    )
    (gb,) = torch.autograd.grad(out.sum(), xb)
    assert gb.dtype == torch.bfloat16 and bool((gb[:, -1] == 0).all())
    with pytest.raises(ValueError, match="targets must have shape"):
        token_nll(x, y[:, :-1])


def test_aligned_wide_output_layer_is_exact_and_restored():
    """A tied GPT-2 head of 4100 classes (not a multiple of 64) computed through the zero-padded weight
    (align=True forces it on the CPU) gives the plain per-example gradients; close() restores forward."""
    model = jiggle(wide_gpt2(0), 0).double().eval()
    examples = [torch.randint(1, 4100, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 3, 5)]
    names = list(select_parameters(model, "all"))
    ref = flat(reference_grads(model, names, examples, causal_loss_alone), names)
    batch = text_batch(examples, "right")
    for method in ("gram", "direct"):  # gram: the head's Gram over the zero-padded width
        with GradEngine(model, align=True, proj_dim=16, sqnorm_method=method) as eng:
            assert [m for m in eng._patched if isinstance(m, nn.Linear)] == [model.lm_head]
            out = eng.compute(lambda: per_example_loss(model, batch, "causal_lm"), project=True)
            logits = model(input_ids=batch["input_ids"]).logits
            assert logits.shape[-1] == 4100 and logits.stride(-2) == 4160  # the padded product's view
        assert "forward" not in model.lm_head.__dict__
        assert rel(out["sqnorm"].double(), ref.square().sum(1)) < 1e-5
        P = eng.projection_matrix()
        assert rel(out["proj"].double(), ref @ P.t()) < 1e-5
    with GradEngine(model, align="auto") as eng:
        assert model.lm_head in eng._patched  # patched, but plain F.linear on CPU
    with pytest.raises(ValueError, match="align must be"):
        GradEngine(model, align="always")


def test_aligned_layer_records_padded_rows_in_every_factor_dtype(monkeypatch):
    """The aligned head's recorded output gradient keeps the padded row stride (fp32 casts too), and the
    squared norms agree with the unaligned engine in both factor precisions."""
    from winnow.scorers import grad_rules

    x = torch.randn(2, 3, 70)[..., :65]
    y = grad_rules._cast_rows(x, torch.float64)
    assert y.stride() == (210, 70, 1) and torch.equal(y, x.double())
    assert grad_rules._cast_rows(x.contiguous(), torch.float64).is_contiguous()
    seen = []
    cast = grad_rules._cast_rows

    def spy(g, dtype):
        out = cast(g, dtype)
        if g.shape[-1] == 4100:
            seen.append((g.stride(-2), out.stride(-2)))
        return out

    monkeypatch.setattr(grad_rules, "_cast_rows", spy)
    widened = []
    wide = grad_rules.Outer.wide_left

    def wide_spy(self):
        out = wide(self)
        widened.append(out.shape[-1])
        return out

    monkeypatch.setattr(grad_rules.Outer, "wide_left", wide_spy)
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


def test_fused_gelu_equals_the_models_own_and_is_restored():
    """GPT-2's gelu_new runs as F.gelu(approximate='tanh') while the engine is open: the same function."""
    from winnow.scorers.grad_engine import _tanh_gelu

    act = transformers.activations.NewGELUActivation()
    x = torch.linspace(-8, 8, 2001, dtype=torch.float64)
    torch.testing.assert_close(_tanh_gelu(x), act(x), rtol=0, atol=1e-14)
    model = gpt2().double().eval()
    acts = [m for m in model.modules() if isinstance(m, transformers.activations.NewGELUActivation)]
    assert acts
    batch = text_batch(seqs([7, 5, 3], seed=2), "right")
    outs = []
    for fuse in (False, True):
        with GradEngine(model, fuse_activations=fuse, proj_dim=16) as eng:
            assert all(("forward" in m.__dict__) == fuse for m in acts)
            outs.append(eng.compute(lambda: per_example_loss(model, batch, "causal_lm"), project=True))
        assert not any("forward" in m.__dict__ for m in acts)
    for key in ("loss", "sqnorm", "proj"):
        torch.testing.assert_close(outs[1][key], outs[0][key], rtol=1e-10, atol=1e-12)


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


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_grad_coeffs_give_the_weighted_batch_gradient(arch):
    """compute(grad_coeffs=f) adds sum_b c_b grad_b to .grad, with c chosen from this step's group Gram:
    equal to autograd's gradient of sum_b c_b loss_b (float64), in one backward."""
    model = (gpt2 if arch == "gpt2" else llama)().double()
    examples = seqs([9, 4, 7, 2, 6, 5], seed=8)
    batch = text_batch(examples, "right")
    groups = torch.tensor([0, 1, 0, 2, 1, 2])
    seen = {}

    def coeffs(out):  # e.g. DoGE: weights from the group Gram of this very step
        gram = out["group_gram"].double()
        w = torch.softmax(gram.sum(1) / gram.diagonal().sum(), 0)
        seen["w"] = w
        return w[groups]

    model.zero_grad(set_to_none=True)
    with GradEngine(model, check=False) as eng:
        eng.compute(
            lambda: per_example_loss(model, batch, "causal_lm"),
            sqnorm=False,
            groups=groups,
            grad_coeffs=coeffs,
        )
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    c = seen["w"][groups]
    (per_example_loss(model, batch, "causal_lm") * c).sum().backward()
    for n, p in model.named_parameters():
        # relative to the largest entry: Llama computes its rotary embedding in fp32 even in a float64 model
        assert float((got[n] - p.grad).abs().max()) <= 1e-6 * float(p.grad.abs().max()) + 1e-15, n
    with pytest.raises(ValueError, match="grad_coeffs must return"):
        with GradEngine(model) as eng:
            eng.compute(
                lambda: per_example_loss(model, batch, "causal_lm"), grad_coeffs=lambda out: torch.ones(2)
            )


def test_fast_paths_give_the_same_losses_and_gradients_and_restore():
    from winnow.scorers.grad_engine import fast_paths

    model = wide_gpt2(0).double().eval()
    ids = torch.randint(1, 4100, (3, 9))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    outs = []
    for fast in (False, True):
        model.zero_grad(set_to_none=True)
        if fast:
            with fast_paths(model, align=True) as fp:
                assert len(fp.patched) == 2  # the head and the one block's gelu_new
                loss = per_example_loss(model, batch, "causal_lm").sum()
                loss.backward()
        else:
            loss = per_example_loss(model, batch, "causal_lm").sum()
            loss.backward()
        outs.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert not any("forward" in m.__dict__ for m in model.modules())
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-12, atol=1e-12)
    for n in outs[0][1]:
        torch.testing.assert_close(outs[1][1][n], outs[0][1][n], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize(
    "order,wide",
    [("sorted", False), ("shuffled", False), ("sorted", True), ("equal", False), ("equal", True)],
)
def test_group_coeffs_give_the_group_weighted_gradient(order, wide, monkeypatch):
    """compute(group_coeffs=f) adds sum_c a_c S_c to .grad from the kept group sums, with a chosen from this
    step's Gram: equal (float64) to autograd's gradient of sum_b a_{group(b)} loss_b, and its Gram equals
    the per-example path's, whether or not the batch is ordered by group; ``wide``: a tied 4100-word head
    that the engine aligns (padded output gradient, group sums over the padded rows)."""
    model = wide_gpt2(3).double().eval() if wide else gpt2().double()
    examples = seqs([9, 4, 7, 2, 6, 5, 8], seed=9)
    batch = text_batch(examples, "right")
    groups = torch.tensor(
        {"sorted": [0, 0, 1, 1, 1, 3, 3], "shuffled": [1, 0, 3, 1, 0, 3, 1], "equal": [0, 0, 0, 1, 1, 1, 2]}[
            order
        ]
    )
    C = 4  # group 2 is empty ("equal": every group present with as many examples: one batched product)
    if order == "equal":
        examples, groups, C = examples[:6], torch.tensor([0, 0, 1, 1, 2, 2]), 3
        batch = text_batch(examples, "right")
    seen = {}
    from winnow.scorers import grad_engine as ge

    dims, mm = [], ge._mm_acc
    monkeypatch.setattr(ge, "_mm_acc", lambda a, b, acc: dims.append(a.dim()) or mm(a, b, acc))

    def coeffs(out):
        gram = out["group_gram"].double()
        a = torch.softmax(gram.sum(1) / gram.diagonal().sum(), 0)
        seen["a"], seen["gram"] = a, gram
        return a

    model.zero_grad(set_to_none=True)
    with GradEngine(model, check=False, align=True) as eng:
        out = eng.compute(
            lambda: per_example_loss(model, batch, "causal_lm"),
            sqnorm=False,
            groups=groups,
            num_groups=C,
            group_coeffs=coeffs,
        )
        ref_gram = eng.compute(
            lambda: per_example_loss(model, batch, "causal_lm"), sqnorm=False, groups=groups, num_groups=C
        )["group_gram"].double()
    torch.testing.assert_close(seen["gram"], ref_gram, rtol=1e-10, atol=1e-14)
    assert set(dims) == ({3} if order == "equal" else {2})  # batched products exactly when groups are equal
    torch.testing.assert_close(out["group_coeffs"].double(), seen["a"], rtol=1e-6, atol=0)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    (per_example_loss(model, batch, "causal_lm") * seen["a"][groups]).sum().backward()
    for n, p in model.named_parameters():
        assert float((got[n] - p.grad).abs().max()) <= 1e-9 * float(p.grad.abs().max()) + 1e-15, n
    with GradEngine(model) as eng:
        with pytest.raises(ValueError, match="group_coeffs must return"):
            eng.compute(
                lambda: per_example_loss(model, batch, "causal_lm"),
                groups=groups,
                group_coeffs=lambda out: torch.ones(7),
            )
        with pytest.raises(ValueError, match="needs groups"):
            eng.compute(
                lambda: per_example_loss(model, batch, "causal_lm"), group_coeffs=lambda out: torch.ones(2)
            )


def test_group_sums_in_bf16_factors_stay_close_to_fp32():
    """factor_dtype='input' under bf16 autocast: the group Gram from bf16 factors (fp32 accumulation) is
    within bf16 rounding of the fp32-factor Gram; the gradient from group_coeffs likewise."""
    torch.manual_seed(0)
    model = gpt2().eval()
    batch = text_batch(seqs([7, 5, 3, 6, 8, 4], seed=5), "right")
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    res = {}
    for fd in ("fp32", "input"):
        model.zero_grad(set_to_none=True)
        with (
            GradEngine(model, check=False, factor_dtype=fd) as eng,
            torch.autocast("cpu", dtype=torch.bfloat16),
        ):
            out = eng.compute(
                lambda: per_example_loss(model, batch, "causal_lm"),
                sqnorm=False,
                groups=groups,
                group_coeffs=lambda out: torch.tensor([0.5, 0.3, 0.2]),
            )
        res[fd] = (
            out["group_gram"].double(),
            torch.cat([p.grad.flatten() for p in model.parameters()]).double(),
        )
    g32, g16 = res["fp32"][0], res["input"][0]
    assert float((g16 - g32).norm() / g32.norm()) < 0.02
    d32, d16 = res["fp32"][1], res["input"][1]
    assert float((d16 - d32).norm() / d32.norm()) < 0.02
