"""The compiled CPU kernel of the fast path (``csrc/cpu_linear.cpp``), built on first use.

``torch.ops.gwq_cpu.linear`` does in one call what :func:`gwq_compile.cpu_layout.linear`
does with a dozen ATen ops: round x to bf16, run torch's int4 CPU GEMM, then add the fp16
CSR outliers (read as stored: int16 columns, fp16 values) and the bias in the same pass
that writes the output.  It is the part no library has (the outliers) plus the glue that
otherwise costs more per call than the GEMM at decode sizes.

The source is compiled with ``torch.utils.cpp_extension.load`` (g++ and ninja; about 10 s)
into ``$GWQ_EXTENSIONS_DIR`` or ``~/.cache/gwq_compile/<python>-<torch>-<source digest>``,
once per machine and version.  If that is impossible (no compiler), :func:`available` says why in one warning
and :mod:`gwq_compile.dispatch` runs the fast path's ATen-op version instead (same layout,
same numerics, more per-call overhead); ``GWQ_KERNEL=cpu_aten`` asks for that version.

Example:
    >>> from gwq_compile import cpu_kernel
    >>> cpu_kernel.available() in (True, False)
    True
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import warnings
from pathlib import Path

import torch

__all__ = ["available", "build_dir", "eager_linear", "gemv_isa", "gemv_supported", "path_calls", "reason_unavailable"]

#: The compiled kernel's paths, in the order ``torch.ops.gwq_cpu.path_calls`` counts them.
PATHS = ("gemv", "int4", "tile")

SOURCE = Path(__file__).with_name("csrc") / "cpu_linear.cpp"
#: -fopenmp: at::parallel_for is a header template that runs serially in a unit compiled without
#: it (ATen's INTRA_OP_PARALLEL), and it marks its body a parallel region, so even the at::mm
#: inside would run on one thread.  Linking it names libgomp.so.1, the runtime torch has loaded.
CFLAGS = ["-O3", "-fopenmp"]
LDFLAGS = ["-fopenmp"]


def build_dir() -> Path:
    """Where the kernel is built and cached: one build per Python version, torch version and
    source text.  The source's digest is in the name because two checkouts of different
    versions on one machine would otherwise rebuild one directory in turn, and a process
    could load the library another checkout's source just built."""
    root = os.environ.get("GWQ_EXTENSIONS_DIR") or Path.home() / ".cache" / "gwq_compile"
    sources = b"".join(f.read_bytes() for f in sorted(SOURCE.parent.iterdir()) if f.suffix in (".cpp", ".h"))
    digest = hashlib.sha256(sources + repr((CFLAGS, LDFLAGS)).encode()).hexdigest()[:12]
    tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__.replace('+', '_')}-{digest}"
    return Path(root) / tag


#: ``torch.ops.gwq_cpu.linear``'s kernel as a plain function (the extension's pybind11 binding), once built.
_EAGER: list = [None]


def eager_linear():
    """The compiled kernel as a plain Python function, same arguments as ``torch.ops.gwq_cpu.linear``:
    for eager inference only (no dispatcher: no autograd, no tracing), where it saves half
    the per-call cost at batch 1.  None when the kernel is not built."""
    return _EAGER[0] if available() else None


@functools.cache
def _load() -> str | None:
    """Build/load the extension; ``None`` on success, else the reason it is unavailable."""
    try:
        from torch.utils.cpp_extension import load  # noqa: PLC0415  (heavy; only on first use)

        path = build_dir()
        path.mkdir(parents=True, exist_ok=True)
        module = load(
            name="gwq_cpu_linear", sources=[str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=LDFLAGS, is_python_module=True,
            build_directory=str(path),
        )
        torch.library.register_fake("gwq_cpu::linear")(_fake_linear)
        _EAGER[0] = module.linear
    except Exception as err:  # noqa: BLE001  (any build failure: reported once, below)
        return f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else err!r}"
    return None


def _fake_linear(x, codes, scales_zeros, row_ptr, col_idx, values, bias, tile_group, in_features, pad, gather, repeat_k, tile_min_rows, gemv_max_rows):
    """Shape and dtype of ``torch.ops.gwq_cpu.linear`` (so compiled graphs can call it directly)."""
    return x.new_empty(*x.shape[:-1], row_ptr.shape[0] - 1)


@torch.compiler.assume_constant_result  # built or not is fixed for the process: compiled graphs take it as a constant
def reason_unavailable() -> str | None:
    """``None`` once the kernel is built (or found in the cache), else why it cannot be."""
    return _load()


@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether ``torch.ops.gwq_cpu.linear`` can run; a failed build warns once, naming the reason."""
    reason = _load()
    if reason is not None:
        _warn_once(reason)
    return reason is None


def gemv_supported() -> bool:
    """Whether one of the kernel's decode GEMVs runs on this CPU (else decode uses torch's int4 GEMM)."""
    return available() and bool(torch.ops.gwq_cpu.gemv_supported())


@functools.cache
def gemv_isa() -> str:
    """Which decode GEMV runs here: ``"avx512_bf16"`` (bf16 x, ``csrc/cpu_gemv_bf16.h``), ``"avx2"``
    (x rounded to int16 per tile group, integer multiply-adds, ``csrc/cpu_gemv_avx2.h``), or ``""`` (none: torch's int4 GEMM)."""
    return str(torch.ops.gwq_cpu.gemv_isa()) if available() else ""


def path_calls() -> dict[str, int]:
    """Calls of the compiled kernel so far by the path they took (``PATHS``): the tests' proof of which ran."""
    if not available():
        return dict.fromkeys(PATHS, 0)
    return dict(zip(PATHS, torch.ops.gwq_cpu.path_calls()))


@functools.cache
def _warn_once(reason: str) -> None:
    warnings.warn(
        f"the GWQ CPU kernel ({SOURCE.name}) could not be built ({reason}); the CPU fast path runs its ATen-op version, "
        "which is slower per call (install g++ and ninja, or set GWQ_KERNEL=cpu_aten to silence this)",
        stacklevel=5,
    )
