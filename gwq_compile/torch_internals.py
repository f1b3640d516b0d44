"""Every private torch internal gwq-compile relies on, in one place.

The ``torch.compile`` backend calibrates the whole model from inside a Dynamo backend call
and bakes packed weights into Dynamo's graphs; no public torch API does either, so it
reaches into the names below.  Each is looked up strictly: when a torch release renames or
removes one, its first use raises :class:`MissingTorchInternal` naming it, what it is for
and the torch version, never a silent default.  ``tests/test_torch_internals.py`` resolves
every entry of :data:`INTERNALS` on the installed torch and checks the attributes of
:data:`DYNAMO_ATTRIBUTES` on a real compile, so CI fails loudly the day one disappears.

The library's eager path (``quantize_``, ``GWQTensor``, the CPU and Triton kernels) uses
none of these; only ``passes/`` and :mod:`gwq_compile.compile_backend` do.

Example:
    >>> from gwq_compile import torch_internals
    >>> torch_internals.resolve("torch._guards.TracingContext").__name__
    'TracingContext'
    >>> torch_internals.resolve("torch._no_such_module.thing")
    Traceback (most recent call last):
    ...
    gwq_compile.torch_internals.MissingTorchInternal: gwq-compile needs torch._no_such_module.thing, ...
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from typing import Any, Iterator, Optional

import torch

__all__ = ["DYNAMO_ATTRIBUTES", "INTERNALS", "MissingTorchInternal", "resolve"]

#: Importable private names: dotted path -> what gwq-compile uses it for.
INTERNALS: dict[str, str] = {
    "torch._dynamo.eval_frame.OptimizedModule": "what torch.compile(model) returns; its _orig_mod is the model to calibrate",
    "torch._dynamo.eval_frame.cached_backends": "the backend wrappers of the torch.compile calls made so far, whose "
    "calibration tensors are wrapped so that recompile checks compare them by identity",
    "torch._guards.tracing": "leaves Dynamo's tracing context while calibration runs eagerly",
    "torch._guards.TracingContext": "the compile's guards, to which rewrite adds ID_MATCH guards on the baked weights",
    "torch._guards.detect_fake_mode": "the fake mode of a graph's example values, for the rewritten nodes' metadata",
    "torch._subclasses.fake_tensor.unset_fake_temporarily": "real tensors while calibration runs inside the backend",
    "torch._subclasses.fake_tensor.FakeTensor": "tells real example inputs from fake ones (annotate)",
    "torch._dynamo.source.ConstantSource": "the source of each packed-weight buffer rewrite registers on a Dynamo graph",
    "torch._dynamo.source.LocalSource": "where a parameter's source chain starts (the traced frame's self)",
    "torch._dynamo.guards.GuardBuilder.ID_MATCH": "the guard that makes another model instance recompile",
    "torch._dynamo.utils.counters": "the counters each pass increments (counters['gwq'])",
    "torch._inductor.compile_fx.compile_fx": "Inductor, which compiles the rewritten graph",
    "torch._inductor.list_mode_options": "the options of the backend's mode= (as torch.compile's)",
    "torch._C._nn.linear": "the C binding of F.linear, which Dynamo graphs may call directly (capture)",
    "torch._dynamo.config": "inline_inbuilt_nn_modules, without which linears reach the backend as opaque modules",
}

#: Attributes Dynamo sets on its own objects (not importable; checked on a real compile).
DYNAMO_ATTRIBUTES: dict[str, str] = {
    "nn.Module._compiled_call_impl": "set by Module.compile(): a module compiled in place; cleared while calibration calls it",
    "OptimizedModule._orig_mod": "the module torch.compile wrapped",
    "cached_backends[...].compiler_fn / .kwargs": "a pending compile's backend and its options",
    "GraphModule._param_name_to_source": "a Dynamo graph's sources of its parameters and buffers",
    "fx.Node._dynamo_source / node.meta['grapharg'].source": "where a graph input comes from",
    "node.meta['grapharg'].example": "the real tensor behind a placeholder whose example input is fake",
    "Source.base": "the chain from a parameter's source to the frame local it starts from",
    "TracingContext.guards_context.dynamo_guards": "the guard set rewrite adds to",
}


class MissingTorchInternal(RuntimeError):
    """A private torch name gwq-compile's backend needs is gone (renamed or removed in this torch)."""


def _missing(name: str, what: str) -> MissingTorchInternal:
    why = INTERNALS.get(name) or DYNAMO_ATTRIBUTES.get(name, "")
    return MissingTorchInternal(
        f"gwq-compile needs {name}, {why + '; ' if why else ''}torch {torch.__version__} has no {what}. "
        "The torch.compile backend does not support this torch version; eager quantize_ still works"
    )


@functools.cache
def resolve(name: str) -> Any:
    """The object at dotted path ``name`` (the longest importable module, then attributes)."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for i, attr in enumerate(parts[cut:], start=cut):
            if not hasattr(obj, attr):
                raise _missing(name, f"{'.'.join(parts[:i])}.{attr}")
            obj = getattr(obj, attr)
        return obj
    raise _missing(name, f"module {parts[0]}")


def attribute(obj: Any, attr: str, name: str) -> Any:
    """``obj.attr``, strictly: a :class:`MissingTorchInternal` for ``name`` when it is absent."""
    if not hasattr(obj, attr):
        raise _missing(name, f"{attr!r} on {type(obj).__name__}")
    return getattr(obj, attr)


# ----------------------------------------------------------------------------- calibrating inside the backend


@contextlib.contextmanager
def outside_tracing() -> Iterator[None]:
    """Real eager PyTorch from inside a Dynamo backend call: no fake mode, no tracing context."""
    with resolve("torch._subclasses.fake_tensor.unset_fake_temporarily")(), resolve("torch._guards.tracing")(None):
        yield


def compiled_module(obj: Any) -> Optional[torch.nn.Module]:
    """The model behind ``obj`` when it is compiled: ``torch.compile(model)``'s wrapper gives the
    module it wraps, a module compiled in place (``Module.compile()``) itself; else None."""
    if isinstance(obj, resolve("torch._dynamo.eval_frame.OptimizedModule")):
        return attribute(obj, "_orig_mod", "OptimizedModule._orig_mod")
    if isinstance(obj, torch.nn.Module) and compiled_call(obj) is not None:
        return obj
    return None


def compiled_call(module: torch.nn.Module) -> Any:
    """What ``Module.compile()`` installed on ``module`` (None when it was not compiled in place)."""
    return attribute(module, "_compiled_call_impl", "nn.Module._compiled_call_impl")


def set_compiled_call(module: torch.nn.Module, impl: Any) -> None:
    attribute(module, "_compiled_call_impl", "nn.Module._compiled_call_impl")
    module._compiled_call_impl = impl


def pending_compile_options(compiler_fn: Any) -> list[Any]:
    """The ``options`` of every torch.compile made so far with ``compiler_fn`` as its backend."""
    options = []
    for wrapper in list(resolve("torch._dynamo.eval_frame.cached_backends").values()):
        # Other backends' wrappers need not have these attributes; ours (a _TorchCompileWrapper) must.
        if getattr(wrapper, "compiler_fn", None) is compiler_fn:
            options.append(attribute(wrapper, "kwargs", "cached_backends[...].compiler_fn / .kwargs").get("options"))
    return options


# ----------------------------------------------------------------------------- graphs, sources and guards


def fake_mode_of(values: list[torch.Tensor]) -> Any:
    """The fake mode ``values`` live in (None for real tensors)."""
    return resolve("torch._guards.detect_fake_mode")(values)


def is_fake(value: Any) -> bool:
    return isinstance(value, resolve("torch._subclasses.fake_tensor.FakeTensor"))


def register_constant_source(gm: torch.fx.GraphModule, name: str) -> None:
    """Give the buffer ``name`` of a Dynamo graph a ``ConstantSource`` (AOTAutograd looks every
    buffer of a Dynamo graph up there).  A graph traced outside Dynamo has no such table."""
    if not hasattr(gm, "_param_name_to_source"):
        return  # not a Dynamo graph (fx.symbolic_trace): nothing to register
    gm._param_name_to_source[name] = resolve("torch._dynamo.source.ConstantSource")(name)


def node_source(node: torch.fx.Node) -> Optional[Any]:
    """Where a Dynamo graph input comes from, or None for a node Dynamo gave no source."""
    source = getattr(node, "_dynamo_source", None)  # absent on nodes Dynamo did not create
    if source is None:
        source = getattr(node.meta.get("grapharg"), "source", None)
    return source


def module_local(source: Any) -> Optional[Any]:
    """The frame-local source an ``L['self']._modules[...]._parameters[...]`` chain starts from
    (None when the chain does not go through a module)."""
    local_source = resolve("torch._dynamo.source.LocalSource")
    through_module = False
    while source is not None and not isinstance(source, local_source):
        through_module = through_module or "NNModule" in type(source).__name__
        source = getattr(source, "base", None)  # a chain's root has no base
    return source if through_module else None


def add_id_match_guards(sources: list[Any]) -> bool:
    """Guard the frame being compiled on the identity of each source's object; False outside a
    Dynamo compile (nothing to guard)."""
    context = resolve("torch._guards.TracingContext").try_get()
    if context is None:
        return False
    guards = attribute(attribute(context, "guards_context", "TracingContext.guards_context.dynamo_guards"), "dynamo_guards",
                       "TracingContext.guards_context.dynamo_guards")  # fmt: skip
    id_match = resolve("torch._dynamo.guards.GuardBuilder.ID_MATCH")
    for source in sources:
        guards.add(source.make_guard(id_match))
    return True


def inlines_nn_modules() -> bool:
    """Whether Dynamo inlines ``nn.Module`` calls (so linears reach the backend as ``F.linear``).
    The flag can be turned off up to torch 2.12; later releases drop it (always on), so its
    absence means True, by design rather than as a fallback."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.13 deprecates reading it
        return bool(getattr(resolve("torch._dynamo.config"), "inline_inbuilt_nn_modules", True))


def inductor(gm: torch.fx.GraphModule, example_inputs: list, mode: Optional[str]) -> Any:
    """Inductor on ``gm``, with torch.compile's options for ``mode``."""
    patches = resolve("torch._inductor.list_mode_options")(mode) if mode else {}
    return resolve("torch._inductor.compile_fx.compile_fx")(gm, list(example_inputs), config_patches=patches)
