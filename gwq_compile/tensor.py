"""``GWQTensor``: a linear weight quantized with GWQ, in the layout its device runs fastest.

The stored format (bit-plane codes, fp16 scales, uint8 zeros, CSR outliers) is defined
in :mod:`gwq_compile.packing` and is what checkpoints hold.  A ``GWQTensor`` keeps the
grid and the outliers in that format and its codes in one of two layouts:

* ``"planes"``: the stored bit planes (``packed_codes``): on CUDA (the Triton kernels
  read them), on ``meta`` and wherever no runtime layout applies;
* ``"cpu_int4"``: on CPU, torch's int4 CPU GEMM operand (``cpu_int4_codes`` +
  ``cpu_scales_zeros``, :mod:`gwq_compile.cpu_layout`), derived when the weight is
  quantized, loaded, unpickled or moved to the CPU.  It never reaches a checkpoint:
  :meth:`GWQTensor.packed` rebuilds the stored codes exactly, and pickling
  (``torch.save``) stores those.

``F.linear`` on a ``GWQTensor`` goes through :func:`gwq_compile.dispatch.linear` (the one
place that picks the op); a *transposed* one (``transposed=True``: an HF ``Conv1D`` weight,
``[in_features, out_features]`` as that module stores it) runs through ``torch.addmm(b, x, W)``
and ``x @ W``, which is how ``Conv1D.forward`` uses it.  Its packed data is the same
``[out, in]`` format as a linear's; only the parameter's shape (and ``dequantize()``) follow
the module's orientation. ``F.embedding`` dequantizes only the rows it looks up (a tied
input embedding can share the quantized LM head), and ``.to(dtype)`` / ``.to(device)``
return a ``GWQTensor`` whose ``dtype`` is what it computes in and returns.  torchao's
``TorchAOBaseTensor`` derives flatten/unflatten (so torch.compile sees the inner tensors),
``detach``, ``clone`` and ``__repr__`` from the field lists.

Example:
    >>> import torch
    >>> from gwq_compile.tensor import GWQTensor
    >>> w = torch.randn(32, 80)
    >>> mask = torch.rand_like(w) < 0.01
    >>> qw = GWQTensor.from_float(w, mask, bits=4, group_size=32)
    >>> qw.code_layout, torch.nn.functional.linear(torch.randn(2, 80), qw).shape
    ('cpu_int4', torch.Size([2, 32]))
    >>> bool((qw.dequantize()[mask] - w[mask]).abs().max() < 1e-2)
    True
"""

from __future__ import annotations

import functools
import hashlib
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torchao.utils import TorchAOBaseTensor, return_and_correct_aliasing

from gwq_compile import cpu_layout, dispatch, packing
from gwq_compile import ops as _ops  # noqa: F401  (registers torch.ops.gwq.*)
from gwq_compile.codegen import launch as _launch  # noqa: F401  (registers torch.ops.gwq.linear_triton; no triton import)

aten = torch.ops.aten

__all__ = ["LAYOUTS", "GWQTensor", "default_layout"]

#: Code layouts a GWQTensor can hold.
LAYOUTS = ("planes", "cpu_int4")


def default_layout(device: torch.device) -> str:
    """The layout a weight gets on ``device``: ``"cpu_int4"`` on CPU (when torch has the int4
    CPU GEMM), ``"planes"`` elsewhere."""
    return "cpu_int4" if torch.device(device).type == "cpu" and cpu_layout.available() else "planes"


class GWQTensor(TorchAOBaseTensor):
    """A GWQ-quantized 2-D weight ``[out_features, in_features]`` (``[in, out]`` when ``transposed``).

    Tensor fields (layout details in :mod:`gwq_compile.packing` and :mod:`gwq_compile.cpu_layout`):
        group_scales (fp16 [N, G]), group_zeros (uint8 [N, G]): the stored group grid.
        outlier_row_ptr (int32 [N+1]), outlier_col_idx (int16/int32 [nnz]),
        outlier_values (fp16 [nnz]): the salient weights in CSR.
        packed_codes (uint8 [N, row_bytes]): the stored bit-plane codes (``"planes"`` layout only).
        cpu_int4_codes (uint8 [Np, Kc/2]), cpu_scales_zeros (bf16 [Kc/tile, Np, 2]): the int4
            CPU GEMM operand (``"cpu_int4"`` layout only).
    Attributes:
        bits (int), group_size (int, effective, > 0), shape (torch.Size), dtype: the dtype
        ``F.linear`` computes in and ``dequantize()`` returns; double_quant (bool): the grid is
        stored double-quantized (:mod:`gwq_compile.packing`; in memory it is the same fp16/uint8 grid);
        transposed (bool): the parameter is ``[in, out]`` (HF ``Conv1D``); every field keeps the
        linear's ``[out, in]`` orientation.
    """

    tensor_data_names = ["group_scales", "group_zeros", "outlier_row_ptr", "outlier_col_idx", "outlier_values"]
    tensor_attribute_names = ["bits", "group_size", "shape", "dtype"]
    optional_tensor_data_names = ["packed_codes", "cpu_int4_codes", "cpu_scales_zeros"]
    optional_tensor_attribute_names = ["double_quant", "transposed"]

    def __new__(
        cls,
        group_scales: torch.Tensor,
        group_zeros: torch.Tensor,
        outlier_row_ptr: torch.Tensor,
        outlier_col_idx: torch.Tensor,
        outlier_values: torch.Tensor,
        bits: int,
        group_size: int,
        shape: torch.Size,
        dtype: torch.dtype,
        packed_codes: Optional[torch.Tensor] = None,
        cpu_int4_codes: Optional[torch.Tensor] = None,
        cpu_scales_zeros: Optional[torch.Tensor] = None,
        double_quant: bool = False,
        transposed: bool = False,
    ):
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=group_scales.device, requires_grad=False)

    def __init__(
        self,
        group_scales: torch.Tensor,
        group_zeros: torch.Tensor,
        outlier_row_ptr: torch.Tensor,
        outlier_col_idx: torch.Tensor,
        outlier_values: torch.Tensor,
        bits: int,
        group_size: int,
        shape: torch.Size,
        dtype: torch.dtype,
        packed_codes: Optional[torch.Tensor] = None,
        cpu_int4_codes: Optional[torch.Tensor] = None,
        cpu_scales_zeros: Optional[torch.Tensor] = None,
        double_quant: bool = False,
        transposed: bool = False,
    ):
        super().__init__()
        if (packed_codes is None) == (cpu_int4_codes is None) or (cpu_int4_codes is None) != (cpu_scales_zeros is None):
            raise ValueError("GWQTensor holds its codes in exactly one layout: packed_codes, or cpu_int4_codes with cpu_scales_zeros")
        self.group_scales = group_scales
        self.group_zeros = group_zeros
        self.outlier_row_ptr = outlier_row_ptr
        self.outlier_col_idx = outlier_col_idx
        self.outlier_values = outlier_values
        self.bits = bits
        self.group_size = group_size
        self.packed_codes = packed_codes
        self.cpu_int4_codes = cpu_int4_codes
        self.cpu_scales_zeros = cpu_scales_zeros
        self.double_quant = bool(double_quant)
        self.transposed = bool(transposed)
        self._flat_shape, self._flat_dtype = torch.Size(shape), dtype  # for __tensor_flatten__
        # The linear's (out_features, in_features), read by the hot path as a plain attribute.
        self._linear_shape = (shape[1], shape[0]) if self.transposed else (shape[0], shape[1])

    def __tensor_flatten__(self):
        """torchao's generic flatten, from plain attributes.  A compiled graph's guards call this
        for every subclass weight on every call (Dynamo's metadata check); the generic version
        reads ``.shape``/``.dtype`` through ``__torch_function__``, about 25 us a weight, 5 ms of
        a SmolLM2 decode step.  Same names in the same order, same metadata."""
        names = list(self.tensor_data_names)
        names += [n for n in self.optional_tensor_data_names if getattr(self, n) is not None]
        meta = {"bits": self.bits, "group_size": self.group_size, "shape": self._flat_shape, "dtype": self._flat_dtype}
        return names, {**meta, "double_quant": self.double_quant, "transposed": self.transposed}

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_packed(cls, packed: packing.PackedWeight, dtype: torch.dtype, layout: Optional[str] = None, transposed: bool = False) -> "GWQTensor":
        """The weight of a stored :class:`~gwq_compile.packing.PackedWeight`, in ``layout``
        (default: :func:`default_layout` of its device); ``transposed``: as an HF ``Conv1D``'s
        ``[in, out]`` parameter."""
        layout = layout or default_layout(packed.packed_codes.device)
        if layout not in LAYOUTS:
            raise ValueError(f"GWQTensor layout must be one of {LAYOUTS}, got {layout!r}")
        n, k = packed.packed_codes.shape[0], packed.in_features
        shape = torch.Size([k, n] if transposed else [n, k])
        grid_and_outliers = (*packed[1:6], packed.bits, packed.group_size, shape, dtype)
        flags = {"double_quant": packed.double_quant, "transposed": transposed}
        if layout == "planes":
            return cls(*grid_and_outliers, packed_codes=packed.packed_codes, **flags)
        if packed.packed_codes.device.type != "cpu":
            raise ValueError(f"the cpu_int4 layout needs CPU tensors, got {packed.packed_codes.device}")
        codes, grid = cpu_layout.pack(packed)
        return cls(*grid_and_outliers, cpu_int4_codes=codes, cpu_scales_zeros=grid, **flags)

    @classmethod
    def from_float(
        cls, weight: torch.Tensor, outlier_mask: Optional[torch.Tensor], bits: int, group_size: int, symmetric: bool = False,
        double_quant: bool = False,
    ) -> "GWQTensor":
        """Round-to-nearest quantization of ``weight`` with ``outlier_mask`` kept in fp16."""
        packed = packing.quantize_weight(weight, outlier_mask, bits, group_size, symmetric, double_quant=double_quant)
        return cls.from_packed(packed, weight.dtype)

    def to_layout(self, layout: str, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> "GWQTensor":
        """This weight in ``layout`` on ``device`` (default: its own), as ``dtype``."""
        device = torch.device(device) if device is not None else self.device
        packed = self.packed()
        packed = packed._replace(**{f: getattr(packed, f).to(device) for f in packed._fields[:6]})  # the tensors; attributes as they are
        return GWQTensor.from_packed(packed, dtype or self.dtype, layout, self.transposed)

    # ------------------------------------------------------------------ views of the data

    @property
    def code_layout(self) -> str:
        """``"planes"`` or ``"cpu_int4"`` (not ``layout``: that is torch's ``torch.strided``)."""
        return "planes" if self.packed_codes is not None else "cpu_int4"

    @property
    def linear_shape(self) -> tuple[int, int]:
        """``(out_features, in_features)``, whatever the parameter's orientation."""
        return self._linear_shape

    @property
    def in_features(self) -> int:
        return self._linear_shape[1]

    @property
    def out_features(self) -> int:
        return self._linear_shape[0]

    def stored_fields(self) -> tuple[torch.Tensor, ...]:
        """The six tensors of the stored format (``ops.STORED_FIELDS`` order); codes rebuilt exactly
        from the CPU layout when needed."""
        codes = self.packed_codes
        if codes is None:
            codes = torch.ops.gwq.unpack_cpu_codes(self.cpu_int4_codes, self.bits, self.group_size, self.in_features, self.out_features)
        return (codes, *self._grid_fields())

    def cpu_fields(self) -> tuple[torch.Tensor, ...]:
        """The tensors of ``torch.ops.gwq.linear_cpu`` (``ops.CPU_FIELDS`` order)."""
        return (self.cpu_int4_codes, self.cpu_scales_zeros, *self._grid_fields())

    def _grid_fields(self) -> tuple[torch.Tensor, ...]:
        return (self.group_scales, self.group_zeros, self.outlier_row_ptr, self.outlier_col_idx, self.outlier_values)

    def packed(self) -> packing.PackedWeight:
        """The stored format of this weight (exact, whatever the layout)."""
        return packing.PackedWeight(*self.stored_fields(), self.bits, self.group_size, self.in_features, self.double_quant)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense weight (codes dequantized plus outliers) in the parameter's shape, in
        ``self.dtype`` by default."""
        dense = self.dequantize_rows(None, dtype)
        return dense.t() if self.transposed else dense

    def dequantize_rows(self, rows: Optional[torch.Tensor], dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Dense output rows ``[len(rows), in_features]`` of the linear (all rows for ``None``;
        the linear's orientation even when ``transposed``): an embedding lookup."""
        attributes = (self.bits, self.group_size, self.in_features, dtype or self.dtype)
        return torch.ops.gwq.dequantize(self.packed_codes, self.cpu_int4_codes, *self._grid_fields(), rows, *attributes)

    def outlier_mask(self) -> torch.Tensor:
        """Bool, in the parameter's shape: True where the weight is kept as an fp16 outlier."""
        mask = packing.csr_to_mask(self.outlier_row_ptr, self.outlier_col_idx, self.linear_shape)
        return mask.t() if self.transposed else mask

    @property
    def num_outliers(self) -> int:
        return self.outlier_values.numel()

    def storage_bits(self) -> dict[str, int]:
        """Bits of the stored format, by component (what checkpoints hold and the report counts)."""
        return packing.storage_bits_of(
            self.out_features, self.in_features, self.bits, self.group_size, self.num_outliers, self.outlier_col_idx.element_size(), self.double_quant
        )

    def resident_bytes(self) -> int:
        """Bytes this weight holds in memory now, its runtime layout included."""
        names = self.__tensor_flatten__()[0]
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in names)

    # ------------------------------------------------------------------ pickling: the stored format

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop(dispatch.EAGER_ARGS_ATTR, None)  # a cache of the eager kernel call, rebuilt on use
        if self.packed_codes is None:  # the CPU operand is capability-specific: save the stored codes
            state.update(packed_codes=self.stored_fields()[0], cpu_int4_codes=None, cpu_scales_zeros=None)
        return state

    def _setstate(self, state: dict) -> None:
        """``__setstate__`` (installed below the class): restore, then derive the device's layout."""
        torch._utils._set_obj_state(self, state)
        for name in self.optional_tensor_data_names:  # a checkpoint of an older gwq-compile
            self.__dict__.setdefault(name, None)
        self.__dict__.setdefault("double_quant", False)
        self.__dict__.setdefault("transposed", False)
        self.__dict__.setdefault("_linear_shape", tuple(self._flat_shape))
        if self.packed_codes is not None and default_layout(self.device) == "cpu_int4":
            self.cpu_int4_codes, self.cpu_scales_zeros = cpu_layout.pack(self.packed())
            self.packed_codes = None

    def _stable_hash_for_caching(self) -> str:
        """What AOTAutograd's cache keys this weight by: its layout and the metadata of its fields
        (never the data; the same graph serves every weight with the same metadata), plus how
        gwq-compile lowers it: the source of the modules that pick and build its ops, ``GWQ_KERNEL``
        and whether the compiled CPU kernel exists.  Without those a graph traced by another
        version of this code, or under another ``GWQ_KERNEL``, would be reused from the cache."""
        names = self.__tensor_flatten__()[0]
        fields = [(n, tuple(getattr(self, n).shape), str(getattr(self, n).dtype), tuple(getattr(self, n).stride())) for n in names]
        lowering = (_source_digest(), dispatch.kernel_choice(), self.code_layout == "cpu_int4" and dispatch.cpu_kernel() == "ext")
        meta = (type(self).__qualname__, self.code_layout, self.bits, self.group_size, tuple(self.shape), str(self.dtype), self.device.type, fields, lowering)
        return hashlib.blake2b(repr(meta).encode(), digest_size=16).hexdigest()

    def __repr__(self) -> str:
        return f"GWQTensor({self._quantization_type()}, dtype={self.dtype}, device={self.device})"

    def _quantization_type(self) -> str:
        return (
            f"bits={self.bits}, group_size={self.group_size}, outliers={self.num_outliers}, "
            f"shape={tuple(self.shape)}, code_layout={self.code_layout}" + (", double_quant" if self.double_quant else "")
            + (", transposed" if self.transposed else "")
        )


@functools.cache
def _source_digest() -> str:
    """Digest of the files that decide how a GWQTensor lowers in a compiled graph."""
    from gwq_compile import cpu_kernel  # noqa: PLC0415

    files = [Path(m.__file__) for m in (sys.modules[__name__], dispatch, _ops, cpu_layout, packing, _launch)] + [cpu_kernel.SOURCE]
    files += sorted(Path(_launch.__file__).parent.glob("*.py"))  # the Triton kernels themselves
    digest = hashlib.blake2b(digest_size=16)
    for f in files:
        digest.update(f.read_bytes())
    return digest.hexdigest()


# TorchAOBaseTensor.__init_subclass__ installs its own __setstate__ after the class body runs.
GWQTensor.__setstate__ = GWQTensor._setstate

implements = GWQTensor.implements
implements_torch_function = GWQTensor.implements_torch_function


@implements(aten.linear.default)
@implements_torch_function(F.linear)
def _(func, types, args, kwargs):
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if isinstance(x, GWQTensor) or not isinstance(weight, GWQTensor):
        raise NotImplementedError(f"{func}: only a dense input times a GWQTensor weight is supported")
    if weight.transposed:
        raise NotImplementedError(
            f"{func}: this GWQ weight is an HF Conv1D's [in, out] parameter (transposed=True): use torch.addmm(b, x, W) or x @ W"
        )
    return dispatch.linear(x, weight, bias)


def _transposed_weight(func, x, weight) -> "GWQTensor":
    if isinstance(x, GWQTensor) or not isinstance(weight, GWQTensor) or not weight.transposed:
        raise NotImplementedError(
            f"{func}: a GWQTensor is only the right operand of a matmul when it is an HF Conv1D's [in, out] weight "
            "(transposed=True); a linear's weight goes through F.linear"
        )
    return weight


@implements_torch_function(torch.addmm)
def _(func, types, args, kwargs):
    """``torch.addmm(b, x, W)``, as HF ``Conv1D.forward`` calls it: ``x @ W + b`` through the GWQ linear."""
    bias, x, weight = args[:3]
    extra = {**dict(zip(("beta", "alpha"), args[3:])), **kwargs}
    if extra.get("beta", 1) != 1 or extra.get("alpha", 1) != 1 or extra.get("out") is not None:
        raise NotImplementedError(f"{func}: only beta=1, alpha=1 and no out= are supported on a GWQTensor")
    return dispatch.linear(x, _transposed_weight(func, x, weight), bias)


@implements_torch_function([torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__])
def _(func, types, args, kwargs):
    x, weight = args[0], args[1]
    if kwargs.get("out") is not None:
        raise NotImplementedError(f"{func}: out= is not supported on a GWQTensor")
    return dispatch.linear(x, _transposed_weight(func, x, weight), None)


@implements(aten.embedding.default)
@implements_torch_function(F.embedding)
def _(func, types, args, kwargs):
    if func is F.embedding:
        input, weight = args[0], args[1]
        extra = {**dict(zip(("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"), args[2:])), **kwargs}
        if extra.get("max_norm") is not None:
            raise NotImplementedError("F.embedding(max_norm=...) renormalises the weight in place: not supported on a GWQTensor")
    else:
        weight, input = args[0], args[1]
    if not isinstance(weight, GWQTensor) or isinstance(input, GWQTensor) or weight.transposed:
        raise NotImplementedError(f"{func}: only integer indices into a (not transposed) GWQTensor weight are supported")
    return weight.dequantize_rows(input.reshape(-1)).view(*input.shape, weight.shape[1])


@implements(aten._to_copy.default)
def _(func, types, args, kwargs):
    self = args[0]
    to = self._get_to_kwargs(*args[1:], **kwargs)
    device, dtype = torch.device(to["device"]), to["dtype"]
    if device == self.device:
        new = GWQTensor(
            *(getattr(self, n) for n in GWQTensor.tensor_data_names), self.bits, self.group_size, self.shape, dtype,
            self.packed_codes, self.cpu_int4_codes, self.cpu_scales_zeros, self.double_quant, self.transposed,
        )  # fmt: skip
    else:
        new = self.to_layout(default_layout(device), device, dtype)
    return return_and_correct_aliasing(func, args, kwargs, new)


torch.serialization.add_safe_globals([GWQTensor])
