"""gwq-compile: GWQ (gradient-aware weight quantization) for PyTorch.

Example:
    >>> import torch
    >>> from gwq_compile import GWQConfig, quantize_, quantization_report
    >>> model = torch.nn.Sequential(torch.nn.Embedding(100, 64), torch.nn.Linear(64, 100))
    >>> ids = torch.randint(0, 100, (1, 32))
    >>> cfg = GWQConfig(bits=4, group_size=32, skip_output_embeddings=False, skip_modules=(), progress=False)
    >>> quantize_(model, cfg, calibration_data=ids)
    >>> type(model[1].weight).__name__
    'GWQTensor'
    >>> quantization_report(model)["outliers"]
    64
"""

from gwq_compile.backend import CalibrationData, backend  # the function shadows the module name on purpose
from gwq_compile.config import GWQConfig
from gwq_compile.data import calibration_tokens
from gwq_compile.quantize import gwq_filter, quantize_
from gwq_compile.report import quantization_report
from gwq_compile.serialization import load_quantized, save_quantized
from gwq_compile.tensor import GWQTensor

__all__ = [
    "CalibrationData",
    "GWQConfig",
    "GWQTensor",
    "backend",
    "calibration_tokens",
    "gwq_filter",
    "load_quantized",
    "quantization_report",
    "quantize_",
    "save_quantized",
]
__version__ = "0.1.0"
