"""CPU kernel choice for the GWQ fast path: its GEMV, torch's int4 GEMM and the dequantized-tile path, by M.

    python benchmarks/cpu_kernels.py [--threads 1 2] [--m 1 2 4 16 32 64 512] [--repeats 30]

For each SmolLM2-135M linear shape (W4 g64 + 0.5 % outliers, random weights: speed depends
on the grid and the outlier count, not on which weights they are), one interleaved run of

* ``fp32``: ``F.linear`` on the dense fp32 weight (the model GWQ replaces);
* ``bf16``: ``F.linear`` on a bf16 weight with bf16 x;
* ``gemv``: ``torch.ops.gwq_cpu.linear`` forced onto its decode GEMV: the AVX512-BF16 one
  (``csrc/cpu_gemv_bf16.h``; bf16 x) or, on other AVX2 CPUs, the integer one (``csrc/cpu_gemv_avx2.h``; x rounded to int16 per tile group;
  every row of x against each block while it is in cache); outliers fused;
* ``int4``: the same op forced onto torch's int4 GEMM (bf16 x, outliers fused);
* ``tile``: the same op forced onto the dequantized-tile path (64-row fp32 tiles + at::mm).

The variants are timed round-robin (one call of each in turn), so a change in the machine's
load hits them alike.  Medians in microseconds, then the ratios that set
``cpu_layout.GEMV_MAX_ROWS_BY_ISA`` (up to which M ``gemv`` beats ``int4``) and
``cpu_layout.TILE_MIN_ROWS`` (from which ``tile`` beats ``int4``).  The LM head shape
(49152×576) is in the list because ``head_bits`` quantizes it.  Writes
``benchmarks/results/cpu_kernels_<gemv isa>.md`` (the limits differ by CPU: one file per kind).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gwq_compile import cpu_kernel, cpu_layout, packing

RESULTS = Path(__file__).resolve().parent / "results"
#: (out_features, in_features) of SmolLM2-135M's linears: q/o, k/v, gate/up, down.
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]
NEVER, ALWAYS = 1 << 62, 1


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), for the results' machine line."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def timed(fns: dict, repeats: int) -> dict[str, float]:
    """Median µs of each function, called round-robin."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) * 1e6 for name, v in samples.items()}


def variants(n: int, k: int, m: int) -> dict:
    gen = torch.Generator().manual_seed(n * 7 + k)
    w = torch.randn(n, k, generator=gen) * 0.02
    p = packing.quantize_weight(w, torch.rand(n, k, generator=gen) < 0.005, bits=4, group_size=64)
    codes, grid = cpu_layout.pack(p)
    km = cpu_layout.k_map(k, 64, 4)
    x = torch.randn(m, k, generator=gen)
    xb, wd = x.bfloat16(), packing.dequantize_weight(p)
    wb = wd.bfloat16()

    def gwq(tile_min_rows: int, gemv_max_rows: int):
        return lambda: torch.ops.gwq_cpu.linear.default(
            x, codes, grid, *p[3:6], None, km.tile_group, k, km.pad, km.gather, False, tile_min_rows, gemv_max_rows
        )

    return {
        "fp32": lambda: F.linear(x, wd), "bf16": lambda: F.linear(xb, wb),
        "gemv": gwq(NEVER, NEVER), "int4": gwq(NEVER, 0), "tile": gwq(ALWAYS, 0),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, torch.get_num_threads()])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 512])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/cpu_kernels_<gemv isa>.md")
    args = ap.parse_args(argv)
    if cpu_kernel.reason_unavailable() is not None:
        sys.exit(f"the compiled CPU kernel is unavailable: {cpu_kernel.reason_unavailable()}")
    if not cpu_kernel.gemv_supported():
        sys.exit("this CPU has neither AVX512-BF16 nor AVX2: the kernel's GEMVs do not run here")
    isa = cpu_kernel.gemv_isa()
    out = args.out or RESULTS / f"cpu_kernels_{isa}.md"
    load = os.getloadavg()
    lines = [
        "# CPU kernels of the GWQ fast path, by M (W4 g64 + 0.5 % outliers)",
        "",
        f"- Command: `python benchmarks/cpu_kernels.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, GEMV `{isa}`;"
        f" date {datetime.datetime.now().isoformat(timespec='minutes')}",
        f"- Load averages at the start {', '.join(f'{v:.2f}' for v in load)} (2 cores: above ~0.5 other work shared the CPU)",
        "- Medians in µs of one round-robin run; `gemv`/`int4`/`tile` are `torch.ops.gwq_cpu.linear` forced onto each path",
        "",
    ]
    for threads in args.threads:
        torch.set_num_threads(threads)
        lines += [
            f"## {threads} thread(s)", "",
            "| shape (N×K) | M | fp32 | bf16 | gemv | int4 | tile | gemv / int4 | tile / int4 | fastest GWQ / fp32 |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]  # fmt: skip
        for n, k in SHAPES:
            for m in args.m:
                if n * m > 49152 * 64:
                    continue  # the head at prefill sizes: minutes per row, and generate() runs it on one row
                fns = variants(n, k, m)
                t = timed(fns, max(3, args.repeats // 10) if n > 10000 else args.repeats)
                best = min(t["gemv"], t["int4"], t["tile"])
                lines.append(
                    f"| {n}×{k} | {m} | {t['fp32']:.0f} | {t['bf16']:.0f} | {t['gemv']:.0f} | {t['int4']:.0f} | {t['tile']:.0f} | "
                    f"{t['gemv'] / t['int4']:.2f} | {t['tile'] / t['int4']:.2f} | {best / t['fp32']:.2f} |"
                )
                print(lines[-1], flush=True)
        lines.append("")
    lines.append(f"Load averages at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
