"""Where a decode step's GPU time goes: torch.profiler over a few compiled decode steps.

Builds the same Llama-2-7B-shaped random model as ``decode.py`` (fewer layers), compiles
the forward (Inductor, default mode) and prints the CUDA kernels by total device time for
each variant, so the gap between ``decode.py``'s tokens/s and ``kernels.py``'s per-layer
latencies can be attributed to kernels (extra launches, casts, the linears themselves).

    python benchmarks/decode_profile.py --layers 2 --variants fp16 gwq4 --out-dir $OUT
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode as bench  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=["fp16", "gwq4"], choices=list(bench.VARIANTS))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import StaticCache

    if not torch.cuda.is_available():
        print("skip: no CUDA GPU")
        return 0
    dargs = bench.parse_args(["--layers", str(args.layers)])
    device = torch.device("cuda")
    report = []
    for variant in args.variants:
        model, _ = bench.build_model(dargs, bench.VARIANTS[variant], device, torch.float16)
        torch._dynamo.reset()
        step = torch.compile(model.forward)
        cache = StaticCache(config=model.config, max_cache_len=64)
        token = torch.zeros(1, 1, dtype=torch.long, device=device)
        with torch.no_grad():
            for i in range(4):
                step(input_ids=token, past_key_values=cache, cache_position=torch.tensor([i], device=device), use_cache=True)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for i in range(4, 4 + args.steps):
                    step(input_ids=token, past_key_values=cache, cache_position=torch.tensor([i], device=device), use_cache=True)
                torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70)
        text = f"## {variant}: {args.layers} layers, {args.steps} decode steps (M = 1)\n\n{table}\n"
        print(text, flush=True)
        report.append(text)
        del model
        torch.cuda.empty_cache()
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "decode_profile.txt").write_text("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
