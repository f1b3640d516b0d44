"""The calibration's forward + loss + backward in bounded memory.

GWQ needs one backward pass through the whole model, so without care a calibration
sample keeps every layer's activations and the full-vocabulary logits (and their
gradient) alive at once: 7.6 GB for SmolLM2-135M on 2048 tokens.  Three things bound it:

* **Activation checkpointing per decoder layer** (:func:`checkpointed_layers`): each
  transformers decoder layer (``GradientCheckpointingLayer``) runs under
  ``torch.utils.checkpoint`` (non-reentrant); only its input is kept and it is recomputed
  during the backward pass.  The forward hooks that record layer inputs must not count
  the recomputation twice: they check :func:`hooks_paused`.
* **A chunked LM loss** (:func:`chunked_next_token_nll`): the model runs up to the
  hidden states (the LM head's forward is captured, see :func:`head_capture`); the head
  and the cross-entropy then run on chunks of the sequence, each under checkpoint, so one
  chunk's logits exist at a time, forward and backward.
* **SDPA attention** (:func:`sdpa_attention`) where the model offers it, instead of eager
  attention's ``[heads, seq, seq]`` probabilities per layer.

Each is switched on for the calibration only and undone afterwards.  Where one is not
possible for a model, a warning says so (once per model class) and calibration runs the
plain way for that part.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# One chunk's logits: at most this many fp32 elements (8 MB), e.g. 42 tokens of SmolLM2's 49152-id
# vocabulary.  The chunk's logits, log-softmax and gradient are alive together while every
# checkpointed layer input is (at the end of the forward pass), and from the second sample on
# the saliency sums are too: 32 MB chunks put SmolLM2's 2-sample peak 85 MB higher, at the same
# speed (benchmarks/results/calibration_memory_probe.md).
CHUNK_LOGIT_ELEMENTS = 1 << 21
_CACHE_ARGS = ("past_key_values", "past_key_value", "layer_past")

_paused = 0
_warned: set[tuple[str, str]] = set()


def hooks_paused() -> bool:
    """True while a checkpointed layer is recomputed (or a probe runs): the calibration's
    forward hooks must not record this second forward."""
    return _paused > 0


@contextlib.contextmanager
def paused_hooks() -> Iterator[None]:
    global _paused
    _paused += 1
    try:
        yield
    finally:
        _paused -= 1


def warn_once(model: torch.nn.Module, what: str, message: str) -> None:
    key = (type(model).__qualname__, what)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"GWQ calibration of {type(model).__name__}: {message}", stacklevel=4)


# ----------------------------------------------------------------------------- activation checkpointing


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The outermost transformers ``GradientCheckpointingLayer`` modules (the decoder layers)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        return []
    layers, inside = [], []
    for name, module in model.named_modules():
        if isinstance(module, GradientCheckpointingLayer) and not any(name.startswith(p + ".") for p in inside):
            layers.append(module)
            inside.append(name)
    return layers


def _checkpointed_forward(forward: Callable) -> Callable:
    """``forward`` under non-reentrant checkpoint; the recomputation runs with hooks paused."""

    def run(first: list, *args: Any, **kwargs: Any) -> Any:
        if first[0]:
            first[0] = False
            return forward(*args, **kwargs)
        with paused_hooks():
            return forward(*args, **kwargs)

    def checkpointed(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        for name in _CACHE_ARGS:  # a KV cache would be written twice (forward and recomputation)
            if kwargs.get(name) is not None:
                kwargs[name] = None
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
        return checkpoint(run, [True], *args, use_reentrant=False, **kwargs)

    return checkpointed


@contextlib.contextmanager
def checkpointed_layers(model: torch.nn.Module) -> Iterator[int]:
    """Run every decoder layer of ``model`` under activation checkpointing; yields how many."""
    layers = decoder_layers(model)
    if not layers:
        warn_once(model, "checkpoint", "no transformers decoder layer to checkpoint; every layer's activations are kept for the backward pass")
    saved = [layer.__dict__.get("forward") for layer in layers]  # an instance-level forward (accelerate hooks), if any
    for layer in layers:
        layer.forward = _checkpointed_forward(layer.forward)
    try:
        yield len(layers)
    finally:
        for layer, forward in zip(layers, saved):
            del layer.forward
            if forward is not None:
                layer.forward = forward


# ----------------------------------------------------------------------------- SDPA attention


@contextlib.contextmanager
def sdpa_attention(model: torch.nn.Module) -> Iterator[None]:
    """Switch a transformers model's eager attention to SDPA for the calibration, and back."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    switch = current == "eager" and hasattr(model, "set_attn_implementation")
    if current == "eager" and not getattr(model, "_supports_sdpa", False):
        warn_once(model, "sdpa", "the model offers no SDPA attention; eager attention keeps [heads, seq, seq] probabilities per layer")
        switch = False
    if switch:
        model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(current)


# ----------------------------------------------------------------------------- chunked LM loss


class HeadCapture:
    """While active, the LM head's forward returns an empty marker and records its input."""

    def __init__(self, head: torch.nn.Module):
        self.head, self.forward = head, head.forward  # the head's own forward, for the chunks
        self.hidden: torch.Tensor | None = None
        self.marker: torch.Tensor | None = None

    def _capture(self, hidden: torch.Tensor) -> torch.Tensor:
        self.hidden = hidden
        self.marker = hidden.new_empty(*hidden.shape[:-1], 0)
        return self.marker

    @contextlib.contextmanager
    def active(self) -> Iterator["HeadCapture"]:
        saved = self.head.__dict__.get("forward")
        self.head.forward = self._capture
        try:
            yield self
        finally:
            del self.head.forward
            if saved is not None:
                self.head.forward = saved

    def took(self, logits: torch.Tensor) -> bool:
        """Whether the model returned the head's output unchanged (no softcap, scale or cast)."""
        return self.marker is not None and logits is self.marker


def head_capture(model: torch.nn.Module, call: Callable[[torch.Tensor], Any]) -> HeadCapture | None:
    """A :class:`HeadCapture` for the model's LM head when its logits are the head's output
    as is (probed on 2 tokens with hooks paused); else None, with a warning."""
    from gwq_compile.calibration import logits_of

    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, torch.nn.Linear):
        warn_once(model, "chunk", "no nn.Linear output embedding; the loss is computed on the full logits")
        return None
    capture = HeadCapture(head)
    device = head.weight.device
    try:
        with torch.no_grad(), paused_hooks(), capture.active():
            took = capture.took(logits_of(call(torch.zeros(1, 2, dtype=torch.long, device=device))))
    except Exception as err:  # a model that needs more than token ids (e.g. images) to run
        warn_once(model, "chunk", f"a 2-token probe of its LM head failed ({type(err).__name__}: {err}); the loss is computed on the full logits")
        return None
    if not took:
        warn_once(model, "chunk", "its logits are not the LM head's output as is; the loss is computed on the full logits")
        return None
    capture.hidden = capture.marker = None
    return capture


def _chunk_nll(forward: Callable, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = forward(hidden).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")


class _PrecomputedGrad(torch.autograd.Function):
    """``loss`` in the forward; in the backward, hands ``grad_hidden`` (d loss / d hidden,
    already computed chunk by chunk) to ``hidden``."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, loss: torch.Tensor, grad_hidden: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(grad_hidden)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_out, None, None


def _chunks(seq: int, step: int) -> list[tuple[int, int]]:
    return [(start, min(start + step, seq - 1)) for start in range(0, seq - 1, step)]


def chunked_next_token_nll(forward: Callable, hidden: torch.Tensor, input_ids: torch.Tensor, vocab: int, head_needs_grad: bool = True) -> torch.Tensor:
    """``next_token_nll(forward(hidden), input_ids)`` with one chunk of the sequence's logits
    alive at a time.

    When the head's weight needs a gradient (a quantized head), each chunk's head +
    cross-entropy run under checkpoint and are recomputed in the backward pass, so the head
    gradient is accumulated by autograd once per backward.  Otherwise each chunk's
    gradient with respect to the hidden states is taken right away (no recomputation) and
    handed to the model's backward pass; it is the same gradient, bit for bit.
    """
    batch, seq = input_ids.shape
    targets = input_ids[:, 1:].to(hidden.device)
    chunks = _chunks(seq, max(1, CHUNK_LOGIT_ELEMENTS // (vocab * batch)))
    n = targets.numel()
    if head_needs_grad:
        total = hidden.new_zeros((), dtype=torch.float32)
        for start, end in chunks:
            total = total + checkpoint(_chunk_nll, forward, hidden[:, start:end], targets[:, start:end], use_reentrant=False)
        return total / n
    scale = torch.ones((), dtype=torch.float32, device=hidden.device) / n  # d mean / d sum, as autograd computes it
    grads, total = [], hidden.new_zeros((), dtype=torch.float32)
    for start, end in chunks:
        piece = hidden[:, start:end].detach().requires_grad_()
        with torch.enable_grad():
            loss = _chunk_nll(forward, piece, targets[:, start:end])
            grads.append(torch.autograd.grad(loss, piece, grad_outputs=scale)[0])
        total = total + loss.detach()
    last = hidden.new_zeros(batch, seq - chunks[-1][1], hidden.shape[-1])  # the last position predicts nothing
    return _PrecomputedGrad.apply(hidden, total / n, torch.cat([*grads, last], dim=1))
