"""Honest accounting of a GWQ model: every stored bit counts, and so does every resident byte.

Bits per weight = (packed codes + fp16 scales + uint8 zeros + fp16 outlier values +
outlier column indices + CSR row pointers) / number of weights: the stored format, what
a checkpoint holds.  ``resident_bytes`` is what the weights hold in memory now, their
runtime layout included (on CPU the int4 GEMM operand replaces the bit-plane codes, see
:mod:`gwq_compile.cpu_layout`).

Example:
    >>> import torch
    >>> from gwq_compile.tensor import GWQTensor
    >>> from gwq_compile.report import quantization_report
    >>> lin = torch.nn.Linear(128, 64)
    >>> lin.weight = torch.nn.Parameter(GWQTensor.from_float(lin.weight.detach(), None, 4, 128), requires_grad=False)
    >>> round(quantization_report(lin)["bits_per_weight"], 3)   # 4 + (16 + 8) / 128 + 65 * 32 / 8192
    4.441
"""

from __future__ import annotations

import torch

from gwq_compile.tensor import GWQTensor


def layer_report(weight: GWQTensor) -> dict:
    bits = weight.storage_bits()
    numel = weight.numel()
    stored = sum(bits.values())
    return {
        "shape": list(weight.shape),
        "bits": weight.bits,
        "group_size": weight.group_size,
        "outliers": weight.num_outliers,
        "outlier_fraction": weight.num_outliers / numel,
        "bits_per_weight": stored / numel,
        "bits_breakdown": {k: v / numel for k, v in bits.items()},
        "bytes_before": numel * weight.dtype.itemsize,
        "bytes_after": stored // 8,
        "code_layout": weight.code_layout,
        "resident_bytes": weight.resident_bytes(),
    }


def quantization_report(model: torch.nn.Module) -> dict:
    """Totals over the quantized layers, per-layer figures under ``"layers"``, and whole-model bytes.

    Keys: ``bits_per_weight`` (stored bits over the quantized weights), ``outliers``,
    ``quantized_weights``, ``bytes_before``/``bytes_after`` (quantized layers only, dense at the
    weight's dtype / stored), ``resident_bytes`` (quantized layers, in memory now),
    ``model_bytes_before``/``model_bytes_after``/``model_resident_bytes`` (every parameter and
    buffer, counted once even when tied), ``model_bits_per_weight`` (the model's stored bits over
    all its parameters: the dense ones at their dtype's width), ``layers``.
    """
    layers: dict[str, dict] = {}
    seen: set[int] = set()
    model_before = model_after = model_resident = 0
    param_count = param_bytes_after = 0
    named = [(n, t, True) for n, t in model.named_parameters(remove_duplicate=False)]
    named += [(n, t, False) for n, t in model.named_buffers(remove_duplicate=False)]
    for name, tensor, is_param in named:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        if isinstance(tensor, GWQTensor):
            rep = layer_report(tensor)
            layers[name.removesuffix(".weight")] = rep
            before, after, resident = rep["bytes_before"], rep["bytes_after"], rep["resident_bytes"]
        else:
            before = after = resident = tensor.numel() * tensor.element_size()
        model_before, model_after, model_resident = model_before + before, model_after + after, model_resident + resident
        if is_param:
            param_count += tensor.numel()
            param_bytes_after += after
    numel = sum(torch.Size(r["shape"]).numel() for r in layers.values())
    stored_bits = sum(r["bits_per_weight"] * torch.Size(r["shape"]).numel() for r in layers.values())
    return {
        "bits_per_weight": stored_bits / numel if numel else float("nan"),
        "outliers": sum(r["outliers"] for r in layers.values()),
        "quantized_weights": numel,
        "quantized_layers": len(layers),
        "bytes_before": sum(r["bytes_before"] for r in layers.values()),
        "bytes_after": sum(r["bytes_after"] for r in layers.values()),
        "resident_bytes": sum(r["resident_bytes"] for r in layers.values()),
        "model_bytes_before": model_before,
        "model_bytes_after": model_after,
        "model_resident_bytes": model_resident,
        "model_bits_per_weight": 8 * param_bytes_after / param_count if param_count else float("nan"),
        "layers": layers,
    }
