"""Rewrite: every annotated linear becomes ``torch.ops.gwq.linear`` on packed weights.

For each site carrying ``node.meta["gwq"]`` (see :mod:`~gwq_compile.passes.annotate`):

* the tensors of its weight that its op reads are registered once as buffers of the
  GraphModule (``_gwq_<layer>_<field>``); they are shared with the quantized model, not copied;
* ``get_attr`` nodes read them and the op :func:`gwq_compile.dispatch.graph_op` names for the
  weight's layout (``torch.ops.gwq.linear_cpu`` for CPU weights, ``torch.ops.gwq.linear``
  otherwise) replaces the linear (``F.linear``, ``addmm``/``mm``/``matmul`` against ``t(W)``, or Conv1D's ``addmm``),
  with the same output value (shape, dtype) recorded in its meta;
* the old node and its now unused ``t(W)`` are erased, then the graph is linted and
  recompiled.

The dense weight input stays a graph input (a compiled graph's signature is fixed by
Dynamo) but nothing reads it any more.  Because the packed weights are now baked into
the graph, :func:`guard_baked_weights` adds an identity guard on each such weight's source,
so the compiled graph is never reused for another model instance whose parameters merely
have the same shapes.

Buffers of a Dynamo graph must have a ``Source`` in ``gm._param_name_to_source`` (AOTAutograd
checks that every lifted parameter has one); they get a ``ConstantSource``.

Example:
    >>> import torch, weakref
    >>> from gwq_compile import GWQConfig
    >>> from gwq_compile.passes import ModelQuantization, QuantizedLayer, annotate_linears, capture_linears, rewrite_linears
    >>> from gwq_compile.tensor import GWQTensor
    >>> lin = torch.nn.Linear(32, 16)
    >>> gm = torch.fx.symbolic_trace(lin)
    >>> packed = GWQTensor.from_float(lin.weight.detach(), None, bits=4, group_size=32)
    >>> quant = ModelQuantization(GWQConfig(), {id(lin.weight): QuantizedLayer("lin", packed, "out_in", weakref.ref(lin.weight))})
    >>> baked = rewrite_linears(gm, annotate_linears(gm, capture_linears(gm), [], quant))
    >>> [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    ['gwq.linear_cpu.default']
    >>> x = torch.randn(3, 32)
    >>> torch.allclose(gm(x), torch.nn.functional.linear(x, packed.dequantize(), lin.bias), atol=0.02)  # bf16 on CPU
    True
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from gwq_compile import dispatch, torch_internals
from gwq_compile.passes.annotate import META_KEY, GWQAnnotation
from gwq_compile.passes.capture import LinearSite, match_linear, meta_value


def _buffer_prefix(gm: fx.GraphModule, name: str) -> str:
    base = "_gwq_" + re.sub(r"\W", "_", name)
    prefix, i = base, 0
    while hasattr(gm, f"{prefix}_group_scales"):
        i += 1
        prefix = f"{base}_{i}"
    return prefix


def _fake_mode(gm: fx.GraphModule) -> Any:
    """The fake mode the graph's example values live in (None for a plain traced graph)."""
    values = [meta_value(n) for n in gm.graph.find_nodes(op="placeholder")]
    return torch_internals.fake_mode_of([v for v in values if isinstance(v, torch.Tensor)])


def _register_packed(gm: fx.GraphModule, annotation: GWQAnnotation) -> tuple[Any, list[str]]:
    """Register the tensors the weight's op reads as buffers (with Dynamo sources when needed);
    return the op and the buffers' names."""
    prefix = _buffer_prefix(gm, annotation.name)
    names = []
    op, tensors = dispatch.graph_op(annotation.weight)
    for field, tensor in tensors.items():
        name = f"{prefix}_{field}"
        gm.register_buffer(name, tensor)
        torch_internals.register_constant_source(gm, name)
        names.append(name)
    return op, names


def _value_key(node: fx.Node) -> str:
    return "val" if "val" in node.meta else "example_value"


def _replace(gm: fx.GraphModule, site: LinearSite, op: Any, buffers: list[str], fake_mode: Any) -> fx.Node:
    annotation: GWQAnnotation = site.node.meta[META_KEY]
    graph, key = gm.graph, _value_key(site.node)
    with graph.inserting_before(site.node):
        attrs = []
        for name in buffers:
            attr = graph.get_attr(name)
            if fake_mode is not None:
                attr.meta[key] = fake_mode.from_tensor(getattr(gm, name), static_shapes=True)
            attrs.append(attr)
        # Operands are read from the node now: an earlier rewrite may have replaced its input.
        x, _, bias, *_ = match_linear(site.node)
        args = (x, *attrs, bias, annotation.bits, annotation.group_size, site.in_features)
        new = graph.call_function(op, args)
    new.meta.update(site.node.meta)  # same output value, stack trace and module stack
    site.node.replace_all_uses_with(new)
    graph.erase_node(site.node)
    if site.transpose is not None and not site.transpose.users:
        graph.erase_node(site.transpose)
    return new


def rewrite_linears(gm: fx.GraphModule, sites: list[LinearSite]) -> list[fx.Node]:
    """Replace every annotated site by ``torch.ops.gwq.linear``; return the weight inputs now baked in.

    Counts ``counters["gwq"]["linear_rewritten"]``.  The graph is linted and recompiled.

    Example:
        >>> baked = rewrite_linears(gm, annotate_linears(gm, capture_linears(gm), inputs, quant))  # doctest: +SKIP
    """
    fake_mode = _fake_mode(gm)
    buffers: dict[int, tuple[Any, list[str]]] = {}  # id(GWQTensor) -> (op, buffer names): one set per weight
    baked: dict[fx.Node, None] = {}
    for site in sites:
        annotation = site.node.meta.get(META_KEY)
        if not isinstance(annotation, GWQAnnotation):
            continue
        key = id(annotation.weight)
        if key not in buffers:
            buffers[key] = _register_packed(gm, annotation)
        _replace(gm, site, *buffers[key], fake_mode)
        baked[site.weight] = None
        counters["gwq"]["linear_rewritten"] += 1
    if baked:
        gm.graph.lint()
        gm.recompile()
    return list(baked)


def guard_baked_weights(weight_nodes: list[fx.Node]) -> int:
    """Guard the compiled frame on the identity of each baked weight's parameter and owner.

    With ``inline_inbuilt_nn_modules`` Dynamo guards parameters by metadata only, because a
    graph that takes them as inputs works for any instance.  A graph with baked packed
    weights does not, so an ``ID_MATCH`` guard on the parameter's source makes another
    instance recompile (and get its own weights).  The module local the source starts
    from (``self`` of the traced frame) gets an ``ID_MATCH`` too: Dynamo then counts its
    recompile limit per instance, so compiling many instances of one model class does not
    exhaust it.  The guards are built after the backend returns, from the module's
    current parameter (the GWQTensor for nn.Linear).

    Returns the number of guards added (0 outside Dynamo, e.g. for a traced module).
    """
    guards = {}
    for node in weight_nodes:
        source = torch_internals.node_source(node)
        if source is None:
            continue
        guards[source] = None
        owner = torch_internals.module_local(source)
        if owner is not None:
            guards[owner] = None
    if not torch_internals.add_id_match_guards(list(guards)):
        return 0
    counters["gwq"]["weights_guarded"] += len(weight_nodes)
    return len(guards)
