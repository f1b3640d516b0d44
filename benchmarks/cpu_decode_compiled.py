"""Compiled CPU decode of one GWQ variant alone in its process, against FP32 eager in the same process.

    python benchmarks/cpu_decode_compiled.py --variant gwq_w4_head4 --module-guards keep [--rounds 5]

Why a separate script: ``benchmarks/cpu_decode.py --compile`` compiles every variant's
``model.forward`` in one process.  They share one code object, so every compiled call walks
the other variants' cache entries (each checking the guards of ~300 parameters) before it
finds its own, and ``--module-guards skip`` entries can even match another copy's entry.  A
user compiles one model; this measures that: one variant, static cache,
``torch.compile(model.forward, fullgraph=True)`` (``skip``: with
``options={"guard_filter_fn": torch.compiler.skip_guard_on_inbuilt_nn_modules_unsafe}``),
two warm-up generations, then ``--rounds`` rounds of FP32 eager and compiled decode,
interleaved.  Prints one JSON line (append it to a results file).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpu_decode  # noqa: E402  (the variants, the model build and the decode timing)
from cpu_kernels import cpu_name  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="gwq_w4_head4", choices=list(cpu_decode.VARIANTS))
    p.add_argument("--module-guards", default="keep", choices=list(cpu_decode.GUARD_FILTERS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from gwq_compile import calibration_tokens  # noqa: PLC0415
    from gwq_tools.models import load_causal_lm  # noqa: PLC0415

    fp, tokenizer = load_causal_lm()
    prompt = calibration_tokens(tokenizer, "default", 1, 32)
    fp32 = copy.deepcopy(fp).eval()
    model = cpu_decode.build(fp, tokenizer, args.variant, {})
    start = time.perf_counter()
    model = cpu_decode.compiled(model, args.module_guards)
    for _ in range(2):
        cpu_decode.decode_tokens_per_s(model, prompt, args.new_tokens)
    compile_s = time.perf_counter() - start
    eager, comp = [], []
    for _ in range(args.rounds):
        eager.append(cpu_decode.decode_tokens_per_s(fp32, prompt, args.new_tokens))
        comp.append(cpu_decode.decode_tokens_per_s(model, prompt, args.new_tokens))
    print(json.dumps({
        "variant": args.variant, "module_guards": args.module_guards, "fp32_eager_tok_s": round(statistics.median(eager), 2),
        "compiled_tok_s": round(statistics.median(comp), 2), "compiled_vs_fp32_eager": round(statistics.median(comp) / statistics.median(eager), 2),
        "rounds_compiled": [round(v, 1) for v in comp], "rounds_fp32": [round(v, 1) for v in eager], "compile_s": round(compile_s),
        "machine": f"{cpu_name()}, torch {torch.__version__}, {args.threads} threads", "date": time.strftime("%Y-%m-%dT%H:%M"),
    }), flush=True)


if __name__ == "__main__":
    main()
