"""Whole-model peers of GWQ: RTN, GPTQ, AWQ (onto the GWQ grid) and torchao's Intx, plus honest bit counts.

Every function here mutates ``model`` in place and returns it.  The quantized linears
are the decoder's ``nn.Linear`` s (:func:`quantizable_linear_names`: every linear except
the output head, which SmolLM2 ties to the embedding), the same set for every method.

* :func:`rtn_quantize_model`: round-to-nearest on the GWQ grid, no outliers.
* :func:`gptq_quantize_model`: GPTQ (:mod:`gwq_compile.gptq`).  ``sequential=True``
  (default) runs layer by layer: the Hessians of decoder layer ``i`` come from inputs
  that went through the already *quantized* layers ``0..i-1``; all linears of one layer
  take their Hessians from the same pass (not GPTQ's intra-layer "true sequential"),
  and linears reading the same input (q/k/v, gate/up) are solved as one stacked weight
  (GPTQ is row-independent given H: same result, one column loop).
  ``sequential=False``: every Hessian from one pass through the full-precision model.
* :func:`awq_quantize_model`: AWQ scale search and folding (:mod:`gwq_tools.awq`) on
  full-precision layer inputs, then RTN of the scaled weights.
* :func:`torchao_intx_quantize_model`: torchao's ``IntxWeightOnlyConfig`` (int2/3/4,
  ``PerGroup``), with ``IntxChooseQParamsAlgorithm.AFFINE`` or ``HQQ_SCALE_ONLY``.
* :func:`bits_per_weight`: storage of the quantized linears divided by their weight count,
  for GWQ tensors (codes, fp16 scales, uint8 zeros, fp16 outlier values, CSR indices)
  and torchao tensors alike.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from gwq_tools import peers
    >>> cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
    ...                   num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    >>> model = peers.rtn_quantize_model(LlamaForCausalLM(cfg).eval(), bits=4, group_size=32)
    >>> round(peers.bits_per_weight(model)["bits_per_weight"], 3)   # 4 + 24/32 + int32 row pointers over tiny K
    5.201
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from gwq_compile import gptq, packing
from gwq_tools import awq
from gwq_tools.hessians import collect_hessians, record_input_grams
from gwq_compile.quantize import GWQConfig
from gwq_compile.targets import target_modules
from gwq_compile.report import layer_report
from gwq_compile.tensor import GWQTensor

__all__ = [
    "quantizable_linear_names",
    "decoder_layers",
    "capture_layer_inputs",
    "rtn_quantize_model",
    "gptq_quantize_model",
    "awq_quantize_model",
    "torchao_intx_quantize_model",
    "bits_per_weight",
    "split_rows",
    "TORCHAO_ALGORITHMS",
]

TORCHAO_ALGORITHMS = ("affine", "hqq_scale_only")


def quantizable_linear_names(model: nn.Module) -> list[str]:
    """Names of every ``nn.Linear`` except the output head (the same set for every method): GWQ's
    own targeting rule (:func:`gwq_compile.targets.target_modules`) under the default config."""
    return [name for name, _ in target_modules(model, GWQConfig(), conv1d=False, quantized=True)]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's layer list of a HF causal LM (``model.model.layers``)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no model.layers ModuleList: layer-by-layer GPTQ/AWQ support Llama-style HF models")
    return layers


def _set_quantized(module: nn.Linear, packed: packing.PackedWeight) -> None:
    module.weight = nn.Parameter(GWQTensor.from_packed(packed, module.weight.dtype), requires_grad=False)


def _check_calibration(calibration_data: torch.Tensor) -> None:
    if not isinstance(calibration_data, torch.Tensor) or calibration_data.dim() != 2 or calibration_data.dtype != torch.long:
        raise ValueError("calibration_data must be a LongTensor [n_samples, seq_len]")
    if calibration_data.shape[0] < 1:
        raise ValueError("calibration_data needs at least one sample")


class _StopForward(Exception):
    """Raised by the capture hook once the first decoder layer's inputs are recorded."""


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, calibration_data: torch.Tensor) -> tuple[list[torch.Tensor], list[dict]]:
    """Inputs of the first decoder layer, one ``([1, seq, H], kwargs)`` per calibration row.

    The model runs up to layer 0 only (a hook stops it there); the kwargs are what the model
    passes to every layer (rotary ``position_embeddings``, ``attention_mask``, ...).

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        ...                   num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
        >>> model = LlamaForCausalLM(cfg).eval()
        >>> xs, kws = capture_layer_inputs(model, torch.randint(0, 256, (2, 16)))
        >>> len(xs), tuple(xs[0].shape), tuple(model.model.layers[0](xs[0], **kws[0]).shape)
        (2, (1, 16, 64), (1, 16, 64))
    """
    _check_calibration(calibration_data)
    layers = decoder_layers(model)
    states: list[torch.Tensor] = []
    kwargs: list[dict] = []

    def hook(module: nn.Module, args: tuple, kw: dict):
        states.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for row in calibration_data:
            try:
                model(row.unsqueeze(0).to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return states, kwargs


def _layer_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@contextlib.contextmanager
def _dequantized(layer: nn.Module):
    """Swap the layer's GWQ weights for their dense dequantized values, and back.

    The CPU reference op dequantizes at every call; running the calibration samples
    through a quantized layer would redo that per sample.  Same weights, same outputs.
    """
    swapped = []
    for module in layer.modules():
        if isinstance(module, nn.Linear) and isinstance(module.weight, GWQTensor):
            swapped.append((module, module.weight))
            module.weight = nn.Parameter(module.weight.dequantize(), requires_grad=False)
    try:
        yield
    finally:
        for module, weight in swapped:
            module.weight = weight


@torch.no_grad()
def _run_layer(layer: nn.Module, states: Sequence[torch.Tensor], kwargs: Sequence[dict]) -> list[torch.Tensor]:
    with _dequantized(layer):
        return [_layer_output(layer(h, **kw)) for h, kw in zip(states, kwargs)]


@torch.no_grad()
def rtn_quantize_model(model: nn.Module, bits: int, group_size: int, symmetric: bool = False) -> nn.Module:
    """Round-to-nearest every quantizable linear onto the GWQ grid (no outliers).

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        ...                   num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
        >>> model = LlamaForCausalLM(cfg).eval()
        >>> type(rtn_quantize_model(model, bits=3, group_size=64).model.layers[0].mlp.up_proj.weight).__name__
        'GWQTensor'
    """
    modules = dict(model.named_modules())
    for name in quantizable_linear_names(model):
        linear = modules[name]
        _set_quantized(linear, packing.quantize_weight(linear.weight.detach(), None, bits, group_size, symmetric))
    return model


@dataclass(frozen=True)
class GPTQOptions:
    """GPTQ settings shared by every layer (see :func:`gwq_compile.gptq.gptq_quantize_weight`)."""

    bits: int
    group_size: int
    symmetric: bool = False
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False

    def __post_init__(self) -> None:
        packing.check_bits(self.bits)
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size must be > 0 or -1 (per output channel), got {self.group_size}")
        if self.damp < 0:
            raise ValueError(f"damp must be >= 0, got {self.damp}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")


def split_rows(packed: packing.PackedWeight, sizes: Sequence[int]) -> list[packing.PackedWeight]:
    """Cut a packed ``[sum(sizes), K]`` weight into row blocks (codes, grid and CSR outliers).

    Example:
        >>> import torch
        >>> p = packing.quantize_weight(torch.randn(6, 32), None, bits=4, group_size=16)
        >>> [q.packed_codes.shape[0] for q in split_rows(p, [2, 4])]
        [2, 4]
    """
    if sum(sizes) != packed.packed_codes.shape[0]:
        raise ValueError(f"row sizes {list(sizes)} do not add up to {packed.packed_codes.shape[0]} rows")
    out, r0 = [], 0
    for size in sizes:
        r1 = r0 + size
        lo, hi = int(packed.outlier_row_ptr[r0]), int(packed.outlier_row_ptr[r1])
        out.append(
            packing.PackedWeight(
                packed.packed_codes[r0:r1].contiguous(), packed.group_scales[r0:r1].contiguous(),
                packed.group_zeros[r0:r1].contiguous(), (packed.outlier_row_ptr[r0 : r1 + 1] - lo).contiguous(),
                packed.outlier_col_idx[lo:hi].contiguous(), packed.outlier_values[lo:hi].contiguous(),
                packed.bits, packed.group_size, packed.in_features,
            )  # fmt: skip
        )
        r0 = r1
    return out


def _shared_input_groups(hessians: dict[str, torch.Tensor]) -> list[list[str]]:
    """Names whose Hessians are identical (q/k/v, gate/up read the same input), in order."""
    groups: list[list[str]] = []
    for name, h in hessians.items():
        for group in groups:
            ref = hessians[group[0]]
            if ref.shape == h.shape and torch.equal(ref, h):
                group.append(name)
                break
        else:
            groups.append([name])
    return groups


def _gptq_linears(modules: dict[str, nn.Module], hessians: dict[str, torch.Tensor], opts: GPTQOptions) -> None:
    # GPTQ treats rows independently given H, so linears sharing an input are solved as one
    # stacked weight: the same result with one column loop instead of three (q, k, v).
    for group in _shared_input_groups(hessians):
        weights = [modules[name].weight.detach() for name in group]
        packed = gptq.gptq_quantize_weight(
            torch.cat(weights), hessians[group[0]], opts.bits, opts.group_size, None, opts.symmetric, opts.damp,
            opts.block_size, opts.act_order,
        )  # fmt: skip
        for name, part in zip(group, split_rows(packed, [w.shape[0] for w in weights])):
            _set_quantized(modules[name], part)


@torch.no_grad()
def gptq_quantize_model(
    model: nn.Module,
    calibration_data: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    sequential: bool = True,
) -> nn.Module:
    """GPTQ every quantizable linear, Hessians from ``calibration_data`` (LongTensor ``[n, seq]``).

    See the module docstring for ``sequential``.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        ...                   num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
        >>> model = LlamaForCausalLM(cfg).eval()
        >>> model = gptq_quantize_model(model, torch.randint(0, 256, (2, 32)), bits=3, group_size=32)
        >>> type(model.model.layers[0].self_attn.q_proj.weight).__name__
        'GWQTensor'
    """
    _check_calibration(calibration_data)
    opts = GPTQOptions(bits, group_size, symmetric, damp, block_size, act_order)
    names = quantizable_linear_names(model)
    modules = dict(model.named_modules())
    if not sequential:
        _gptq_linears(modules, collect_hessians(model, names, calibration_data), opts)
        return model
    states, kwargs = capture_layer_inputs(model, calibration_data)
    for layer in decoder_layers(model):
        local = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
        hessians: dict[str, torch.Tensor] = {}
        handles = record_input_grams({n: layer.get_submodule(n) for n in local}, hessians)
        try:
            _run_layer(layer, states, kwargs)
        finally:
            for handle in handles:
                handle.remove()
        _gptq_linears(dict(layer.named_modules()), hessians, opts)
        states = _run_layer(layer, states, kwargs)  # inputs of the next layer, through the quantized one
    # Linears outside the decoder layers (rare), from a pass through the now quantized model.
    rest = [n for n in names if not isinstance(modules[n].weight, GWQTensor)]
    if rest:
        _gptq_linears(modules, collect_hessians(model, rest, calibration_data), opts)
    return model


@torch.no_grad()
def awq_quantize_model(
    model: nn.Module,
    calibration_data: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    n_grid: int = 20,
) -> nn.Module:
    """AWQ: search and fold scales layer by layer (fp inputs), then RTN every quantizable linear.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        ...                   num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
        >>> model = LlamaForCausalLM(cfg).eval()
        >>> model = awq_quantize_model(model, torch.randint(0, 256, (1, 32)), bits=4, group_size=32, n_grid=4)
        >>> type(model.model.layers[0].mlp.down_proj.weight).__name__
        'GWQTensor'
    """
    _check_calibration(calibration_data)
    states, kwargs = capture_layer_inputs(model, calibration_data)
    for layer in decoder_layers(model):
        awq.apply_awq_to_llama_layer(layer, states, kwargs, bits, group_size, symmetric, n_grid)
        states = _run_layer(layer, states, kwargs)  # scaled but still fp: the same function
    return rtn_quantize_model(model, bits, group_size, symmetric)


def torchao_intx_quantize_model(
    model: nn.Module,
    bits: int,
    group_size: int,
    algorithm: str = "affine",
    scale_dtype: torch.dtype = torch.float16,
) -> nn.Module:
    """torchao ``IntxWeightOnlyConfig(torch.int{bits}, PerGroup(group_size))`` on every quantizable linear.

    ``algorithm="affine"`` uses asymmetric min/max qparams (``MappingType.ASYMMETRIC``, the
    same kind of grid as GWQ's); ``"hqq_scale_only"`` is torchao's HQQ (symmetric, scales
    optimized, zero points all 0).  Scales are stored in ``scale_dtype`` (fp16 by default,
    as GWQ's), zero points in int8; codes live unpacked in int8.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        ...                   num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
        >>> model = LlamaForCausalLM(cfg).eval()
        >>> model = torchao_intx_quantize_model(model, bits=3, group_size=32, algorithm="hqq_scale_only")
        >>> round(bits_per_weight(model)["bits_per_weight"], 3)   # 3 + (16 + 8) / 32
        3.75
    """
    from torchao.quantization import IntxWeightOnlyConfig, MappingType, PerGroup, quantize_
    from torchao.quantization.quantize_.workflows.intx.intx_choose_qparams_algorithm import IntxChooseQParamsAlgorithm

    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be 2, 3, 4 or 8 for the torchao peer, got {bits}")
    if algorithm not in TORCHAO_ALGORITHMS:
        raise ValueError(f"algorithm must be one of {TORCHAO_ALGORITHMS}, got {algorithm!r}")
    names = set(quantizable_linear_names(model))
    for name in names:
        k = model.get_submodule(name).in_features
        if k % group_size:
            raise ValueError(f"torchao PerGroup needs in_features divisible by group_size: {name} has {k}, group_size={group_size}")
    config = IntxWeightOnlyConfig(
        weight_dtype=getattr(torch, f"int{bits}"),
        granularity=PerGroup(group_size),
        mapping_type=MappingType.ASYMMETRIC if algorithm == "affine" else MappingType.SYMMETRIC,
        scale_dtype=scale_dtype,
        intx_choose_qparams_algorithm=IntxChooseQParamsAlgorithm(algorithm),
    )
    quantize_(model, config, filter_fn=lambda module, fqn: fqn in names)
    return model


def _torchao_bits(weight: torch.Tensor) -> tuple[dict[str, int], int] | None:
    """(bits by component, bits as stored in memory) of a torchao Intx weight, else None."""
    qdata = getattr(weight, "qdata", None)
    scale = getattr(weight, "scale", None)
    zero = getattr(weight, "zero_point", None)
    target = getattr(weight, "target_dtype", None)
    if qdata is None or scale is None or target is None:
        return None
    # torch.int1..int7 are not real integer dtypes (torch.iinfo rejects them): read the width from the name.
    code_bits = torch.iinfo(target).bits if target in (torch.int8, torch.uint8) else int(str(target).removeprefix("torch.int"))
    parts = {
        "codes": qdata.numel() * code_bits,  # as if packed at b bits
        "scales": scale.numel() * scale.element_size() * 8,
        "zeros": 0 if zero is None else zero.numel() * zero.element_size() * 8,
    }
    in_memory = qdata.numel() * qdata.element_size() * 8 + parts["scales"] + parts["zeros"]
    return parts, in_memory


def bits_per_weight(model: nn.Module, names: Sequence[str] | None = None) -> dict[str, float]:
    """Storage of the quantizable linears' weights: ``bits_per_weight`` and its components.

    GWQ tensors count what :func:`gwq_compile.report.layer_report` counts (the stored format,
    CSR indices of outliers included); torchao Intx weights count codes at b bits plus their scale
    and zero-point dtypes (``stored_bits_per_weight`` also gives the int8 codes they
    actually keep in memory); any plain float weight counts its dtype's width.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        ...                   num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
        >>> model = LlamaForCausalLM(cfg).eval()
        >>> bits = bits_per_weight(rtn_quantize_model(model, bits=4, group_size=64))
        >>> bits["codes_bits_per_weight"], bits["scales_bits_per_weight"] + bits["zeros_bits_per_weight"]
        (4.0, 0.375)
        >>> round(bits["bits_per_weight"], 3)   # + int32 CSR row pointers: 32 bits a row over K = 64 or 128
        4.826
    """
    names = quantizable_linear_names(model) if names is None else list(names)
    totals = {"codes": 0, "scales": 0, "zeros": 0, "outlier_values": 0, "outlier_indices": 0, "dense": 0}
    stored, n_weights = 0, 0
    for name in names:
        w = model.get_submodule(name).weight
        n_weights += w.numel()
        if isinstance(w, GWQTensor):  # the core report's accounting, by component
            parts = {k: v * w.numel() for k, v in layer_report(w)["bits_breakdown"].items()}
            mem = sum(parts.values())
        else:
            ao = _torchao_bits(w)
            if ao is not None:
                parts, mem = ao
            else:
                parts = {"dense": w.numel() * w.element_size() * 8}
                mem = parts["dense"]
        for key, value in parts.items():
            totals[key] += value
        stored += mem
    if n_weights == 0:
        raise ValueError("the model has no quantizable linear weights")
    out = {f"{key}_bits_per_weight": value / n_weights for key, value in totals.items()}
    out["bits_per_weight"] = sum(totals.values()) / n_weights
    out["stored_bits_per_weight"] = stored / n_weights
    out["n_weights"] = float(n_weights)
    return out
