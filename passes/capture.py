"""Capture: find every linear layer in an FX graph.

A *linear site* is a node that computes ``x @ W^T (+ b)`` where ``W`` comes straight from
a graph input (a ``placeholder``, which is how Dynamo passes parameters when
``inline_inbuilt_nn_modules`` is on) or a ``get_attr`` (a module traced with
``torch.fx.symbolic_trace``).  The forms recognised are the ones Dynamo and AOT graphs
actually contain:

* ``F.linear(x, W, b)`` / ``aten.linear``;
* ``addmm(b, x, t(W))``, ``mm(x, t(W))``, ``matmul(x, t(W))`` and ``x @ t(W)``, where
  ``t(W)`` is ``W.t()``, ``W.T``, ``W.transpose(0, 1)`` or ``W.permute(1, 0)``;
* HF ``Conv1D``: ``addmm(b, x, W)`` with the *un-transposed* ``[in, out]`` weight.

Capture only looks at structure and shapes; which sites get quantized is decided by
:mod:`gwq_compile.passes.annotate`.

Example:
    >>> import torch
    >>> from gwq_compile.passes.capture import capture_linears
    >>> gm = torch.fx.symbolic_trace(torch.nn.Linear(8, 4))   # F.linear(x, self.weight, self.bias)
    >>> [(s.pattern, s.layout, s.out_features, s.in_features) for s in capture_linears(gm)]
    [('linear', 'out_in', 4, 8)]
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._dynamo.utils import counters

from gwq_compile import torch_internals

aten = torch.ops.aten

LAYOUT_OUT_IN = "out_in"  # nn.Linear: W is [out_features, in_features]
LAYOUT_IN_OUT = "in_out"  # HF Conv1D: W is [in_features, out_features]

_LINEAR_TARGETS = {F.linear, torch_internals.resolve("torch._C._nn.linear"), aten.linear.default}
_ADDMM_TARGETS = {torch.addmm, aten.addmm.default}
_MM_TARGETS = {torch.mm, aten.mm.default}
_MATMUL_TARGETS = {torch.matmul, operator.matmul, aten.matmul.default}
_TRANSPOSE_METHODS = {"t", "transpose", "permute"}
_TRANSPOSE_TARGETS = {torch.t, aten.t.default, torch.transpose, aten.transpose.int, torch.permute, aten.permute.default}


@dataclass
class LinearSite:
    """One linear computation found in a graph.

    Attributes:
        node: the node producing the linear's output (it is what rewrite replaces).
        x: the activation node, ``[..., in_features]``.
        weight: the graph input holding the dense weight (placeholder or get_attr).
        bias: the bias node (``[out_features]``) or None.
        layout: ``"out_in"`` (nn.Linear) or ``"in_out"`` (HF Conv1D).
        transpose: the ``t(W)`` node between the weight and the matmul, if any.
        pattern: ``"linear"``, ``"addmm"``, ``"mm"`` or ``"matmul"`` (for messages).
        out_features, in_features: the layer's sizes.
    """

    node: fx.Node
    x: fx.Node
    weight: fx.Node
    bias: Optional[fx.Node]
    layout: str
    transpose: Optional[fx.Node]
    pattern: str
    out_features: int
    in_features: int


def meta_value(node: Any) -> Any:
    """The example value of a node (``meta["val"]`` in AOT graphs, ``"example_value"`` in Dynamo's)."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val")
    return node.meta.get("example_value") if val is None else val


def _is_call(node: Any, targets: set, methods: tuple[str, ...] = ()) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in targets
    return node.op == "call_method" and node.target in methods


def _is_weight_input(node: Any) -> bool:
    """A 2-D floating tensor that enters the graph as an input or attribute (a parameter)."""
    if not isinstance(node, fx.Node) or node.op not in ("placeholder", "get_attr"):
        return False
    val = meta_value(node)
    if val is None and node.op == "get_attr":
        val = _fetch_attr(node.graph.owning_module, node.target)
    return isinstance(val, torch.Tensor) and val.dim() == 2 and val.is_floating_point()


def _fetch_attr(module: Optional[torch.nn.Module], target: str) -> Any:
    obj: Any = module
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def _swaps_two_dims(node: fx.Node) -> bool:
    """True if ``node`` is ``t``/``transpose``/``permute`` that swaps the two dims of a 2-D tensor."""
    rest = list(node.args[1:])
    if node.target in ("t", torch.t, aten.t.default):
        return not rest
    if node.target in ("transpose", torch.transpose, aten.transpose.int):
        dims = rest or [node.kwargs.get("dim0"), node.kwargs.get("dim1")]
        return len(dims) == 2 and {d % 2 for d in dims if isinstance(d, int)} == {0, 1}
    dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
    dims = dims or node.kwargs.get("dims", [])
    return [d % 2 for d in dims if isinstance(d, int)] == [1, 0]


def transposed_weight(node: Any) -> Optional[fx.Node]:
    """If ``node`` is ``W^T`` for a weight input ``W``, return ``W``."""
    if not isinstance(node, fx.Node) or not node.args:
        return None
    base = node.args[0]
    if not _is_weight_input(base):
        return None
    if node.op == "call_function" and node.target is getattr and node.args[1:] in (("T",), ("mT",)):
        return base
    if _is_call(node, _TRANSPOSE_TARGETS, tuple(_TRANSPOSE_METHODS)) and _swaps_two_dims(node):
        return base
    return None


def _arg(node: fx.Node, index: int, name: str) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name)


def match_linear(node: fx.Node) -> Optional[tuple]:
    """(x, weight, bias, layout, transpose, pattern) if ``node`` is a linear, else None."""
    if _is_call(node, _LINEAR_TARGETS):
        x, w, b = _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")
        return (x, w, b, LAYOUT_OUT_IN, None, "linear") if _is_weight_input(w) else None
    if _is_call(node, _ADDMM_TARGETS, ("addmm",)):
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return None
        b, x, m2 = _arg(node, 0, "input"), _arg(node, 1, "mat1"), _arg(node, 2, "mat2")
        bias_val = meta_value(b)
        if not isinstance(bias_val, torch.Tensor) or bias_val.dim() != 1:
            return None  # a 2-D "bias" is a residual add, not a linear's bias
        w = transposed_weight(m2)
        if w is not None:
            return x, w, b, LAYOUT_OUT_IN, m2, "addmm"
        return (x, m2, b, LAYOUT_IN_OUT, None, "addmm") if _is_weight_input(m2) else None
    for targets, methods, pattern in ((_MM_TARGETS, ("mm",), "mm"), (_MATMUL_TARGETS, ("matmul", "__matmul__"), "matmul")):
        if _is_call(node, targets, methods):
            x, m2 = node.args[0] if node.args else None, node.args[1] if len(node.args) > 1 else None
            w = transposed_weight(m2)
            return (x, w, None, LAYOUT_OUT_IN, m2, pattern) if w is not None else None
    return None


def _site(node: fx.Node) -> Optional[LinearSite]:
    matched = match_linear(node)
    if matched is None:
        return None
    x, w, b, layout, transpose, pattern = matched
    x_val, w_val = meta_value(x), meta_value(w)
    if w_val is None and w.op == "get_attr":
        w_val = _fetch_attr(w.graph.owning_module, w.target)
    if not isinstance(x, fx.Node) or not isinstance(w_val, torch.Tensor):
        return None
    out_features, in_features = w_val.shape if layout == LAYOUT_OUT_IN else reversed(w_val.shape)
    if isinstance(x_val, torch.Tensor) and (x_val.dim() == 0 or x_val.shape[-1] != in_features):
        return None
    if b is not None and not isinstance(b, fx.Node):
        return None  # a Python-number bias: not a layer
    return LinearSite(node, x, w, b, layout, transpose, pattern, int(out_features), int(in_features))


def capture_linears(gm: fx.GraphModule) -> list[LinearSite]:
    """Every linear site in ``gm``, in graph order; counts ``counters["gwq"]["linear_captured"]``.

    Example:
        >>> import torch
        >>> gm = torch.fx.symbolic_trace(torch.nn.Linear(6, 3))
        >>> len(capture_linears(gm))
        1
    """
    sites = [site for node in gm.graph.nodes if (site := _site(node)) is not None]
    counters["gwq"]["linear_captured"] += len(sites)
    return sites


def weights_with_other_uses(sites: list[LinearSite]) -> set[fx.Node]:
    """Weight inputs that some node other than a captured linear (or its ``t(W)``) reads.

    Such a weight cannot be replaced by packed codes: the other reader needs it dense.
    """
    site_nodes = {s.node for s in sites}
    transposes = {s.transpose for s in sites if s.transpose is not None}
    other = set()
    for weight in {s.weight for s in sites}:
        for user in weight.users:
            if user in site_nodes or (user in transposes and all(u in site_nodes for u in user.users)):
                continue
            other.add(weight)
    return other
