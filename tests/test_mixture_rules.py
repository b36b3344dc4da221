"""DoReMi, DoGE and DGA update rules against plain step-by-step references written here, on losses and
gradients recorded from a transformers GPT-2 on real text of three domains."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from winnow.grads import GradEngine, per_example_loss
from winnow.selectors.mixture import (
    dga_update,
    doge_update,
    doremi_excess,
    doremi_token_weights,
    doremi_update,
    entropy,
    static_weights,
)

K = 3


def _real_batches(n_steps: int, per_domain: int = 2, length: int = 24, seed: int = 0):
    """Byte-level token ids of real text: stdlib code, the language reference, and a licence file."""
    import sysconfig
    from pathlib import Path
    from pydoc_data.topics import topics

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [
        (stdlib / "json" / "decoder.py").read_text(),
        " ".join(topics[k] for k in sorted(topics)[:40]),
        (stdlib / "LICENSE.txt").read_text()
        if (stdlib / "LICENSE.txt").exists()
        else (stdlib / "this.py").read_text() * 20,
    ]
    g = torch.Generator().manual_seed(seed)
    data = [torch.tensor(list(t.encode("utf-8")[:20000]), dtype=torch.long) for t in texts]
    out = []
    for _ in range(n_steps):
        ids, dom, mask = [], [], []
        for d in range(K):
            for _ in range(per_domain):
                s = int(torch.randint(0, len(data[d]) - length, (1,), generator=g))
                n = int(torch.randint(length // 2, length + 1, (1,), generator=g))
                row = torch.zeros(length, dtype=torch.long)
                row[:n] = data[d][s : s + n]
                m = torch.zeros(length, dtype=torch.long)
                m[:n] = 1
                ids.append(row)
                mask.append(m)
                dom.append(d)
        out.append((torch.stack(ids), torch.stack(mask), torch.tensor(dom)))
    return out


def _model(seed: int):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=16, n_positions=32, vocab_size=256, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def _token_losses(model, ids, mask):
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), ids[:, 1:].reshape(-1), reduction="none")
    return nll.view(ids.shape[0], -1), (mask[:, :-1] * mask[:, 1:])


def test_static_weights():
    torch.testing.assert_close(
        static_weights([1, 3], "uniform"), torch.tensor([0.5, 0.5], dtype=torch.float64)
    )
    torch.testing.assert_close(static_weights([1, 3]), torch.tensor([0.25, 0.75], dtype=torch.float64))
    t = static_weights([100, 10000], "temperature", temperature=2.0)  # sqrt of sizes: 10 : 100
    torch.testing.assert_close(t, torch.tensor([10 / 110, 100 / 110], dtype=torch.float64))
    assert abs(entropy(static_weights([5, 5, 5], "uniform")) - math.log(3)) < 1e-12
    with pytest.raises(ValueError, match="kind"):
        static_weights([1], "zipf")


def test_doremi_rule_equals_a_plain_loop():
    proxy, ref = _model(0), _model(1)
    batches = _real_batches(4)
    alpha = torch.full((K,), 1 / K, dtype=torch.float64)
    prev = None
    ref_alpha = [1 / K] * K
    ref_prev = [0.0] * K
    history, ref_history = [], []
    for step, (ids, mask, dom) in enumerate(batches):
        if step == 2:  # a batch without domain 2: its lambda is the previous one
            keep = dom != 2
            ids, mask, dom = ids[keep], mask[keep], dom[keep]
        with torch.no_grad():
            lp, m = _token_losses(proxy, ids, mask)
            lr_, _ = _token_losses(ref, ids, mask)
        lam = doremi_excess(lp, lr_, m, dom, K, prev)
        alpha = doremi_update(alpha, lam, eta=1.0, smoothing=1e-3)
        prev = lam
        history.append(alpha)
        # plain reference: loops over examples and tokens
        lam_ref = []
        for i in range(K):
            tot, cnt = 0.0, 0
            for b in range(ids.shape[0]):
                if int(dom[b]) != i:
                    continue
                for t in range(lp.shape[1]):
                    if m[b, t]:
                        tot += max(float(lp[b, t]) - float(lr_[b, t]), 0.0)
                        cnt += 1
            lam_ref.append(tot / cnt if cnt else ref_prev[i])
        ref_prev = lam_ref
        un = [ref_alpha[i] * math.exp(lam_ref[i]) for i in range(K)]
        z = sum(un)
        ref_alpha = [(1 - 1e-3) * u / z + 1e-3 / K for u in un]
        ref_history.append(ref_alpha)
        torch.testing.assert_close(lam, torch.tensor(lam_ref, dtype=torch.float64), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(
            alpha, torch.tensor(ref_alpha, dtype=torch.float64), rtol=1e-12, atol=1e-12
        )
    # the proxy objective's token weights: sum_i alpha_i * mean loss of domain i
    ids, mask, dom = batches[0]
    with torch.no_grad():
        lp, m = _token_losses(proxy, ids, mask)
    w = doremi_token_weights(alpha, m, dom)
    want = sum(float(alpha[i]) * float(lp[dom == i][m[dom == i].bool()].mean()) for i in range(K))
    assert abs(float((w * lp).sum()) - want) < 1e-10


def test_doge_rule_and_engine_group_gram_equal_the_backward_per_domain_way():
    """DoGE's public code takes one backward per domain; the engine's group Gram gives the same inner
    products from one backward, and the update equals a plain reference."""
    model = _model(2)
    ids, mask, dom = _real_batches(1, per_domain=3)[0]
    params = [p for p in model.parameters()]
    # the DoGE-code way: per domain, the gradient of the mean token loss over the domain's tokens
    grads = []
    for i in range(K):
        sel = dom == i
        lp, m = _token_losses(model, ids[sel], mask[sel])
        loss = (lp * m).sum() / m.sum()
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    G_ref = torch.stack(grads) @ torch.stack(grads).t()
    # the engine: per-example losses scaled so that the group sums are the domains' mean token gradients
    batch = {"input_ids": ids, "attention_mask": mask}
    ntok = (mask[:, :-1] * mask[:, 1:]).sum(1).double()
    tok_per_dom = torch.zeros(K, dtype=torch.float64).index_add_(0, dom, ntok)
    scale = ntok / tok_per_dom[dom]  # example b's mean-token loss times its share of its domain's tokens
    with GradEngine(model) as eng:
        out = eng.compute(
            lambda: per_example_loss(model, batch, "causal_lm") * scale,
            sqnorm=False,
            groups=dom,
            num_groups=K,
        )
    torch.testing.assert_close(out["group_gram"].double(), G_ref, rtol=1e-6, atol=1e-10)
    # the update, universal target, against a plain reference
    alpha = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    lr, mu = 3e-4, 0.05
    new, s = doge_update(alpha, G_ref, lr, mu=mu)
    norms = [math.sqrt(float(G_ref[i, i])) for i in range(K)]
    avg = sum(norms) / K
    ref_s = []
    for i in range(K):
        v = lr * sum(float(G_ref[i, j]) for j in range(K) if j != i) / (avg + 1e-6)
        ref_s.append(min(max(v, 0.0), lr * 5.0))
    un = [math.exp(math.log(float(alpha[i])) + ref_s[i] / mu) for i in range(K)]
    torch.testing.assert_close(new, torch.tensor([u / sum(un) for u in un], dtype=torch.float64))
    # out-of-domain target (domain 0's gradient as the target, domains 1, 2 training)
    dots = torch.tensor([float(grads[i] @ grads[0]) for i in range(K)])
    new2, s2 = doge_update(alpha, G_ref, lr, target_dots=dots, w_max=1e9)
    ref2 = [lr * float(dots[i]) / (avg + 1e-6) for i in range(K)]
    torch.testing.assert_close(
        s2, torch.tensor([min(max(v, 0.0), lr * 1e9) for v in ref2], dtype=torch.float64)
    )


def test_dga_rule_equals_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    alpha = torch.full((K,), 1 / K, dtype=torch.float64)
    ah = alpha.clone()
    ref_a, ref_h = [1 / K] * K, [1 / K] * K
    for _ in range(5):
        dots = torch.randn(K, generator=g, dtype=torch.float64) * 1e-3
        alpha, ah = dga_update(alpha, ah, dots, beta=0.8)
        eta = 1.0 / (sum(abs(float(d)) for d in dots) / K)
        un = [ref_h[i] * math.exp(eta * float(dots[i])) for i in range(K)]
        ref_h = [u / sum(un) for u in un]
        ref_a = [0.8 * ref_a[i] + 0.2 * ref_h[i] for i in range(K)]
        torch.testing.assert_close(alpha, torch.tensor(ref_a, dtype=torch.float64), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(ah, torch.tensor(ref_h, dtype=torch.float64), rtol=1e-12, atol=1e-14)


def test_doge_mu_auto_is_the_papers_mu_scaled_to_the_schedule():
    from winnow.pipeline.mixtures.doge import DoGEConfig, resolve_mu

    # the authors' own schedule length and lr give back about their mu = 0.05 (winnow's cosine ends at 0.1x
    # the peak, theirs at 0.2x: a few per cent apart)
    paper = resolve_mu(DoGEConfig(method="doge", steps=10_000, lr=5e-4, warmup_steps=500))
    assert 0.045 < paper < 0.05
    short = DoGEConfig(method="doge", steps=200, lr=3e-3, warmup_steps=10)
    mu = resolve_mu(short)
    # plain reference: sum of the proxy's lr_t (linear warm-up, cosine to 0.1x) over the paper's budget
    lrs = [
        3e-3 * ((t + 1) / 10 if t < 10 else 0.1 + 0.45 * (1 + math.cos(math.pi * (t - 10) / 190)))
        for t in range(200)
    ]
    budget = (
        sum(
            (
                5e-4 * (t + 1) / 500
                if t < 500
                else 1e-4 + 4e-4 * 0.5 * (1 + math.cos(math.pi * (t - 500) / 9500))
            )
            for t in range(10_000)
        )
        / 0.05
    )
    assert mu == pytest.approx(sum(lrs) / budget, rel=1e-9)
    assert resolve_mu(DoGEConfig(method="doge", steps=200, lr=1.5e-3, warmup_steps=10)) == pytest.approx(
        mu / 2
    )
    assert resolve_mu(DoGEConfig(method="doge", mu=0.05)) == 0.05
    with pytest.raises(ValueError, match="mixture.mu"):
        DoGEConfig(method="doge", mu=-1.0)
