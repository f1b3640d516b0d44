"""gwq-compile: GWQ (gradient-aware weight quantization) for PyTorch."""
from gwq_compile.tensor import GWQTensor

__all__ = ["GWQTensor"]
