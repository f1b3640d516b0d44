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
the LM head and the rest of the model are not in it).  Then what the rest costs: greedy
``generate`` decode ms per token (``(t(33 tokens) - t(1 token)) / 32``) of the dense model in
fp32 and bf16 with every linear (the head included) swapped for a stub that returns zeros of
its output's shape, so what is left is attention, norms, rotary, the KV cache and generate's
own per-token Python.  Writes
``benchmarks/results/cpu_call_overhead_<gemv isa>.md``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gwq_compile import GWQConfig, GWQTensor, calibration_tokens, cpu_kernel, dispatch, quantize_
from gwq_tools.models import load_causal_lm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_kernels import cpu_name  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class ZeroLinear(torch.nn.Module):
    """A linear's output shape at (almost) no cost: what is left of a decode step without it is the rest of the model."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def rest_ms_per_token(model: torch.nn.Module, prompt: torch.Tensor, repeats: int) -> float:
    """Decode ms per token of ``model`` with every nn.Linear swapped for :class:`ZeroLinear` (in place)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(module, name, ZeroLinear(child.out_features))
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False  # the stub head has no weight to tie

    def seconds(n: int) -> float:
        t = time.perf_counter()
        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t

    with torch.no_grad():
        seconds(4)
        return statistics.median((seconds(33) - seconds(1)) / 32 * 1e3 for _ in range(repeats))
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = ap.parse_args(argv)
    dtype = DTYPES[args.dtype]
    load_before = os.getloadavg()
    model, tokenizer = load_causal_lm()
    prompt = tokenizer("The quick brown fox jumps over the lazy dog. " * 4, return_tensors="pt").input_ids[:, :32]
    rest = {name: rest_ms_per_token(copy.deepcopy(model).to(dt).eval(), prompt, 5) for name, dt in DTYPES.items()}
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
    lines += ["", f"Python between `F.linear` and the kernel: {per_call:.1f} µs a call ({len(calls)} calls a token).", ""]
    lines += ["The rest of a decode step (every linear a zero-cost stub; dense model, greedy `generate`, 32-token prompt, median of 5):", ""]
    lines += ["| model dtype | rest ms per token |", "| --- | --- |"] + [f"| {k} | {v:.1f} |" for k, v in rest.items()]
    out = RESULTS / f"cpu_call_overhead_{cpu_kernel.gemv_isa() or 'none'}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
