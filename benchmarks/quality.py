"""Quality benchmark: GWQ vs RTN, GPTQ, AWQ and torchao Intx on SmolLM2-135M (fp32, CPU).

Every method quantizes the same decoder linears (every ``nn.Linear`` but the tied
output head) of the same model, is timed around its quantization call (calibration
included), and is evaluated on the same WikiText-2 **test** windows (standard protocol,
:mod:`gwq_tools.eval`).  Calibration windows come from WikiText-2 **validation**
(``data.calibration_tokens(tok, "wikitext2", n, seqlen, seed=0)``); nothing is ever tuned
on test windows.  Bits per weight are honest: codes + scales + zeros + outlier values +
outlier indices (CSR row pointers included), over the quantized weights.

Methods (``--methods``):
    fp           the unquantized fp32 model
    rtn          round-to-nearest on the GWQ grid (asymmetric, groups along K)
    gptq         GPTQ, damp 0.01, sequential layer by layer, ``--calib-samples`` windows, dynamic groups
    gptq_act     the same with act-order (columns by decreasing H_jj; static groups)
    awq          AWQ scale search + folding (ours), then RTN; ``--awq-samples`` x ``--awq-seqlen``
    ao_affine    torchao IntxWeightOnlyConfig, asymmetric affine qparams, fp16 scales
    ao_hqq       torchao IntxWeightOnlyConfig, HQQ_SCALE_ONLY, fp16 scales
    llamacpp     llama.cpp's llama-quantize with an importance matrix (llama-imatrix on 16 x 512 tokens of
                 WikiText-2 validation), from the model's Q4_1 GGUF; rows are ``llamacpp:TYPE`` (e.g.
                 ``llamacpp:IQ4_XS``); bpw from the GGUF bytes of the decoder linears (benchmarks/llamacpp_peer.py)
    llamacpp_plain  the same without the importance matrix
    gwq          the paper's setting: |grad| from 1 sample, top ratio per layer in fp16, RTN rest
    gwq_fisher   saliency sum grad^2            gwq_gradw    saliency |grad * w|
    gwq_8s       |grad| summed over 8 samples   gwq_row      equal outlier count per row
    gwq_hessian  outliers by OBS w^2/[H^-1]_jj  gwq_gptq     gwq + GPTQ compensation of the rest
    gwq_gptq_act gwq + act-order GPTQ compensation of the rest
    gwq_clip     gwq, each group's range from an activation-weighted error search (clip_search="act_mse")
    gwq_err      gwq_clip, outliers by |grad| x squared rounding error (saliency="grad_error"), per layer
    gwq_err_model  gwq_err, outliers ranked over the whole model (outlier_scope="model"): the default GWQConfig
    gwq_wls      gwq_err_model with a weighted least-squares refit of each group's scale/zero (clip_search="act_wls")
    gwq_dq       gwq_err_model with double-quantized scales (double_quant=True)
    gwq_wls_dq   gwq_wls with double-quantized scales (the refit's scales rounded onto the 8-bit grid too)

Rows are cached in the JSON results file under a key of every setting that affects
them; a re-run skips cached rows (``--force`` recomputes), so a long grid can be run in
pieces.  The JSON is rewritten (atomically) after every row; the Markdown table and the
plot at the end.

Example (the first subset committed, ~45 min on 2 CPU cores)::

    python benchmarks/quality.py --seqlen 2048 --max-windows 16 \\
        --rows fp rtn:3:64 gwq:3:64:0.01 gptq:3:64 awq:3:64 rtn:4:128 gwq:4:128:0.01 gptq:4:128 awq:4:128
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from gwq_tools import data
from gwq_tools import peers
from gwq_compile.atomic_write import write_json as write_json_atomic, write_text as write_text_atomic
from gwq_tools.eval import perplexity_details
from gwq_tools.models import load_causal_lm

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BASELINES = ("fp", "rtn", "gptq", "gptq_act", "awq", "ao_affine", "ao_hqq", "llamacpp", "llamacpp_plain")
#: llama.cpp rows: a GGUF type (``llamacpp:IQ4_XS``) instead of bits/group (benchmarks/llamacpp_peer.py).
LLAMACPP = ("llamacpp", "llamacpp_plain")
GWQ_VARIANTS = {
    # method: (saliency, samples kind, outlier_scope, compensation)
    "gwq": ("grad", "gwq", "layer", "none"),
    "gwq_fisher": ("fisher", "gwq", "layer", "none"),
    "gwq_gradw": ("grad_weight", "gwq", "layer", "none"),
    "gwq_8s": ("grad", "gwq_many", "layer", "none"),
    "gwq_row": ("grad", "gwq", "row", "none"),
    "gwq_hessian": ("hessian", "gwq", "layer", "none"),
    "gwq_gptq": ("grad", "gwq", "layer", "gptq"),
    "gwq_gptq_act": ("grad", "gwq", "layer", "gptq_act"),
    "gwq_clip": ("grad", "gwq", "layer", "none"),
    "gwq_err": ("grad_error", "gwq", "layer", "none"),
    "gwq_err_model": ("grad_error", "gwq", "model", "none"),
    "gwq_wls": ("grad_error", "gwq", "model", "none"),
    "gwq_dq": ("grad_error", "gwq", "model", "none"),
    "gwq_wls_dq": ("grad_error", "gwq", "model", "none"),
}
#: GWQ variants whose grids are double-quantized (``GWQConfig.double_quant``: 8-bit scale codes, zeros at the code width).
GWQ_DOUBLE_QUANT = ("gwq_dq", "gwq_wls_dq")
#: GWQ variants whose groups' ranges come from a search (``GWQConfig.clip_search``); the rest use plain min/max.
GWQ_CLIP = {"gwq_clip": "act_mse", "gwq_err": "act_mse", "gwq_err_model": "act_mse", "gwq_wls": "act_wls", "gwq_dq": "act_mse", "gwq_wls_dq": "act_wls"}
METHODS = BASELINES + tuple(GWQ_VARIANTS)
#: The variant whose selection is the default GWQConfig's (drawn in black).
DEFAULT_METHOD = "gwq_err_model"
Q4_1_CAVEAT = (
    "SmolLM2 weights come from a Q4_1 GGUF (asymmetric 4-bit blocks of 32): a 4-bit g32 grid "
    "nearly reproduces them, so this point is not a win of any method"
)


@dataclass(frozen=True)
class Settings:
    """Everything besides the row itself that changes a result."""

    model: str
    seqlen: int
    max_windows: int | None
    calib_seqlen: int
    gwq_samples: int
    gwq_many_samples: int
    gptq_samples: int
    awq_samples: int
    awq_seqlen: int
    awq_grid: int
    damp: float
    eval_split: str = "test"


@dataclass(frozen=True)
class Row:
    """One configuration to measure: a method on a grid (``ratio`` only for GWQ methods)."""

    method: str
    bits: int | None = None
    group_size: int | None = None
    ratio: float | None = None
    qtype: str | None = None  # llama.cpp rows only: the GGUF type
    bits_budget: float | None = None  # GWQ rows only: GWQConfig.bits_budget (mixed per-layer widths)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {METHODS}")
        if self.method in LLAMACPP:
            if self.qtype is None or self.bits is not None or self.group_size is not None or self.ratio is not None:
                raise ValueError(f"{self.method}: give a GGUF type (llamacpp:IQ4_XS), nothing else")
            return
        if self.qtype is not None:
            raise ValueError(f"{self.method}: a GGUF type is for llama.cpp rows only")
        if self.bits_budget is not None and self.method not in GWQ_VARIANTS:
            raise ValueError(f"{self.method}: a bits budget is for GWQ rows only")
        if self.method == "fp":
            if self.bits is not None or self.group_size is not None or self.ratio is not None:
                raise ValueError("the fp row takes no bits/group/ratio")
            return
        if self.bits not in (2, 3, 4) or not self.group_size:
            raise ValueError(f"{self.method}: needs bits in (2, 3, 4) and a group size, got {self.bits}, {self.group_size}")
        if (self.method in GWQ_VARIANTS) != (self.ratio is not None):
            raise ValueError(f"{self.method}: an outlier ratio is required for GWQ methods and refused otherwise")

    @classmethod
    def parse(cls, text: str) -> "Row":
        """``fp``, ``rtn:3:64``, ``gwq:3:64:0.01`` or ``llamacpp:IQ4_XS``."""
        parts = text.split(":")
        if parts[0] in LLAMACPP:
            if len(parts) != 2:
                raise argparse.ArgumentTypeError(f"bad row {text!r}: expected {parts[0]}:TYPE")
            return cls(parts[0], qtype=parts[1].upper())
        try:
            bits = int(parts[1]) if len(parts) > 1 else None
            group = int(parts[2]) if len(parts) > 2 else None
            ratio = float(parts[3]) if len(parts) > 3 else None
            budget = float(parts[4]) if len(parts) > 4 else None
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"bad row {text!r}: {err}") from err
        if len(parts) > 5:
            raise argparse.ArgumentTypeError(f"bad row {text!r}: expected method[:bits:group[:ratio[:bits_budget]]]")
        try:
            return cls(parts[0], bits, group, ratio, bits_budget=budget)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from err

    @property
    def label(self) -> str:
        if self.method == "fp":
            return "fp"
        if self.method in LLAMACPP:
            return f"{self.method} {self.qtype}"
        tail = f"+{self.ratio * 100:g}%" if self.ratio is not None else ""
        tail += f" mean {self.bits_budget:g}b" if self.bits_budget is not None else ""
        return f"{self.method} W{self.bits}g{self.group_size}{tail}"

    def calibration(self, s: Settings) -> dict:
        """The calibration settings this row depends on (part of its cache key)."""
        if self.method in ("gptq", "gptq_act"):
            act = {"act_order": True} if self.method == "gptq_act" else {}  # absent for gptq: keeps its cached rows' keys
            return {"samples": s.gptq_samples, "seqlen": s.calib_seqlen, "damp": s.damp, "sequential": True, **act}
        if self.method == "awq":
            return {"samples": s.awq_samples, "seqlen": s.awq_seqlen, "n_grid": s.awq_grid}
        if self.method == "llamacpp":
            import llamacpp_peer  # beside this script

            return {"imatrix": f"wikitext2 validation {llamacpp_peer.IMATRIX_CHUNKS}x{llamacpp_peer.IMATRIX_CTX}", "llama_cpp": f"llama-cpp-python {llamacpp_peer.SDIST_VERSION} sdist"}
        if self.method == "llamacpp_plain":
            import llamacpp_peer  # beside this script

            return {"llama_cpp": f"llama-cpp-python {llamacpp_peer.SDIST_VERSION} sdist"}
        if self.method in GWQ_VARIANTS:
            kind = GWQ_VARIANTS[self.method][1]
            n = s.gwq_samples if kind == "gwq" else s.gwq_many_samples
            extra = {"damp": s.damp} if self.method in ("gwq_hessian", "gwq_gptq", "gwq_gptq_act") else {}
            return {"samples": n, "seqlen": s.calib_seqlen, **extra}
        return {}

    def key(self, s: Settings) -> str:
        fields = {k: v for k, v in asdict(self).items() if k not in ("qtype", "bits_budget") or v is not None}  # absent when unused: keeps cached keys
        return json.dumps(
            {**fields, **_eval_settings(s), "calibration": self.calibration(s)},
            sort_keys=True,
        )


def grid_rows(methods: list[str], bits: list[int], groups: list[int], ratios: list[float]) -> list[Row]:
    rows: list[Row] = []
    for method in methods:
        if method == "fp":
            rows.append(Row("fp"))
            continue
        for b in bits:
            for g in groups:
                if method in GWQ_VARIANTS:
                    rows += [Row(method, b, g, r) for r in ratios]
                else:
                    rows.append(Row(method, b, g))
    return rows


# ----------------------------------------------------------------------------- running one row


@torch.no_grad()
def dequantized_twin(model: torch.nn.Module, probe: torch.Tensor) -> tuple[torch.nn.Module, float]:
    """``model`` with every quantized weight replaced by its dequantized dense tensor, and the
    largest logit difference between the two on ``probe``.

    Why: the CPU reference path of ``torch.ops.gwq.linear`` dequantizes the weight at every
    call (and torchao's Intx linear does the same), which doubles the cost of a SmolLM2
    forward on 2 cores.  Dequantizing once gives the same weights, hence the same logits
    (the probe checks it; the difference is recorded with each row).
    """
    from torchao.utils import TorchAOBaseTensor  # GWQTensor and torchao's Intx tensors both derive from it

    twin = copy.deepcopy(model)
    for name in peers.quantizable_linear_names(twin):
        linear = twin.get_submodule(name)
        if isinstance(linear.weight, TorchAOBaseTensor):
            linear.weight = torch.nn.Parameter(linear.weight.dequantize().to(torch.float32), requires_grad=False)
    diff = (twin(probe).logits - model(probe).logits).abs().max().item()
    return twin, diff


class Bench:
    """The loaded model, tokenizer, test ids and calibration windows, shared by all rows."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.model, self.tokenizer = load_causal_lm(None if settings.model == "smollm2" else settings.model, torch.float32)
        self.test_ids = data.tokenize(self.tokenizer, data.wikitext2_text(settings.eval_split))
        self._calib: dict[tuple[int, int], torch.Tensor] = {}

    def calibration(self, n: int, seqlen: int) -> torch.Tensor:
        """``n`` validation windows; for one seqlen the first rows are shared across n (same seed)."""
        if (n, seqlen) not in self._calib:
            self._calib[(n, seqlen)] = data.calibration_tokens(self.tokenizer, "wikitext2", n, seqlen, seed=0)
        return self._calib[(n, seqlen)]

    def quantize(self, row: Row, model: torch.nn.Module) -> dict:
        """Quantize ``model`` in place for ``row``; returns extra facts to record."""
        s = self.settings
        if row.method == "rtn":
            peers.rtn_quantize_model(model, row.bits, row.group_size)
        elif row.method in ("gptq", "gptq_act"):
            calib = self.calibration(s.gptq_samples, s.calib_seqlen)
            peers.gptq_quantize_model(model, calib, row.bits, row.group_size, damp=s.damp, act_order=row.method == "gptq_act")
        elif row.method == "awq":
            peers.awq_quantize_model(model, self.calibration(s.awq_samples, s.awq_seqlen), row.bits, row.group_size, n_grid=s.awq_grid)
        elif row.method in ("ao_affine", "ao_hqq"):
            algorithm = "affine" if row.method == "ao_affine" else "hqq_scale_only"
            peers.torchao_intx_quantize_model(model, row.bits, row.group_size, algorithm)
        elif row.method in GWQ_VARIANTS:
            return self._gwq(row, model)
        return {}

    def _gwq(self, row: Row, model: torch.nn.Module) -> dict:
        from gwq_compile import GWQConfig, quantization_report, quantize_

        s = self.settings
        saliency, kind, scope, compensation = GWQ_VARIANTS[row.method]
        n = s.gwq_samples if kind == "gwq" else s.gwq_many_samples
        config = GWQConfig(
            bits=row.bits, group_size=row.group_size, outlier_ratio=row.ratio, saliency=saliency,
            outlier_scope=scope, compensation=compensation, damp=s.damp, progress=False,
            clip_search=GWQ_CLIP.get(row.method, False),  # plain min/max unless the variant searches: rtn/awq's grid
            bits_budget=row.bits_budget, double_quant=row.method in GWQ_DOUBLE_QUANT,
        )  # fmt: skip
        quantize_(model, config, calibration_data=self.calibration(n, s.calib_seqlen))
        report = quantization_report(model)
        widths: dict[int, int] = {}
        for layer in report["layers"].values():
            widths[layer["bits"]] = widths.get(layer["bits"], 0) + 1
        return {"core_report_bits_per_weight": report["bits_per_weight"], "outliers": report["outliers"], "gwq_config": config.to_dict(),
                "layer_widths": {str(k): v for k, v in sorted(widths.items())}}  # fmt: skip

    def run_llamacpp(self, row: Row) -> dict:
        """A llama.cpp row: re-quantize the source GGUF, load it dense through transformers, evaluate."""
        import llamacpp_peer  # beside this script
        from gwq_tools.models import resolve_model_path

        source = resolve_model_path(None if self.settings.model == "smollm2" else self.settings.model)
        if source.suffix != ".gguf":
            raise ValueError("llama.cpp rows need a GGUF source model")
        start = time.perf_counter()
        imat = llamacpp_peer.imatrix(source, data.wikitext2_text("validation")) if row.method == "llamacpp" else None
        path = llamacpp_peer.quantize(source, row.qtype, imat)
        quant_seconds = time.perf_counter() - start
        bits = llamacpp_peer.decoder_linear_bits(path)
        model, _ = load_causal_lm(str(path), torch.float32)
        start = time.perf_counter()
        res = perplexity_details(model, self.test_ids, self.settings.seqlen, self.settings.max_windows, desc=row.label)
        return {
            "label": row.label, **asdict(row), "calibration": row.calibration(self.settings),
            "bits_per_weight": bits["bits_per_weight"], "stored_bits_per_weight": bits["bits_per_weight"],
            "tensor_types": bits["tensor_types"], "gguf": path.name,
            "quant_seconds": quant_seconds, "eval_seconds": time.perf_counter() - start,
            "perplexity": res.perplexity, "nll": res.nll, "n_windows": res.n_windows, "seqlen": res.seqlen,
            "note": llamacpp_peer.CAVEAT, "measured_at": _now(),
        }  # fmt: skip

    def run(self, row: Row) -> dict:
        if row.method in LLAMACPP:
            return self.run_llamacpp(row)
        model = copy.deepcopy(self.model)
        start = time.perf_counter()
        extra = {} if row.method == "fp" else self.quantize(row, model)
        quant_seconds = time.perf_counter() - start
        bits = peers.bits_per_weight(model)
        if "core_report_bits_per_weight" in extra and not math.isclose(extra["core_report_bits_per_weight"], bits["bits_per_weight"], rel_tol=1e-9):
            raise RuntimeError(f"{row.label}: bits disagree: core report {extra['core_report_bits_per_weight']}, peers {bits['bits_per_weight']}")
        dense, probe_diff = dequantized_twin(model, self.test_ids[:, :64])
        del model
        start = time.perf_counter()
        res = perplexity_details(dense, self.test_ids, self.settings.seqlen, self.settings.max_windows, desc=row.label)
        eval_seconds = time.perf_counter() - start
        return {
            "label": row.label,
            **asdict(row),
            "calibration": row.calibration(self.settings),
            "bits_per_weight": bits["bits_per_weight"],
            "bits_breakdown": {k.removesuffix("_bits_per_weight"): v for k, v in bits.items() if k.endswith("_bits_per_weight") and k != "stored_bits_per_weight"},
            "stored_bits_per_weight": bits["stored_bits_per_weight"],
            "quant_seconds": quant_seconds if row.method != "fp" else 0.0,
            "eval_seconds": eval_seconds,
            "perplexity": res.perplexity,
            "nll": res.nll,
            "n_windows": res.n_windows,
            "seqlen": res.seqlen,
            "eval_twin_max_abs_logit_diff": probe_diff,
            "note": Q4_1_CAVEAT if row.bits == 4 and row.group_size == 32 else "",
            "measured_at": _now(),
            **extra,
        }


# ----------------------------------------------------------------------------- reporting


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    import torchao
    import transformers

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torchao": torchao.__version__,
        "python": platform.python_version(),
    }


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten by one with fewer (or equal) bits and lower perplexity, sorted by bits.

    Example:
        >>> pareto_front([(3.0, 20.0), (3.5, 25.0), (4.0, 15.0)])
        [(3.0, 20.0), (4.0, 15.0)]
    """
    front: list[tuple[float, float]] = []
    for bpw, ppl in sorted(points):
        if not front or ppl < front[-1][1]:
            front.append((bpw, ppl))
    return front


def _row_order(r: dict) -> tuple:
    """Table order: fp first, then by bits, group, method, outlier ratio."""
    return (r["method"] != "fp", r["bits"] or 0, r["group_size"] or 0, METHODS.index(r["method"]), r["ratio"] or 0,
            r.get("bits_budget") or 0, r["bits_per_weight"])  # fmt: skip


def markdown(results: dict, settings: Settings) -> str:
    rows = [r for r in results["rows"].values() if r["key_settings"] == _eval_settings(settings)]
    rows.sort(key=_row_order)
    fp = next((r for r in rows if r["method"] == "fp"), None)
    rtn = {(r["bits"], r["group_size"]): r for r in rows if r["method"] == "rtn"}
    lines = [
        f"# Quality: SmolLM2-135M (fp32, CPU), WikiText-2 {settings.eval_split} perplexity",
        "",
        f"Generated {_now()} by `benchmarks/quality.py` (tables and plot rebuilt from the cached rows in `{settings_file_name(results)}`).",
        "",
        "Commands run (each adds or reuses rows; see the JSON for per-row timestamps):",
        "",
        *[f"    {c}" for c in results["commands"]],
        "",
        f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores ({results['machine']['torch_threads']} torch threads), "
        f"torch {results['machine']['torch']}, transformers {results['machine']['transformers']}, torchao {results['machine']['torchao']}, "
        f"Python {results['machine']['python']}.  Machine shared with other jobs: wall times are indicative only.",
        "",
        f"Evaluation: seqlen {settings.seqlen}, {'all' if settings.max_windows is None else f'the first {settings.max_windows}'} non-overlapping windows "
        f"of the WikiText-2 raw {settings.eval_split} split, tokenized once (standard protocol).",
        f"Calibration (WikiText-2 validation, seed 0, never the test split): GWQ {settings.gwq_samples} x {settings.calib_seqlen} tokens "
        f"(gwq_8s: {settings.gwq_many_samples}); GPTQ {settings.gptq_samples} x {settings.calib_seqlen} (damp {settings.damp}, sequential layer by layer; "
        f"gptq: dynamic groups, no act-order; gptq_act: act-order, static groups); AWQ {settings.awq_samples} x {settings.awq_seqlen}, {settings.awq_grid}-point alpha grid, no clipping search.",
        "Bits/weight: codes + fp16 scales + uint8 zeros + fp16 outlier values + int16 outlier columns + int32 CSR row pointers "
        "(the row pointers cost 32/K bits even with no outliers), over the 210 quantized linears (the tied lm_head/embedding stays fp32 for every method). "
        "torchao rows count codes at b bits (torchao keeps them unpacked in int8: `stored bpw`) plus its fp16 scales and int8 zero points "
        "(HQQ scale-only's zero points are all 0 but stored).",
        "Quant time: wall seconds of the quantization call (calibration forward/backward, Hessians, search) on the 2-core CPU.",
        "",
        "| method | bits | group | outliers | bits/weight | stored bpw | quant time (s) | perplexity | vs fp | vs RTN same grid | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        vs = f"{r['perplexity'] / fp['perplexity']:.2f}x" if fp else ""
        base = rtn.get((r["bits"], r["group_size"]))
        vs_rtn = f"{100 * (r['perplexity'] / base['perplexity'] - 1):+.1f}%" if base and r["method"] != "rtn" and r["method"] != "fp" else ""
        ratio = "" if r["ratio"] is None else f"{r['ratio'] * 100:g}%"
        if r.get("bits_budget") is not None:
            ratio += f", mixed: mean {r['bits_budget']:g} code bits"
        note = ("llama.cpp: see caveat" if r["method"] in LLAMACPP else "Q4_1 grid: see caveat") if r["note"] else ""
        method = f"{r['method']} {r['qtype']}" if r.get("qtype") else r["method"]
        lines.append(
            f"| {method} | {'' if r.get('qtype') else r['bits'] or 32} | {r['group_size'] or ''} | {ratio} | {r['bits_per_weight']:.3f} | {r['stored_bits_per_weight']:.3f} "
            f"| {r['quant_seconds']:.1f} | {r['perplexity']:.3f} | {vs} | {vs_rtn} | {note} |"
        )
    lines += _comparisons(rows)
    lines += budget_table(rows)
    lines += llamacpp_table(rows)
    if any(r["note"] and r["method"] not in LLAMACPP for r in rows):
        lines += ["", f"Caveat: {Q4_1_CAVEAT}."]
    skipped = [r for r in results.get("skipped", {}).values() if r["key_settings"] == _eval_settings(settings)]
    if skipped:
        lines += ["", "Rows that could not be run:", ""] + [f"- {r['label']}: {r['reason']}" for r in skipped]
    others = sorted({json.dumps(r["key_settings"]) for r in results["rows"].values()} - {json.dumps(_eval_settings(settings))})
    for other in others:
        ks = json.loads(other)
        group = [r for r in results["rows"].values() if r["key_settings"] == ks]
        group.sort(key=_row_order)
        gfp = next((r for r in group if r["method"] == "fp"), None)
        windows = "all" if ks["max_windows"] is None else f"the first {ks['max_windows']}"
        lines += [
            "", f"## Rows at other evaluation settings: seqlen {ks['seqlen']}, {windows} windows of {ks.get('eval_split', 'test')}", "",
            "| method | bits | group | outliers | bits/weight | perplexity | vs fp |", "| --- | --- | --- | --- | --- | --- | --- |",
        ]  # fmt: skip
        for r in group:
            vs = f"{r['perplexity'] / gfp['perplexity']:.3f}x" if gfp else ""
            ratio = f"{r['ratio'] * 100:g}%" if r["ratio"] else ""
            if r.get("bits_budget") is not None:
                ratio += f", mixed: mean {r['bits_budget']:g} code bits"
            method = f"{r['method']} {r['qtype']}" if r.get("qtype") else r["method"]
            lines.append(
                f"| {method} | {'' if r.get('qtype') else r['bits'] or 32} | {r['group_size'] or ''} | {ratio} | {r['bits_per_weight']:.3f} | {r['perplexity']:.3f} | {vs} |"
            )
        lines += budget_table(group)
    return "\n".join(lines) + "\n"


def _comparisons(rows: list[dict]) -> list[str]:
    """Sentences computed from the rows: GWQ against RTN on its grid and at similar bits, and against GPTQ's time."""
    out: list[str] = []
    by = {(r["method"], r["bits"], r["group_size"], r["ratio"]): r for r in rows}
    for r in rows:
        if r["method"] != "gwq" or r["note"]:
            continue
        b, g = r["bits"], r["group_size"]
        rtn = by.get(("rtn", b, g, None))
        if rtn:
            cut = 100 * (1 - r["perplexity"] / rtn["perplexity"])
            verdict = "meets" if cut >= 25 else "misses"
            out.append(
                f"- GWQ W{b}g{g}+{r['ratio'] * 100:g}% vs RTN W{b}g{g}: perplexity {r['perplexity']:.2f} vs {rtn['perplexity']:.2f} "
                f"({cut:.1f}% lower; {verdict} the 25% bar) at {r['bits_per_weight']:.3f} vs {rtn['bits_per_weight']:.3f} bits/weight."
            )
        # The RTN row closest in bits (GWQ's outliers cost bits: compare at equal storage too).
        others = [o for o in rows if o["method"] == "rtn" and o["bits"] == b and not o["note"]]
        if others:
            near = min(others, key=lambda o: abs(o["bits_per_weight"] - r["bits_per_weight"]))
            if near is not rtn:
                out.append(
                    f"- At similar storage, GWQ W{b}g{g}+{r['ratio'] * 100:g}% ({r['bits_per_weight']:.3f} bpw) vs RTN W{b}g{near['group_size']} "
                    f"({near['bits_per_weight']:.3f} bpw): perplexity {r['perplexity']:.2f} vs {near['perplexity']:.2f}."
                )
        gptq = by.get(("gptq", b, g, None))
        if gptq:
            out.append(
                f"- Quantization time W{b}g{g}: GWQ {r['quant_seconds']:.0f} s (1 calibration sample, forward + backward) vs GPTQ "
                f"{gptq['quant_seconds']:.0f} s ({gptq['calibration']['samples']} samples, sequential); perplexity {r['perplexity']:.2f} vs {gptq['perplexity']:.2f}."
            )
    return ["", "Comparisons (computed from the rows above):", "", *out] if out else []


BUDGETS = (3.5, 3.75, 4.0, 4.25, 4.5, 4.75, 5.0)
PEER_FAMILIES = {
    "RTN": ("rtn",), "GPTQ": ("gptq", "gptq_act"), "AWQ": ("awq",), "torchao affine": ("ao_affine",), "torchao HQQ": ("ao_hqq",),
    "llama.cpp imatrix": ("llamacpp",),
}  # fmt: skip


def best_within(rows: list[dict], methods: tuple[str, ...], budget: float) -> dict | None:
    """The lowest-perplexity row of ``methods`` with at most ``budget`` bits per weight
    (Q4_1-caveat rows excluded: they are not wins of any method).

    Example:
        >>> rows = [{"method": "rtn", "bits_per_weight": 4.25, "perplexity": 28.0, "note": ""},
        ...         {"method": "rtn", "bits_per_weight": 3.4, "perplexity": 70.0, "note": ""}]
        >>> best_within(rows, ("rtn",), 4.0)["perplexity"]
        70.0
    """
    cands = [r for r in rows if r["method"] in methods and _counts(r) and r["bits_per_weight"] <= budget + 1e-9]
    return min(cands, key=lambda r: r["perplexity"]) if cands else None


def _counts(r: dict) -> bool:
    """Whether a row takes part in the fronts: Q4_1-caveat rows do not; llama.cpp rows do (their caveat is stated beside them)."""
    return not r["note"] or r["method"] in LLAMACPP


def llamacpp_table(rows: list[dict]) -> list[str]:
    """Criterion (1): at each llama.cpp point, the best GWQ row (any variant) with no more bits per weight."""
    lc = sorted((r for r in rows if r["method"] in LLAMACPP), key=lambda r: (r["method"], r["bits_per_weight"]))
    if not lc:
        return []
    lines = ["", "GWQ against llama.cpp at each of its points (best measured GWQ row with no more bits/weight):", "",
             "| llama.cpp row | bpw | perplexity | best GWQ at <= bpw | its bpw | its perplexity | GWQ lower? |",
             "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in lc:
        g = best_within(rows, tuple(GWQ_VARIANTS), r["bits_per_weight"])
        verdict = "–" if g is None else ("yes" if g["perplexity"] < r["perplexity"] else "**no**")
        gcells = "– | – | –" if g is None else f"{g['label']} | {g['bits_per_weight']:.3f} | {g['perplexity']:.3f}"
        lines.append(f"| {r['label']} | {r['bits_per_weight']:.3f} | {r['perplexity']:.3f} | {gcells} | {verdict} |")
    types = {r["label"]: r.get("tensor_types") for r in lc}
    lines += ["", "Tensor types llama.cpp chose for the decoder linears (count of tensors):", ""]
    lines += [f"- {label}: " + ", ".join(f"{k} x{v}" for k, v in (t or {}).items()) for label, t in types.items()]
    import llamacpp_peer  # beside this script

    lines += ["", f"Caveat: {llamacpp_peer.CAVEAT}. Below 4.1 bpw llama.cpp has no format for this model (GWQ has)."]
    return lines


def budget_table(rows: list[dict]) -> list[str]:
    """Criterion 2 as a table: at each bits/weight budget, the best measured row of GWQ (any
    variant) and of each peer family; a cell is empty where a family has no measured row
    within the budget.  Only measured rows count: no interpolation."""
    gwq_methods = tuple(GWQ_VARIANTS)
    fams = {"GWQ (best variant)": gwq_methods, **PEER_FAMILIES}
    head = "| budget (bpw) | " + " | ".join(fams) + " | GWQ below every measured peer? |"
    lines = ["", "Best perplexity within each bits/weight budget (measured rows only; Q4_1-caveat rows excluded):", "", head,
             "|" + "---|" * (len(fams) + 2)]  # fmt: skip
    for budget in BUDGETS:
        cells, best = [], {}
        for fam, methods in fams.items():
            r = best_within(rows, methods, budget)
            best[fam] = r
            cells.append(f"{r['perplexity']:.2f} ({r['label']})" if r else "–")
        g = best["GWQ (best variant)"]
        peers_here = [r for fam, r in best.items() if fam != "GWQ (best variant)" and r]
        verdict = "–" if not g or not peers_here else ("yes" if all(g["perplexity"] < r["perplexity"] for r in peers_here) else "**no**")
        lines.append(f"| {budget:g} | " + " | ".join(cells) + f" | {verdict} |")
    fp = next((r for r in rows if r["method"] == "fp"), None)
    w4 = best_within(rows, gwq_methods, 4.6)
    w4 = w4 if w4 and w4["bits"] == 4 else None
    if fp and w4:
        gap = 100 * (w4["perplexity"] / fp["perplexity"] - 1)
        lines += ["", f"Best W4-class GWQ row (<= 4.6 bpw): {w4['label']} at {w4['bits_per_weight']:.3f} bpw, perplexity {w4['perplexity']:.2f} "
                      f"vs FP {fp['perplexity']:.2f}: {gap:+.2f}% ({'within' if gap <= 10 else 'not within'} 10%)."]  # fmt: skip
    return lines


def settings_file_name(results: dict) -> str:
    return results.get("json_name", "quality_smollm2.json")


def plot(results: dict, settings: Settings, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"].values() if r["key_settings"] == _eval_settings(settings)]
    fp = next((r for r in rows if r["method"] == "fp"), None)
    # Clip the y axis at 10x FP (a collapsed 2-bit RTN row would squash every other line); rows
    # above it are drawn on the top edge as triangles and named in the legend with their value.
    top = 10 * fp["perplexity"] if fp else None
    fig, ax = plt.subplots(figsize=(9, 8))
    colors = plt.get_cmap("tab20").colors
    off_scale = []
    for i, method in enumerate(m for m in METHODS if m != "fp"):
        pts = [(r["bits_per_weight"], r["perplexity"]) for r in rows if r["method"] == method and _counts(r)]
        if not pts:
            continue
        style = "-" if method in GWQ_VARIANTS else "--"  # GWQ variants solid, peers dashed
        color = colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20]
        width = 1.5
        if method == DEFAULT_METHOD:
            color, width = "black", 2.5
        front = [(b, min(p, top) if top else p) for b, p in pareto_front(pts)]
        ax.plot(*zip(*front), marker="o", linestyle=style, color=color, linewidth=width,
                label=f"{method} (default GWQConfig)" if method == DEFAULT_METHOD else method)  # fmt: skip
        ax.scatter(*zip(*[(b, min(p, top) if top else p) for b, p in pts]), color=color, s=12, alpha=0.5)
        if method in LLAMACPP:
            color, width = ("tab:red", 2.0) if method == "llamacpp" else ("salmon", 1.5)
        for r in rows:
            if r["method"] == method and _counts(r):
                y = r["perplexity"]
                if top and y > top:
                    off_scale.append(f"{r['label']}: {y:.0f}")
                    ax.scatter([r["bits_per_weight"]], [top], marker="^", color=color, s=40)
                    y = top
                tag = r["qtype"] if r.get("qtype") else f"W{r['bits']}g{r['group_size']}"
                ax.annotate(tag, (r["bits_per_weight"], y), fontsize=6,
                            xytext=(3, 3), textcoords="offset points", color=color)  # fmt: skip
    caveat = [(r["bits_per_weight"], r["perplexity"]) for r in rows if not _counts(r)]
    if caveat:
        ax.scatter(*zip(*caveat), marker="x", color="gray", label="4-bit g32 (Q4_1 grid, not a win)")
    if fp:
        ax.axhline(fp["perplexity"], color="black", linestyle=":", linewidth=1, label=f"fp32 ({fp['perplexity']:.2f})")
        ax.set_ylim(top=top * 1.05)
    if off_scale:
        ax.plot([], [], marker="^", linestyle="none", color="gray", label="off scale: " + ", ".join(off_scale))
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (codes + scales + zeros + outliers + indices)")
    ax.set_ylabel(f"WikiText-2 {settings.eval_split} perplexity (log)")
    win = "all" if settings.max_windows is None else settings.max_windows
    ax.set_title(f"SmolLM2-135M, seqlen {settings.seqlen}, {win} windows: Pareto front per method")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.1))  # below the axes: the fronts fill the top left
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def _eval_settings(s: Settings) -> dict:
    split = {} if s.eval_split == "test" else {"eval_split": s.eval_split}  # absent for test: keeps cached keys
    return {"model": s.model, "seqlen": s.seqlen, "max_windows": s.max_windows, **split}


# ----------------------------------------------------------------------------- main


def _int_list(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t]


def _float_list(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="'smollm2' (the wheel's GGUF), a HF folder or a .gguf file")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list from {','.join(METHODS)}")
    p.add_argument("--bits", type=_int_list, default=[2, 3, 4])
    p.add_argument("--group-sizes", type=_int_list, default=[32, 64, 128])
    p.add_argument("--ratios", type=_float_list, default=[0.005, 0.01, 0.02])
    p.add_argument("--rows", nargs="+", type=Row.parse, default=None, help="explicit rows (method[:bits:group[:ratio]]), instead of the grid")
    p.add_argument("--calib-seqlen", type=int, default=2048)
    p.add_argument("--calib-samples", type=int, default=16, help="GPTQ calibration windows")
    p.add_argument("--gwq-samples", type=int, default=1)
    p.add_argument("--gwq-many-samples", type=int, default=8)
    p.add_argument("--awq-samples", type=int, default=4)
    p.add_argument("--awq-seqlen", type=int, default=512)
    p.add_argument("--awq-grid", type=int, default=20)
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument(
        "--eval-split", choices=["test", "validation"], default="test",
        help="evaluate on WikiText-2 validation instead of test: for choosing settings without touching the test "
        "windows (use another --name; calibration windows are drawn from validation too)",
    )  # fmt: skip
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--name", default="quality_smollm2")
    p.add_argument("--force", action="store_true", help="recompute rows already in the JSON")
    p.add_argument("--no-plot", action="store_true")
    return p


def _merged(json_path: Path, results: dict) -> dict:
    """``results`` with the rows (and skips) another process wrote to ``json_path`` meanwhile:
    several runs can share one results file without dropping each other's rows."""
    if json_path.is_file():
        on_disk = json.loads(json_path.read_text())
        for part in ("rows", "skipped"):
            results.setdefault(part, {})
            for key, value in on_disk.get(part, {}).items():
                results[part].setdefault(key, value)
        results["commands"] += [c for c in on_disk.get("commands", []) if c not in results["commands"]]
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        print(f"quality.py: error: unknown methods {unknown}; choose from {METHODS}", file=sys.stderr)
        return 2
    rows = args.rows if args.rows is not None else grid_rows(methods, args.bits, args.group_sizes, args.ratios)
    settings = Settings(
        args.model, args.seqlen, args.max_windows, args.calib_seqlen, args.gwq_samples, args.gwq_many_samples,
        args.calib_samples, args.awq_samples, args.awq_seqlen, args.awq_grid, args.damp, args.eval_split,
    )  # fmt: skip
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.out_dir / f"{args.name}.json"
    results = json.loads(json_path.read_text()) if json_path.is_file() else {"rows": {}, "commands": []}
    results["json_name"] = json_path.name
    results["machine"] = machine_info()
    command = "python benchmarks/quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if command not in results["commands"]:
        results["commands"].append(command)

    bench = Bench(settings)
    for i, row in enumerate(rows, 1):
        key = row.key(settings)
        if key in results["rows"] and not args.force:
            cached = results["rows"][key]
            print(f"[{i}/{len(rows)}] {row.label}: cached ({cached['perplexity']:.3f} ppl)", flush=True)
            continue
        print(f"[{i}/{len(rows)}] {row.label} ...", flush=True)
        try:
            record = bench.run(row)
        except ValueError as err:  # a configuration the method cannot do (e.g. torchao needs K % group == 0)
            print(f"[{i}/{len(rows)}] {row.label}: skipped: {err}", flush=True)
            results.setdefault("skipped", {})[key] = {"label": row.label, "reason": str(err), "key_settings": _eval_settings(settings)}
            write_json_atomic(json_path, _merged(json_path, results))
            continue
        record["key_settings"] = _eval_settings(settings)
        record["command"] = command
        results["rows"][key] = record
        write_json_atomic(json_path, _merged(json_path, results))
        print(
            f"[{i}/{len(rows)}] {row.label}: {record['bits_per_weight']:.3f} bpw, quant {record['quant_seconds']:.1f} s, "
            f"eval {record['eval_seconds']:.1f} s, ppl {record['perplexity']:.3f}",
            flush=True,
        )
    write_json_atomic(json_path, _merged(json_path, results))
    write_text_atomic(args.out_dir / f"{args.name}.md", markdown(results, settings))
    if not args.no_plot:
        plot(results, settings, args.out_dir / f"{args.name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
