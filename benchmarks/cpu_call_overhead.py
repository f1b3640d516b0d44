"""Where a batch-1 CPU decode step's linear time goes: kernel, Python around it, module call.

    python benchmarks/cpu_call_overhead.py [--repeats 20] [--dtype bf16]

All 210 decoder linears of SmolLM2-135M quantized with the default config (one 512-token
calibration sample of the offline default text), each called once with a one-token input,
as a decode step calls them, and timed as a whole pass (the weights stream from memory as
in a real step), round-robin:

* ``kernel``: the compiled kernel through the dispatcher (``torch.ops.gwq_cpu.linear``, what a
  compiled graph calls), arguments prepared once;
* ``kernel_pybind``: the same kernel through its pybind11 binding (``cpu_kernel.eager_linear()``);
* ``F.linear``: ``F.linear(x, gwq_weight)``: the subclass's ``__torch_function__`` and
  ``dispatch.linear`` (the path decision) around the kernel;
* ``module``: ``linear_module(x)``, what HF's forward calls;
* ``dense_F.linear`` / ``dense_module``: the same layers as dense weights in the same dtype.

Medians over the passes, in ms per pass (= per decode token, for the decoder linears alone;
the LM head and the rest of the model are not in it).  Writes
``benchmarks/results/cpu_call_overhead_<gemv isa>.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gwq_compile import GWQConfig, GWQTensor, calibration_tokens, cpu_kernel, dispatch, quantize_
from gwq_compile.models import load_causal_lm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_kernels import cpu_name  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = ap.parse_args(argv)
    dtype = DTYPES[args.dtype]
    load_before = os.getloadavg()
    model, tokenizer = load_causal_lm()
    dense = {n: m.weight.detach().to(dtype).clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    quantize_(model, GWQConfig(progress=False), calibration_data=calibration_tokens(tokenizer, "default", 1, 512))
    model = model.to(dtype).eval()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and isinstance(m.weight, GWQTensor)]
    if len(layers) != len(dense) or not cpu_kernel.available():
        raise RuntimeError(f"expected {len(dense)} quantized decoder linears on the compiled kernel, got {len(layers)}")
    xs = {k: torch.randn(1, 1, k).to(dtype) for k in {m.in_features for _, m in layers}}
    op, eager = torch.ops.gwq_cpu.linear.default, cpu_kernel.eager_linear()
    calls = []
    for _, m in layers:
        F.linear(xs[m.in_features], m.weight)  # caches the weight's eager arguments
        calls.append((xs[m.in_features], dispatch.eager_kernel_args(m.weight), m))
    dense_modules = []
    for n, m in layers:
        d = torch.nn.Linear(m.in_features, m.out_features, bias=False, dtype=dtype)
        d.weight = torch.nn.Parameter(dense[n], requires_grad=False)
        dense_modules.append((xs[m.in_features], d))

    variants = {
        "kernel": lambda: [op(x, *a[:5], None, *a[5:]) for x, a, _ in calls],
        "kernel_pybind": lambda: [eager(x, *a[:5], None, *a[5:]) for x, a, _ in calls],
        "F.linear": lambda: [F.linear(x, m.weight) for x, _, m in calls],
        "module": lambda: [m(x) for x, _, m in calls],
        "dense_F.linear": lambda: [F.linear(x, d.weight) for x, d in dense_modules],
        "dense_module": lambda: [d(x) for x, d in dense_modules],
    }
    times = {k: [] for k in variants}
    with torch.no_grad():
        for f in variants.values():
            f()
        for _ in range(args.repeats):
            for name, f in variants.items():
                t = time.perf_counter()
                f()
                times[name].append((time.perf_counter() - t) * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = [
        "# Batch-1 decode: the time of SmolLM2-135M's 210 decoder linears per token, by call route",
        "",
        f"- Command: `{('python benchmarks/cpu_call_overhead.py ' + ' '.join(argv if argv is not None else sys.argv[1:])).strip()}`",
        f"- Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, GEMV `{cpu_kernel.gemv_isa()}`",
        f"- Date: {datetime.datetime.now().isoformat(timespec='minutes')}; load averages at the start {', '.join(f'{v:.2f}' for v in load_before)},"
        f" at the end {', '.join(f'{v:.2f}' for v in os.getloadavg())}",
        f"- Default config (W4 g64 + 0.5 %), model and x in {args.dtype}; one pass = each layer once with a [1, 1, K] input;"
        f" medians of {args.repeats} round-robin passes",
        "",
        "| route | ms per token | vs kernel |",
        "| --- | --- | --- |",
    ]
    for k, v in med.items():
        lines.append(f"| {k} | {v:.2f} | {v / med['kernel']:.2f}x |")
    per_call = (med["F.linear"] - med["kernel_pybind"]) / len(calls) * 1e3
    lines += ["", f"Python between `F.linear` and the kernel: {per_call:.1f} µs a call ({len(calls)} calls a token)."]
    out = RESULTS / f"cpu_call_overhead_{cpu_kernel.gemv_isa() or 'none'}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
