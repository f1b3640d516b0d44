"""Score and select: each weight's outlier score from its calibration, and which weights stay fp16.

The stage between calibration (:mod:`gwq_compile.calibration`, which accumulates the
gradients) and packing (:mod:`gwq_compile.packing`): the saliency of each layer
(:func:`layer_saliency`: |g|, |g| x rounding error, or the OBS Hessian score), the
per-layer or model-wide outlier masks (:func:`layer_outlier_mask`, with the streaming
ranking of :mod:`gwq_compile.ranking`), and ``bits_budget``'s per-layer code widths
(:func:`allocate_layer_bits`).  It never calls back into calibration's stages, and
:mod:`gwq_compile.quantize` calls it once per layer.
"""

from __future__ import annotations

import heapq
import warnings

import torch
from tqdm.auto import tqdm

from gwq_compile import calibration, grid, ranking
from gwq_compile.config import GWQConfig
from gwq_compile.targets import is_conv1d


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
    """``(weight [out, in], state, grad_in_out)`` of ``nn.Linear`` and HF ``Conv1D`` modules for
    :func:`rank_model_outliers`: a Conv1D's ``[in, out]`` weight is seen through a transposed
    view, and its gradients have that layout (``grad_in_out=True``)."""
    entries = []
    for m in modules:
        conv1d = is_conv1d(m)
        entries.append((m.weight.detach().t() if conv1d else m.weight, calibration.layer_state(m.weight), conv1d))
    return entries


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
