"""Honest accounting of a GWQ model: every stored bit counts.

Bits per weight = (packed codes + fp16 scales + uint8 zeros + fp16 outlier values +
outlier column indices + CSR row pointers) / number of weights.

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
    }


def quantization_report(model: torch.nn.Module) -> dict:
    """Totals over the quantized layers, per-layer figures under ``"layers"``, and whole-model bytes.

    Keys: ``bits_per_weight``, ``outliers``, ``quantized_weights``, ``bytes_before`` and
    ``bytes_after`` (quantized layers only), ``model_bytes_before``/``model_bytes_after``
    (every parameter and buffer, counted once even when tied), ``layers``.
    """
    layers: dict[str, dict] = {}
    seen: set[int] = set()
    model_before = model_after = 0
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        if isinstance(tensor, GWQTensor):
            rep = layer_report(tensor)
            layers[name.removesuffix(".weight")] = rep
            model_before += rep["bytes_before"]
            model_after += rep["bytes_after"]
        else:
            model_before += tensor.numel() * tensor.element_size()
            model_after += tensor.numel() * tensor.element_size()
    numel = sum(torch.Size(r["shape"]).numel() for r in layers.values())
    stored_bits = sum(r["bits_per_weight"] * torch.Size(r["shape"]).numel() for r in layers.values())
    return {
        "bits_per_weight": stored_bits / numel if numel else float("nan"),
        "outliers": sum(r["outliers"] for r in layers.values()),
        "quantized_weights": numel,
        "quantized_layers": len(layers),
        "bytes_before": sum(r["bytes_before"] for r in layers.values()),
        "bytes_after": sum(r["bytes_after"] for r in layers.values()),
        "model_bytes_before": model_before,
        "model_bytes_after": model_after,
        "layers": layers,
    }
