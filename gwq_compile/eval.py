"""Perplexity with the standard protocol (see ``../shared/data/README.md``).

Join the text, tokenize once, cut into non-overlapping windows of ``seqlen`` tokens,
report ``exp(mean next-token NLL over all predicted tokens)``.

Example:
    >>> from gwq_compile.eval import perplexity
    >>> ppl = perplexity(model, token_ids, seqlen=512, max_windows=8)   # doctest: +SKIP
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


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


def context_length(model) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None)


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    token_ids: torch.Tensor,
    seqlen: int = 2048,
    max_windows: int | None = None,
    progress: bool = True,
    desc: str = "perplexity",
) -> float:
    """Perplexity of ``model`` on ``token_ids`` (``[T]`` or ``[1, T]``) in non-overlapping windows."""
    ids = token_ids.reshape(-1)
    limit = context_length(model)
    if limit is not None and seqlen > limit:
        raise ValueError(f"seqlen={seqlen} is longer than the model's context ({limit} tokens)")
    n_windows = ids.numel() // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise ValueError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for i in tqdm(range(n_windows), desc=desc, disable=not progress, leave=False):
        window = ids[i * seqlen : (i + 1) * seqlen].unsqueeze(0).to(device)
        nll = next_token_nll(logits_of(model(window)), window, reduction="sum")
        total_nll += nll.item()
        total_tokens += seqlen - 1
    return math.exp(total_nll / total_tokens)
