"""Register GWQ with transformers when ``import gwq_compile`` runs, without importing transformers.

Importing transformers' quantizer registry costs seconds (it imports torchao and every
built-in quantizer), and ``import gwq_compile`` must stay cheap for the ``gwq`` command.  So:

* if ``transformers.quantizers.auto`` is already imported, GWQ is registered now;
* otherwise a finder on ``sys.meta_path`` waits for that module: once it has run, GWQ is
  registered and the finder removes itself.  Every ``from_pretrained`` imports the registry
  before it reads a ``quantization_config``, so GWQ is always there in time.

:func:`mark_transformers_model` is the other cheap entry point: ``quantize_`` calls it on
every model it quantized, and only a transformers model (its module already imported) gets
the GWQ quantizer attached.

Example:
    >>> import gwq_compile, transformers                                      # doctest: +SKIP
    >>> transformers.quantizers.auto.AUTO_QUANTIZER_MAPPING["gwq"].__name__   # doctest: +SKIP
    'GWQHfQuantizer'
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

REGISTRY_MODULE = "transformers.quantizers.auto"


MIN_TRANSFORMERS = "5.24"


def register_now() -> None:
    # gwq_compile.hf_quantizer registers itself when its body has run.  Imported first (it
    # imports the registry, which brings us here), it is still half-initialized now and
    # this import returns at once; its last line does the registering.
    try:
        import gwq_compile.hf_quantizer  # noqa: F401
    except ImportError as err:  # an older transformers: say so, but do not break transformers' own import
        import warnings

        import transformers

        warnings.warn(
            f"gwq_compile's transformers integration needs transformers>={MIN_TRANSFORMERS} (found "
            f"{transformers.__version__}: {err}); from_pretrained/save_pretrained of GWQ models are unavailable",
            stacklevel=2,
        )


class _RegisterAfterLoad(importlib.abc.Loader):
    """Runs the registry module with its own loader, then registers GWQ into it."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self.loader.exec_module(module)
        register_now()

    def __getattr__(self, name: str):  # get_source, get_filename, ...: the file loader's own
        return getattr(self.loader, name)


class _RegistryImportHook(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path, target=None):
        if fullname != REGISTRY_MODULE:
            return None
        uninstall()  # one shot; also keeps the search below from finding this finder again
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _RegisterAfterLoad(spec.loader)
        return spec


_HOOK = _RegistryImportHook()


def uninstall() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


def install() -> None:
    """Register GWQ now if transformers' registry is loaded, else as soon as it is."""
    if REGISTRY_MODULE in sys.modules:
        register_now()
    elif _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)


def mark_transformers_model(model) -> None:
    """After GWQ has quantized ``model``: if it is a transformers model, give it the GWQ
    quantizer and ``quantization_config`` (as ``from_pretrained`` would have)."""
    modeling_utils = sys.modules.get("transformers.modeling_utils")  # not imported: it cannot be one
    if modeling_utils is not None and isinstance(model, modeling_utils.PreTrainedModel):
        from gwq_compile.hf_quantizer import attach_quantizer

        attach_quantizer(model)
