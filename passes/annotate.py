"""Annotate: attach each captured linear's calibration result to its node.

For every :class:`~gwq_compile.passes.capture.LinearSite` whose weight input is a weight
the calibrate stage quantized (matched by the identity of the real tensor the graph
receives), ``node.meta["gwq"]`` gets a :class:`GWQAnnotation`: the packed weight, whose
CSR fields are the outlier mask and whose ``group_scales``/``group_zeros`` are the
quantization grid.  Nothing in the graph changes here; :mod:`~gwq_compile.passes.rewrite`
acts on the annotations.

A site whose weight input already *is* a ``GWQTensor`` is annotated with that tensor: every
graph after the first one that calibrated the model (a graph break's next graph, a
recompile for new shapes) reads the module's quantized parameter, and so does a model
quantized with ``quantize_`` before it was compiled.  These are also counted as
``linear_prequantized``, so every graph gets the same explicit op and baked fields, not
only the first.

Sites that are left alone are counted as ``linear_skipped``: the weight is not a quantized
target (e.g. ``lm_head``), or it is read in another orientation or shape than its layer's,
or the linear changes the dtype (autocast).

Example:
    >>> import torch, weakref
    >>> from gwq_compile import GWQConfig
    >>> from gwq_compile.passes import ModelQuantization, QuantizedLayer, annotate_linears, capture_linears
    >>> from gwq_compile.tensor import GWQTensor
    >>> lin = torch.nn.Linear(32, 16)
    >>> gm = torch.fx.symbolic_trace(lin)
    >>> mask = lin.weight.detach().abs() > 0.17
    >>> packed = GWQTensor.from_float(lin.weight.detach(), mask, bits=4, group_size=32)
    >>> quant = ModelQuantization(GWQConfig(), {id(lin.weight): QuantizedLayer("lin", packed, "out_in", weakref.ref(lin.weight))})
    >>> [site] = annotate_linears(gm, capture_linears(gm), [], quant)
    >>> site.node.meta["gwq"].name, torch.equal(site.node.meta["gwq"].outlier_mask(), mask)
    ('lin', True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from gwq_compile import torch_internals
from gwq_compile.passes.calibrate import ModelQuantization
from gwq_compile.passes.capture import LAYOUT_IN_OUT, LAYOUT_OUT_IN, LinearSite, meta_value, weights_with_other_uses
from gwq_compile.tensor import GWQTensor

META_KEY = "gwq"


@dataclass(frozen=True)
class GWQAnnotation:
    """``node.meta["gwq"]`` of a linear that will be quantized.

    Attributes:
        name: the layer's module name.
        weight: the layer's ``GWQTensor`` (transposed, ``[in, out]``, for an HF Conv1D).
        layout: the dense weight's layout in the graph, ``"out_in"`` or ``"in_out"`` (Conv1D).
    """

    name: str
    weight: GWQTensor
    layout: str

    @property
    def bits(self) -> int:
        return self.weight.bits

    @property
    def group_size(self) -> int:
        return self.weight.group_size

    @property
    def group_scales(self) -> torch.Tensor:
        """fp16 ``[out, groups]``: the grid's scales."""
        return self.weight.group_scales

    @property
    def group_zeros(self) -> torch.Tensor:
        """uint8 ``[out, groups]``: the grid's zero points."""
        return self.weight.group_zeros

    def outlier_mask(self) -> torch.Tensor:
        """Bool ``[out, in]`` (the linear's orientation, also for a Conv1D), True at the fp16 outliers
        (built on demand from the CSR fields)."""
        mask = self.weight.outlier_mask()
        return mask.t() if self.weight.transposed else mask


def input_value(gm: fx.GraphModule, node: fx.Node, example_inputs: Sequence[Any]) -> Any:
    """The real tensor a placeholder or get_attr node stands for (None if unknown).

    Placeholders line up with ``example_inputs``; Dynamo also keeps the real value in
    ``meta["grapharg"]``, used when the example inputs are fake.
    """
    if node.op == "get_attr":
        obj: Any = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part, None)
        return obj
    if node.op != "placeholder":
        return None
    index = next(i for i, n in enumerate(gm.graph.find_nodes(op="placeholder")) if n is node)
    value = example_inputs[index] if index < len(example_inputs) else None
    if value is None or torch_internals.is_fake(value):
        grapharg = node.meta.get("grapharg")  # set by Dynamo (torch_internals.DYNAMO_ATTRIBUTES)
        value = getattr(grapharg, "example", None) if grapharg is not None else None
    return value


def _annotation(site: LinearSite, value: Any, quant: ModelQuantization) -> Optional[GWQAnnotation]:
    """The annotation of ``site``, or None when it is left alone (counted as ``linear_skipped``)."""
    if isinstance(value, GWQTensor):  # the module's quantized parameter (a later graph, or quantize_ before compile)
        layout = LAYOUT_IN_OUT if value.transposed else LAYOUT_OUT_IN
        annotation = GWQAnnotation(quant.name_of(value) or str(site.weight.target), value, layout)
    else:
        layer = quant.lookup(value)
        if layer is None:
            return None
        annotation = GWQAnnotation(layer.name, layer.weight, layer.layout)
    if annotation.layout != site.layout or annotation.weight.linear_shape != (site.out_features, site.in_features):
        return None  # the weight is read in another orientation than it was calibrated in
    if _dtype_changes(site):
        return None  # e.g. autocast: gwq.linear returns the input's dtype
    return annotation


def _dtype_changes(site: LinearSite) -> bool:
    x_val, out_val = meta_value(site.x), meta_value(site.node)
    return isinstance(x_val, torch.Tensor) and isinstance(out_val, torch.Tensor) and x_val.dtype != out_val.dtype


def unquantizable_weights(
    gm: fx.GraphModule, sites: list[LinearSite], example_inputs: Sequence[Any], model: torch.nn.Module
) -> frozenset[int]:
    """``id()`` of the model weights this graph needs dense, decided before calibration.

    A weight stays dense when the graph reads it other than through a captured linear,
    through a linear in another orientation than its module's (``[out, in]`` for
    nn.Linear, ``[in, out]`` for Conv1D), or through a linear whose output dtype differs
    from its input's (autocast): ``torch.ops.gwq.linear`` could not replace that read.
    """
    layouts: dict[int, str] = {}
    for mod in model.modules():
        weight = getattr(mod, "weight", None)
        if isinstance(mod, torch.nn.Linear):
            layouts[id(weight)] = LAYOUT_OUT_IN
        elif type(mod).__name__ == "Conv1D" and isinstance(weight, torch.Tensor):
            layouts[id(weight)] = LAYOUT_IN_OUT
    dense = {id(input_value(gm, node, example_inputs)) for node in weights_with_other_uses(sites)}
    for site in sites:
        key = id(input_value(gm, site.weight, example_inputs))
        if key in layouts and (layouts[key] != site.layout or _dtype_changes(site)):
            dense.add(key)
    return frozenset(dense)


def annotate_linears(
    gm: fx.GraphModule, sites: list[LinearSite], example_inputs: Sequence[Any], quant: ModelQuantization
) -> list[LinearSite]:
    """Write ``node.meta["gwq"]`` for every site whose weight was quantized; return those sites.

    Counts ``linear_annotated``, ``linear_skipped`` and ``linear_prequantized`` in
    ``counters["gwq"]``.

    Example:
        >>> annotated = annotate_linears(gm, capture_linears(gm), example_inputs, quant)  # doctest: +SKIP
    """
    annotated = []
    for site in sites:
        value = input_value(gm, site.weight, example_inputs)
        annotation = _annotation(site, value, quant)
        if annotation is None:
            counters["gwq"]["linear_skipped"] += 1
            continue
        if isinstance(value, GWQTensor):
            counters["gwq"]["linear_prequantized"] += 1
        site.node.meta[META_KEY] = annotation
        annotated.append(site)
    counters["gwq"]["linear_annotated"] += len(annotated)
    return annotated
