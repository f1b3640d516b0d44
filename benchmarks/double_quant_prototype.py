"""The prototype that chose double_quant's grid (issue #16), kept so its validation figures have a command.

It monkeypatches ``grid._grid_from_range`` / ``compute_group_qparams``, rounding every
candidate scale onto an 8-bit grid per row: under an fp16 row scale (``8:...``) or a
power-of-two exponent (``p8:...``, the design that landed as ``GWQConfig(double_quant=True)``);
``fp16:...`` is the plain fp16 grid.  It was run before ``double_quant`` existed; the printed
bits per weight are those of fp16 scales (double-quantized storage is ``(24 - 8 - bits) / group``
lower).  WikiText-2 validation, 8 windows x 2048, one 2048-token calibration sample.

    python benchmarks/double_quant_prototype.py fp16:4:64:0.005 8:4:32:0.005 fp16:4:32:0.005 8:4:64:0.005
    python benchmarks/double_quant_prototype.py p8:4:32:0.005 p8:3:32:0.0025 p8:3:64:0.0075 p8:3:32:0.0025:3.0

Spec: ``SCALES:bits:group:ratio[:bits_budget]``; one JSON line per spec on stdout.
Results: ``benchmarks/results/llamacpp_peer_smollm2.md`` (double-quantized grids).
"""
import copy, sys, time, json, torch
from gwq_compile import grid as grid_stage, packing, GWQConfig, quantize_, quantization_report
from gwq_tools import data
from gwq_tools.eval import perplexity_details
from gwq_tools.models import load_causal_lm

SCALE_BITS = None
POW2 = False
_SUPER = [None]
orig_grid = grid_stage._grid_from_range
orig_cgq = grid_stage.compute_group_qparams

def grid(wmin, wmax, bits, symmetric, exponents=None):
    s, z = orig_grid(wmin, wmax, bits, symmetric, exponents)
    if SCALE_BITS is None or _SUPER[0] is None:
        return s, z
    sup = _SUPER[0]
    levels = (1 << SCALE_BITS) - 1
    sq = (torch.round(s / sup).clamp(1, levels) * sup).to(torch.float16).float()
    if not symmetric:
        maxq = (1 << bits) - 1
        z = torch.round(-wmin / sq).clamp(0, maxq)
    return sq, z

def cgq(weight, outlier_mask, bits, group_size, symmetric=False, clip_search=False, importance=None, double_quant=False):
    if SCALE_BITS is not None:
        g = grid_stage.effective_group_size(weight.shape[1], group_size)
        w = weight.float()
        if outlier_mask is not None:
            w = w.masked_fill(outlier_mask, 0.0)
        wg = grid_stage._grouped(w, g)
        wmin = wg.amin(-1).clamp(max=0.0); wmax = wg.amax(-1).clamp(min=0.0)
        s0 = ((wmax - wmin) / ((1 << bits) - 1)).clamp(min=2**-24)
        if POW2:
            _SUPER[0] = torch.exp2(torch.ceil(torch.log2(s0.amax(-1, keepdim=True) / ((1 << SCALE_BITS) - 1))).clamp(min=-24))
        else:
            _SUPER[0] = (s0.amax(-1, keepdim=True) / ((1 << SCALE_BITS) - 1)).to(torch.float16).float()
    try:
        return orig_cgq(weight, outlier_mask, bits, group_size, symmetric, clip_search, importance, double_quant)
    finally:
        _SUPER[0] = None

grid_stage._grid_from_range = grid
grid_stage.compute_group_qparams = cgq
packing.compute_group_qparams = cgq  # packing.quantize_weight calls it by the name it imported
import gwq_compile.quantize as Q
for mod in list(sys.modules.values()):
    if mod is not None and getattr(mod, "compute_group_qparams", None) is orig_cgq:
        mod.compute_group_qparams = cgq

if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("specs", nargs="+", help="SCALES:bits:group:ratio[:bits_budget], e.g. p8:4:32:0.005")
    specs = parser.parse_args().specs
    model, tok = load_causal_lm(None, torch.float32)
    val = data.tokenize(tok, data.wikitext2_text("validation"))
    calib = data.calibration_tokens(tok, "wikitext2", 1, 2048, seed=0)
    for spec in specs:
        sb, bits, g, r, *rest = spec.split(":")
        POW2 = sb.startswith("p")
        SCALE_BITS = None if sb == "fp16" else int(sb.lstrip("p"))
        budget = float(rest[0]) if rest else None
        m = copy.deepcopy(model)
        t = time.time()
        cfg = GWQConfig(bits=int(bits), group_size=int(g), outlier_ratio=float(r), progress=False, bits_budget=budget)
        quantize_(m, cfg, calibration_data=calib)
        rep = quantization_report(m)
        for mod in m.modules():
            if isinstance(mod, torch.nn.Linear) and hasattr(mod.weight, "dequantize"):
                mod.weight = torch.nn.Parameter(mod.weight.dequantize().float(), requires_grad=False)
        res = perplexity_details(m, val, 2048, 8, progress=False)
        out = {"spec": spec, "ppl": res.perplexity, "bpw_fp16_scales": rep["bits_per_weight"], "secs": time.time() - t}
        print(json.dumps(out), flush=True)
