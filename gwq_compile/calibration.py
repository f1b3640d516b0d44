"""Gradient calibration: accumulate per-weight saliency from backward passes.

``prepare`` attaches a :class:`LayerCalibration` to each target weight.  A
post-accumulate-grad hook folds every backward's gradient into the saliency sum and
clears ``.grad`` right away, so gradients never pile up: only the fp32 saliency
(one ``[N, K]`` tensor per layer) and one sample's activations are alive at a time.
When the config needs it (``saliency="hessian"`` or ``compensation="gptq"`` / ``"gptq_act"``) a
forward pre-hook also accumulates the layer-input Hessian ``sum x x^T``; for
``clip_search="act_mse"`` only its diagonal ``sum x_j^2``.

:func:`run_calibration` is the one-shot loop: it freezes every other parameter, runs
forward + next-token loss + backward over each calibration batch, and restores the
model's ``requires_grad`` flags, existing ``.grad`` and train/eval mode afterwards.  The
backward passes run in bounded memory (:func:`bounded_memory`: checkpointed decoder
layers, chunked loss, SDPA; see :mod:`gwq_compile.lean_backward`).
"""

from __future__ import annotations

import collections.abc
import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gwq_compile import gptq, heap, lean_backward
from gwq_compile.config import GWQConfig

_STATE_ATTR = "_gwq_calibration"


def logits_of(output) -> torch.Tensor:
    """The logits of a model output: a tensor, a tuple whose first item is one, or an object with ``.logits``."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        logits = output[0]
    if logits is None:
        raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")
    return logits


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of predicting ``input_ids[:, 1:]`` from ``logits[:, :-1]`` (computed in fp32)."""
    shift_logits = logits[:, :-1, :].float()
    targets = input_ids[:, 1:].to(shift_logits.device)
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), targets.reshape(-1), reduction=reduction)


@dataclass
class LayerCalibration:
    """Calibration state of one weight (shared by every Linear that ties it)."""

    name: str
    saliency_kind: str
    saliency_sum: torch.Tensor | None = None  # fp32 [N, K]
    n_backward: int = 0
    hessian: torch.Tensor | None = None  # fp32 [K, K]
    input_sq: torch.Tensor | None = None  # fp32 [K]: sum over tokens of x_j^2
    handles: list = field(default_factory=list)
    saved_requires_grad: bool = False
    saved_grad: torch.Tensor | None = None
    quantized: torch.nn.Parameter | None = None  # set by convert, reused by tied modules
    scores: torch.Tensor | None = None  # fp32 [out, in] outlier scores, computed in place of saliency_sum (selection.layer_scores)
    outlier_threshold: float | None = None  # outlier_scope="model": the model-wide threshold, set by the ranking
    outlier_ties: int = 0  # ... and how many of this layer's scores equal to it are outliers (gwq_compile.ranking)
    is_head: bool = False  # the output embedding: quantized on GWQConfig.head_config()'s grid
    bits: int | None = None  # GWQConfig.bits_budget: this layer's code width, chosen by selection.allocate_layer_bits
    group: "CalibrationGroup | None" = None  # the layers prepared with it (ranked together for outlier_scope="model")

    def remove_hooks(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


class CalibrationGroup:
    """The layers one prepare pass prepared (``quantize_(model, GWQConfig(step="prepare"))``,
    torchao's or ours: every handler call of a pass gets the same config object, and the
    group is that object's).  ``outlier_scope="model"`` ranks a group as one model at its
    first convert, so torchao's ``quantize_(model, GWQConfig(step="convert"))`` needs no
    hand-built filter.  Holds weak references: a dropped model leaves nothing alive here."""

    def __init__(self) -> None:
        self._modules: list[weakref.ReferenceType] = []
        self.ranked = False

    def add(self, module: torch.nn.Module) -> None:
        self._modules.append(weakref.ref(module))

    def modules(self) -> list[torch.nn.Module]:
        """The group's live modules, in prepare order (the model's module order)."""
        return [m for m in (r() for r in self._modules) if m is not None]


#: The attribute of a prepare config holding its :class:`CalibrationGroup` (not a dataclass
#: field: never compared, copied by ``replace`` or serialized).
_GROUP_ATTR = "_gwq_calibration_group"


def group_of(config: GWQConfig) -> CalibrationGroup:
    """The calibration group of a prepare pass run with ``config`` (created on first use).
    torchao's ``quantize_`` hands every module the same config object, so use one prepare
    config object per model (``gwq_compile.quantize_`` copies it per call itself)."""
    group = config.__dict__.get(_GROUP_ATTR)
    if group is None:
        group = config.__dict__[_GROUP_ATTR] = CalibrationGroup()
    return group


def saliency_term(grad: torch.Tensor, weight: torch.Tensor, kind: str) -> torch.Tensor:
    """One backward's contribution to the saliency sum (fp32)."""
    g = grad.float()
    if kind in ("grad", "grad_error"):  # grad_error weights |g| by the rounding error at convert time
        return g.abs()
    if kind == "fisher":
        return g.square()
    if kind == "grad_weight":
        return (g * weight.detach().float()).abs()
    raise ValueError(f"saliency {kind!r} is not accumulated from gradients")


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The rows this process holds: an FSDP2-sharded ``DTensor``'s local shard, else ``t`` itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def check_finite(t: torch.Tensor, what: str, name: str) -> None:
    if not torch.isfinite(t).all():
        raise ValueError(f"layer {name!r}: {what} contains NaN or Inf")


def layer_state(weight: torch.nn.Parameter) -> LayerCalibration | None:
    return getattr(weight, _STATE_ATTR, None)


def prepare_weight(module: torch.nn.Module, name: str, config: GWQConfig) -> LayerCalibration:
    """Start accumulating saliency for ``module.weight`` (idempotent for tied weights)."""
    weight = module.weight
    state = layer_state(weight)
    if state is not None:  # a tied weight already prepared through another module
        return state
    check_finite(local_tensor(weight.detach()), "the weight", name)
    state = LayerCalibration(name=name, saliency_kind=config.saliency, group=group_of(config))
    state.group.add(module)
    state.saved_requires_grad, state.saved_grad = weight.requires_grad, weight.grad
    weight.grad = None

    if config.needs_gradients:

        def _accumulate(param: torch.Tensor) -> None:
            grad = local_tensor(param.grad)  # under FSDP2: the reduce-scattered rows this rank owns
            param.grad = None  # fold into the saliency now; never keep a second copy
            check_finite(grad, "the gradient", state.name)
            term = saliency_term(grad, local_tensor(param), state.saliency_kind)
            state.saliency_sum = term if state.saliency_sum is None else state.saliency_sum.add_(term)
            state.n_backward += 1

        weight.requires_grad_(True)
        state.handles.append(weight.register_post_accumulate_grad_hook(_accumulate))

    if config.needs_hessian:

        def _hessian(mod: torch.nn.Module, args: tuple) -> None:
            if lean_backward.hooks_paused():  # a checkpointed layer's recomputation: already recorded
                return
            state.hessian = gptq.add_input_gram(state.hessian, args[0])

        state.handles.append(module.register_forward_pre_hook(_hessian))

    if config.needs_input_sq:

        def _input_sq(mod: torch.nn.Module, args: tuple) -> None:
            if lean_backward.hooks_paused():
                return
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sq = x.square().sum(0)
            state.input_sq = sq if state.input_sq is None else state.input_sq.add_(sq)

        state.handles.append(module.register_forward_pre_hook(_input_sq))

    setattr(weight, _STATE_ATTR, state)
    return state


def release_weight(weight: torch.nn.Parameter) -> LayerCalibration | None:
    """Remove hooks and state from ``weight`` and restore its flag and ``.grad``."""
    state = layer_state(weight)
    if state is None:
        return None
    state.remove_hooks()
    delattr(weight, _STATE_ATTR)
    weight.requires_grad_(state.saved_requires_grad)
    weight.grad = state.saved_grad
    return state


# ----------------------------------------------------------------------------- calibration data


def iter_batches(calibration_data: Any) -> Iterator[Any]:
    """Yield calibration batches: ``[batch, seq]`` token tensors (a 1-D tensor is one sample,
    a 2-D tensor is split into its rows so only one sample's activations live at a time) or
    dicts of model keyword arguments holding ``input_ids``."""
    if calibration_data is None:
        raise ValueError("calibration_data is required for one-shot GWQ (or use step='prepare'/'convert')")
    if isinstance(calibration_data, torch.Tensor):
        data = calibration_data
        if data.dim() == 1:
            data = data.unsqueeze(0)
        if data.dim() != 2 or data.numel() == 0:
            raise ValueError(f"calibration data must be a non-empty [batch, seq] token tensor, got shape {tuple(calibration_data.shape)}")
        if data.is_floating_point():
            raise TypeError(f"calibration token ids must be integers, got {data.dtype}")
        yield from (row.unsqueeze(0) for row in data)
        return
    if isinstance(calibration_data, collections.abc.Mapping):
        yield calibration_data
        return
    if not isinstance(calibration_data, Iterable):
        raise TypeError(f"calibration_data must be a token tensor, a dict of inputs or an iterable of them, got {type(calibration_data).__name__}")
    for batch in calibration_data:
        if isinstance(batch, torch.Tensor):
            yield from iter_batches(batch)
        else:
            yield batch


def _model_inputs(model: torch.nn.Module, batch: Any, device: torch.device) -> tuple[dict | torch.Tensor, torch.Tensor]:
    """``(model inputs, input_ids)`` of one batch: keyword arguments, or the token tensor
    itself for a plain module; no KV cache for a transformers model (nothing is generated)."""
    uses_cache = getattr(getattr(model, "config", None), "use_cache", None) is not None
    if not isinstance(batch, collections.abc.Mapping) and not uses_cache:
        ids = batch.to(device)
        _check_length(ids)
        return ids, ids
    if isinstance(batch, collections.abc.Mapping):
        if "input_ids" not in batch:
            raise ValueError("a dict calibration batch needs an 'input_ids' entry for the next-token loss")
        inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    else:
        inputs = {"input_ids": batch.to(device)}
    if uses_cache:
        inputs.setdefault("use_cache", False)
    _check_length(inputs["input_ids"])
    return inputs, inputs["input_ids"]


def _check_length(ids: torch.Tensor) -> None:
    if ids.shape[-1] < 2:
        raise ValueError("calibration samples need at least 2 tokens for a next-token loss")


def _call(model: torch.nn.Module, inputs: dict | torch.Tensor) -> Any:
    return model(inputs) if isinstance(inputs, torch.Tensor) else model(**inputs)


def _batch_loss(model: torch.nn.Module, batch: Any, device: torch.device, capture: "lean_backward.HeadCapture | None") -> torch.Tensor:
    """The mean next-token loss of one batch: through the captured LM head in chunks, or on the full logits."""
    inputs, ids = _model_inputs(model, batch, device)
    if capture is None or (isinstance(inputs, dict) and "labels" in inputs):  # labels: the model computes its own loss on the logits
        return next_token_nll(logits_of(_call(model, inputs)), ids)
    with capture.active():
        output = _call(model, inputs)
    hidden, took = capture.hidden, capture.took(logits_of(output))
    capture.hidden = capture.marker = None
    if not took:
        raise RuntimeError(f"{type(model).__name__} transformed its LM head's output on this batch but not on the probe; cannot chunk the loss")
    head_needs_grad = any(p.requires_grad for p in capture.head.parameters())
    return lean_backward.chunked_next_token_nll(capture.forward, hidden, ids, capture.head.out_features, head_needs_grad)


@dataclass
class _ModelSnapshot:
    requires_grad: dict[int, bool]
    grads: dict[int, torch.Tensor | None]
    training: dict[int, bool]


def snapshot_and_freeze(model: torch.nn.Module) -> _ModelSnapshot:
    """Remember flags/grads/modes, then freeze all parameters and switch to eval."""
    params = {id(p): p for p in model.parameters()}
    snap = _ModelSnapshot(
        requires_grad={k: p.requires_grad for k, p in params.items()},
        grads={k: p.grad for k, p in params.items()},
        training={id(m): m.training for m in model.modules()},
    )
    for p in params.values():
        p.grad = None
        p.requires_grad_(False)
    model.eval()
    return snap


def restore(model: torch.nn.Module, snap: _ModelSnapshot) -> None:
    """Undo :func:`snapshot_and_freeze` for every parameter still in the model."""
    for p in model.parameters():
        if id(p) in snap.requires_grad and p.is_floating_point() and not _is_quantized(p):
            p.requires_grad_(snap.requires_grad[id(p)])
            p.grad = snap.grads[id(p)]
    for m in model.modules():
        if id(m) in snap.training:
            m.train(snap.training[id(m)])


def _is_quantized(p: torch.Tensor) -> bool:
    from gwq_compile.tensor import GWQTensor

    return isinstance(p, GWQTensor)


def batch_count(calibration_data: Any) -> int | None:
    """How many samples :func:`iter_batches` will yield, when it is known up front (progress totals)."""
    data = getattr(calibration_data, "batches", calibration_data)  # calibration_inputs' checked wrapper
    if isinstance(data, torch.Tensor):
        return 1 if data.dim() == 1 else data.shape[0]
    if isinstance(data, collections.abc.Mapping):
        return 1
    if isinstance(data, (list, tuple)) and all(isinstance(b, (torch.Tensor, collections.abc.Mapping)) for b in data):
        return sum(batch_count(b) for b in data)
    return None


@contextlib.contextmanager
def bounded_memory(model: torch.nn.Module, backward: bool) -> Iterator["lean_backward.HeadCapture | None"]:
    """SDPA attention, checkpointed decoder layers and the chunked loss for the calibration's
    backward passes (:mod:`gwq_compile.lean_backward`); yields the LM head capture, if any."""
    if not backward:  # no backward pass: no activation is kept, the plain forward is lean already
        yield None
        return
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with lean_backward.sdpa_attention(model), lean_backward.checkpointed_layers(model), heap.returned_large_buffers():
        yield lean_backward.head_capture(model, lambda ids: _call(model, _model_inputs(model, ids, device)[0]))


def run_calibration(
    model: torch.nn.Module, calibration_data: Any, backward: bool = True, progress: bool = True, bounded: bool = True, loss_scale: float = 1.0
) -> int:
    """Forward + next-token loss (+ backward) over every batch; returns the number of batches.

    The hooks installed by :func:`prepare_weight` do the accumulation.  ``backward=False``
    serves saliencies that need only the forward Hessian.  ``bounded``: checkpointed layers,
    chunked loss and SDPA (:func:`bounded_memory`); ``False`` keeps every activation (the
    reference the checkpointed calibration is tested against).  ``loss_scale`` multiplies
    the loss before backward (0 on the FSDP2 ranks whose gradient must not count, see
    :mod:`gwq_compile.distributed`).
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    n = 0
    lean = bounded_memory(model, backward) if bounded else contextlib.nullcontext()
    with torch.set_grad_enabled(backward), lean as capture:
        batches = tqdm(iter_batches(calibration_data), desc="GWQ calibration", total=batch_count(calibration_data), disable=not progress, unit="sample")
        for batch in batches:
            loss = _batch_loss(model, batch, device, capture)
            if not torch.isfinite(loss):
                raise ValueError(f"calibration loss is {loss.item()} on batch {n}: check the model and the calibration data")
            if backward:
                (loss if loss_scale == 1.0 else loss * loss_scale).backward()
            n += 1
    if n == 0:
        raise ValueError("calibration data is empty: give at least one sample of token ids")
    return n
