"""Choosing ``GWQConfig.head_bits`` on validation: the quantized LM head's cost in perplexity.

    python benchmarks/head_selection.py [--heads none 8:64 4:64 ...] [--max-windows 8]

The protocol of the README's "Choosing the defaults": SmolLM2-135M (fp32), the default
``GWQConfig`` for the decoder linears, one 2048-token calibration window of WikiText-2
validation (``calibration_tokens(tok, "wikitext2", 1, 2048, seed=0)``), perplexity on the
first ``--max-windows`` 2048-token windows of WikiText-2 **validation** (never test).
SmolLM2 ties its head to the input embedding, so a quantized head is the embedding too.
Each head setting ``bits:group`` quantizes that one tensor on its own grid, with outliers
from the same model-wide ranking as every other layer.  Perplexity is computed on the
dequantized weights (the same weights; see ``quality.py``'s ``dequantized_twin``).
Writes ``benchmarks/results/head_selection_smollm2.md``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

from gwq_compile import GWQConfig, GWQTensor, calibration_tokens, quantization_report, quantize_
from gwq_tools.data import tokenize, wikitext2_text
from gwq_tools.eval import perplexity
from gwq_tools.models import load_causal_lm

RESULTS = Path(__file__).resolve().parent / "results" / "head_selection_smollm2.md"


def dense_twin(model: torch.nn.Module) -> torch.nn.Module:
    """The model with every GWQTensor replaced by its dequantized fp32 weight (ties kept)."""
    twin = copy.deepcopy(model)
    done: dict[int, torch.nn.Parameter] = {}
    for mod in twin.modules():
        for name, p in list(mod._parameters.items()):
            if isinstance(p, GWQTensor):
                if id(p) not in done:
                    done[id(p)] = torch.nn.Parameter(p.dequantize(torch.float32), requires_grad=False)
                mod._parameters[name] = done[id(p)]
    return twin


def parse_head(text: str) -> tuple[int | None, int]:
    if text == "none":
        return None, 64
    bits, group = text.split(":")
    return int(bits), int(group)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heads", nargs="+", default=["none", "8:64", "8:128", "4:64", "4:32"])
    p.add_argument("--max-windows", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=2048)
    args = p.parse_args(argv)
    fp, tok = load_causal_lm()
    valid = tokenize(tok, wikitext2_text("validation"))
    calib = calibration_tokens(tok, "wikitext2", 1, 2048, seed=0)
    rows = [("FP32", None, None, perplexity(fp, valid, seqlen=args.seqlen, max_windows=args.max_windows, desc="fp"), 0.0)]
    for head in args.heads:
        bits, group = parse_head(head)
        model = copy.deepcopy(fp)
        t = time.perf_counter()
        quantize_(model, GWQConfig(head_bits=bits, head_group_size=group, progress=False), calibration_data=calib)
        seconds = time.perf_counter() - t
        report = quantization_report(model)
        ppl = perplexity(dense_twin(model), valid, seqlen=args.seqlen, max_windows=args.max_windows, desc=head)
        rows.append((f"default + head {head}", report["bits_per_weight"], report["model_bits_per_weight"], ppl, seconds))
        print(rows[-1], flush=True)
        del model
    fp_ppl = rows[0][3]
    lines = [
        "# LM head quantization on SmolLM2-135M: validation perplexity (choosing `head_bits`)",
        "",
        f"- Command: `python benchmarks/head_selection.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        f"- Date: {datetime.date.today().isoformat()}",
        f"- WikiText-2 validation, first {args.max_windows} windows of {args.seqlen}; calibration: 1 x 2048 validation tokens (seed 0)",
        "",
        "| setting | quantized-weight bpw | whole-model bpw | validation perplexity | vs FP | quantize time (s) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, bpw, model_bpw, ppl, seconds in rows:
        lines.append(
            f"| {name} | {'' if bpw is None else f'{bpw:.3f}'} | {'32' if model_bpw is None else f'{model_bpw:.2f}'} | "
            f"{ppl:.3f} | {ppl / fp_ppl - 1:+.2%} | {seconds:.0f} |"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, RESULTS)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
