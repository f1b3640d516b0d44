"""Where a compiled CPU decode step of one GWQ model goes: torch.profiler's top ops.

    python benchmarks/cpu_decode_profile.py --variant gwq_w4_bf16 --module-guards keep [--tokens 33]

One variant alone in its process (as ``benchmarks/cpu_decode_compiled.py``): static cache,
``torch.compile(model.forward, fullgraph=True)``, two warm-up generations, then one profiled
greedy generation of ``--tokens`` tokens.  Prints the top-15 ops by self CPU time and the
per-token time of Dynamo's cache lookup (the per-call guard checks), which
``--module-guards skip`` (``torch.compiler.skip_guard_on_inbuilt_nn_modules_unsafe``) removes
for the model's parameters.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpu_decode  # noqa: E402  (the variants, the model build, compile and generate)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="gwq_w4_bf16", choices=list(cpu_decode.VARIANTS))
    p.add_argument("--module-guards", default="keep", choices=list(cpu_decode.GUARD_FILTERS))
    p.add_argument("--tokens", type=int, default=33)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from gwq_compile import calibration_tokens  # noqa: PLC0415
    from gwq_tools.models import load_causal_lm  # noqa: PLC0415

    fp, tokenizer = load_causal_lm()
    prompt = calibration_tokens(tokenizer, "default", 1, 32)
    model = cpu_decode.compiled(cpu_decode.build(fp, tokenizer, args.variant, {}), args.module_guards)
    for _ in range(2):
        cpu_decode.decode_tokens_per_s(model, prompt, 64)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        cpu_decode.generate_seconds(model, prompt, args.tokens)
    events = prof.key_averages()
    lookup = sum(e.self_cpu_time_total for e in events if e.key == "TorchDynamo Cache Lookup")
    print(f"{args.variant}, module guards {args.module_guards}, {args.tokens} tokens: "
          f"Dynamo cache lookup {lookup / 1e3 / args.tokens:.2f} ms a token, all profiled CPU time "
          f"{sum(e.self_cpu_time_total for e in events) / 1e3 / args.tokens:.2f} ms a token")
    print(events.table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
