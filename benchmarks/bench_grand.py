"""GraNd (per-example gradient norms) on a GPT-2-small-shaped model: winnow's engine against the
ways other tools do it, all in one run on one GPU.

Variants (all params, sequences of --seq tokens, random init, random tokens):
  plain_step   a plain training step (forward + backward of the batch-mean loss): the speed floor
  less_loop    batch size 1, a backward per example, norm of the flattened gradient (LESS / data-diet code)
  vmap         torch.func.vmap(grad) over chunks of 16 examples (TRAK / dattri)
  opacus       Opacus' ghost-clipping norms (GradSampleModuleFastGradientClipping), where it supports the model
  engine       winnow.grads.GradEngine: one batched backward, exact per-example norms
  *_fused_gelu plain_step and vmap again with GPT-2's gelu_new run as F.gelu(approximate="tanh"), the
               substitution the engine makes while open (so the comparison can be read both ways)

Every variant runs in fp32 weights under bf16 autocast on CUDA. Exactness: the engine's norms are
compared with vmap's on the same examples. Peak memory: torch.cuda.max_memory_allocated per variant.

    python3 benchmarks/bench_grand.py --out $OUT          # on the GPU machine
    python3 benchmarks/bench_grand.py --smoke             # tiny shapes on CPU, to check the script
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from winnow.grads import GradEngine, per_example_loss  # noqa: E402


def build(kind: str, smoke: bool, seq: int):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if kind == "gpt2":
        cfg = GPT2Config(
            n_layer=2 if smoke else 12,
            n_embd=64 if smoke else 768,
            n_head=4 if smoke else 12,
            vocab_size=500 if smoke else 50257,
            n_positions=max(seq, 64),
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        m = GPT2LMHeadModel(cfg)
    else:
        cfg = LlamaConfig(
            num_hidden_layers=2 if smoke else 12,
            hidden_size=64 if smoke else 768,
            intermediate_size=128 if smoke else 2048,
            num_attention_heads=4 if smoke else 12,
            num_key_value_heads=4 if smoke else 12,
            vocab_size=500 if smoke else 32000,
            max_position_embeddings=max(seq, 64),
            tie_word_embeddings=False,
        )
        m = LlamaForCausalLM(cfg)
    return m


def timed(fn, device, iters: int, warmup: int) -> tuple[float, float]:
    """Median seconds per call and peak GiB over the timed calls."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    times.sort()
    return times[len(times) // 2], peak


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--models", default="gpt2,llama")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    a = ap.parse_args()
    seq = 32 if a.smoke else a.seq
    device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    results: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "seq": seq,
        "batch": a.batch,
        "variants": {},
    }
    import transformers

    results["transformers"] = transformers.__version__
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    for kind in a.models.split(","):
        results["variants"][kind] = bench_one(kind, a, seq, device, amp)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "bench_grand.json").write_text(json.dumps(results, indent=2, default=str))
    print(
        json.dumps(
            results, indent=2, default=lambda x: None if isinstance(x, float) and math.isnan(x) else str(x)
        )
    )


def bench_one(kind: str, a: argparse.Namespace, seq: int, device: torch.device, amp: dict) -> dict:
    model = build(kind, a.smoke, seq).to(device)
    model.config.use_cache = False
    n_params = sum(p.numel() for p in model.parameters())
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (max(a.batch, 16), seq), generator=g).to(device)
    mask = torch.ones_like(ids)
    B = a.batch
    batch = {"input_ids": ids[:B], "attention_mask": mask[:B]}
    res: dict = {"params": n_params}
    print(f"== {kind}: {n_params / 1e6:.1f}M params, B={B}, T={seq}, {device}", flush=True)

    def plain():
        with torch.autocast(**amp):
            loss = model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    s, peak = timed(plain, device, a.iters, a.warmup)
    res["plain_step"] = {"tokens_per_s": B * seq / s, "examples_per_s": B / s, "peak_gib": peak}
    print("plain_step", res["plain_step"], flush=True)

    n_loop = 4 if a.smoke else 16

    def less_loop():
        for i in range(n_loop):
            one = {"input_ids": ids[i : i + 1], "attention_mask": mask[i : i + 1]}
            with torch.autocast(**amp):
                loss = per_example_loss(model, one, "causal_lm").sum()
            grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
            torch.stack([gr.float().pow(2).sum() for gr in grads]).sum().sqrt().item()

    s, peak = timed(less_loop, device, max(1, a.iters // 2), 1)
    res["less_loop"] = {"examples_per_s": n_loop / s, "tokens_per_s": n_loop * seq / s, "peak_gib": peak}
    print("less_loop", res["less_loop"], flush=True)

    from torch.func import functional_call, grad, vmap

    names = [n for n, p in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_one(p, x):
        with torch.autocast(**amp):
            out = functional_call(model, p, (x[None],), {"use_cache": False})
        logits = out.logits[0, :-1].float()
        return torch.nn.functional.cross_entropy(logits, x[1:])

    vg = vmap(grad(loss_one), in_dims=(None, 0))
    chunk = 16
    vmap_norms: list[torch.Tensor] = []

    def run_vmap():
        vmap_norms.clear()
        for k in range(0, B, chunk):
            gs = vg(params, ids[k : k + chunk])
            vmap_norms.append(torch.stack([gs[n].float().flatten(1).pow(2).sum(1) for n in names]).sum(0))
            del gs

    try:
        s, peak = timed(run_vmap, device, a.iters, a.warmup)
        res["vmap"] = {"examples_per_s": B / s, "tokens_per_s": B * seq / s, "peak_gib": peak, "chunk": chunk}
    except torch.OutOfMemoryError as e:
        res["vmap"] = {"error": f"out of memory: {str(e).splitlines()[0]}"}
        torch.cuda.empty_cache()
    print("vmap", res["vmap"], flush=True)

    # The same two baselines with GPT-2's gelu_new run as the identical fused F.gelu(approximate="tanh"),
    # the substitution the engine makes while it is open: how much of the engine's lead is that kernel.
    gelus = [m for m in model.modules() if type(m).__name__ == "NewGELUActivation"]
    if gelus:
        from winnow.grads.fast_paths import _tanh_gelu

        for m in gelus:
            m.forward = _tanh_gelu
        s, peak = timed(plain, device, a.iters, a.warmup)
        res["plain_step_fused_gelu"] = {
            "tokens_per_s": B * seq / s,
            "examples_per_s": B / s,
            "peak_gib": peak,
        }
        print("plain_step_fused_gelu", res["plain_step_fused_gelu"], flush=True)
        try:
            s, peak = timed(run_vmap, device, a.iters, a.warmup)
            res["vmap_fused_gelu"] = {
                "examples_per_s": B / s,
                "tokens_per_s": B * seq / s,
                "peak_gib": peak,
                "chunk": chunk,
            }
        except torch.OutOfMemoryError as e:
            res["vmap_fused_gelu"] = {"error": f"out of memory: {str(e).splitlines()[0]}"}
            torch.cuda.empty_cache()
        print("vmap_fused_gelu", res["vmap_fused_gelu"], flush=True)
        for m in gelus:
            del m.forward

    eng_out: dict = {}
    for check, fdt in ((True, "fp32"), (False, "fp32"), (False, "input")):
        eng = GradEngine(model, params="all", check=check, factor_dtype=fdt)

        for bb in [B] if a.smoke or check else [B, 2 * B, 4 * B]:
            ids_b = torch.randint(0, V, (bb, seq), generator=g).to(device) if bb != B else ids[:B]
            batch = {"input_ids": ids_b, "attention_mask": torch.ones_like(ids_b)}
            key = f"engine_b{bb}" + ("_check" if check else "") + ("_bf16factors" if fdt == "input" else "")

            def engine(eng=eng, batch=batch, key=key):
                with torch.autocast(**amp):
                    out = eng.compute(lambda: per_example_loss(model, batch, "causal_lm"), sqnorm=True)
                eng_out[key] = out["sqnorm"]

            try:
                s, peak = timed(engine, device, a.iters, a.warmup)
                res[key] = {"examples_per_s": bb / s, "tokens_per_s": bb * seq / s, "peak_gib": peak}
            except torch.OutOfMemoryError as e:
                res[key] = {"error": f"out of memory: {str(e).splitlines()[0]}"}
                torch.cuda.empty_cache()
            print(key, res[key], flush=True)
        eng.close()

    k32, k16 = f"engine_b{B}", f"engine_b{B}_bf16factors"
    if k32 in eng_out and k16 in eng_out:
        res["bf16factors_max_rel_diff_vs_fp32factors"] = (
            ((eng_out[k16].double() - eng_out[k32].double()).abs() / eng_out[k32].double().abs()).max().item()
        )
        print("bf16 factors vs fp32 factors, max rel diff:", res["bf16factors_max_rel_diff_vs_fp32factors"])
    # exactness on the same examples as vmap (fp32 engine vs fp32 vmap, no autocast)
    batch = {"input_ids": ids[:B], "attention_mask": mask[:B]}
    with GradEngine(model, params="all") as e2:
        sq = e2.compute(lambda: per_example_loss(model, batch, "causal_lm"), sqnorm=True)["sqnorm"]
    model.zero_grad(set_to_none=True)
    amp_off = dict(amp, enabled=False)
    vg32 = vmap(grad(lambda p, x: _loss_fp32(model, p, x, amp_off)), in_dims=(None, 0))
    ref = []
    for k in range(0, B, chunk):
        gs = vg32(params, ids[k : k + chunk])
        ref.append(torch.stack([gs[n].double().flatten(1).pow(2).sum(1) for n in names]).sum(0))
        del gs
    ref_t = torch.cat(ref)
    rel = ((sq.double() - ref_t).abs() / ref_t.abs()).max().item()
    res["max_rel_err_fp32_vs_vmap"] = rel
    print("max rel err (fp32, engine vs vmap):", rel, flush=True)

    # Opacus ghost clipping, where its layer support covers the model
    try:
        from opacus.grad_sample import GradSampleModuleFastGradientClipping

        gm = GradSampleModuleFastGradientClipping(
            model, batch_first=True, loss_reduction="sum", max_grad_norm=1.0, use_ghost_clipping=True
        )

        def opacus_norms():
            with torch.autocast(**amp):
                losses = per_example_loss(gm, batch, "causal_lm")
            losses.sum().backward(retain_graph=False)
            gm.get_norm_sample()
            gm.zero_grad(set_to_none=True)

        s, peak = timed(opacus_norms, device, a.iters, a.warmup)
        res["opacus"] = {"examples_per_s": B / s, "tokens_per_s": B * seq / s, "peak_gib": peak}
        gm._close()
    except Exception as e:  # unsupported layers (GPT-2's Conv1D), missing package, API drift
        res["opacus"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    print("opacus", res["opacus"], flush=True)

    base = res.get("vmap", {}).get("examples_per_s")
    best = max(
        (v["examples_per_s"] for k, v in res.items() if k.startswith("engine") and "examples_per_s" in v),
        default=float("nan"),
    )
    res["engine_vs_vmap"] = best / base if base else None
    fused = res.get("vmap_fused_gelu", {}).get("examples_per_s")
    res["engine_vs_vmap_fused_gelu"] = best / fused if fused else None
    res["engine_vs_plain_tokens"] = best * seq / res["plain_step"]["tokens_per_s"]
    print(
        f"engine/vmap = {res['engine_vs_vmap']}, engine tokens/s / plain step = "
        f"{res['engine_vs_plain_tokens']:.3f}",
        flush=True,
    )
    return res


def _loss_fp32(model, p, x, amp):
    from torch.func import functional_call

    out = functional_call(model, p, (x[None],), {"use_cache": False})
    return torch.nn.functional.cross_entropy(out.logits[0, :-1].float(), x[1:])


if __name__ == "__main__":
    main()
