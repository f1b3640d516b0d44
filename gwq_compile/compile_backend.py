"""The ``gwq`` torch.compile backend: GWQ-quantize a model and compile it in one step.

Two ways to use it::

    # through the torch_dynamo_backends entry point (no gwq_compile import needed)
    compiled = torch.compile(model, backend="gwq", options={"bits": 4, "calibration_data": ids})

    # or build the backend yourself
    compiled = torch.compile(model, backend=gwq_compile.backend(GWQConfig(bits=4), calibration_data=ids))

``options`` takes every :class:`~gwq_compile.GWQConfig` field plus ``calibration_data``
(what :func:`gwq_compile.quantize_` accepts).  Without calibration data the model is
calibrated on its first call's inputs, with a warning (see
:mod:`gwq_compile.passes.calibrate` for the loss used).

What happens on each graph Dynamo hands over (:func:`compile_graph`): capture the
linears, calibrate the *whole model* once (the model is found on the call stack, or given
as ``model=``), annotate, rewrite them to ``torch.ops.gwq.linear`` on packed weights, then
Inductor.  After the first graph the model's ``nn.Linear`` weights are ``GWQTensor``
parameters (dense weights freed), so graphs traced later (graph breaks, recompiles for
new shapes) reuse the quantized weights and never recalibrate; annotate and rewrite give
their linears the same explicit op on those weights' packed fields.

Calibration tensors in ``options``: ``torch.compile`` keeps the options dict and, when it
looks for a reason to recompile, compares the options of two compiled models with ``==``,
which fails on tensors ("Boolean value of Tensor ... is ambiguous").  The backend
therefore replaces ``options["calibration_data"]`` (in the dict you passed, and in every
other ``gwq`` compile created so far) by a :class:`CalibrationData`, which compares by
identity.  Wrapping it yourself, ``options={"calibration_data": CalibrationData(ids)}``,
does the same up front.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Embedding(64, 32), torch.nn.Linear(32, 64))
    >>> ids = torch.randint(0, 64, (1, 16))
    >>> opts = {"group_size": 32, "skip_modules": (), "progress": False, "calibration_data": ids}
    >>> compiled = torch.compile(model, backend="gwq", options=opts)     # doctest: +SKIP
    >>> compiled(ids).shape                                              # doctest: +SKIP
    torch.Size([1, 16, 64])
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

from gwq_compile import torch_internals
from gwq_compile.config import GWQConfig, config_fields
from gwq_compile.passes import (
    annotate_linears,
    calibrate_model,
    capture_linears,
    find_model_call,
    guard_baked_weights,
    input_value,
    rewrite_linears,
    unquantizable_weights,
)

CALIBRATION_OPTION = "calibration_data"

__all__ = ["CalibrationData", "GWQBackend", "backend", "compile_graph", "gwq_backend", "parse_options", "valid_options"]


class CalibrationData:
    """Calibration data for the backend's options, compared by identity.

    Holds anything :func:`gwq_compile.quantize_` accepts as ``calibration_data``.

    Example:
        >>> import torch
        >>> a, b = CalibrationData(torch.ones(2, 4)), CalibrationData(torch.ones(2, 4))
        >>> a == a, a == b
        (True, False)
    """

    __slots__ = ("data",)

    def __init__(self, data: Any) -> None:
        self.data = data.data if isinstance(data, CalibrationData) else data

    def __eq__(self, other: object) -> bool:
        return self is other

    def __ne__(self, other: object) -> bool:
        return self is not other

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        data = self.data
        if isinstance(data, torch.Tensor):
            what = f"tensor {tuple(data.shape)} {data.dtype}"
        elif isinstance(data, Mapping):
            what = f"dict with keys {sorted(data)}"
        else:
            what = type(data).__name__
        return f"CalibrationData({what})"


# ----------------------------------------------------------------------------- options


def valid_options() -> list[str]:
    """Names ``options`` accepts: the GWQConfig fields and ``calibration_data``."""
    return [*config_fields(), CALIBRATION_OPTION]


def parse_options(options: Optional[Mapping[str, Any]]) -> tuple[GWQConfig, Any]:
    """``(GWQConfig, calibration data)`` from a ``torch.compile(..., options=...)`` dict.

    Example:
        >>> cfg, data = parse_options({"bits": 3, "group_size": 64})
        >>> cfg.bits, data
        (3, None)
        >>> parse_options({"bitz": 3})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: unknown gwq backend option(s) ['bitz']; valid options: bits, group_size, ..., calibration_data
    """
    options = dict(options or {})
    unknown = sorted(str(k) for k in options if k not in valid_options())
    if unknown:
        raise ValueError(f"unknown gwq backend option(s) {unknown}; valid options: {', '.join(valid_options())}")
    data = options.pop(CALIBRATION_OPTION, None)
    if isinstance(data, CalibrationData):
        data = data.data
    config = GWQConfig(**options)
    _check_one_shot(config)
    return config, data


def _check_one_shot(config: GWQConfig) -> None:
    if config.step is not None:
        raise ValueError(f"the gwq backend quantizes in one shot: option step must be None, got {config.step!r}")


def _wrap_calibration_option(options: Any) -> None:
    """Replace a raw ``calibration_data`` option by a :class:`CalibrationData`, in place."""
    if isinstance(options, dict) and options.get(CALIBRATION_OPTION) is not None:
        if not isinstance(options[CALIBRATION_OPTION], CalibrationData):
            options[CALIBRATION_OPTION] = CalibrationData(options[CALIBRATION_OPTION])


def _wrap_pending_compiles() -> None:
    """Wrap the calibration data of every ``gwq`` torch.compile created so far.

    Dynamo remembers each torch.compile's backend wrapper in ``cached_backends``; a model
    compiled but not yet run still holds its raw tensor, which the next recompile-reason
    check would compare with ``==``.
    """
    for options in torch_internals.pending_compile_options(gwq_backend):
        _wrap_calibration_option(options)


# ----------------------------------------------------------------------------- the pipeline


def compile_graph(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    config: GWQConfig,
    calibration_data: Any = None,
    model: Optional[torch.nn.Module] = None,
    mode: Optional[str] = None,
) -> Callable:
    """capture -> calibrate (once per model) -> annotate -> rewrite -> Inductor, for one Dynamo graph.

    ``model`` is the whole model; by default the compiled module being called is found
    on the call stack.  Raises ValueError when there is no model to calibrate.

    Example:
        >>> compiled_fn = compile_graph(gm, example_inputs, GWQConfig(), calibration_data=ids)  # doctest: +SKIP
    """
    if not torch_internals.inlines_nn_modules():
        raise ValueError("the gwq backend needs torch._dynamo.config.inline_inbuilt_nn_modules = True (the default)")
    sites = capture_linears(gm)
    # The stack walk finds the compiled module and its call's inputs; with both the model and the
    # calibration data given there is nothing to find.
    call = None if (model is not None and calibration_data is not None) else find_model_call(model)
    root = model if model is not None else (call.model if call is not None else None)
    if root is None:
        raise ValueError(
            "the gwq backend could not find the model to calibrate: compile the nn.Module itself "
            "(torch.compile(model, backend='gwq')) or pass it, gwq_compile.backend(config, model=model)"
        )
    keep_dense = unquantizable_weights(gm, sites, example_inputs, root)
    quant = calibrate_model(root, config, calibration_data, call, keep_dense)
    annotated = annotate_linears(gm, sites, example_inputs, quant)
    baked = rewrite_linears(gm, annotated)
    guard_baked_weights(baked)
    _check_no_dense_read_of_swapped_weights(gm, example_inputs, quant)
    counters["gwq"]["graphs_compiled"] += 1
    return torch_internals.inductor(gm, example_inputs, mode)


def _check_no_dense_read_of_swapped_weights(gm: fx.GraphModule, example_inputs: Sequence[Any], quant: Any) -> None:
    """Fail loudly if the graph still reads a dense nn.Linear weight the model no longer has.

    Such a weight arrives as a ``GWQTensor`` at run time, which a compiled kernel must not
    read as dense memory.  ``unquantizable_weights`` keeps these weights dense beforehand;
    this is the backstop for a graph it did not foresee.
    """
    for node in gm.graph.find_nodes(op="placeholder"):
        layer = quant.lookup(input_value(gm, node, example_inputs))
        if layer is not None and layer.layout == "out_in" and node.users:
            readers = ", ".join(str(u.target) for u in node.users)
            raise RuntimeError(f"layer {layer.name!r}: the compiled graph reads its dense weight ({readers}) after it was quantized")


class GWQBackend:
    """A torch.compile backend bound to one GWQ config and calibration set.

    Attributes:
        config: the one-shot :class:`GWQConfig`.
        calibration_data: as for :func:`gwq_compile.quantize_`, or None (first-call calibration).
        mode: an Inductor mode (``"max-autotune"``, ...) or None.
    """

    def __init__(self, config: GWQConfig, calibration_data: Any = None, model: Optional[torch.nn.Module] = None, mode: Optional[str] = None) -> None:
        if not isinstance(config, GWQConfig):
            raise TypeError(f"config must be a GWQConfig, got {type(config).__name__}")
        _check_one_shot(config)
        self.config = config
        self.calibration_data = calibration_data.data if isinstance(calibration_data, CalibrationData) else calibration_data
        self.mode = mode
        if model is not None:  # torch.compile(model)'s wrapper: the module it wraps
            model = torch_internals.compiled_module(model) or model
        # Weak: torch._dynamo keeps backends alive until reset(), the model must not be.
        self._model = weakref.ref(model) if model is not None else None

    @property
    def model(self) -> Optional[torch.nn.Module]:
        return self._model() if self._model is not None else None

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], options: Optional[Mapping] = None, mode: Optional[str] = None) -> Callable:
        if options:
            raise ValueError(
                f"options {sorted(options)} were given to torch.compile with a gwq_compile.backend(...) object; "
                "pass them to gwq_compile.backend(...) instead"
            )
        if self._model is not None and self.model is None:
            raise ValueError("the model given to gwq_compile.backend(model=...) no longer exists")
        return compile_graph(gm, example_inputs, self.config, self.calibration_data, self.model, mode or self.mode)

    def __repr__(self) -> str:
        return f"GWQBackend(bits={self.config.bits}, group_size={self.config.group_size}, outlier_ratio={self.config.outlier_ratio})"


def backend(
    config: Optional[GWQConfig] = None,
    calibration_data: Any = None,
    *,
    model: Optional[torch.nn.Module] = None,
    mode: Optional[str] = None,
    **config_changes: Any,
) -> GWQBackend:
    """A ``torch.compile`` backend that GWQ-quantizes the model, then compiles it with Inductor.

    Args:
        config: the GWQ settings (default ``GWQConfig()``); ``step`` must be None.
        calibration_data: token ids, dict batches, or an iterable of them (as for
            ``quantize_``); None calibrates on the first call's inputs.
        model: the whole model, when it cannot be found on the call stack (e.g. when a
            function calling the model is compiled rather than the model).
        mode: an Inductor mode.
        **config_changes: GWQConfig fields overriding ``config``'s.

    Example:
        >>> import torch
        >>> be = backend(bits=3, group_size=64, calibration_data=torch.randint(0, 100, (1, 32)))
        >>> be.config.bits
        3
        >>> compiled = torch.compile(model, backend=be)      # doctest: +SKIP
    """
    unknown = sorted(set(config_changes) - set(config_fields()))
    if unknown:
        raise ValueError(f"unknown gwq backend option(s) {unknown}; valid options: {', '.join(valid_options())}")
    config = config if config is not None else GWQConfig()
    if config_changes:
        config = config.replace(**config_changes)
    return GWQBackend(config, calibration_data, model=model, mode=mode)


def gwq_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Optional[dict] = None, mode: Optional[str] = None) -> Callable:
    """Entry point of ``torch.compile(model, backend="gwq", options={...})``.

    ``torch.compile`` calls it with the ``options`` dict it was given (and ``mode`` when
    one was set); see :func:`parse_options` for what it accepts.

    Example:
        >>> compiled = torch.compile(model, backend="gwq", options={"bits": 4, "calibration_data": ids})  # doctest: +SKIP
    """
    _wrap_calibration_option(options)
    _wrap_pending_compiles()
    config, calibration_data = parse_options(options)
    return compile_graph(gm, example_inputs, config, calibration_data, mode=mode)
