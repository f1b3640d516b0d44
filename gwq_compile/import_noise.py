"""Drop two known, harmless messages that importing torchao prints on every run.

Both are filtered on the logger that emits them, and only when they say exactly that:

* torchao's ``Failed to load .../_C_mxfp8...so`` and ``.../_C_cutlass_90a.abi3.so`` (logger
  ``torchao``): the PyPI torchao wheel ships these CUDA-only extensions, which can never
  load into a CPU-only torch build (``torch.version.cuda is None``).  On a CUDA build the
  same message is a real problem and is kept, and so is a failure of any other library.
* ``<enum ...> is an Enum subclass and is now natively supported by torch.compile ...``
  (logger ``torch.utils._pytree``): torchao's ``register_as_pytree_constant`` still
  registers its own Enums (``KernelPreference``, ...), which newer torch deprecates.  Only
  Enums defined in torchao are dropped; the same warning about anyone else's class stays.

Installed by ``import gwq_compile`` before anything of ours imports torchao; installing
touches only :mod:`logging` (no torch import), so it costs nothing at start-up.
"""

from __future__ import annotations

import enum
import logging
import os

# Extensions of the torchao wheel that need CUDA (file names start with these).
CUDA_ONLY_TORCHAO_EXTENSIONS = ("_C_mxfp8", "_C_cutlass_90a")


class _CudaOnlyExtensionOnCpuTorch(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith("Failed to load "):
            return True
        path = message.removeprefix("Failed to load ").split(":", 1)[0]
        if not os.path.basename(path).startswith(CUDA_ONLY_TORCHAO_EXTENSIONS):
            return True
        import torch  # already imported: torchao imports it before loading its extensions

        return torch.version.cuda is not None  # keep it where CUDA could have loaded it


class _TorchaoEnumPytreeDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if "is an Enum subclass and is now natively supported" not in str(record.msg):
            return True
        cls = record.args[0] if isinstance(record.args, tuple) and record.args else None
        is_torchao_enum = isinstance(cls, type) and issubclass(cls, enum.Enum) and cls.__module__.split(".")[0] == "torchao"
        return not is_torchao_enum


_FILTERS = {"torchao": _CudaOnlyExtensionOnCpuTorch(), "torch.utils._pytree": _TorchaoEnumPytreeDeprecation()}


def install() -> None:
    """Add the two filters to their loggers (idempotent)."""
    for name, flt in _FILTERS.items():
        logger = logging.getLogger(name)
        if flt not in logger.filters:
            logger.addFilter(flt)
