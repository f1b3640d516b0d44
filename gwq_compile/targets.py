"""Which layers GWQ quantizes: the one targeting rule (:func:`target_modules`), used by eager
``quantize_``, the ``torch.compile`` backend, FSDP2 calibration and the peers in ``gwq_tools``,
and the marks a target carries until it is converted (:func:`mark_target`).

Example:
    >>> import torch
    >>> from gwq_compile import GWQConfig
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    >>> [name for name, _ in target_modules(model, GWQConfig(skip_modules=("2",), progress=False))]
    ['0']
"""

from __future__ import annotations

import fnmatch
import warnings

import torch

from gwq_compile.config import GWQConfig
from gwq_compile.tensor import GWQTensor

__all__ = ["HEAD_ATTR", "NAME_ATTR", "is_conv1d", "layer_name", "mark_target", "output_head", "skipped_by_default", "target_modules"]

NAME_ATTR = "_gwq_name"
HEAD_ATTR = "_gwq_head"  # on the output embedding quantized on the head's grid: the (module, name) of each tied parameter slot


def layer_name(module: torch.nn.Module) -> str:
    """The name :func:`mark_target` gave the layer, else its shape (for messages)."""
    return getattr(module, NAME_ATTR, None) or f"Linear({module.in_features}->{module.out_features})"


def _tied_to_other_modules(model: torch.nn.Module) -> dict[int, str]:
    """id(param) -> name of a module other than a linear using it (e.g. an embedding tied to lm_head)."""
    owners = {}
    for mname, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) or is_conv1d(mod):
            continue
        for pname, p in mod.named_parameters(recurse=False):
            owners[id(p)] = f"{mname}.{pname}" if mname else pname
    return owners


def output_head(model: torch.nn.Module, config: GWQConfig) -> torch.nn.Linear | None:
    """The output embedding to quantize on the head's grid (``config.head_bits``), if any."""
    if config.head_bits is None or not hasattr(model, "get_output_embeddings"):
        return None
    head = model.get_output_embeddings()
    return head if isinstance(head, torch.nn.Linear) and not isinstance(head.weight, GWQTensor) else None


def skipped_by_default(model: torch.nn.Module) -> tuple[torch.nn.Module | None, tuple[str, ...]]:
    """What ``skip_modules=None`` leaves dense: ``(output embedding module, name patterns)``; the
    model's ``get_output_embeddings()`` when it has one, else modules named ``lm_head``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return (head, ()) if head is not None else (None, ("lm_head",))


def is_conv1d(module: torch.nn.Module) -> bool:
    """An HF ``Conv1D`` (``weight`` ``[in, out]``, ``nf`` outputs; GPT-2), matched by duck type so
    this package does not import transformers for it."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(weight, torch.nn.Parameter)
        and weight.dim() == 2 and weight.shape[1] == module.nf
    )  # fmt: skip


def target_modules(
    model: torch.nn.Module, config: GWQConfig, conv1d: bool = True, quantized: bool = False
) -> list[tuple[str, torch.nn.Module]]:
    """The ``(name, module)`` pairs GWQ quantizes, after the skip rules: the one targeting rule
    (eager ``quantize_``, the backend, FSDP2, the peers).

    Every ``nn.Linear`` and HF ``Conv1D`` (unless ``conv1d=False``: FSDP2's row shards of a
    ``[in, out]`` weight are not output rows) but those ``config.skip_modules`` skips (by default
    the output embedding) and layers whose weight a non-linear module shares (with a warning);
    the output embedding is one of them when ``config.head_bits`` is set (tied or not).  Already
    quantized layers are left out unless ``quantized`` (to count what was quantized).
    """
    head = output_head(model, config)
    output_embeddings, patterns = skipped_by_default(model) if config.skip_modules is None else (None, config.skip_modules)
    tied = _tied_to_other_modules(model)
    targets = []
    for name, mod in model.named_modules():
        if not (isinstance(mod, torch.nn.Linear) or (conv1d and is_conv1d(mod))):
            continue
        if isinstance(mod.weight, GWQTensor) and not quantized:
            continue
        label = name or layer_name(mod)
        if mod is head:
            targets.append((label, mod))
            continue
        if mod is output_embeddings or any(fnmatch.fnmatchcase(name, pat) for pat in patterns):
            continue
        if id(mod.weight) in tied:
            warnings.warn(f"layer {name!r} shares its weight with {tied[id(mod.weight)]!r}; it is not quantized (tied weights are never untied)", stacklevel=3)
            continue
        targets.append((label, mod))
    return targets


def mark_target(model: torch.nn.Module, name: str, module: torch.nn.Module, config: GWQConfig) -> None:
    """Name the layer (for messages); on the output embedding quantized on the head's grid,
    record the other modules' slots that hold its weight (a tied input embedding), which
    :func:`convert_linear` points at the quantized weight too, so the tie survives."""
    setattr(module, NAME_ATTR, name)
    if module is output_head(model, config):
        slots = [(m, n) for m in model.modules() if not isinstance(m, torch.nn.Linear) for n, p in m._parameters.items() if p is module.weight]
        setattr(module, HEAD_ATTR, slots)
