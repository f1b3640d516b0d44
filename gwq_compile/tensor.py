"""``GWQTensor``: a linear weight stored in the GWQ packed format.

The layout itself lives in :mod:`gwq_compile.packing`; this class only holds the
fields, keeps torch.compile / serialization working (via torchao's
``TorchAOBaseTensor``, which derives flatten/unflatten, ``to``, ``detach``, ``clone``
from the field lists) and routes ``F.linear`` to ``torch.ops.gwq.linear``.

Example:
    >>> import torch
    >>> from gwq_compile.tensor import GWQTensor
    >>> w = torch.randn(32, 80)
    >>> mask = torch.rand_like(w) < 0.01
    >>> qw = GWQTensor.from_float(w, mask, bits=4, group_size=32)
    >>> torch.nn.functional.linear(torch.randn(2, 80), qw).shape
    torch.Size([2, 32])
    >>> bool((qw.dequantize()[mask] - w[mask]).abs().max() < 1e-2)
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchao.utils import TorchAOBaseTensor

from gwq_compile import ops as _ops  # noqa: F401  (registers torch.ops.gwq.linear)
from gwq_compile import packing
from gwq_compile.codegen import launch as _launch  # noqa: F401  (registers torch.ops.gwq.linear_triton; no triton import)

aten = torch.ops.aten

__all__ = ["GWQTensor"]


class GWQTensor(TorchAOBaseTensor):
    """A GWQ-quantized 2-D weight ``[out_features, in_features]``.

    Tensor fields (see :mod:`gwq_compile.packing` for the exact layout):
        packed_codes (uint8 [N, row_bytes]): bit-plane packed b-bit codes.
        group_scales (fp16 [N, G]), group_zeros (uint8 [N, G]): per-group grid.
        outlier_row_ptr (int32 [N+1]), outlier_col_idx (int16/int32 [nnz]),
        outlier_values (fp16 [nnz]): the salient weights in CSR.
    Attributes:
        bits (int), group_size (int, effective, > 0), shape (torch.Size), dtype: the
        original weight's shape and dtype, which ``dequantize()`` returns.
    """

    tensor_data_names = [f for f in packing.PackedWeight._fields if f not in ("bits", "group_size", "in_features")]
    tensor_attribute_names = ["bits", "group_size", "shape", "dtype"]

    def __new__(
        cls,
        packed_codes: torch.Tensor,
        group_scales: torch.Tensor,
        group_zeros: torch.Tensor,
        outlier_row_ptr: torch.Tensor,
        outlier_col_idx: torch.Tensor,
        outlier_values: torch.Tensor,
        bits: int,
        group_size: int,
        shape: torch.Size,
        dtype: torch.dtype,
    ):
        return torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=dtype, device=packed_codes.device, requires_grad=False
        )

    def __init__(
        self,
        packed_codes: torch.Tensor,
        group_scales: torch.Tensor,
        group_zeros: torch.Tensor,
        outlier_row_ptr: torch.Tensor,
        outlier_col_idx: torch.Tensor,
        outlier_values: torch.Tensor,
        bits: int,
        group_size: int,
        shape: torch.Size,
        dtype: torch.dtype,
    ):
        super().__init__()
        self.packed_codes = packed_codes
        self.group_scales = group_scales
        self.group_zeros = group_zeros
        self.outlier_row_ptr = outlier_row_ptr
        self.outlier_col_idx = outlier_col_idx
        self.outlier_values = outlier_values
        self.bits = bits
        self.group_size = group_size

    @classmethod
    def from_packed(cls, packed: packing.PackedWeight, dtype: torch.dtype) -> "GWQTensor":
        shape = torch.Size([packed.packed_codes.shape[0], packed.in_features])
        return cls(*packed[:6], packed.bits, packed.group_size, shape, dtype)

    @classmethod
    def from_float(
        cls,
        weight: torch.Tensor,
        outlier_mask: torch.Tensor | None,
        bits: int,
        group_size: int,
        symmetric: bool = False,
    ) -> "GWQTensor":
        """Round-to-nearest quantization of ``weight`` with ``outlier_mask`` kept in fp16."""
        return cls.from_packed(packing.quantize_weight(weight, outlier_mask, bits, group_size, symmetric), weight.dtype)

    @property
    def in_features(self) -> int:
        return self.shape[1]

    def packed(self) -> packing.PackedWeight:
        return packing.PackedWeight(
            self.packed_codes, self.group_scales, self.group_zeros, self.outlier_row_ptr,
            self.outlier_col_idx, self.outlier_values, self.bits, self.group_size, self.in_features,
        )  # fmt: skip

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight (codes dequantized plus outliers), in the original dtype by default."""
        return packing.dequantize_weight(self.packed(), dtype or self.dtype)

    def outlier_mask(self) -> torch.Tensor:
        """Bool ``[N, K]``: True where the weight is kept as an fp16 outlier."""
        return packing.csr_to_mask(self.outlier_row_ptr, self.outlier_col_idx, tuple(self.shape))

    @property
    def num_outliers(self) -> int:
        return self.outlier_values.numel()

    def storage_bits(self) -> dict[str, int]:
        return packing.storage_bits(self.packed())

    def __repr__(self) -> str:
        return f"GWQTensor({self._quantization_type()}, dtype={self.dtype}, device={self.device})"

    def _quantization_type(self) -> str:
        return f"bits={self.bits}, group_size={self.group_size}, outliers={self.num_outliers}, shape={tuple(self.shape)}"


implements = GWQTensor.implements
implements_torch_function = GWQTensor.implements_torch_function


def _linear(x: torch.Tensor, weight: GWQTensor, bias: torch.Tensor | None) -> torch.Tensor:
    args = (
        x, weight.packed_codes, weight.group_scales, weight.group_zeros, weight.outlier_row_ptr,
        weight.outlier_col_idx, weight.outlier_values, bias, weight.bits, weight.group_size, weight.in_features,
    )  # fmt: skip
    if x.is_cuda and _ops.kernel_choice() != "reference":
        # A triton_op: Inductor sees the Triton kernel inside compiled graphs.  CPU keeps the
        # opaque custom op (a triton_op cannot run on the interpreter inside torch.compile).
        return torch.ops.gwq.linear_triton(*args)
    return torch.ops.gwq.linear(*args)


@implements(aten.linear.default)
@implements_torch_function(F.linear)
def _(func, types, args, kwargs):
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if isinstance(x, GWQTensor) or not isinstance(weight, GWQTensor):
        raise NotImplementedError(f"{func}: only a dense input times a GWQTensor weight is supported")
    return _linear(x, weight, bias)


torch.serialization.add_safe_globals([GWQTensor])
