"""Calibrate: gradient saliency of every target weight, once per model, from the whole-model loss.

The backend only ever sees subgraphs, but GWQ's saliency is ``|dL/dW|`` of the *whole
model's* loss: a graph break must not turn one loss into two.  So this stage works on
the original ``nn.Module``, not on the graph:

* :func:`find_model_call` finds the module being compiled (and the arguments of the
  current call) on the Python call stack: the innermost ``OptimizedModule`` (what
  ``torch.compile(model)`` returns) or module compiled in place with ``model.compile()``.
* :func:`calibrate_model` runs the same prepare / forward+backward / convert steps as
  eager :func:`gwq_compile.quantize_` (the same functions, in the same order), so the
  outlier masks and packed weights are identical to eager GWQ.  Every target's weight is
  swapped for its ``GWQTensor`` parameter (the dense ones are freed): HF ``Conv1D`` weights
  get a transposed one (``[in, out]``, as ``Conv1D.forward`` uses it), so eager calls, the
  report and ``save_quantized`` see the same quantized model as the compiled graphs.
* The result is registered per model (weakly), so later subgraphs, graph breaks and
  recompiles reuse it: calibration never runs twice for one model.

Without calibration data the first call's own inputs are used (a warning says so):
next-token cross-entropy when the output holds LM logits over token-id inputs, else
``0.5 * mean(output ** 2)``.  Its gradient with respect to the output is the output itself
(scaled by ``1 / numel``), so back-propagating it asks "how much does each weight drive
the output this model actually produces": a label-free, first-order output-sensitivity
score.  The mean rather than the sum keeps the gradients in fp16/bf16 range and the
saliency scale independent of batch and sequence length (the top-k selection is
scale-invariant anyway).

Example:
    >>> import torch
    >>> from gwq_compile import GWQConfig
    >>> from gwq_compile.passes.calibrate import calibrate_model
    >>> model = torch.nn.Sequential(torch.nn.Embedding(50, 32), torch.nn.Linear(32, 50))
    >>> cfg = GWQConfig(bits=4, group_size=32, skip_modules=(), progress=False)
    >>> quant = calibrate_model(model, cfg, torch.randint(0, 50, (1, 16)))
    >>> sorted(quant.names()), type(model[1].weight).__name__
    (['1'], 'GWQTensor')
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch._dynamo.utils import counters
from torch.utils import _pytree as pytree

from gwq_compile import calibration, quantize, torch_internals
from gwq_compile.config import GWQConfig
from gwq_compile.targets import mark_target, target_modules
from gwq_compile.calibration import logits_of, next_token_nll
from gwq_compile.passes.capture import LAYOUT_IN_OUT, LAYOUT_OUT_IN
from gwq_compile.tensor import GWQTensor

# ----------------------------------------------------------------------------- finding the model


@dataclass
class ModelCall:
    """The module being compiled and the arguments of the call that triggered compilation."""

    model: torch.nn.Module
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


def _frame_call(frame: Any) -> Optional[ModelCall]:
    if frame.f_code.co_name not in ("__call__", "_wrapped_call_impl"):
        return None
    local = frame.f_locals
    owner = local.get("self")
    args, kwargs = local.get("args", ()), local.get("kwargs", {})
    if not isinstance(args, tuple) or not isinstance(kwargs, dict):
        return None
    model = torch_internals.compiled_module(owner)  # torch.compile(model)'s wrapper, or model.compile()
    return None if model is None else ModelCall(model, args, dict(kwargs))


def find_model_call(model: Optional[torch.nn.Module] = None) -> Optional[ModelCall]:
    """The innermost compiled module on the call stack (or the call of ``model``), with its arguments.

    Dynamo calls the backend synchronously, while the user's ``compiled_model(...)`` call
    is still on the stack, so this works for the first graph, for every graph after a
    graph break and for every recompile.  Calling a compiled *function* that uses the
    model leaves no such frame: pass ``model=`` to :func:`gwq_compile.backend` then.

    Example:
        >>> find_model_call() is None   # not inside a compiled module's call
        True
    """
    frame = sys._getframe(1)
    while frame is not None:
        call = _frame_call(frame)
        if call is not None and (model is None or call.model is model):
            return call
        frame = frame.f_back
    return None


# ----------------------------------------------------------------------------- per-model result


@dataclass
class QuantizedLayer:
    """One calibrated and packed weight.

    Attributes:
        name: module name in the model.
        weight: the module's ``GWQTensor`` (transposed, ``[in, out]``, for an HF Conv1D).
        layout: ``"out_in"`` (nn.Linear) or ``"in_out"`` (HF Conv1D: the dense weight was ``[in, out]``).
        dense: weak reference to the dense parameter the graphs receive (identity key).
    """

    name: str
    weight: GWQTensor
    layout: str
    dense: weakref.ReferenceType

    @property
    def outlier_mask(self) -> torch.Tensor:
        """Bool ``[out_features, in_features]`` (the linear's orientation, also for a Conv1D): the weights kept as fp16 outliers."""
        mask = self.weight.outlier_mask()
        return mask.t() if self.weight.transposed else mask


@dataclass
class ModelQuantization:
    """What calibration produced for one model; shared by all of its subgraphs and recompiles."""

    config: GWQConfig
    layers: dict[int, QuantizedLayer] = field(default_factory=dict)
    calibration_loss: str = "none"

    def lookup(self, tensor: Any) -> Optional[QuantizedLayer]:
        """The layer whose dense weight is ``tensor`` (by identity), or None."""
        layer = self.layers.get(id(tensor))
        return layer if layer is not None and layer.dense() is tensor else None

    def name_of(self, weight: Any) -> Optional[str]:
        """The name of the layer whose quantized weight is ``weight`` (by identity), or None."""
        return next((layer.name for layer in self.layers.values() if layer.weight is weight), None)

    def names(self) -> list[str]:
        return [layer.name for layer in self.layers.values()]

    def masks(self) -> dict[str, torch.Tensor]:
        """``{layer name: outlier mask}`` (``[out, in]`` bool), e.g. to compare with eager GWQ."""
        return {layer.name: layer.outlier_mask for layer in self.layers.values()}


_MODELS: "weakref.WeakKeyDictionary[torch.nn.Module, ModelQuantization]" = weakref.WeakKeyDictionary()


_RUNNING: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()  # models being calibrated right now


def model_quantization(model: torch.nn.Module) -> Optional[ModelQuantization]:
    """The calibration result registered for ``model`` (by the backend), or None."""
    return _MODELS.get(model)


# ----------------------------------------------------------------------------- targets


# ----------------------------------------------------------------------------- running the model eagerly


@contextlib.contextmanager
def eager_context() -> Iterator[None]:
    """Run real eager PyTorch from inside a Dynamo backend call.

    No fake mode, no tracing context, gradients allowed (even if the compiled model was
    called under ``no_grad`` or ``inference_mode``).  ``torch.compiler.is_compiling()`` stays
    what torch says (True for the whole compile session since torch 2.13): a model that
    branches on it runs its compile-time branch, which computes the function being compiled,
    so calibration sees the model that will run.  No compiler flag is rebound; on SmolLM2 and
    the tests' tiny Llama, Qwen2 and GPT-2 the masks and weights equal eager ``quantize_``'s.
    """
    with torch_internals.outside_tracing(), torch.inference_mode(False):
        yield


@contextlib.contextmanager
def _uncompiled(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` (and any submodule) without the compiled call ``Module.compile()`` installs.

    Calibration runs the model from inside the backend; a module compiled in place would
    send that call straight back into torch.compile (and this backend) otherwise.
    """
    compiled = {m: torch_internals.compiled_call(m) for m in model.modules() if torch_internals.compiled_call(m) is not None}
    for m in compiled:
        torch_internals.set_compiled_call(m, None)
    try:
        yield
    finally:
        for m, impl in compiled.items():
            torch_internals.set_compiled_call(m, impl)


def _clone_inputs(tree: Any) -> Any:
    # Inputs created under inference_mode cannot be saved for backward: clone them outside it.
    return pytree.tree_map_only(torch.Tensor, lambda t: t.clone() if t.is_inference() else t, tree)


def _token_ids(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    ids = kwargs.get("input_ids", args[0] if args else None)
    if isinstance(ids, torch.Tensor) and not ids.is_floating_point() and not ids.is_complex() and ids.dim() == 2 and ids.shape[-1] >= 2:
        return ids
    return None


def self_supervised_loss(output: Any, args: tuple, kwargs: dict) -> tuple[torch.Tensor, str]:
    """The loss used when no calibration data is given, and its name.

    Next-token cross-entropy when ``output`` holds logits ``[B, T, V]`` over token ids
    ``[B, T]`` (``input_ids`` or the first positional argument); otherwise
    ``0.5 * mean(y ** 2)`` over the floating tensors of the output (see the module
    docstring for why).

    Example:
        >>> import torch
        >>> loss, kind = self_supervised_loss(torch.ones(2, 3), (torch.randn(2, 4),), {})
        >>> kind, float(loss)
        ('output_energy', 0.5)
    """
    ids = _token_ids(args, kwargs)
    try:
        logits = logits_of(output)
    except TypeError:
        logits = None
    if ids is not None and isinstance(logits, torch.Tensor) and logits.is_floating_point():
        if logits.dim() == 3 and tuple(logits.shape[:2]) == tuple(ids.shape):
            return next_token_nll(logits, ids), "next_token"
    outputs = [logits] if isinstance(logits, torch.Tensor) and logits.is_floating_point() else [
        t
        for t in pytree.tree_leaves(output)
        if isinstance(t, torch.Tensor) and t.is_floating_point() and (t.requires_grad or not torch.is_grad_enabled())
    ]
    if not outputs:
        raise ValueError(
            "the gwq backend cannot calibrate on the first call: the model's output has no floating-point tensor; "
            "pass calibration_data in the options"
        )
    energy = sum(t.float().square().sum() for t in outputs) / sum(t.numel() for t in outputs)
    return 0.5 * energy, "output_energy"


def _calibrate_on_call(model: torch.nn.Module, call: ModelCall, config: GWQConfig) -> str:
    args, kwargs = _clone_inputs(call.args), _clone_inputs(call.kwargs)
    with torch.set_grad_enabled(config.needs_gradients):
        loss, kind = self_supervised_loss(model(*args, **kwargs), args, kwargs)
        if not torch.isfinite(loss):
            raise ValueError(f"the first-call calibration loss ({kind}) is {loss.item()}: check the model and its inputs")
        if config.needs_gradients:
            loss.backward()
    return kind


# ----------------------------------------------------------------------------- the stage


def _check_same_config(model: torch.nn.Module, done: GWQConfig, config: GWQConfig) -> None:
    ignore = {"progress"}
    diff = {f.name for f in dataclasses.fields(GWQConfig) if f.name not in ignore and getattr(done, f.name) != getattr(config, f.name)}
    if diff:
        raise ValueError(
            f"{type(model).__name__} was already quantized by the gwq backend with different settings "
            f"({', '.join(f'{k}={getattr(done, k)!r}' for k in sorted(diff))}); a model is calibrated once"
        )


def calibrate_model(
    model: torch.nn.Module,
    config: GWQConfig,
    calibration_data: Any = None,
    call: Optional[ModelCall] = None,
    exclude: frozenset[int] = frozenset(),
) -> ModelQuantization:
    """Calibrate and quantize ``model`` once; later calls return the registered result.

    Args:
        model: the whole model (not a subgraph).
        config: a one-shot :class:`GWQConfig` (``step=None``).
        calibration_data: as for :func:`gwq_compile.quantize_`; None calibrates on ``call``.
        call: the model call whose inputs self-calibration uses.
        exclude: ``id()`` of weights to leave dense (see ``annotate.unquantizable_weights``).

    Counts ``counters["gwq"]["calibrations"]`` and ``["layers_calibrated"]``.

    Example:
        >>> import torch
        >>> from gwq_compile import GWQConfig
        >>> lin = torch.nn.Linear(32, 8)
        >>> cfg = GWQConfig(group_size=32, skip_modules=(), progress=False)
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")   # "calibrated on its first call's inputs"
        ...     q = calibrate_model(lin, cfg, call=ModelCall(lin, (torch.randn(4, 32),)))
        >>> q.calibration_loss, type(lin.weight).__name__
        ('output_energy', 'GWQTensor')
    """
    done = _MODELS.get(model)
    if done is not None:
        _check_same_config(model, done.config, config)
        return done
    if calibration_data is None and call is None:
        raise ValueError(
            "the gwq backend needs calibration data: pass options={'calibration_data': token_ids} "
            "or gwq_compile.backend(config, calibration_data=...)"
        )
    if model in _RUNNING:
        raise RuntimeError(f"{type(model).__name__} was compiled again while the gwq backend was calibrating it")
    _RUNNING.add(model)
    try:
        with eager_context(), _uncompiled(model):
            result = torch.compiler.disable(_calibrate)(model, config, calibration_data, call, exclude)
    finally:
        _RUNNING.discard(model)
    _MODELS[model] = result
    counters["gwq"]["calibrations"] += 1
    counters["gwq"]["layers_calibrated"] += len(result.layers)
    return result


def _calibrate(
    model: torch.nn.Module, config: GWQConfig, calibration_data: Any, call: Optional[ModelCall], exclude: frozenset[int]
) -> ModelQuantization:
    all_targets = target_modules(model, config)  # nn.Linear and HF Conv1D
    for name, mod in all_targets:
        if id(mod.weight) in exclude:
            warnings.warn(
                f"layer {name!r}: the graph reads its weight other than through a linear gwq.linear can replace; it stays unquantized",
                stacklevel=4,
            )
    targets = [(n, m) for n, m in all_targets if id(m.weight) not in exclude]
    result = ModelQuantization(config)
    if not targets:
        if not any(isinstance(p, GWQTensor) for p in model.parameters()):  # quiet for an already-quantized model
            warnings.warn("the gwq backend found no linear layer to quantize; the model is compiled unquantized", stacklevel=4)
        return result
    dense = {name: mod.weight for name, mod in targets}
    snapshot = calibration.snapshot_and_freeze(model)
    try:
        # The same preparation, loss and conversion as eager quantize_ (same functions, same
        # order), so the masks and packed weights are identical to eager GWQ on the same data.
        for name, mod in targets:
            mark_target(model, name, mod, config)
            quantize.prepare_linear(mod, config)
        if calibration_data is not None:
            calibration.run_calibration(model, calibration_data, backward=config.needs_gradients, progress=config.progress)
            result.calibration_loss = "next_token"
        else:
            result.calibration_loss = _calibrate_on_call(model, call, config)
            warnings.warn(
                f"gwq backend: no calibration_data given; calibrated {type(model).__name__} on its first call's inputs "
                f"with the {result.calibration_loss!r} loss (pass options={{'calibration_data': ...}} for real GWQ)",
                stacklevel=4,
            )
        _check_some_gradient(targets, config)
        quantize.convert_targets(model, targets, config)  # ranks Linear and Conv1D layers together (outlier_scope="model")
    except BaseException:
        for _, mod in targets:
            calibration.release_weight(mod.weight)
        raise
    finally:
        calibration.restore(model, snapshot)
    for name, mod in targets:
        if isinstance(mod.weight, GWQTensor):  # the module holds it now (eager calls, report, save); the graph gets its fields
            layout = LAYOUT_IN_OUT if mod.weight.transposed else LAYOUT_OUT_IN
            result.layers[id(dense[name])] = QuantizedLayer(name, mod.weight, layout, weakref.ref(dense[name]))
    return result


def _check_some_gradient(targets: list[tuple[str, torch.nn.Module]], config: GWQConfig) -> None:
    if not config.needs_gradients:
        return
    states = [calibration.layer_state(m.weight) for _, m in targets]
    if all(s is None or s.n_backward == 0 for s in states):
        raise ValueError("no layer received a gradient during calibration: is the model's output connected to its linear layers?")
