"""The shared harness of the gradient engine's tests: a plain reference (for each example alone, unpadded,
a batch of one, ``torch.autograd.grad`` of its own loss in a float64 copy of the model, flattened), the
relative errors the tests compare with, and the tiny models (GPT-2, Llama, BERT, a digits CNN, a LoRA
net) they run on. The engine runs on the float32 model, on padded batches (left and right), in one
forward and one backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from winnow.grads import GradEngine

transformers = pytest.importorskip("transformers")

V = 61  # vocabulary of the tiny language models

PAD = V - 1

K = 64  # projection dimension (8 x 8)

RTOL = 1e-4  # the exactness bar

FLOOR = 1e-10  # per-example values below this fraction of the example's whole squared norm: compared to it

ERRORS: dict[str, float] = {}  # largest relative error seen per check (printed with -s)


def _note(key: str, err: float) -> float:
    ERRORS[key] = max(ERRORS.get(key, 0.0), err)
    return err


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


LENGTHS = [9, 4, 1, 7, 2, 6]  # one example with a single token: no next-token position, zero gradient

GROUPS = torch.tensor([0, 2, 0, 1, 2, 0])

C = 4  # group 3 is empty


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
