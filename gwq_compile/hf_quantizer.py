"""GWQ in transformers' quantizer registry: ``quant_method: "gwq"``.

* :class:`GWQHfConfig` is the ``quantization_config`` of a GWQ folder's ``config.json`` (the
  GWQ config and the format version) and what ``from_pretrained(fp_dir,
  quantization_config=GWQHfConfig(...))`` takes to quantize on load, as bitsandbytes users
  do: calibration runs on ``dataset`` (default: the embedded ``pydoc_data`` text) with the
  folder's tokenizer unless ``calibration_data`` token ids are given.
* :class:`GWQHfQuantizer` loads a GWQ folder: HF builds the model on ``meta``, reads every
  tensor, and :class:`GWQDeserialize` rebuilds each quantized weight from its stored fields
  (checked against the sha256 in the header), so ``from_pretrained(DIR)`` is bit-exact with
  what was saved.  ``save_pretrained`` gets its tensors from
  :func:`gwq_compile.serialization.flatten_model`: the same layout as ``save_quantized``.
* torchao's own quantizer is wrapped (:class:`TorchAoWithGWQ`) so that
  ``TorchAoConfig(GWQConfig(...))`` fails in one line where GWQ cannot work per module, and
  a model prepared through it and converted saves as GWQ.

:func:`register` runs when this module is imported, which :mod:`gwq_compile.hf_registration`
does as soon as transformers' registry is imported after ``import gwq_compile`` (or right
away if it already was).

Example:
    >>> import gwq_compile                                                       # doctest: +SKIP
    >>> model = AutoModelForCausalLM.from_pretrained("out/smollm2-gwq")          # doctest: +SKIP
    >>> q = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=GWQHfConfig(bits=3))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any

import torch
from torchao.core.config import AOBaseConfig
from torchao.quantization.transform_module import register_quantize_module_handler
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizer_torchao import TorchAoHfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from gwq_compile import serialization as ser
from gwq_compile.config import GWQConfig
from gwq_compile.tensor import GWQTensor

QUANT_METHOD = "gwq"
# Fields of GWQConfig that describe a run, not the quantization: not written to config.json.
class GWQHfConfig(QuantizationConfigMixin):
    """``quantization_config`` for GWQ.

    Args:
        config: a :class:`GWQConfig`; or give its fields as keyword arguments (``bits=3, ...``).
        dataset: calibration text for quantize-on-load: ``"default"`` (the embedded
            ``pydoc_data`` text), a text file path, or a ``datasets.Dataset``.
        tokenizer: tokenizer for the calibration text; default: the model folder's.
        calibration_data: token ids (``[batch, seq]`` LongTensor) used instead of ``dataset``.
        n_samples, seq_len, seed: how many calibration windows of how many tokens
            (``seq_len`` is capped at the model's context), drawn with ``seed``.
        format_version: the GWQ checkpoint format (read from config.json; must match).
    """

    def __init__(
        self,
        config: GWQConfig | None = None,
        *,
        dataset: Any = "default",
        tokenizer: Any = None,
        calibration_data: Any = None,
        n_samples: int = 1,
        seq_len: int = 512,
        seed: int = 0,
        format_version: int = ser.FORMAT_VERSION,
        quant_method: str = QUANT_METHOD,
        **config_fields: Any,
    ):
        if quant_method != QUANT_METHOD:
            raise ValueError(f"GWQHfConfig.quant_method must be {QUANT_METHOD!r}, got {quant_method!r}")
        if format_version != ser.FORMAT_VERSION:
            raise ValueError(
                f"this GWQ checkpoint has format version {format_version!r}; this gwq-compile reads version "
                f"{ser.FORMAT_VERSION}: quantize the model again to write it"
            )
        valid = {f.name for f in dataclasses.fields(GWQConfig)}
        unknown = sorted(set(config_fields) - valid)
        if unknown:
            raise TypeError(f"GWQHfConfig got unknown arguments {unknown}; GWQConfig fields are {sorted(valid)}")
        if config is not None and config_fields:
            raise TypeError("give GWQHfConfig either a GWQConfig or its fields as keywords, not both")
        if config is not None and not isinstance(config, GWQConfig):
            raise TypeError(f"GWQHfConfig(config=...) must be a GWQConfig, got {type(config).__name__}")
        for name, value in (("n_samples", n_samples), ("seq_len", seq_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "n_samples" else 2):
                raise ValueError(f"GWQHfConfig.{name} must be an int >= {1 if name == 'n_samples' else 2}, got {value!r}")
        gwq = config if config is not None else GWQConfig(**config_fields)
        self.gwq_config = gwq.replace(step=None)
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.dataset, self.tokenizer, self.calibration_data = dataset, tokenizer, calibration_data
        self.n_samples, self.seq_len, self.seed = n_samples, seq_len, seed

    def get_apply_tensor_subclass(self) -> "KeepDenseAfterMerge":
        """What peft's LoRA ``merge()`` re-quantizes a merged layer with: nothing (see
        :class:`KeepDenseAfterMerge`)."""
        return KeepDenseAfterMerge()

    def to_dict(self) -> dict[str, Any]:
        """What config.json records: the method, the format version and the GWQ config.  The
        calibration arguments are options of one quantize-on-load call, not of the model (a
        model quantized with ``quantize_`` never saw them), so they are not written."""
        return {"quant_method": QUANT_METHOD, "format_version": self.format_version, **self.gwq_config.to_dict()}

    def __repr__(self) -> str:
        return f"GWQHfConfig({self.to_dict()})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GWQHfConfig) and self.to_dict() == other.to_dict()


@dataclasses.dataclass
class KeepDenseAfterMerge(AOBaseConfig):
    """torchao config that leaves a module's weight as it is.

    peft merges a LoRA adapter into a torchao-quantized layer by dequantizing, adding the
    adapter's delta and re-quantizing with the model's ``get_apply_tensor_subclass()``.  GWQ
    cannot re-quantize one layer alone: its outliers and grid come from whole-model
    calibration.  So a merged layer keeps the dense weight peft computed (the dequantized
    GWQ weight plus the adapter's delta BA); run
    ``gwq_compile.quantize_(model, config, calibration_data=...)`` afterwards to quantize the
    merged layers again (layers still holding GWQ weights are left as they are).
    """


@register_quantize_module_handler(KeepDenseAfterMerge)
def _keep_dense(module: torch.nn.Module, config: KeepDenseAfterMerge) -> torch.nn.Module:
    # peft hands over the merged weight as a plain tensor attribute (torchao's handlers
    # re-wrap it); it must be a parameter again, or state_dict and save_pretrained miss it.
    if not isinstance(module.weight, torch.nn.Parameter):
        module.weight = torch.nn.Parameter(module.weight.detach(), requires_grad=False)
    warnings.warn(
        "the LoRA-merged layer keeps a dense weight (GWQ re-quantizes only with calibration): run "
        "gwq_compile.quantize_(model, config, calibration_data=...) to quantize merged layers again",
        stacklevel=2,
    )
    return module


class GWQDeserialize(ConversionOps):
    """Conversion op: the stored fields of one quantized weight -> its ``GWQTensor`` parameter.

    HF's loader collects, for each ``*.weight`` of the checkpoint, the tensors stored under
    ``weight`` and ``weight_gwq_compile_<field>``.  A weight the header does not list as quantized
    is a dense one: it is passed on in the model's dtype (HF leaves dtype casts to load ops).
    """

    def __init__(self, hf_quantizer: "GWQHfQuantizer"):
        self.hf_quantizer = hf_quantizer  # HF looks for this attribute: no dtype cast before the op

    def convert(self, input_dict: dict, model: torch.nn.Module | None = None, full_layer_name: str | None = None, **kwargs) -> dict:
        tensors = {k: (v[0] if isinstance(v, list) else v) for k, v in input_dict.items()}
        module_name, _, leaf = full_layer_name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        target = getattr(module, leaf)
        self.hf_quantizer.check_sha256(full_layer_name, tensors)
        layer = self.hf_quantizer.layers.get(full_layer_name)
        if layer is None:
            (value,) = tensors.values()
            if value.is_floating_point() and target is not None and target.is_floating_point():
                value = value.to(target.dtype)
            return {full_layer_name: value}
        fields = {ser.CODES_FIELD if k == "weight" else k.split(ser.FIELD_SEPARATOR, 1)[1]: v for k, v in tensors.items()}
        missing = sorted(set(ser.STORED_FIELDS) - set(fields))
        if missing:
            raise ser.CheckpointError(f"layer {full_layer_name!r}: the checkpoint lacks its GWQ fields {missing}")
        dtype = target.dtype if target is not None and target.is_floating_point() else ser._dtype_from_name(layer["dtype"])
        qweight = ser.gwq_tensor_from_fields(fields, layer, dtype)
        module._is_hf_initialized = True
        return {full_layer_name: torch.nn.Parameter(qweight, requires_grad=False)}

    @property
    def reverse_op(self) -> "_SavedAsIs":
        return _SavedAsIs()


class _SavedAsIs(ConversionOps):
    """Reverse of :class:`GWQDeserialize` at save time: the state dict is already flat."""

    def convert(self, input_dict: dict, **kwargs) -> dict:
        return input_dict


class GWQHfQuantizer(HfQuantizer):
    """Loads GWQ folders (``pre_quantized``) and quantizes on load (``quantization_config=GWQHfConfig``)."""

    requires_calibration = False
    quantization_config: GWQHfConfig

    def __init__(self, quantization_config: GWQHfConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        self.layers: dict[str, dict] = {}
        self.aliases: dict[str, str] = {}
        self.sha256: dict[str, str] = {}
        self.header_config: dict | None = None

    def validate_environment(self, *args: Any, device_map: Any = None, **kwargs: Any) -> None:
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("GWQ models cannot be offloaded to disk: use a device_map without 'disk'")

    # -------------------------------------------------------------------- loading a GWQ folder

    def _process_model_before_weight_loading(self, model: torch.nn.Module, checkpoint_files: list[str] | None = None, **kwargs: Any):
        if not self.pre_quantized:
            return model
        if not checkpoint_files or not all(str(f).endswith(".safetensors") for f in checkpoint_files):
            raise ser.CheckpointError(f"a GWQ checkpoint is stored as safetensors; found {checkpoint_files}")
        from pathlib import Path

        # Checkpoints keep non-persistent buffers (rotary inv_freq, ...) so that load_quantized
        # can fill a meta skeleton; transformers builds those itself and need not report them.
        persistent = set(model.state_dict())
        non_persistent = {re.escape(n) for n, _ in model.named_buffers() if n not in persistent}
        model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | {f"^{n}$" for n in non_persistent}
        for file in checkpoint_files:
            header = ser.read_header(Path(file))
            self.layers.update(header[ser.META_LAYERS])
            self.aliases.update(header[ser.META_ALIASES])
            self.sha256.update(header[ser.META_SHA256])
            self.header_config = header[ser.META_CONFIG]
        # Tied names are stored once; the loader must not report the others as missing
        # (they are tied again after loading, see _process_model_after_weight_loading).
        tied = {f"^{re.escape(alias)}$" for alias in self.aliases}
        model._keys_to_ignore_on_load_missing = set(model._keys_to_ignore_on_load_missing or ()) | tied
        return model

    @property
    def serialized_names(self) -> dict[str, list[str]]:
        if not self.pre_quantized:
            return {}
        companions = [ser.field_key("weight", f) for f in ser.STORED_FIELDS if f != ser.CODES_FIELD]
        return {"weight": ["weight", *companions]}

    def get_load_operations(self) -> dict:
        return {"deserialize": GWQDeserialize}

    def check_sha256(self, param_name: str, tensors: dict[str, torch.Tensor]) -> None:
        for pattern, value in tensors.items():
            key = param_name.removesuffix("weight") + pattern
            expected = self.sha256.get(key)
            if expected is None:
                raise ser.CheckpointError(f"tensor {key!r} has no sha256 in the checkpoint header: the file was altered")
            if ser.tensor_sha256(value) != expected:
                raise ser.CheckpointError(f"the GWQ checkpoint is corrupted: tensor {key!r} does not match its sha256")

    def param_needs_quantization(self, model: torch.nn.Module, param_name: str, **kwargs: Any) -> bool:
        return False  # GWQ needs the whole model calibrated: it quantizes after loading

    def _process_model_after_weight_loading(self, model: torch.nn.Module, **kwargs: Any):
        if self.pre_quantized:
            not_loaded = [n for n in self.layers if not isinstance(model.get_parameter(n), GWQTensor)]
            if not_loaded:
                raise ser.CheckpointError(f"GWQ layers {not_loaded[:5]} were not restored from the checkpoint (do the model class and folder match?)")
            for alias, target in self.aliases.items():
                owner_name, _, leaf = alias.rpartition(".")
                owner = model.get_submodule(owner_name) if owner_name else model
                owner._parameters[leaf] = model.get_parameter(target)
            if self.header_config:
                model._gwq_config = GWQConfig.from_dict(self.header_config)
            return model
        return self._quantize_after_loading(model)

    # -------------------------------------------------------------------- quantize on load

    def _quantize_after_loading(self, model: torch.nn.Module) -> torch.nn.Module:
        from gwq_compile.calibration_inputs import context_length
        from gwq_compile.calibration_text import calibration_tokens
        from gwq_compile.quantize import quantize_

        cfg = self.quantization_config
        ids = cfg.calibration_data
        if ids is None:
            tokenizer = cfg.tokenizer
            if tokenizer is None:
                from transformers import AutoTokenizer

                source = model.config.name_or_path
                try:
                    tokenizer = AutoTokenizer.from_pretrained(source)
                except (OSError, ValueError) as err:
                    raise ValueError(
                        f"quantize-on-load calibrates on text and found no tokenizer in {source!r}: pass "
                        f"GWQHfConfig(tokenizer=...) or GWQHfConfig(calibration_data=token_ids) ({str(err).splitlines()[0]})"
                    ) from err
            context = context_length(model)
            seq_len = min(cfg.seq_len, context) if context else cfg.seq_len
            ids = calibration_tokens(tokenizer, cfg.dataset, cfg.n_samples, seq_len, cfg.seed)
        quantize_(model, cfg.gwq_config, calibration_data=ids)
        self.pre_quantized = True  # from now on the model is a GWQ model (save, reload)
        return model

    # -------------------------------------------------------------------- saving, flags

    def get_state_dict_and_metadata(self, model: torch.nn.Module):
        return ser.flatten_model(model)

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # the GWQ weights stay frozen; adapters (LoRA) on top train

    @property
    def is_compileable(self) -> bool:
        return True

    def _dequantize(self, model: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, GWQTensor):
                module.weight = torch.nn.Parameter(weight.dequantize(dtype), requires_grad=False)
        model.__dict__.pop("_gwq_config", None)
        return model


class TorchAoWithGWQ(TorchAoHfQuantizer):
    """transformers' torchao quantizer, with what GWQ configs need.

    GWQ calibrates the whole model, which torchao's per-module loading cannot do: a one-shot
    ``GWQConfig`` fails here in one line instead of once per layer deep in the loader.  A
    model loaded with ``GWQConfig(step="prepare")`` and converted saves in the GWQ layout.
    """

    def validate_environment(self, *args: Any, **kwargs: Any):
        quant_type = self.quantization_config.quant_type
        if isinstance(quant_type, GWQConfig) and quant_type.step != "prepare":
            raise ValueError(
                f"TorchAoConfig(GWQConfig(step={quant_type.step!r})) cannot calibrate while loading: use "
                "from_pretrained(..., quantization_config=gwq_compile.GWQHfConfig(...)) to quantize on load, or "
                "TorchAoConfig(GWQConfig(step='prepare')), a backward pass, then gwq_compile.quantize_(model, GWQConfig(step='convert'))"
            )
        return super().validate_environment(*args, **kwargs)

    def get_state_dict_and_metadata(self, model: torch.nn.Module):
        if any(isinstance(p, GWQTensor) for p in model.parameters()):
            attach_quantizer(model)  # before config.json is written: it records quant_method "gwq"
            return model.hf_quantizer.get_state_dict_and_metadata(model)
        return super().get_state_dict_and_metadata(model)


def attach_quantizer(model: torch.nn.Module) -> None:
    """Mark a transformers model holding GWQ weights as a GWQ model, as ``from_pretrained``
    does, so that ``save_pretrained`` writes the GWQ layout and ``config.json`` says so."""
    if not any(isinstance(p, GWQTensor) for p in model.parameters()):
        return
    cfg = GWQHfConfig(getattr(model, "_gwq_config", None) or GWQConfig())
    current = getattr(model, "hf_quantizer", None)
    if isinstance(current, GWQHfQuantizer):
        current.quantization_config = cfg
        current.pre_quantized = True
    else:
        model.hf_quantizer = GWQHfQuantizer(cfg, pre_quantized=True)
    model.config.quantization_config = cfg
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    for module in model.modules():
        if hasattr(module, "config") and hasattr(module.config, "to_dict"):
            module.config._is_quantized = True


def register() -> None:
    """Put GWQ into transformers' quantizer registry (idempotent)."""
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is GWQHfQuantizer:
        return
    for mapping, cls in ((AUTO_QUANTIZATION_CONFIG_MAPPING, GWQHfConfig), (AUTO_QUANTIZER_MAPPING, GWQHfQuantizer)):
        existing = mapping.get(QUANT_METHOD)
        if existing is not None and existing.__module__ != __name__:  # ours from an earlier import is replaced
            raise RuntimeError(f"transformers already has a quantization method {QUANT_METHOD!r} ({existing.__module__}.{existing.__name__})")
        mapping[QUANT_METHOD] = cls
    if AUTO_QUANTIZER_MAPPING.get("torchao") is TorchAoHfQuantizer:
        AUTO_QUANTIZER_MAPPING["torchao"] = TorchAoWithGWQ


register()
