"""The ``gwq`` torch.compile backend against eager ``quantize_`` on the real SmolLM2-135M.

    python benchmarks/backend_matches_eager.py [--calib-tokens 512]

Quantizes one copy of the model with eager ``quantize_(model, GWQConfig())`` and compiles
another with ``torch.compile(model, backend="gwq")`` on the same calibration tokens (one
window of the offline default text), then counts the layers whose outlier masks or
dequantized weights differ, and the largest logit difference of the two on 64 tokens.  The
backend calibrates inside the compile, with ``torch.compiler.is_compiling()`` True; this is
the check that the model it calibrates is the one eager GWQ calibrates.  Prints one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from gwq_compile import GWQConfig, GWQTensor, calibration_tokens, quantize_
from gwq_tools.models import load_causal_lm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calib-tokens", type=int, default=512)
    args = parser.parse_args()
    model, tokenizer = load_causal_lm()
    calib = calibration_tokens(tokenizer, "default", 1, args.calib_tokens)
    eager = copy.deepcopy(model)
    quantize_(eager, GWQConfig(progress=False), calibration_data=calib)
    compiled_model = copy.deepcopy(model)
    start = time.perf_counter()
    compiled = torch.compile(compiled_model, backend="gwq", options={"progress": False, "calibration_data": calib})
    probe = calib[:, :64]
    with torch.no_grad():
        out = compiled(probe, use_cache=False).logits
        ref = eager(probe, use_cache=False).logits
    layers = masks = weights = 0
    for (name, a), (_, b) in zip(eager.named_modules(), compiled_model.named_modules()):
        if isinstance(getattr(a, "weight", None), GWQTensor):
            layers += 1
            masks += int(not torch.equal(a.weight.outlier_mask(), b.weight.outlier_mask()))
            weights += int(not torch.equal(a.weight.dequantize(), b.weight.dequantize()))
    print(json.dumps({
        "layers": layers, "layers_with_other_masks": masks, "layers_with_other_weights": weights,
        "max_abs_logit_difference": (out - ref).abs().max().item(), "max_abs_logit": ref.abs().max().item(),
        "compile_and_first_call_s": round(time.perf_counter() - start, 1), "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
