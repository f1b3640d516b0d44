"""GWQ checkpoints: one folder layout for ``save_quantized``, ``gwq quantize`` and HF ``save_pretrained``.

A checkpoint is a folder with

* ``model.safetensors`` (or HF's ``model-0000k-of-0000n.safetensors`` shards and their
  ``model.safetensors.index.json``): every parameter and buffer, each stored once even when
  tied.  A quantized weight ``x.weight`` is stored as its packed codes, flattened to 1-D
  uint8, under ``x.weight`` itself (a loader that does not know GWQ fails on the shape
  instead of loading garbage) and the other fields of its stored format
  (:data:`STORED_FIELDS`, :mod:`gwq_compile.packing`) under ``x.weight_gwq_compile_<field>``,
  whatever runtime layout the weight had in memory (loading derives the runtime layout of
  the target device again, see :class:`~gwq_compile.tensor.GWQTensor`).  The header metadata holds the format version, the GWQ
  config, per-layer attributes (bits, group size, shape, dtype; double_quant and transposed, an HF Conv1D's [in, out] weight, when set), tied aliases and the sha256
  of every tensor, so a truncated or altered file is caught before it is used;
* for transformers models: ``config.json`` with ``quantization_config`` (``quant_method:
  "gwq"``, the GWQ config, the format version), ``generation_config.json``, and the
  tokenizer files when a tokenizer is given.

``save_quantized`` is crash-safe: it builds the new folder beside the old one and swaps
the two with one atomic rename (Linux ``renameat2(RENAME_EXCHANGE)``, :mod:`gwq_compile.atomic_write`), so a process killed
at any moment leaves the old or the new checkpoint, never neither; files of the old folder
that are not part of a checkpoint (a README, adapters, ...) are kept.  Stale temporary
folders of an interrupted save are removed by the next save.

Example:
    >>> save_quantized(model, "out/smollm2-gwq", tokenizer=tokenizer)   # doctest: +SKIP
    >>> load_quantized(skeleton, "out/smollm2-gwq")                     # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from gwq_compile import atomic_write, packing
from gwq_compile.tensor import GWQTensor

#: The tensors a quantized weight is saved as (the stored format of :mod:`gwq_compile.packing`).
STORED_FIELDS = packing.PackedWeight._fields[:6]
FORMAT_NAME = "gwq"
FORMAT_VERSION = 2
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
LEGACY_MANIFEST_FILE = "gwq_config.json"  # format version 1 (a separate manifest)
FIELD_SEPARATOR = "_gwq_compile_"  # x.weight_gwq_compile_group_scales: a loader without gwq_compile reports these by name
#: The tensors a quantized weight is saved as: its stored format (``PackedWeight``'s first six).
CODES_FIELD = "packed_codes"  # stored under the weight's own name
# Header metadata keys (safetensors metadata is a str -> str map).
META_VERSION, META_CONFIG, META_LAYERS, META_ALIASES, META_SHA256 = (
    "gwq_format_version", "gwq_config", "gwq_layers", "gwq_aliases", "gwq_tensor_sha256",
)  # fmt: skip


# ----------------------------------------------------------------------------- tensors <-> file


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"checkpoint names an unknown dtype {name!r}")
    return dtype


def named_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor, str]]:
    """(name, tensor, kind) for every parameter and buffer, tied aliases included."""
    out = [(n, p, "param") for n, p in model.named_parameters(remove_duplicate=False)]
    out += [(n, b, "buffer") for n, b in model.named_buffers(remove_duplicate=False)]
    return out


def field_key(name: str, field: str) -> str:
    return name if field == CODES_FIELD else f"{name}{FIELD_SEPARATOR}{field}"


def tensor_sha256(t: torch.Tensor) -> str:
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(data)).hexdigest()


def flatten_model(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model as plain tensors and the header metadata that describes them (see module doc).

    Raises ``ValueError`` naming the tensor when one is on the meta device (it has no data).
    """
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    aliases: dict[str, str] = {}
    canonical: dict[int, str] = {}
    config = getattr(model, "_gwq_config", None)
    named = named_tensors(model)
    progress = tqdm(named, desc="GWQ saving", total=len(named), disable=config is None or not config.progress, unit="tensor")
    for name, t, _kind in progress:
        if id(t) in canonical:
            aliases[name] = canonical[id(t)]
            continue
        canonical[id(t)] = name
        if t.device.type == "meta":
            raise ValueError(f"cannot save {name!r}: it is on the meta device (no data); load or quantize the model first")
        if isinstance(t, GWQTensor):
            stored = t.packed()  # the stored format, whatever the runtime layout
            if t.double_quant:  # the grid in its compact stored form (packing.encode_grid), same field names
                scales, zeros = packing.encode_grid(stored.group_scales, stored.group_zeros, t.bits)
                stored = stored._replace(group_scales=scales, group_zeros=zeros)
            for field, value in zip(STORED_FIELDS, stored):
                value = value.detach().cpu().contiguous()
                tensors[field_key(name, field)] = value.reshape(-1) if field == CODES_FIELD else value
            layers[name] = {
                "bits": t.bits, "group_size": t.group_size, "shape": list(t.shape), "dtype": _dtype_name(t.dtype),
                "codes_shape": list(stored.packed_codes.shape),
                **({"double_quant": True} if t.double_quant else {}),  # absent otherwise: headers as before
                **({"transposed": True} if t.transposed else {}),  # an HF Conv1D's [in, out] weight
            }  # fmt: skip
        else:
            tensors[name] = t.detach().cpu().contiguous()
    metadata = {
        "format": "pt",  # what transformers writes; GWQ's own version is below
        META_VERSION: str(FORMAT_VERSION),
        META_CONFIG: json.dumps(config.to_dict() if config is not None else None),
        META_LAYERS: json.dumps(layers),
        META_ALIASES: json.dumps(aliases),
        META_SHA256: json.dumps({k: tensor_sha256(v) for k, v in tensors.items()}),
    }
    return tensors, metadata


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message says why and what to do."""


def interrupted_save_hint(path: Path) -> str:
    """``" (...)"`` naming the leftovers of an interrupted save in or beside ``path``, else ``""``."""
    leftovers = []
    if path.parent.is_dir():
        leftovers += sorted(p.name for p in path.parent.iterdir() if p.name.startswith((f".{path.name}{atomic_write.TEMP_MARK}", f".{path.name}{atomic_write.BACKUP_MARK}")))
    if path.is_dir():  # temporary files that format 1 wrote inside the folder
        leftovers += sorted(p.name for p in path.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))
    if not leftovers:
        return ""
    backups = [path.parent / n / "old" for n in leftovers if n.startswith(f".{path.name}{atomic_write.BACKUP_MARK}")]
    if not path.exists() and backups and backups[0].is_dir():  # only where renameat2 is missing
        return f" (a save into it was interrupted; the previous checkpoint is in {str(backups[0])!r}, and the next save puts it back)"
    return f" (a save into it was interrupted: {', '.join(leftovers[:3])}{'...' if len(leftovers) > 3 else ''} left behind; save again)"


def weight_files(path: Path) -> list[Path]:
    """The safetensors file(s) of the checkpoint folder ``path`` (one file or HF shards)."""
    if not path.is_dir():
        hint = interrupted_save_hint(path)
        raise FileNotFoundError(f"no GWQ checkpoint at {str(path)!r}: the folder does not exist{hint}")
    single, index = path / WEIGHTS_FILE, path / WEIGHTS_INDEX_FILE
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index: {err}") from err
        return [path / name for name in sorted(set(weight_map.values()))]
    if (path / LEGACY_MANIFEST_FILE).is_file():
        raise CheckpointError(
            f"{str(path)!r} is a GWQ checkpoint of format version 1 ({LEGACY_MANIFEST_FILE}); this gwq-compile reads "
            f"version {FORMAT_VERSION}: quantize the model again (gwq quantize) to write it"
        )
    raise FileNotFoundError(f"no GWQ checkpoint at {str(path)!r}: it has no {WEIGHTS_FILE}{interrupted_save_hint(path)}")


def read_header(file: Path) -> dict[str, Any]:
    """The GWQ part of ``file``'s header: version-checked, JSON decoded."""
    try:
        with safe_open(file, framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file} is truncated or corrupted ({err}){interrupted_save_hint(file.parent)}") from err
    if META_VERSION not in metadata:
        raise CheckpointError(f"{file} is not a GWQ checkpoint: its header has no {META_VERSION!r} entry")
    if metadata[META_VERSION] != str(FORMAT_VERSION):
        raise CheckpointError(
            f"{file} has GWQ format version {metadata[META_VERSION]}; this gwq-compile reads version {FORMAT_VERSION}"
        )
    header = {}
    for key in (META_CONFIG, META_LAYERS, META_ALIASES, META_SHA256):
        if key not in metadata:
            raise CheckpointError(f"{file} has no {key!r} entry in its header: it was altered or not written by gwq-compile")
        try:
            header[key] = json.loads(metadata[key])
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{file}: header entry {key!r} is corrupted ({err})") from err
    return header


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every stored tensor of the folder ``path``, checked against its sha256, and the header."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    header: dict[str, Any] = {}
    for file in weight_files(path):
        if not file.is_file():
            raise CheckpointError(f"GWQ checkpoint {str(path)!r} is missing {file.name}{interrupted_save_hint(path)}")
        header = read_header(file)
        try:
            with safe_open(file, framework="pt") as f:
                keys = list(f.keys())
                for key in keys:
                    tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{file} is truncated or corrupted ({err}){interrupted_save_hint(path)}") from err
        for key in keys:
            expected = header[META_SHA256].get(key)
            if expected is None:
                raise CheckpointError(f"{file}: tensor {key!r} has no sha256 in the header: the file was altered")
            if tensor_sha256(tensors[key]) != expected:
                raise CheckpointError(f"{file} is corrupted: tensor {key!r} does not match its sha256{interrupted_save_hint(path)}")
    missing = sorted(set(header[META_SHA256]) - set(tensors))
    if missing:
        raise CheckpointError(f"GWQ checkpoint {str(path)!r} lacks tensors its header lists: {missing[:5]}")
    return tensors, header


def gwq_tensor_from_fields(fields: dict[str, torch.Tensor], layer: dict, dtype: torch.dtype) -> GWQTensor:
    """Rebuild one :class:`GWQTensor` from its stored fields (codes flattened) and header entry,
    in the runtime layout of the fields' device."""
    codes = fields[CODES_FIELD].reshape(layer["codes_shape"])
    values = {f: codes if f == CODES_FIELD else fields[f] for f in STORED_FIELDS}
    double_quant = bool(layer.get("double_quant", False))
    if double_quant:
        values["group_scales"], values["group_zeros"] = packing.decode_grid(values["group_scales"], values["group_zeros"], layer["bits"])
    transposed = bool(layer.get("transposed", False))
    in_features = layer["shape"][0 if transposed else 1]
    packed = packing.PackedWeight(*values.values(), layer["bits"], layer["group_size"], in_features, double_quant)
    return GWQTensor.from_packed(packed, dtype, transposed=transposed)


# ----------------------------------------------------------------------------- crash-safe folders


# Files that describe the saved model itself: the old folder's copies never survive a new
# save (a config.json of the old model beside new weights would describe the wrong model).
_MODEL_FILES = ("config.json", "generation_config.json", LEGACY_MANIFEST_FILE)


def _is_checkpoint_artifact(name: str) -> bool:
    """Files a new save replaces wholesale, so the old folder's copies are not carried over."""
    return (
        name.endswith((".safetensors", ".safetensors.index.json"))
        or name.startswith("pytorch_model")
        or name in _MODEL_FILES
        or (name.startswith(".") and name.endswith(".tmp"))
    )


# ----------------------------------------------------------------------------- public API


def _is_transformers_model(model: torch.nn.Module) -> bool:
    modeling_utils = sys.modules.get("transformers.modeling_utils")  # not imported: it cannot be one
    return modeling_utils is not None and isinstance(model, modeling_utils.PreTrainedModel)


def save_quantized(model: torch.nn.Module, path: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Write ``model`` (quantized or partly quantized) to the folder ``path``, crash-safely; returns it.

    A transformers model is written by its own ``save_pretrained`` (config.json with the
    GWQ ``quantization_config``, generation config, weights) into the new folder, plus
    ``tokenizer`` when given; any other module gets ``model.safetensors`` alone.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if tokenizer is not None and not hasattr(tokenizer, "save_pretrained"):
        raise TypeError(f"tokenizer must have save_pretrained (a transformers tokenizer), got {type(tokenizer).__name__}")
    on_meta = [n for n, t, _ in named_tensors(model) if t.device.type == "meta"]
    if on_meta:  # before anything is written
        raise ValueError(f"cannot save {on_meta[0]!r}: it is on the meta device (no data); load or quantize the model first")

    def build(tmp: Path) -> None:
        if _is_transformers_model(model):
            from gwq_compile.hf_quantizer import attach_quantizer

            attach_quantizer(model)
            model.save_pretrained(tmp)  # calls flatten_model through the GWQ quantizer
        else:
            tensors, metadata = flatten_model(model)
            save_file(tensors, tmp / WEIGHTS_FILE, metadata=metadata)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return atomic_write.write_folder(path, build, replaced=_is_checkpoint_artifact)


def _owner(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    mod_name, _, leaf = name.rpartition(".")
    return (model.get_submodule(mod_name) if mod_name else model), leaf


def load_quantized(model: torch.nn.Module, path: str | os.PathLike, device: str | torch.device | None = None) -> torch.nn.Module:
    """Fill the unquantized skeleton ``model`` (may live on ``meta``) from a GWQ checkpoint folder.

    Quantized layers get :class:`GWQTensor` weights; everything else is assigned as saved.
    Each tensor takes the skeleton's dtype (a bf16 skeleton gives a bf16 model: quantized
    layers then dequantize to bf16); with the saved dtypes the result is bit-exact.  Raises
    ``ValueError`` naming the tensors when the model and the checkpoint do not match.
    """
    path = Path(path).expanduser()
    saved, header = read_checkpoint(path)
    layers, aliases = header[META_LAYERS], header[META_ALIASES]
    named = named_tensors(model)
    model_names = {n for n, _, _ in named}
    field_keys = {field_key(q, f) for q in layers for f in STORED_FIELDS}
    ckpt_names = set(aliases) | set(layers) | (set(saved) - field_keys)
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
        target = current[name]
        if name in layers:
            shape = torch.Size(layers[name]["shape"])
            if tuple(target.shape) != tuple(shape):
                raise ValueError(f"layer {name!r}: checkpoint shape {tuple(shape)} does not match the model's {tuple(target.shape)}")
            fields = {f: saved[field_key(name, f)] for f in STORED_FIELDS}
            dtype = target.dtype if target.is_floating_point() else _dtype_from_name(layers[name]["dtype"])
            value = gwq_tensor_from_fields(fields, layers[name], dtype)
        else:
            value = saved[name]
            if value.shape != target.shape:
                raise ValueError(f"tensor {name!r}: checkpoint shape {tuple(value.shape)} does not match the model's {tuple(target.shape)}")
            if value.is_floating_point() and target.is_floating_point() and value.dtype != target.dtype:
                value = value.to(target.dtype)
        if device is not None:
            value = value.to(device)
        if kinds[name] == "param":
            requires_grad = target.requires_grad and not isinstance(value, GWQTensor)
            value = torch.nn.Parameter(value, requires_grad=requires_grad)
        loaded[name] = value
    for alias, target_name in aliases.items():
        loaded[alias] = loaded[target_name]
    for name, value in loaded.items():
        owner, leaf = _owner(model, name)
        if kinds[name] == "param":
            owner._parameters[leaf] = value
        else:
            owner._buffers[leaf] = value
    if header[META_CONFIG]:
        from gwq_compile.config import GWQConfig

        model._gwq_config = GWQConfig.from_dict(header[META_CONFIG])
    if _is_transformers_model(model):
        from gwq_compile.hf_quantizer import attach_quantizer

        attach_quantizer(model)
    return model
