"""Which copy of the Triton kernel modules runs: compiled for CUDA, or on the interpreter for CPU.

Triton fixes that choice when ``@triton.jit`` decorates a function, so :func:`kernel_modules`
keeps one copy of the kernel modules (``unpack``, ``gemv``, ``dequant``) per mode and loads
the interpreted one on demand: no ``TRITON_INTERPRET`` is needed for CPU tensors, and the
choice never leaks into anyone else's kernels.  Nothing here needs ``triton`` at import time.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from types import ModuleType, SimpleNamespace

import torch

__all__ = ["kernel_modules", "require_triton", "triton_interpreting", "use_interpreter"]

_PACKAGE = "gwq_compile.codegen"
#: Kernel modules in import order (each imports the helper module before it).
_MODULES = ("unpack", "gemv", "dequant")
_loaded: dict[bool, SimpleNamespace] = {}


def require_triton() -> ModuleType:
    try:
        import triton  # noqa: PLC0415  (optional dependency: imported only when a kernel is used)
    except ImportError as exc:
        raise ImportError(
            "the GWQ Triton kernels (GWQ_KERNEL=triton, or CUDA tensors by default) need the `triton` "
            "package (pip install 'triton>=3.3'), which cannot be imported; use GWQ_KERNEL=reference"
        ) from exc
    return triton


def triton_interpreting() -> bool:
    """Whether triton itself was imported for the interpreter (``TRITON_INTERPRET=1``): then
    every kernel runs on the interpreter, CUDA tensors included (a debugging mode).

    Example:
        >>> from gwq_compile.codegen.kernel_modules import triton_interpreting
        >>> isinstance(triton_interpreting(), bool)
        True
    """
    require_triton()
    import triton.language as tl  # noqa: PLC0415
    from triton.runtime.jit import JITFunction  # noqa: PLC0415

    return not isinstance(tl.zeros, JITFunction)


@contextlib.contextmanager
def _interpret_env(interpret: bool) -> Iterator[None]:
    """Set ``TRITON_INTERPRET`` while a copy of our kernels is decorated, then restore it,
    so the choice never leaks into anyone else's kernels."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


def _private_copies(interpret: bool) -> dict[str, ModuleType]:
    """Load every kernel module again under private names, decorated for ``interpret``.
    While a family module runs its ``from gwq_compile.codegen.unpack import ...``, the
    regular name points at the private helper copy, so the copies only call each other."""
    copies: dict[str, ModuleType] = {}
    suffix = "interpreted" if interpret else "compiled"
    saved = {n: sys.modules.get(f"{_PACKAGE}.{n}") for n in _MODULES}
    try:
        for name in _MODULES:
            regular = importlib.util.find_spec(f"{_PACKAGE}.{name}")
            spec = importlib.util.spec_from_file_location(f"{_PACKAGE}.{name}_{suffix}", regular.origin)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            sys.modules[f"{_PACKAGE}.{name}"] = module
            spec.loader.exec_module(module)
            copies[name] = module
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(f"{_PACKAGE}.{name}", None)
            else:
                sys.modules[f"{_PACKAGE}.{name}"] = module
    return copies


def kernel_modules(interpret: bool) -> SimpleNamespace:
    """The kernel modules (``.unpack``, ``.gemv``, ``.dequant``) decorated for the
    interpreter or the compiler: the regular modules when their mode fits (imported
    under the wanted mode if nobody imported them yet), else private copies.

    Example:
        >>> from gwq_compile.codegen.kernel_modules import kernel_modules
        >>> kernel_modules(interpret=True).gemv.INTERPRETED
        True
    """
    if interpret in _loaded:
        return _loaded[interpret]
    require_triton()
    if not interpret and triton_interpreting():
        raise RuntimeError("triton was imported with TRITON_INTERPRET=1: GWQ kernels can only run on the interpreter here")
    with _interpret_env(interpret):
        modules = {n: importlib.import_module(f"{_PACKAGE}.{n}") for n in _MODULES}
        if any(m.INTERPRETED != interpret for m in modules.values()):
            modules = _private_copies(interpret)
    if any(m.INTERPRETED != interpret for m in modules.values()):  # e.g. triton.knobs.runtime.interpret forced in code
        raise RuntimeError(
            f"could not decorate the GWQ kernels for the {'interpreter' if interpret else 'compiler'}: "
            "triton.knobs.runtime.interpret seems to be overridden in code; leave the choice to TRITON_INTERPRET"
        )
    _loaded[interpret] = SimpleNamespace(**modules)
    return _loaded[interpret]


def use_interpreter(device: torch.device) -> bool:
    """CPU tensors run on the Triton interpreter; CUDA ones compiled, unless triton itself
    was imported for the interpreter.

    Example:
        >>> import torch
        >>> from gwq_compile.codegen.kernel_modules import use_interpreter
        >>> use_interpreter(torch.device("cpu"))
        True
    """
    if device.type == "cpu":
        return True
    if device.type in ("cuda", "xpu"):
        return triton_interpreting()
    raise ValueError(f"gwq_linear_triton: x is on {device}; the Triton kernels support cuda (and cpu on the interpreter)")
