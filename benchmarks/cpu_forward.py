"""CPU forward latency of SmolLM2-135M: FP32 eager vs GWQ (reference CPU path), side by side.

    python benchmarks/cpu_forward.py [--bits 4] [--group-size 128] [--seqs 1 32 512] [--repeats 3]

Writes benchmarks/results/cpu_forward_smollm2.md with the command, machine and date.
Weights are quantized with a random 1% outlier mask (no calibration: speed does not depend
on which weights are outliers, only on how many).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from gwq_compile import GWQTensor, quantization_report
from gwq_tools.models import load_causal_lm

RESULTS = Path(__file__).resolve().parent / "results" / "cpu_forward_smollm2.md"


def quantize_random_outliers(model: torch.nn.Module, bits: int, group_size: int, ratio: float) -> None:
    gen = torch.Generator().manual_seed(0)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod is not model.get_output_embeddings():
            w = mod.weight.detach()
            mask = torch.rand(w.shape, generator=gen) < ratio
            mod.weight = torch.nn.Parameter(GWQTensor.from_float(w, mask, bits, group_size), requires_grad=False)


@torch.no_grad()
def latency(model: torch.nn.Module, seq: int, repeats: int) -> float:
    ids = torch.randint(0, 1000, (1, seq), generator=torch.Generator().manual_seed(seq))
    model(ids)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model(ids)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--seqs", type=int, nargs="+", default=[1, 32, 512])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    fp, _ = load_causal_lm()
    q = copy.deepcopy(fp)
    quantize_random_outliers(q, args.bits, args.group_size, 0.01)
    bpw = quantization_report(q)["bits_per_weight"]
    rows = []
    for seq in args.seqs:
        t_fp, t_q = latency(fp, seq, args.repeats), latency(q, seq, args.repeats)
        rows.append((seq, t_fp, t_q))
        print(f"seq {seq:5d}: FP32 {t_fp * 1e3:9.1f} ms  GWQ {t_q * 1e3:9.1f} ms  ratio {t_q / t_fp:5.2f}x", flush=True)
    lines = [
        "# CPU forward latency, SmolLM2-135M: FP32 eager vs GWQ reference path",
        "",
        f"- Command: `python {' '.join(sys.argv)}`",
        f"- Machine: {platform.machine()} CPU, {os.cpu_count()} cores ({platform.processor() or 'unknown model'}); torch {torch.__version__}; threads {torch.get_num_threads()}",
        f"- Date: {datetime.date.today().isoformat()}",
        f"- GWQ W{args.bits} g{args.group_size} + 1% outliers ({bpw:.3f} bits/weight), lm_head dense; median of {args.repeats} after one warm-up; batch 1",
        "",
        "| tokens | FP32 eager (ms) | GWQ eager (ms) | GWQ / FP32 |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {s} | {a * 1e3:.1f} | {b * 1e3:.1f} | {b / a:.2f}x |" for s, a, b in rows]
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, RESULTS)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
