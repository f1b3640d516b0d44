"""``quantize_``: GWQ on every eligible ``nn.Linear`` of a model.

Three stages, each a small function: choose the target layers (:func:`gwq_compile.targets.target_modules`),
calibrate (:mod:`gwq_compile.calibration`), convert each layer (:func:`convert_linear`:
saliency -> outlier mask -> packed weight -> parameter swap).  The torchao handler
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

import heapq
import warnings
from typing import Any, Callable

import torch
from torchao.quantization.transform_module import register_quantize_module_handler
from tqdm.auto import tqdm

from gwq_compile import calibration, calibration_inputs, grid, hf_registration, packing, ranking
from gwq_compile.config import GWQConfig
from gwq_compile.targets import HEAD_ATTR, NAME_ATTR, layer_name, mark_target, output_head, target_modules
from gwq_compile.tensor import GWQTensor



def layer_config(config: GWQConfig, state: calibration.LayerCalibration) -> GWQConfig:
    """The config a layer is quantized with: the head's grid for the output embedding, else
    the width :func:`allocate_layer_bits` chose for it (``bits_budget``), else ``config``."""
    if not state.is_head:
        return config if state.bits is None or state.bits == config.bits else config.replace(bits=state.bits, bits_budget=None)
    if config.head_bits is None:
        raise ValueError(f"layer {state.name!r} was prepared as the quantized LM head, but this config has head_bits=None")
    return config.head_config()


# ----------------------------------------------------------------------------- outlier selection


def select_outliers(saliency: torch.Tensor, ratio: float, scope: str, count: int | None = None) -> torch.Tensor:
    """Bool mask of the most salient weights: ``round(ratio * numel)`` per layer, or
    ``round(ratio * in_features)`` per row when ``scope == "row"``, or the given ``count``
    (the layer's share of a model-wide ranking, :func:`model_outlier_counts`) when
    ``scope == "model"``.

    Example:
        >>> s = torch.tensor([[0.1, 5.0, 0.2], [3.0, 0.0, 0.4]])
        >>> select_outliers(s, 0.34, "layer").nonzero().tolist()
        [[0, 1], [1, 0]]
        >>> select_outliers(s, 0.0, "model", count=1).nonzero().tolist()
        [[0, 1]]
    """
    n, k = saliency.shape
    mask = torch.zeros(n, k, dtype=torch.bool, device=saliency.device)
    if scope == "row":
        per_row = round(ratio * k)
        if per_row:
            mask.scatter_(1, saliency.topk(per_row, dim=1).indices, True)
        return mask
    if scope == "model":
        if count is None:
            raise ValueError("outlier_scope='model' ranks all layers together: the layer's outlier count must come from model_outlier_counts")
    else:
        count = round(ratio * n * k)
    if count:
        mask.view(-1)[saliency.reshape(-1).topk(count).indices] = True
    return mask


def grid_clip_search(config: GWQConfig, input_sq: torch.Tensor | None) -> bool | str:
    """The layer's ``clip_search``: ``"act_mse"`` without a recorded input (see
    :func:`warn_no_input_sq`) falls back to plain min/max, not to an unweighted guess."""
    if grid.needs_importance(config.clip_search) and input_sq is None:
        return False
    return config.clip_search


def rounding_error(weight: torch.Tensor, config: GWQConfig, input_sq: torch.Tensor | None) -> torch.Tensor:
    """``|W - RTN(W)|`` on the layer's own grid (``config.clip_search``, no outlier taken out), fp32."""
    w = calibration.local_tensor(weight.detach()).float()
    rtn = grid.fake_quantize(
        w, config.bits, config.group_size, config.symmetric, grid_clip_search(config, input_sq), importance=input_sq, double_quant=config.double_quant
    )
    return (w - rtn).abs_()


def layer_saliency(
    weight: torch.Tensor, state: calibration.LayerCalibration, config: GWQConfig, grad_in_out: bool = False, in_place: bool = False
) -> torch.Tensor:
    """The outlier score of every weight, in ``weight``'s ``[out, in]`` layout.

    ``grad_in_out``: the accumulated gradients have the transposed ``[in, out]`` layout
    (HF ``Conv1D``).  ``"grad_error"`` scores ``sum |g| * (W - RTN(W))^2``: a weight
    that rounds (almost) exactly costs nothing to quantize, however sensitive.
    ``in_place``: write the scores over ``state.saliency_sum`` (the same values, no second
    fp32 copy of the layer); :func:`layer_scores` does that once and keeps the result.
    """
    if state.scores is not None:
        return state.scores
    if config.saliency == "hessian":
        from gwq_compile.gptq import hessian_saliency

        return hessian_saliency(calibration.local_tensor(weight.detach()).float(), state.hessian, damp=config.damp)
    saliency = state.saliency_sum.t() if grad_in_out else state.saliency_sum
    if config.saliency == "grad_error":
        error = rounding_error(weight, layer_config(config, state), state.input_sq).square_()
        saliency = saliency.mul_(error) if in_place else saliency * error
    return saliency


def layer_scores(weight: torch.Tensor, state: calibration.LayerCalibration, config: GWQConfig, grad_in_out: bool = False) -> torch.Tensor:
    """:func:`layer_saliency`, checked, computed once: gradient scores replace the layer's
    saliency sum (``state.scores``); Hessian scores are recomputed on each call (nothing is kept)."""
    if state.scores is not None:
        return state.scores
    scores = layer_saliency(weight, state, config, grad_in_out, in_place=True)
    calibration.check_finite(scores, "the saliency", state.name)
    if config.needs_gradients:
        state.scores, state.saliency_sum = scores, None
    return scores


model_outlier_counts = ranking.layer_counts  # each layer's share of the model's top round(ratio * total) scores


def ranking_entries(modules: list[torch.nn.Module]) -> list[tuple[torch.Tensor, calibration.LayerCalibration, bool]]:
    """``(weight [out, in], state, grad_in_out=False)`` of ``nn.Linear`` modules for :func:`rank_model_outliers`."""
    return [(m.weight, calibration.layer_state(m.weight), False) for m in modules]


def ranked_layers(layers: list[tuple[torch.Tensor, calibration.LayerCalibration, bool]], config: GWQConfig) -> list:
    """The entries that take part in the ranking: tied weights (one state) count once; layers
    that will stay dense (no gradient) or are already quantized take no share."""
    seen, entries = set(), []
    for weight, state, grad_in_out in layers:
        if state is None or id(state) in seen or state.quantized is not None:
            continue
        seen.add(id(state))
        if (config.needs_gradients and state.n_backward == 0) or (config.needs_hessian and state.hessian is None):
            continue
        entries.append((weight, state, grad_in_out))
    return entries


def allocate_layer_bits(layers: list[tuple[torch.Tensor, calibration.LayerCalibration, bool]], config: GWQConfig) -> dict[str, int]:
    """``bits_budget``: give each calibrated layer a code width from :func:`mixed_bits_choices`
    so that the weight-averaged width is at most ``config.bits_budget``, spending the bits
    where the saliency-weighted rounding error ``sum s * (W - RTN_b(W))^2`` (``s``: the
    accumulated saliency, |g| for ``"grad"``/``"grad_error"``) drops most per extra bit.
    Greedy over each layer's chain of upgrades (a heap of each layer's next step).  Sets
    ``state.bits`` and returns ``{name: bits}``.  The LM head keeps its own grid.
    """
    from gwq_compile.config import mixed_bits_choices

    entries = [e for e in ranked_layers(layers, config) if not e[1].is_head]
    choices = mixed_bits_choices(config.bits)
    if config.bits_budget is None or not entries:
        return {}
    costs = []
    for weight, state, grad_in_out in entries:
        if state.scores is not None or state.saliency_sum is None:
            raise ValueError(f"layer {state.name!r}: bits_budget needs the layer's saliency sum before its outliers are scored")
        sal = state.saliency_sum.t() if grad_in_out else state.saliency_sum
        costs.append([float((sal * rounding_error(weight, config.replace(bits=b, bits_budget=None), state.input_sq).square_()).sum()) for b in choices])
    sizes = [calibration.local_tensor(w).numel() for w, _, _ in entries]
    level = [0] * len(entries)
    spare = config.bits_budget * sum(sizes) - choices[0] * sum(sizes)
    heap = []

    def push(i: int) -> None:
        j = level[i]
        if j + 1 < len(choices):
            gain = (costs[i][j] - costs[i][j + 1]) / (sizes[i] * (choices[j + 1] - choices[j]))
            heapq.heappush(heap, (-gain, i))

    for i in range(len(entries)):
        push(i)
    while heap:
        _, i = heapq.heappop(heap)
        extra = sizes[i] * (choices[level[i] + 1] - choices[level[i]])
        if extra > spare + 1e-6:
            continue  # too big for what is left; a smaller layer may still fit
        spare -= extra
        level[i] += 1
        push(i)
    out = {}
    for (_, state, _), j in zip(entries, level):
        state.bits = choices[j]
        out[state.name] = choices[j]
    return out


def rank_model_outliers(layers: list[tuple[torch.Tensor, calibration.LayerCalibration, bool]], config: GWQConfig, distributed: bool = False) -> None:
    """``outlier_scope="model"``: rank the weights of all calibrated layers together and store
    each layer's share (the model-wide threshold and its ties) on its calibration state;
    :func:`layer_outlier_mask` builds the mask when the layer is packed.  ``layers``:
    ``(weight [out, in], state, grad_in_out)``.  Streams over the layers
    (:mod:`gwq_compile.ranking`): beyond the saliency sums, which the scores overwrite, it
    holds one layer's comparisons and the top ``outlier_ratio`` of the scores.
    ``distributed``: the weights are FSDP2 ``DTensor`` shards; the processes agree on the
    threshold and the ties with collectives, each scores its own rows.
    """
    if config.bits_budget is not None:
        if distributed:
            raise ValueError("bits_budget is not distributed: quantize with one process")
        allocate_layer_bits(layers, config)
    entries = ranked_layers(layers, config)
    count = round(config.outlier_ratio * sum(w.numel() for w, _, _ in entries))

    def scores(desc: str):
        for weight, state, grad_in_out in tqdm(entries, desc=desc, disable=not config.progress, unit="layer"):
            yield layer_scores(weight, state, config, grad_in_out)

    threshold = ranking.model_threshold(scores("GWQ ranking (threshold)"), count, distributed)
    ties = ranking.tie_shares(scores("GWQ ranking (ties)"), threshold, distributed)
    for (_, state, _), layer_ties in zip(entries, ties):
        state.outlier_threshold, state.outlier_ties = threshold.value, layer_ties


def layer_outlier_mask(weight: torch.Tensor, state: calibration.LayerCalibration, config: GWQConfig, grad_in_out: bool = False) -> torch.Tensor:
    """The layer's outliers: its own top scores, or its share of the model-wide ranking
    (``outlier_scope="model"``, which :func:`rank_model_outliers` must have run)."""
    if config.outlier_scope == "model":
        if state.outlier_threshold is None:
            raise ValueError(
                f"layer {state.name!r}: outlier_scope='model' ranks the layers prepared together, and this layer's calibration "
                "group could not be ranked (its other layers are gone); convert the prepared model itself with "
                "gwq_compile.quantize_, torchao's quantize_, or the gwq backend"
            )
        return ranking.threshold_mask(layer_scores(weight, state, config, grad_in_out), state.outlier_threshold, state.outlier_ties)
    saliency = layer_saliency(weight, state, config, grad_in_out)
    calibration.check_finite(saliency, "the saliency", state.name)
    return select_outliers(saliency, config.outlier_ratio, config.outlier_scope)


def quantize_weight(
    weight: torch.Tensor, outlier_mask: torch.Tensor, config: GWQConfig, hessian: torch.Tensor | None, input_sq: torch.Tensor | None = None
) -> GWQTensor:
    """Pack one dense weight with the given outliers: RTN (on the ``clip_search`` grid; ``input_sq``
    weights it for ``"act_mse"``), or GPTQ-compensated non-outliers."""
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
    return GWQTensor.from_packed(packed, w.dtype)


# ----------------------------------------------------------------------------- one layer


def warn_no_input_sq(state: calibration.LayerCalibration, config: GWQConfig) -> None:
    """Say so when ``clip_search="act_mse"`` has no recorded input for a layer: its weight
    was used without calling its module (``F.linear(x, mod.weight)``), so the layer gets
    plain min/max ranges."""
    if config.needs_input_sq and state.input_sq is None:
        warnings.warn(
            f"layer {state.name!r}: its module was never called during calibration, so clip_search='act_mse' "
            "has no input statistics for it; it uses plain min/max ranges",
            stacklevel=4,
        )


def prepare_linear(module: torch.nn.Module, config: GWQConfig) -> torch.nn.Module:
    _check_linear(module)
    state = calibration.prepare_weight(module, layer_name(module), config)
    state.is_head = state.is_head or hasattr(module, HEAD_ATTR)
    return module


def convert_linear(module: torch.nn.Module, config: GWQConfig) -> torch.nn.Module:
    """Swap ``module.weight`` for its GWQ-quantized parameter (prepare must have run)."""
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
        mask = layer_outlier_mask(weight, state, config)
        try:
            warn_no_input_sq(state, config)
            qweight = quantize_weight(weight, mask, layer_config(config, state), state.hessian, state.input_sq)
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
    if not isinstance(module, torch.nn.Linear):
        raise TypeError(f"GWQ quantizes nn.Linear modules, got {type(module).__name__}")


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
    """Quantize ``model``'s eligible ``nn.Linear`` layers with GWQ, in place.

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
        warnings.warn("GWQ found no nn.Linear layers to quantize; the model is unchanged", stacklevel=2)
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


def convert_targets(model: torch.nn.Module, targets: list[tuple[str, torch.nn.Linear]], config: GWQConfig) -> None:
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
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if not targets:
        warnings.warn("GWQ found no nn.Linear layers to quantize; the model is unchanged", stacklevel=3)
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
