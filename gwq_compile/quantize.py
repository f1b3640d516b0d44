"""``quantize_``: GWQ on every eligible ``nn.Linear`` (and HF ``Conv1D``) of a model.

Three stages, each a small function: choose the target layers (:func:`gwq_compile.targets.target_modules`),
calibrate (:mod:`gwq_compile.calibration`), convert each layer (:func:`convert_linear`:
score and select its outliers (:mod:`gwq_compile.selection`) -> pack (:mod:`gwq_compile.packing`)
-> swap the parameter).  The torchao handler
registered for :class:`GWQConfig` only runs prepare or convert on one module, so
``torchao.quantization.quantize_(model, GWQConfig(step=...))`` works as well.

Example:
    >>> import torch
    >>> from gwq_compile import GWQConfig, quantize_
    >>> lin = torch.nn.Linear(64, 32)
    >>> quantize_(lin, GWQConfig(step="prepare"))
    >>> lin(torch.randn(4, 64)).square().mean().backward()
    >>> quantize_(lin, GWQConfig(step="convert", bits=4, group_size=32, progress=False))
    >>> type(lin.weight).__name__
    'GWQTensor'
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torchao.quantization.transform_module import register_quantize_module_handler
from tqdm.auto import tqdm

from gwq_compile import calibration, calibration_inputs, hf_registration, packing
from gwq_compile.config import GWQConfig
from gwq_compile.targets import HEAD_ATTR, NAME_ATTR, is_conv1d, layer_name, mark_target, output_head, target_modules
from gwq_compile.selection import allocate_layer_bits, grid_clip_search, layer_config, layer_outlier_mask, rank_model_outliers, ranking_entries, warn_no_input_sq
from gwq_compile.tensor import GWQTensor


def quantize_weight(
    weight: torch.Tensor, outlier_mask: torch.Tensor, config: GWQConfig, hessian: torch.Tensor | None, input_sq: torch.Tensor | None = None,
    transposed: bool = False,
) -> GWQTensor:
    """Pack one dense ``[out, in]`` weight with the given outliers: RTN (on the ``clip_search``
    grid; ``input_sq`` weights it for ``"act_mse"``), or GPTQ-compensated non-outliers.
    ``transposed``: the result stands in for an HF ``Conv1D``'s ``[in, out]`` parameter."""
    w = weight.detach()
    if config.compensation in ("gptq", "gptq_act"):
        from gwq_compile.gptq import gptq_quantize_weight

        packed = gptq_quantize_weight(
            w.float(), hessian, config.bits, config.group_size, outlier_mask=outlier_mask, symmetric=config.symmetric, damp=config.damp,
            act_order=config.compensation == "gptq_act",
        )
    else:
        packed = packing.quantize_weight(
            w, outlier_mask, config.bits, config.group_size, config.symmetric, grid_clip_search(config, input_sq), importance=input_sq,
            double_quant=config.double_quant,
        )
    return GWQTensor.from_packed(packed, w.dtype, transposed=transposed)


# ----------------------------------------------------------------------------- one layer


def prepare_linear(module: torch.nn.Module, config: GWQConfig) -> torch.nn.Module:
    _check_linear(module)
    state = calibration.prepare_weight(module, layer_name(module), config)
    state.is_head = state.is_head or hasattr(module, HEAD_ATTR)
    return module


def convert_linear(module: torch.nn.Module, config: GWQConfig) -> torch.nn.Module:
    """Swap ``module.weight`` for its GWQ-quantized parameter (prepare must have run).  An HF
    ``Conv1D`` (``[in, out]`` weight, gradients in that layout) is scored and packed as the
    ``[out, in]`` linear it computes, and gets a transposed ``GWQTensor``."""
    _check_linear(module)
    weight = module.weight
    if isinstance(weight, GWQTensor):
        return module  # already converted (a tied weight converted through another module)
    state = calibration.layer_state(weight)
    if state is None:
        raise ValueError(f"layer {layer_name(module)!r}: convert without prepare; run quantize_(model, GWQConfig(step='prepare')) and a backward pass first")
    if state.quantized is None:
        missing_grad = config.needs_gradients and state.n_backward == 0
        missing_hessian = config.needs_hessian and state.hessian is None
        if missing_grad or missing_hessian:
            calibration.release_weight(weight)
            what = "gradient" if missing_grad else "forward input (Hessian)"
            warnings.warn(f"layer {state.name!r} received no {what} during calibration; it stays unquantized", stacklevel=3)
            return module
        if config.outlier_scope == "model" and state.outlier_threshold is None:
            rank_group(state, config)
        conv1d = is_conv1d(module)
        w_out_in = weight.detach().t() if conv1d else weight
        mask = layer_outlier_mask(w_out_in, state, config, grad_in_out=conv1d)
        try:
            warn_no_input_sq(state, config)
            qweight = quantize_weight(w_out_in, mask, layer_config(config, state), state.hessian, state.input_sq, transposed=conv1d)
        except ValueError as err:
            raise ValueError(f"layer {state.name!r}: {err}") from err
        state.quantized = torch.nn.Parameter(qweight, requires_grad=False)
        state.scores = state.saliency_sum = None  # packed into qweight now: free the layer's fp32 scores
        calibration.release_weight(weight)
        setattr(weight, calibration._STATE_ATTR, state)  # keep the result reachable for tied modules
    module.weight = state.quantized
    for owner, pname in module.__dict__.get(HEAD_ATTR, ()):  # a tied input embedding shares the quantized head
        owner._parameters[pname] = state.quantized
    return module


def rank_group(state: calibration.LayerCalibration, config: GWQConfig) -> None:
    """``outlier_scope="model"`` at the first convert of a layer no ranking has reached (torchao's
    ``quantize_`` converts one module at a time): rank the layers prepared with it together,
    as :func:`gwq_compile.quantize_` ranks the model.  Once per group; a layer its group does
    not hold (live) is left to :func:`layer_outlier_mask`'s error."""
    group = state.group
    if group is None or group.ranked:
        return
    entries = ranking_entries(group.modules())
    if not any(s is state for _, s, _ in entries):
        return
    group.ranked = True
    rank_model_outliers(entries, config)


def _check_linear(module: torch.nn.Module) -> None:
    if not (isinstance(module, torch.nn.Linear) or is_conv1d(module)):
        raise TypeError(f"GWQ quantizes nn.Linear and HF Conv1D modules, got {type(module).__name__}")


@register_quantize_module_handler(GWQConfig)
def _gwq_module_handler(module: torch.nn.Module, config: GWQConfig) -> torch.nn.Module:
    """torchao handler: one module, one step; it only prepares or swaps the weight."""
    if config.step == "prepare":
        return prepare_linear(module, config)
    if config.step == "convert":
        return convert_linear(module, config)
    raise ValueError(
        "GWQConfig(step=None) needs calibration data: call gwq_compile.quantize_(model, config, calibration_data=...) "
        "or use step='prepare', a backward pass, then step='convert'"
    )


# ----------------------------------------------------------------------------- choosing layers


def gwq_filter(model: torch.nn.Module, config: GWQConfig) -> Callable[[torch.nn.Module, str], bool]:
    """A ``filter_fn`` for ``torchao.quantization.quantize_`` applying GWQ's skip rules.

    For a ``step="convert"`` config with ``outlier_scope="model"`` it also ranks the
    calibrated layers together (torchao's handler sees one module at a time).

    Example:
        >>> import torchao                                                          # doctest: +SKIP
        >>> torchao.quantization.quantize_(model, cfg, filter_fn=gwq_filter(model, cfg))  # doctest: +SKIP
    """
    targets = target_modules(model, config)
    chosen = {id(m): name for name, m in targets}
    if config.step == "convert" and config.outlier_scope == "model":
        rank_model_outliers(ranking_entries([m for _, m in targets]), config)

    def _filter(module: torch.nn.Module, fqn: str) -> bool:
        if id(module) in chosen:
            mark_target(model, chosen[id(module)], module, config)
            return True
        return False

    return _filter


# ----------------------------------------------------------------------------- public entry point


def quantize_(model: torch.nn.Module, config: GWQConfig, calibration_data: Any = None) -> None:
    """Quantize ``model``'s eligible ``nn.Linear`` (and HF ``Conv1D``) layers with GWQ, in place.

    * ``step=None``: one shot.  Runs the next-token loss over ``calibration_data`` (a
      ``[batch, seq]`` LongTensor, one row is enough, or an iterable of them, or dicts of
      model inputs with ``input_ids``), then converts.
    * ``step="prepare"``: start accumulating saliency; back-propagate any loss you like.
    * ``step="convert"``: quantize from what was accumulated and restore the model's flags.

    The model's ``requires_grad`` flags, existing ``.grad`` and train/eval mode are restored.
    """
    if not isinstance(config, GWQConfig):
        raise TypeError(f"config must be a GWQConfig, got {type(config).__name__}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if config.step == "convert":
        _convert_model(model, config)
        return
    targets = target_modules(model, config)
    if not targets:
        already = sum(isinstance(p, GWQTensor) for p in model.parameters())
        if already:
            raise ValueError(f"the model is already GWQ-quantized ({already} layers); GWQ does not re-quantize: start from the unquantized model")
        warnings.warn("GWQ found no nn.Linear or Conv1D layers to quantize; the model is unchanged", stacklevel=2)
        return
    on_meta = [name for name, mod in targets if mod.weight.device.type == "meta"]
    if on_meta:
        raise ValueError(
            f"layer {on_meta[0]!r} is on the meta device (no data): load the weights first "
            "(from_pretrained, or load_state_dict(state, assign=True) into a meta skeleton)"
        )
    if config.step is None and calibration_data is None:
        raise ValueError("one-shot GWQ needs calibration_data (token ids); or use step='prepare' then step='convert'")
    calibration_data = calibration_inputs.token_batches(calibration_data, calibration_inputs.vocab_size(model))
    snapshot = calibration.snapshot_and_freeze(model)
    prepare_config = config.replace()  # a copy: this call's layers are one calibration group, whatever else used the config
    try:
        for name, mod in targets:
            mark_target(model, name, mod, config)
            prepare_linear(mod, prepare_config)
        if config.step == "prepare":
            model._gwq_snapshot = snapshot  # restored by convert
            return
        calibration.run_calibration(model, calibration_data, backward=config.needs_gradients, progress=config.progress)
        convert_targets(model, targets, config)
    except BaseException:
        for _, mod in targets:
            calibration.release_weight(mod.weight)
        raise
    finally:
        if config.step is None:
            calibration.restore(model, snapshot)


def convert_targets(model: torch.nn.Module, targets: list[tuple[str, torch.nn.Module]], config: GWQConfig) -> None:
    prepared = [(n, m) for n, m in targets if isinstance(m.weight, GWQTensor) or calibration.layer_state(m.weight) is not None]
    if not prepared:
        raise ValueError("convert without prepare: no layer holds GWQ calibration state; run step='prepare' and a backward pass first")
    if config.needs_gradients and all(
        isinstance(m.weight, GWQTensor) or calibration.layer_state(m.weight).n_backward == 0 for _, m in prepared
    ):
        for _, m in prepared:
            calibration.release_weight(m.weight)
        raise ValueError("no layer received a gradient between prepare and convert: call loss.backward() on a loss of the model's output")
    if config.outlier_scope == "model":
        pending = ranking_entries([m for _, m in prepared if not isinstance(m.weight, GWQTensor)])
        if any(state.outlier_threshold is None for _, state, _ in pending):  # the backend ranks them with its Conv1D layers first
            rank_model_outliers(pending, config)
    elif config.bits_budget is not None:
        allocate_layer_bits(ranking_entries([m for _, m in prepared if not isinstance(m.weight, GWQTensor)]), config)
    for name, mod in tqdm(prepared, desc="GWQ quantize", disable=not config.progress, unit="layer"):
        convert_linear(mod, config)
    for _, mod in prepared:  # drop the bookkeeping left on the modules
        mod.__dict__.pop(NAME_ATTR, None)
        mod.__dict__.pop(HEAD_ATTR, None)
    model._gwq_config = config.replace(step=None)
    hf_registration.mark_transformers_model(model)  # so that save_pretrained writes the GWQ layout


def _convert_model(model: torch.nn.Module, config: GWQConfig) -> None:
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) or is_conv1d(m)]
    if not targets:
        warnings.warn("GWQ found no nn.Linear or Conv1D layers to quantize; the model is unchanged", stacklevel=3)
        return
    head = output_head(model, config)
    if head is not None and calibration.layer_state(head.weight) is None:
        raise ValueError(
            f"head_bits={config.head_bits} at convert, but the output embedding was not prepared: "
            "pass the same head_bits to the step='prepare' config"
        )
    snapshot = model.__dict__.pop("_gwq_snapshot", None)
    try:
        convert_targets(model, targets, config)
    finally:
        if snapshot is not None:
            calibration.restore(model, snapshot)
