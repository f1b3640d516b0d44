"""Returning the calibration's large CPU buffers to the system (glibc's malloc).

A calibration backward allocates and frees buffers of many sizes: recomputed activations of
a checkpointed layer (12 MB for a 2048 x 1536 fp32 SmolLM2 MLP activation), gradients folded
into saliency one weight at a time, the loss chunks.  glibc serves requests above its mmap
threshold with their own mappings, returned when freed, but it raises that threshold to the
size of every such buffer freed (up to 32 MB), so after the first layer the rest come from
the heap, where freed space of one size is not reused for the next, and the process keeps
it.  Measured on SmolLM2-135M with 1 x 2048 tokens (``benchmarks/calibration_memory.py``,
one thread): peak RSS 3.00 GB by default, 1.63 GB with ``MALLOC_MMAP_THRESHOLD_=4194304``.

:func:`returned_large_buffers` sets that threshold (``mallopt(M_MMAP_THRESHOLD)``) to
:data:`MMAP_THRESHOLD` for the calibration and then to glibc's ceiling, where its own
adjustment ends up, and trims the heap (``malloc_trim``).  Setting it fixes the threshold
for the rest of the process (glibc has no call to restore its adjustment).  It does
nothing where malloc is not glibc's, where ``MALLOC_MMAP_THRESHOLD_`` is set (the user's
choice stands), or with ``GWQ_MALLOC=keep``.

Example:
    >>> from gwq_compile import heap
    >>> with heap.returned_large_buffers():
    ...     pass
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
from typing import Iterator, Optional

__all__ = ["MMAP_THRESHOLD", "returned_large_buffers"]

#: Buffers of at least this many bytes get their own mapping during calibration (4 MB: above
#: it 1.63 GB peak for the SmolLM2 row above; 64 KB gave 1.56 GB but made the ranking's
#: allocations 10x slower).
MMAP_THRESHOLD = 4 << 20
_GLIBC_MMAP_THRESHOLD_MAX = 32 << 20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit glibc
_M_MMAP_THRESHOLD = -3  # <malloc.h>


@functools.cache
def _glibc() -> Optional[ctypes.CDLL]:
    """glibc's handle, or None where malloc is another library's."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (glibc only; musl and others have no such symbol)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except (OSError, AttributeError):
        return None


def _allocator() -> Optional[ctypes.CDLL]:
    """glibc, unless the user chose the threshold (``MALLOC_MMAP_THRESHOLD_``) or ``GWQ_MALLOC=keep``."""
    if os.environ.get("GWQ_MALLOC", "").lower() == "keep" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return None
    return _glibc()


@contextlib.contextmanager
def returned_large_buffers(threshold: int = MMAP_THRESHOLD) -> Iterator[None]:
    """Within: buffers of ``threshold`` bytes and more are mmapped (see the module comment)."""
    libc = _allocator()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(threshold))
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(_GLIBC_MMAP_THRESHOLD_MAX))
        libc.malloc_trim(ctypes.c_size_t(0))
