"""The CPU kernel of two versions of the source, side by side in one process: a decode pass of
SmolLM2-135M's 210 linear shapes at M = 1, interleaved pass by pass.

    python benchmarks/cpu_kernel_ab.py --base HEAD~1 [--outliers 0 0.005 0.02] [--passes 40]

Why: on a shared 2-core VM one variant's time moves by up to 2x between runs (other tenants'
load), far more than a kernel change moves it, so timings taken in separate runs cannot
tell a 5 % change.  Here ``gwq_compile/csrc`` at ``--base`` (a git revision) and in the
working tree are built as two extensions under their own op namespaces, every pass runs
both on the same weights and inputs in alternating order (the weights streamed from memory:
a 64 MB buffer is read between passes), and the result is the median of the per-pair time
ratios, new / base, which the shared load cancels out of.

The weights are random (speed does not depend on the values): 30 layers of q, k, v, o, gate,
up, down in the default config (W4 g64, bf16 x), with a random outlier mask of each
``--outliers`` density.  Both versions must agree on the outputs first.  Writes
``benchmarks/results/cpu_kernel_ab_<gemv isa>.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

from gwq_compile import GWQTensor, cpu_kernel, dispatch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_kernels import cpu_name  # noqa: E402  (the benchmarks' one CPU-name helper)

ROOT = Path(__file__).resolve().parents[1]
CSRC = "gwq_compile/csrc"
SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # q k v o gate up down


def build(sources: dict[str, str], tag: str, work: Path):
    """The kernel built from ``sources`` (file name -> text) with its op namespace renamed gwq_cpu_<tag>."""
    out = work / tag
    out.mkdir(parents=True, exist_ok=True)
    for name, text in sources.items():
        if name.endswith(".cpp"):
            text = text.replace("TORCH_LIBRARY(gwq_cpu,", f"TORCH_LIBRARY(gwq_cpu_{tag},").replace("TORCH_LIBRARY_IMPL(gwq_cpu,", f"TORCH_LIBRARY_IMPL(gwq_cpu_{tag},")
        (out / name).write_text(text)
    module = load(
        name=f"gwq_cpu_ab_{tag}", sources=[str(out / "cpu_linear.cpp")], extra_cflags=cpu_kernel.CFLAGS, extra_ldflags=cpu_kernel.LDFLAGS,
        build_directory=str(out), is_python_module=True,
    )
    return module.linear


def sources_at(rev: str) -> dict[str, str]:
    names = subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:{CSRC}"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return {n: subprocess.run(["git", "show", f"{rev}:{CSRC}/{n}"], cwd=ROOT, capture_output=True, text=True, check=True).stdout for n in names}


def working_tree_sources() -> dict[str, str]:
    return {p.name: p.read_text() for p in (ROOT / CSRC).iterdir() if p.suffix in (".cpp", ".h")}


def layer_calls(density: float, seed: int = 0) -> list[tuple[torch.Tensor, tuple]]:
    torch.manual_seed(seed)
    xs = {k: torch.randn(1, 1, k, dtype=torch.bfloat16) for k in {k for _, k in SHAPES}}
    calls = []
    for _ in range(30):
        for n, k in SHAPES:
            mask = torch.rand(n, k) < density if density > 0 else None
            w = GWQTensor.from_float(torch.randn(n, k), mask, bits=4, group_size=64).to(torch.bfloat16)
            calls.append((xs[k], dispatch.kernel_args(w)))
    return calls


def compare(base, new, calls, passes: int) -> dict:
    flush = torch.ones(64 * 2**20 // 4)
    with torch.inference_mode():
        for x, a in calls:
            yb, yn = base(x, *a[:5], None, *a[5:]).float(), new(x, *a[:5], None, *a[5:]).float()
            if not torch.allclose(yb, yn, rtol=1e-3, atol=1e-3 * yb.abs().max().item()):
                raise SystemExit(f"the two versions disagree: max difference {(yb - yn).abs().max().item():.3g}")
        times: dict[str, list[float]] = {"base": [], "new": []}
        for i in range(passes):
            order = (("base", base), ("new", new)) if i % 2 == 0 else (("new", new), ("base", base))
            for tag, fn in order:
                flush.sum()
                start = time.perf_counter()
                for x, a in calls:
                    fn(x, *a[:5], None, *a[5:])
                times[tag].append((time.perf_counter() - start) * 1e3)
    ratios = [n / b for b, n in zip(times["base"], times["new"])]
    q = statistics.quantiles(ratios, n=4)
    return {"base_ms": statistics.median(times["base"]), "new_ms": statistics.median(times["new"]), "ratio": statistics.median(ratios), "q1": q[0], "q3": q[2]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="git revision whose gwq_compile/csrc is the baseline")
    p.add_argument("--outliers", type=float, nargs="+", default=[0.0, 0.005, 0.02])
    p.add_argument("--passes", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    base_rev = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="gwq_ab_") as work:
        base = build(sources_at(args.base), "base", Path(work))
        new = build(working_tree_sources(), "new", Path(work))
        rows = [(d, compare(base, new, layer_calls(d), args.passes)) for d in args.outliers]
    load_avg = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    out = args.out or ROOT / "benchmarks" / "results" / f"cpu_kernel_ab_{cpu_kernel.gemv_isa() or 'none'}.md"
    lines = [
        "# CPU kernel, working tree vs a base revision, side by side (decode pass of SmolLM2's 210 linear shapes, M = 1)",
        "",
        f"- Command: `python benchmarks/cpu_kernel_ab.py --base {args.base} --outliers {' '.join(map(str, args.outliers))} --passes {args.passes}`",
        f"- Base: `{base_rev}`; new: the working tree of that run (the commit that adds this file's figures)",
        f"- Machine: {cpu_name()}, torch {torch.__version__}, {args.threads} threads, GEMV `{cpu_kernel.gemv_isa()}`",
        f"- Date: {datetime.datetime.now().isoformat(timespec='minutes')}; load averages at the end {load_avg}",
        f"- {args.passes} passes per variant, alternating; ratio = median of the per-pair new / base times (q1-q3 beside it)",
        "",
        "| outlier density | base ms / pass | new ms / pass | new / base | q1-q3 |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {d:.3g} | {r['base_ms']:.2f} | {r['new_ms']:.2f} | {r['ratio']:.3f} | {r['q1']:.3f}-{r['q3']:.3f} |" for d, r in rows]
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
