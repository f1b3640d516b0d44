"""Saving and loading GWQ models as safetensors plus a small JSON manifest.

A checkpoint is a directory with

* ``model.safetensors``: every parameter and buffer (non-persistent ones too, so a
  ``meta``-device skeleton comes back complete), each stored once even when tied; a
  quantized weight ``x.weight`` becomes the plain tensors ``x.weight.<field>`` of its
  stored format (:data:`STORED_FIELDS`, whatever runtime layout it had in memory; loading
  derives the runtime layout of the target device again);
* ``gwq_config.json``: format name and version, the GWQ config, per-layer attributes
  (bits, group size, shape, dtype), the tied-tensor aliases, and the safetensors file's
  size and sha256 so a truncated or altered file is caught before it is parsed.

Both files are written to temporary names and renamed into place (the manifest last),
so an interrupted save never leaves a half-written checkpoint that looks valid.

Example:
    >>> save_quantized(model, "out/smollm2-gwq")            # doctest: +SKIP
    >>> load_quantized(skeleton, "out/smollm2-gwq")         # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gwq_compile import packing
from gwq_compile.tensor import GWQTensor

#: The tensors a quantized weight is saved as (the stored format of :mod:`gwq_compile.packing`).
STORED_FIELDS = packing.PackedWeight._fields[:6]
FORMAT_NAME = "gwq"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "gwq_config.json"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"checkpoint names an unknown dtype {name!r}")
    return dtype


def _named_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor, str]]:
    """(name, tensor, kind) for every parameter and buffer, tied aliases included."""
    out = [(n, p, "param") for n, p in model.named_parameters(remove_duplicate=False)]
    out += [(n, b, "buffer") for n, b in model.named_buffers(remove_duplicate=False)]
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_quantized(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` (quantized or partly quantized) to the directory ``path``; returns it."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    aliases: dict[str, str] = {}
    canonical: dict[int, str] = {}
    for name, t, _kind in _named_tensors(model):
        if id(t) in canonical:
            aliases[name] = canonical[id(t)]
            continue
        canonical[id(t)] = name
        if isinstance(t, GWQTensor):
            for field, value in zip(STORED_FIELDS, t.packed()):
                tensors[f"{name}.{field}"] = value.detach().cpu().contiguous()
            layers[name] = {"bits": t.bits, "group_size": t.group_size, "shape": list(t.shape), "dtype": _dtype_name(t.dtype)}
        else:
            if t.device.type == "meta":
                raise ValueError(f"cannot save {name!r}: it is on the meta device (no data)")
            tensors[name] = t.detach().cpu().contiguous()
    weights_path = out / WEIGHTS_FILE
    _atomic_write(weights_path, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT_NAME}))
    config = getattr(model, "_gwq_config", None)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": config.to_dict() if config is not None else None,
        "quantized_layers": layers,
        "aliases": aliases,
        "weights_file": WEIGHTS_FILE,
        "weights_bytes": weights_path.stat().st_size,
        "weights_sha256": _sha256(weights_path),
    }
    _atomic_write(out / MANIFEST_FILE, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2)))
    return out


def read_manifest(path: str | os.PathLike) -> dict:
    manifest_path = Path(path) / MANIFEST_FILE
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no GWQ checkpoint at {str(path)!r} (missing {MANIFEST_FILE})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{manifest_path} is corrupted: {err}") from err
    if manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{manifest_path} is not a GWQ checkpoint (format={manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{manifest_path} has unknown GWQ format version {manifest.get('format_version')!r}; this gwq-compile reads version {FORMAT_VERSION}")
    return manifest


def _read_weights(path: Path, manifest: dict) -> dict[str, torch.Tensor]:
    weights_path = path / manifest["weights_file"]
    if not weights_path.is_file():
        raise FileNotFoundError(f"GWQ checkpoint {str(path)!r} is missing {manifest['weights_file']}")
    size = weights_path.stat().st_size
    if size != manifest["weights_bytes"]:
        raise ValueError(f"{weights_path} is truncated or corrupted: {size} bytes, the manifest records {manifest['weights_bytes']}")
    if _sha256(weights_path) != manifest["weights_sha256"]:
        raise ValueError(f"{weights_path} is corrupted: its sha256 does not match the manifest")
    try:
        return load_file(weights_path)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights_path} is corrupted: {err}") from err


def _owner(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    mod_name, _, leaf = name.rpartition(".")
    return (model.get_submodule(mod_name) if mod_name else model), leaf


def load_quantized(model: torch.nn.Module, path: str | os.PathLike, device: str | torch.device | None = None) -> torch.nn.Module:
    """Fill the unquantized skeleton ``model`` (may live on ``meta``) from a GWQ checkpoint.

    Quantized layers get their :class:`GWQTensor` weights; everything else is assigned
    as saved (bit-exact).  Raises ``ValueError`` naming the tensors when the model and
    the checkpoint do not match.
    """
    path = Path(path)
    manifest = read_manifest(path)
    saved = _read_weights(path, manifest)
    layers, aliases = manifest["quantized_layers"], manifest["aliases"]
    named = _named_tensors(model)
    model_names = {n for n, _, _ in named}
    ckpt_names = set(aliases) | set(layers) | {k for k in saved if not any(k.startswith(f"{q}.") for q in layers)}
    missing, unexpected = sorted(model_names - ckpt_names), sorted(ckpt_names - model_names)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {str(path)!r} does not match the model: missing from the checkpoint {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, not in the model {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    kinds = {n: k for n, _, k in named}
    current = {n: t for n, t, _ in named}
    loaded: dict[str, torch.Tensor] = {}
    for name in sorted(model_names - set(aliases)):
        if name in layers:
            meta = layers[name]
            shape = torch.Size(meta["shape"])
            if tuple(current[name].shape) != tuple(shape):
                raise ValueError(f"layer {name!r}: checkpoint shape {tuple(shape)} does not match the model's {tuple(current[name].shape)}")
            fields = [saved[f"{name}.{f}"] for f in STORED_FIELDS]
            if device is not None:
                fields = [f.to(device) for f in fields]
            packed = packing.PackedWeight(*fields, meta["bits"], meta["group_size"], shape[1])
            value = GWQTensor.from_packed(packed, _dtype_from_name(meta["dtype"]))  # the runtime layout of its device
        else:
            value = saved[name]
            if value.shape != current[name].shape:
                raise ValueError(f"tensor {name!r}: checkpoint shape {tuple(value.shape)} does not match the model's {tuple(current[name].shape)}")
            if device is not None:
                value = value.to(device)
        if kinds[name] == "param":
            requires_grad = current[name].requires_grad and not isinstance(value, GWQTensor)
            value = torch.nn.Parameter(value, requires_grad=requires_grad)
        loaded[name] = value
    for alias, target in aliases.items():
        loaded[alias] = loaded[target]
    for name, value in loaded.items():
        owner, leaf = _owner(model, name)
        if kinds[name] == "param":
            owner._parameters[leaf] = value
        else:
            owner._buffers[leaf] = value
    if manifest.get("config"):
        from gwq_compile.config import GWQConfig

        model._gwq_config = GWQConfig.from_dict(manifest["config"])
    return model
