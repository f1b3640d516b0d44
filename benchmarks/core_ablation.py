"""Quick ablation of the core GWQ choices on the real SmolLM2-135M (CPU).

Protocol (quick, not the paper's): WikiText-2 test, seqlen 512, first 8 windows;
calibration: one 512-token sample of the offline default text (seed 0).

    python benchmarks/core_ablation.py [--windows 8]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from gwq_compile import GWQConfig, calibration_tokens, quantization_report, quantize_
from gwq_tools.data import tokenize, wikitext2_text
from gwq_tools.eval import perplexity
from gwq_tools.models import load_causal_lm

ROWS = [
    dict(outlier_ratio=0.0, clip_search=False),
    dict(outlier_ratio=0.0, clip_search=True),
    dict(clip_search=False),
    dict(clip_search=True),
    dict(bits=3, group_size=64, outlier_ratio=0.0, clip_search=False),
    dict(bits=3, group_size=64, clip_search=False),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    base, tok = load_causal_lm()
    ids = tokenize(tok, wikitext2_text("test"))
    calib = calibration_tokens(tok, "default", 1, 512)
    print("FP", perplexity(base, ids, 512, args.windows, progress=False), flush=True)
    for kw in ROWS:
        model = copy.deepcopy(base)
        cfg = GWQConfig(**{**dict(bits=4, group_size=128, outlier_ratio=0.01, progress=False), **kw})
        t = time.time()
        quantize_(model, cfg, calibration_data=calib)
        qt = time.time() - t
        bpw = quantization_report(model)["bits_per_weight"]
        ppl = perplexity(model, ids, 512, args.windows, progress=False)
        print(kw, f"bpw {bpw:.3f} ppl {ppl:.3f} qtime {qt:.1f}", flush=True)


if __name__ == "__main__":
    main()
