"""gwq-compile: GWQ (gradient-aware weight quantization) for PyTorch.

``import gwq_compile`` is cheap: the public names below load their modules on first use
(torchao, the ``torch.compile`` backend and its ``torch._dynamo``, Triton), and GWQ is
registered with transformers' quantizer registry as soon as that is imported
(:mod:`gwq_compile.hf_registration`).

Example:
    >>> import torch
    >>> from gwq_compile import GWQConfig, quantize_, quantization_report
    >>> model = torch.nn.Sequential(torch.nn.Embedding(100, 64), torch.nn.Linear(64, 100))
    >>> ids = torch.randint(0, 100, (1, 32))
    >>> cfg = GWQConfig(bits=4, group_size=32, skip_modules=(), progress=False)
    >>> quantize_(model, cfg, calibration_data=ids)
    >>> type(model[1].weight).__name__
    'GWQTensor'
    >>> quantization_report(model)["outliers"]   # the default outlier_ratio, 0.5 % of the Linear's 6400 weights
    32
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from gwq_compile import hf_registration, import_noise

# public name -> module defining it.  GWQConfig comes through gwq_compile.quantize so that
# its torchao handler is registered whenever the config is.
_LAZY = {
    "CalibrationData": "gwq_compile.compile_backend",
    "GWQConfig": "gwq_compile.quantize",
    "GWQHfConfig": "gwq_compile.hf_quantizer",
    "GWQTensor": "gwq_compile.tensor",
    "backend": "gwq_compile.compile_backend",
    "calibration_tokens": "gwq_compile.calibration_text",
    "gwq_filter": "gwq_compile.quantize",
    "load_quantized": "gwq_compile.serialization",
    "quantization_report": "gwq_compile.report",
    "quantize_": "gwq_compile.quantize",
    "save_quantized": "gwq_compile.serialization",
}

__all__ = sorted(_LAZY)
__version__ = "0.1.0"

import_noise.install()
hf_registration.install()


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gwq_compile' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:
    from gwq_compile.compile_backend import CalibrationData, backend
    from gwq_compile.config import GWQConfig
    from gwq_compile.calibration_text import calibration_tokens
    from gwq_compile.hf_quantizer import GWQHfConfig
    from gwq_compile.quantize import gwq_filter, quantize_
    from gwq_compile.report import quantization_report
    from gwq_compile.serialization import load_quantized, save_quantized
    from gwq_compile.tensor import GWQTensor
