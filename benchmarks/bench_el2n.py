#!/usr/bin/env python3
"""Benchmark: causal-LM EL2N on a GPT-2-small-shaped model, plain baseline against the winnow scorer.

Baseline (the issue's): a plain transformers forward in bf16 (default attention implementation),
then a full fp32 softmax over (B, T, V), an explicit one-hot, and the norm.
Ours: ``winnow.scorers`` EL2N (fused, vocabulary-chunked output layer; never a (B, T, V) fp32 tensor)
with bf16 weights, SDPA attention, large batches, torch.compile of the chunk kernel and of the base
model.

Everything is measured side by side in one run: median time per batch (CUDA events) -> tokens/s,
peak GPU memory (torch.cuda.max_memory_allocated, reset before the timed iterations of each variant),
and agreement of the scores with the baseline (bf16 and fp32 paths) and with a float64 reference.

Needs only torch, transformers and this repository (put on sys.path here). Usage:

    python3 benchmarks/bench_el2n.py --out $OUT        # on the GPU machine
    python3 benchmarks/bench_el2n.py --smoke           # tiny shapes on CPU, checks the script
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch._dynamo  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402

from winnow.scorers import (  # noqa: E402
    causal_lm_hidden_states,
    causal_lm_token_el2n,
    get_scorer,
    lm_head_params,
)

T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------
# setup


def gpt2_config(smoke: bool, init_range: float) -> transformers.GPT2Config:
    if smoke:
        shape = dict(n_layer=2, n_embd=64, n_head=2, vocab_size=1000, n_positions=128)
    else:
        shape = dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    return transformers.GPT2Config(**shape, initializer_range=init_range)


def set_attn(model, impl: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:  # older transformers
        model.config._attn_implementation = impl


def baseline_el2n(model, ids: torch.Tensor) -> torch.Tensor:
    """The plain way: full logits, full fp32 softmax, explicit one-hot, norm, mean over positions."""
    logits = model(input_ids=ids).logits
    p = torch.softmax(logits[:, :-1].float(), dim=-1)
    onehot = F.one_hot(ids[:, 1:], p.shape[-1]).float()
    return (p - onehot).norm(dim=-1).mean(dim=1)


def ours_fn(scorer):
    def fn(model, ids):
        return scorer.score_batch(
            model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, "causal_lm"
        )["el2n"]

    return fn


class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def time_once(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t


def measure(timer: Timer, device, fn, batches, warmup: int, iters: int) -> dict:
    """Median seconds per batch and peak memory over the timed iterations."""
    with torch.inference_mode():
        t_first = time.perf_counter()
        fn(batches[0])
        timer.sync()
        first_s = time.perf_counter() - t_first
        for i in range(1, warmup):
            fn(batches[i % len(batches)])
        timer.sync()
        resident = peak = 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            resident = torch.cuda.memory_allocated()
        times = [timer.time_once(lambda i=i: fn(batches[i % len(batches)])) for i in range(iters)]
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated()
    times.sort()
    med = times[len(times) // 2]
    b, t = batches[0].shape
    return {
        "batch": b,
        "seq": t,
        "first_call_s": round(first_s, 2),
        "median_s": med,
        "min_s": times[0],
        "max_s": times[-1],
        "tokens_per_s": b * t / med,
        "peak_gib": peak / 2**30,
        "resident_gib": resident / 2**30,
        "peak_over_resident_gib": (peak - resident) / 2**30,
    }


def diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.double().cpu(), b.double().cpu()
    d = (a - b).abs()
    return {
        "max_abs": float(d.max()),
        "max_rel": float((d / b.abs().clamp(min=1e-30)).max()),
        "rel_l2": float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)),
        "nan": bool(torch.isnan(a).any() or torch.isnan(b).any()),
    }


def ref_token_el2n(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """float64 reference per token from full logits (N, V); 1 - p_y as the sum of the other classes,
    so that scores far below 1e-16 are resolved too."""
    z = logits.double()
    q = torch.exp(z - torch.logsumexp(z, dim=-1, keepdim=True))
    q[torch.arange(len(targets), device=q.device), targets] = 0.0
    return torch.sqrt((q * q).sum(-1) + q.sum(-1) ** 2)


# ------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (checks the script)")
    ap.add_argument(
        "--compile",
        choices=["auto", "on", "off"],
        default="auto",
        help="torch.compile variants: auto = on for CUDA only",
    )
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64, help="batch of the 'ours' variants")
    ap.add_argument("--baseline-batches", default="8,32")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument(
        "--init-range",
        type=float,
        default=0.2,
        help="weight init std; 0.2 gives peaked softmaxes so the score checks mean something",
    )
    ap.add_argument("--budget-s", type=float, default=440.0, help="skip optional variants past this time")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for bench_el2n.json")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    use_compile = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    if args.smoke:
        args.seq, args.batch, args.iters, args.warmup = 64, 8, 3, 1
        args.baseline_batches = "2,4"
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 checks stay fp32
    torch.backends.cudnn.allow_tf32 = False
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    torch.manual_seed(0)

    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "smoke": args.smoke,
        "compile": use_compile,
    }
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        env.update(sm_count=prop.multi_processor_count, gpu_mem_gib=round(prop.total_memory / 2**30, 1))
    log(f"env {env}")

    report: dict = {"env": env, "variants": {}, "checks": {}, "errors": {}}
    out_dir = Path(args.out) if args.out else None

    def save():
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            tmp = out_dir / "bench_el2n.json.tmp"
            tmp.write_text(json.dumps(report, indent=2, default=float))
            tmp.replace(out_dir / "bench_el2n.json")

    timer = Timer(device)
    cfg = gpt2_config(args.smoke, args.init_range)
    with torch.device(device):
        model32 = transformers.GPT2LMHeadModel(cfg).eval()
    report["env"]["attn_default"] = model32.config._attn_implementation  # what a plain forward gets
    set_attn(model32, "sdpa")
    model = copy.deepcopy(model32).to(torch.bfloat16).eval()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model params {n_params / 1e6:.1f}M, vocab {cfg.vocab_size}, seq {args.seq}")
    report["env"]["params_m"] = round(n_params / 1e6, 1)

    vocab = cfg.vocab_size
    g = torch.Generator(device="cpu").manual_seed(1)

    def make_batches(b: int, n: int = 3) -> list[torch.Tensor]:
        return [torch.randint(0, vocab, (b, args.seq), generator=g).to(device) for _ in range(n)]

    check_ids = torch.randint(0, vocab, (8 if not args.smoke else 4, args.seq), generator=g).to(device)
    check_scores: dict[str, torch.Tensor] = {}

    def run_variant(name: str, fn, b: int, mdl=None, optional: bool = False):
        mdl = mdl if mdl is not None else model
        if optional and time.time() - T0 > args.budget_s:
            log(f"skip {name}: past the time budget")
            report["errors"][name] = "skipped: time budget"
            return None
        log(f"variant {name} (batch {b})")
        try:
            res = measure(timer, device, lambda ids: fn(mdl, ids), make_batches(b), args.warmup, args.iters)
            with torch.inference_mode():
                check_scores[name] = fn(mdl, check_ids).float()
        except Exception as exc:  # noqa: BLE001 - report and go on with the other variants
            log(f"  FAILED: {type(exc).__name__}: {exc}")
            report["errors"][name] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return None
        report["variants"][name] = res
        log(
            f"  {res['tokens_per_s']:,.0f} tok/s, median {res['median_s'] * 1e3:.1f} ms, "
            f"peak {res['peak_gib']:.2f} GiB (first call {res['first_call_s']} s)"
        )
        save()
        return res

    # 1. baselines ---------------------------------------------------------------------------
    for b in [int(x) for x in args.baseline_batches.split(",")]:
        run_variant(f"baseline_sdpa_b{b}", baseline_el2n, b)
    model_eager_attn = copy.deepcopy(model)
    set_attn(model_eager_attn, "eager")
    b0 = int(args.baseline_batches.split(",")[0])
    run_variant(f"baseline_eagerattn_b{b0}", baseline_el2n, b0, mdl=model_eager_attn, optional=True)
    del model_eager_attn

    # 2. ours, no compile --------------------------------------------------------------------
    run_variant(
        f"ours_eager_b{args.batch}",
        ours_fn(get_scorer("el2n", vocab_chunk=8192, token_chunk=8192)),
        args.batch,
    )

    # 3. the EL2N head alone, on precomputed hidden states: chunk sizes, eager vs compiled -------
    head: dict = {}
    report["head_only"] = head
    with torch.inference_mode():
        ids = make_batches(args.batch, 1)[0]
        hidden = causal_lm_hidden_states(model, ids)
        weight, bias, scale, cap = lm_head_params(model)
    head_cfgs = [("eager", 8192, 4096), ("eager", 8192, 16384)]
    if use_compile:
        head_cfgs += [("compiled", 8192, 8192), ("compiled", 16384, 16384), ("compiled", vocab, 8192)]
    if args.smoke:
        head_cfgs = [(m, vc if vc == vocab else vc // 32, tc // 64) for m, vc, tc in head_cfgs]
    for mode, vc, tc in head_cfgs:
        key = f"{mode}_v{vc}_t{tc}"
        if time.time() - T0 > args.budget_s:
            head[key] = "skipped: time budget"
            continue
        log(f"head-only {key}")

        def head_fn(_m, ids_, vc=vc, tc=tc, mode=mode):
            return causal_lm_token_el2n(
                hidden[:, :-1],
                weight,
                bias,
                ids_[:, 1:],
                None,
                vocab_chunk=vc,
                token_chunk=tc,
                compile=mode == "compiled",
            )

        try:
            res = measure(timer, device, lambda ids_: head_fn(None, ids_), [ids], args.warmup, args.iters)
        except Exception as exc:  # noqa: BLE001
            head[key] = f"{type(exc).__name__}: {exc}"
            log(f"  FAILED {head[key]}")
            continue
        head[key] = res
        log(f"  {res['tokens_per_s']:,.0f} tok/s, peak over resident {res['peak_over_resident_gib']:.2f} GiB")
        save()
    hidden = None  # free it before the next variants
    timed = {k: v for k, v in head.items() if isinstance(v, dict) and k.startswith("compiled")}
    best = max(timed, key=lambda k: timed[k]["tokens_per_s"]) if timed else None
    if best is not None:
        _, v_s, t_s = best.split("_")
        best_vc, best_tc = int(v_s[1:]), int(t_s[1:])
    else:
        best_vc, best_tc = 8192, 8192
    report["chosen_chunks"] = {
        "vocab_chunk": best_vc,
        "token_chunk": best_tc,
        "compile_el2n": best is not None,
    }
    log(f"chosen chunks vocab {best_vc} tokens {best_tc}")

    # 4. ours with the compiled EL2N kernel, then also the compiled base model -----------------
    fast = get_scorer("el2n", vocab_chunk=best_vc, token_chunk=best_tc, compile=best is not None)
    if use_compile:
        run_variant(f"ours_compiled_el2n_b{args.batch}", ours_fn(fast), args.batch)
        base = model.get_decoder()
        base.compile()
        run_variant(f"ours_compiled_all_b{args.batch}", ours_fn(fast), args.batch)
        run_variant(f"ours_compiled_all_b{2 * args.batch}", ours_fn(fast), 2 * args.batch, optional=True)

    # 5. agreement ---------------------------------------------------------------------------
    checks = report["checks"]
    ref_name = next((k for k in check_scores if k.startswith("baseline_sdpa")), None)
    if ref_name is not None:
        for k, v in check_scores.items():
            if k != ref_name:
                checks[f"bf16 {k} vs {ref_name}"] = diff(v, check_scores[ref_name])
        s = check_scores[ref_name]
        checks["bf16 baseline score range"] = [float(s.min()), float(s.max())]
    try:
        with torch.inference_mode():
            ids4 = check_ids[:4]
            base32 = baseline_el2n(model32, ids4)
            ours32 = ours_fn(get_scorer("el2n", vocab_chunk=best_vc, token_chunk=best_tc))(model32, ids4)
            logits32 = model32(input_ids=ids4).logits[:, :-1]
            ref64 = ref_token_el2n(logits32.reshape(-1, vocab), ids4[:, 1:].reshape(-1)).view(4, -1).mean(1)
            checks["fp32 ours(eager el2n) vs baseline"] = diff(ours32, base32)
            checks["fp32 ours(eager el2n) vs float64 ref"] = diff(ours32, ref64)
            checks["fp32 baseline vs float64 ref"] = diff(base32, ref64)
            if use_compile:
                ours32c = ours_fn(fast)(model32, ids4)
                checks["fp32 ours(compiled el2n) vs float64 ref"] = diff(ours32c, ref64)
            # each bf16 path against the fp32 baseline: the bf16 model's own rounding dominates
            for k, v in check_scores.items():
                checks[f"bf16 {k} vs fp32 baseline"] = diff(v[:4], base32)
            # per token, sharpened logits (hidden x 6) and half the targets the argmax: EL2N near 0.
            # The reference takes float64 logits, so this includes fp32 matmul rounding of the logits.
            hidden32 = 6.0 * causal_lm_hidden_states(model32, ids4)[:, :-1].reshape(-1, cfg.n_embd)
            w32, b32, _, _ = lm_head_params(model32)
            flat_logits = F.linear(hidden32.double(), w32.double(), None if b32 is None else b32.double())
            tgt = ids4[:, 1:].reshape(-1).clone()
            tgt[::2] = flat_logits[::2].argmax(-1)
            ref_tok = ref_token_el2n(flat_logits, tgt)
            del flat_logits
            tok = causal_lm_token_el2n(hidden32, w32, b32, tgt, vocab_chunk=best_vc, token_chunk=best_tc)
            checks["fp32 per-token eager vs float64 ref (sharpened, half argmax)"] = diff(tok, ref_tok)
            checks["per-token ref range (sharpened)"] = [float(ref_tok.min()), float(ref_tok.max())]
            if use_compile:
                tokc = causal_lm_token_el2n(
                    hidden32, w32, b32, tgt, vocab_chunk=best_vc, token_chunk=best_tc, compile=True
                )
                checks["fp32 per-token compiled vs float64 ref (sharpened, half argmax)"] = diff(
                    tokc, ref_tok
                )
            # the kernel alone: identity output layer, so the logits are exact and any error is the
            # kernel's; targets beat the best other class by 0..80 (scores down to ~1e-35)
            kv = 4096 if not args.smoke else 64
            zl = torch.randn(2048, kv, generator=g).mul_(3).to(device)
            kt = torch.randint(0, kv, (2048,), generator=g).to(device)
            gaps = torch.linspace(0, 80, 2048, device=device)
            others = zl.scatter(1, kt[:, None], -math.inf).amax(1)
            zl.scatter_(1, kt[:, None], (others + gaps)[:, None])
            ref_k = ref_token_el2n(zl, kt)
            eye = torch.eye(kv, device=device)
            kvc = min(best_vc, kv // 3 + 1)
            k_e = causal_lm_token_el2n(zl, eye, None, kt, vocab_chunk=kvc, token_chunk=1000)
            checks["fp32 kernel eager vs float64 ref (exact logits, gaps 0..80)"] = diff(k_e, ref_k)
            checks["kernel ref range"] = [float(ref_k.min()), float(ref_k.max())]
            if use_compile:
                k_c = causal_lm_token_el2n(zl, eye, None, kt, vocab_chunk=kvc, token_chunk=1000, compile=True)
                checks["fp32 kernel compiled vs float64 ref (exact logits, gaps 0..80)"] = diff(k_c, ref_k)
    except Exception as exc:  # noqa: BLE001
        report["errors"]["checks"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    save()

    # 6. summary -----------------------------------------------------------------------------
    variants = report["variants"]
    base_best = max(
        (v["tokens_per_s"] for k, v in variants.items() if k.startswith("baseline_sdpa")), default=None
    )
    ours_best_name = max(
        (k for k in variants if k.startswith("ours")), key=lambda k: variants[k]["tokens_per_s"], default=None
    )
    summary = {}
    if base_best and ours_best_name:
        ours_best = variants[ours_best_name]["tokens_per_s"]
        summary = {
            "baseline_best_tokens_per_s": base_best,
            "ours_best": ours_best_name,
            "ours_best_tokens_per_s": ours_best,
            "speedup_vs_same_run_baseline": ours_best / base_best,
            "speedup_vs_issue_315k": ours_best / 315_000,
            "target_3x_met": ours_best / base_best >= 3.0,
        }
    report["summary"] = summary
    report["wall_s"] = round(time.time() - T0, 1)
    save()

    print()
    print(
        f"{'variant':34} {'batch':>5} {'tokens/s':>12} {'x base':>7} {'ms/batch':>9} {'peak GiB':>9} "
        f"{'peak-res':>9}"
    )
    for k, v in variants.items():
        x = v["tokens_per_s"] / base_best if base_best else float("nan")
        print(
            f"{k:34} {v['batch']:5d} {v['tokens_per_s']:12,.0f} {x:7.2f} {v['median_s'] * 1e3:9.1f} "
            f"{v['peak_gib']:9.2f} {v['peak_over_resident_gib']:9.2f}"
        )
    print("\nhead only (EL2N on precomputed hidden states):")
    for k, v in head.items():
        if isinstance(v, dict):
            print(
                f"  {k:34} {v['tokens_per_s']:12,.0f} tok/s  peak-res {v['peak_over_resident_gib']:.2f} GiB"
            )
        else:
            print(f"  {k:34} {v}")
    print("\nchecks:")
    for k, v in checks.items():
        if isinstance(v, dict):
            print(f"  {k:64} max_abs {v['max_abs']:.2e}  max_rel {v['max_rel']:.2e}  nan {v['nan']}")
        else:
            print(f"  {k:64} {v}")
    if report["errors"]:
        print("\nerrors:", json.dumps(report["errors"], indent=1))
    print("\nsummary:", json.dumps(summary, indent=1, default=float))
    print(f"wall {report['wall_s']} s")


if __name__ == "__main__":
    main()
