"""Where each method's weight error lands, on SmolLM2-135M's 210 quantized linears.

Why: torchao's ``HQQ_SCALE_ONLY`` at W3 g64 measures perplexity 140 against 70 for the
affine grid in ``quality_smollm2.md``.  This checks whether that is a broken layer or harness
bug, or a property of the method, by comparing, per method:

* the mean relative squared error ``|W_q - W|^2 / |W|^2`` over layers;
* the share of that error carried by the 1% largest-magnitude weights of each layer;
* the mean shrink factor ``<W_q, W> / |W|^2`` (1 = no systematic shrinking);
* the worst layer's error relative to the affine grid's on the same layer.

Example (about 2 minutes on 2 CPU cores)::

    python benchmarks/weight_error.py --bits 3 4 --group-size 64
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import sys
from pathlib import Path

import torch

from gwq_compile import packing
from gwq_tools import peers
from gwq_compile.atomic_write import write_text as write_text_atomic
from gwq_tools.models import load_causal_lm

RESULTS = Path(__file__).resolve().parent / "results" / "weight_error_smollm2.md"
METHODS = ("rtn", "ao_affine", "ao_hqq")


def quantized_weights(model: torch.nn.Module, names: list[str], method: str, bits: int, group_size: int) -> dict[str, torch.Tensor]:
    """Dequantized weights of ``names`` after ``method`` (rtn: GWQ's packing, no outliers)."""
    if method == "rtn":
        return {
            n: packing.dequantize_weight(packing.quantize_weight(model.get_submodule(n).weight.detach(), None, bits, group_size))
            for n in names
        }
    q = copy.deepcopy(model)
    peers.torchao_intx_quantize_model(q, bits, group_size, "affine" if method == "ao_affine" else "hqq_scale_only")
    return {n: q.get_submodule(n).weight.dequantize().float() for n in names}


def error_stats(dense: dict[str, torch.Tensor], quant: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per layer: relative squared error, share of it on the top-1% |w|, shrink factor."""
    out = {}
    for n, w0 in dense.items():
        w = quant[n]
        err = (w - w0).square()
        big = w0.abs() > w0.abs().flatten().kthvalue(int(0.99 * w0.numel())).values
        norm = w0.square().sum()
        out[n] = {
            "rel_err": (err.sum() / norm).item(),
            "top1_share": (err[big].sum() / err.sum()).item(),
            "shrink": ((w * w0).sum() / norm).item(),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    model, _ = load_causal_lm(None, torch.float32)
    names = peers.quantizable_linear_names(model)
    dense = {n: model.get_submodule(n).weight.detach().float().clone() for n in names}
    lines = [
        "# Where the weight error lands: SmolLM2-135M, 210 decoder linears",
        "",
        f"Generated {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')} by "
        f"`python benchmarks/weight_error.py {' '.join(sys.argv[1:] if argv is None else argv)}`.",
        f"Machine: {platform.machine()} CPU, torch {torch.__version__}; fp32 weights (the Q4_1 GGUF dequantized).",
        "",
        "Per method: mean over layers of the relative squared error |Wq - W|²/|W|², the mean share of",
        "each layer's error carried by its 1% largest-magnitude weights, the mean shrink factor",
        "<Wq, W>/|W|² (1 = no systematic shrinking), and the largest ratio of a layer's error to the",
        "affine grid's error on the same layer.",
        "",
        "| bits | group | method | mean rel. error | share on top-1% \\|w\\| | mean shrink | worst layer vs affine |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for bits in args.bits:
        stats = {m: error_stats(dense, quantized_weights(model, names, m, bits, args.group_size)) for m in METHODS}
        for m in METHODS:
            s = stats[m]
            worst = max(names, key=lambda n: s[n]["rel_err"] / stats["ao_affine"][n]["rel_err"])
            mean = {k: sum(v[k] for v in s.values()) / len(s) for k in ("rel_err", "top1_share", "shrink")}
            ratio = s[worst]["rel_err"] / stats["ao_affine"][worst]["rel_err"]
            lines.append(
                f"| {bits} | {args.group_size} | {m} | {mean['rel_err']:.4f} | {mean['top1_share']:.3f} | {mean['shrink']:.4f} | "
                f"{ratio:.3f} (`{worst}`) |"
            )
            print(lines[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, "\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
