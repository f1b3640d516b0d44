"""The model-wide outlier ranking, one layer at a time.

``outlier_scope="model"`` keeps the ``count = round(outlier_ratio * weights)`` highest
scores of the whole model.  Those are every score above the model's ``count``-th largest
score ``t``, plus as many scores equal to ``t`` as are needed to reach ``count``.  So the
ranking needs ``t`` and, per layer, two comparisons, never the model's scores side by side:

1. :func:`model_threshold` streams over the layers' scores with a running buffer of the
   ``count`` largest scores seen so far (``outlier_ratio`` of the model, 4 bytes each:
   2 MB for SmolLM2-135M at 0.5 %, 140 MB for a 7B model).  ``t`` is the buffer's minimum.
2. :func:`tie_shares` streams over them again and hands out the scores equal to ``t``
   (ties) in layer order: each layer takes as many as are left.
3. :func:`threshold_mask` builds one layer's mask when it is packed: ``scores > t``, plus
   its first ``ties`` scores equal to ``t`` in row-major order.

Ties are broken by (layer order, row-major position), deterministically.  ``torch.topk``
over the concatenated scores (the ranking before this one) broke them in an
implementation-defined order; with real gradients ties at ``t`` are rare (the SmolLM2
benchmark, ``benchmarks/results/calibration_memory_smollm2.md``, counts the masks' differences).

Example:
    >>> import torch
    >>> layers = [torch.tensor([[9.0, 1.0]]), torch.tensor([[8.0, 1.0]])]
    >>> t = model_threshold(iter(layers), 3)
    >>> t.value, t.ties
    (1.0, 1)
    >>> shares = tie_shares(iter(layers), t)
    >>> shares
    [1, 0]
    >>> [threshold_mask(s, t.value, n).tolist() for s, n in zip(layers, shares)]
    [[[True, True]], [[True, False]]]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch


@dataclass(frozen=True)
class Threshold:
    """Where the model-wide top ``count`` ends.

    Attributes:
        value: the ``count``-th largest score ``t`` (``inf`` when ``count`` is 0: nothing is above).
        ties: how many scores equal to ``t`` are among the top ``count``, model-wide.
    """

    value: float
    ties: int


def _merge_top(buffer: torch.Tensor, scores: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` largest of ``buffer`` and ``scores`` (as a multiset, unordered)."""
    flat = scores.detach().reshape(-1).float()
    if buffer.numel() == count:  # a score not above the buffer's minimum cannot change the multiset
        flat = flat[flat > buffer.min()]
    if flat.numel() > count:
        flat = flat.topk(count, sorted=False).values
    merged = torch.cat([buffer, flat])
    return merged if merged.numel() <= count else merged.topk(count, sorted=False).values


def top_scores(scores: Iterable[torch.Tensor], count: int) -> torch.Tensor:
    """The ``count`` largest scores over all layers (fewer when there are fewer), unordered."""
    buffer = None
    for layer in scores:
        if buffer is None:
            buffer = torch.empty(0, device=layer.device)
        buffer = _merge_top(buffer, layer.to(buffer.device), count)
    return torch.empty(0) if buffer is None else buffer


def threshold_of(top: torch.Tensor, count: int) -> Threshold:
    """The threshold from the ``count`` largest scores (:func:`top_scores`)."""
    if count == 0 or top.numel() == 0:
        return Threshold(float("inf"), 0)
    value = top.min()
    return Threshold(float(value), count - int((top > value).sum()))


def model_threshold(scores: Iterable[torch.Tensor], count: int, distributed: bool = False) -> Threshold:
    """Pass 1: the model's ``count``-th largest score and how many ties at it are outliers.

    ``distributed``: each process streams over its own rows of every layer (FSDP2 shards);
    the processes' top buffers are all-gathered and merged, so all agree on one threshold.
    """
    if count < 0:
        raise ValueError(f"the outlier count must be >= 0, got {count}")
    if count == 0:
        return Threshold(float("inf"), 0)
    top = top_scores(scores, count)
    if distributed:
        top = _merge_top(torch.empty(0), torch.cat(_all_gather_varlen(top.cpu())), count)
    return threshold_of(top, count)


def above_and_equal(scores: torch.Tensor, value: float) -> tuple[int, int]:
    """How many of one layer's scores are above ``value`` and equal to it."""
    return int((scores > value).sum()), int((scores == value).sum())


def share_ties(equal_counts: Iterable[int], ties: int) -> list[int]:
    """Hand ``ties`` out over layers in order, each taking as many as it has (or as are left)."""
    shares = []
    for equal in equal_counts:
        take = min(equal, ties)
        shares.append(take)
        ties -= take
    if ties:
        raise ValueError(f"the scores changed between the ranking's passes: {ties} ties at the threshold are missing")
    return shares


def tie_shares(scores: Iterable[torch.Tensor], threshold: Threshold, distributed: bool = False) -> list[int]:
    """Pass 2: each layer's number of outliers equal to the threshold.

    ``distributed``: rank ``r`` holds the ``r``-th block of rows of each layer, so the
    model's row-major order is (layer, rank): the ties are handed out in that order over
    the all-gathered per-rank counts, which gives each rank the share one process would.
    """
    equal = [above_and_equal(s, threshold.value)[1] for s in scores]
    if not distributed:
        return share_ties(equal, threshold.ties)
    import torch.distributed as dist

    per_rank = torch.stack(_all_gather_varlen(torch.tensor(equal, dtype=torch.int64)))  # [world, layers]
    shares = torch.tensor(share_ties(per_rank.t().reshape(-1).tolist(), threshold.ties)).view(len(equal), -1)
    return shares[:, dist.get_rank()].tolist()


def layer_counts(scores: list[torch.Tensor], ratio: float) -> list[int]:
    """Each layer's share of the model's ``round(ratio * total)`` highest scores (ties at the
    boundary go to the earlier layers); all layers' scores given at once, for tests and tools.

    Example:
        >>> layer_counts([torch.tensor([[9.0, 1.0]]), torch.tensor([[8.0, 7.0]])], 0.5)
        [1, 1]
        >>> layer_counts([torch.tensor([[9.0, 1.0]]), torch.tensor([[8.0, 7.0]])], 0.75)
        [1, 2]
    """
    threshold = model_threshold(iter(scores), round(ratio * sum(s.numel() for s in scores)))
    ties = tie_shares(iter(scores), threshold)
    return [above_and_equal(s, threshold.value)[0] + t for s, t in zip(scores, ties)]


def _all_gather_varlen(t: torch.Tensor) -> list[torch.Tensor]:
    """Every process's 1-D ``t`` (lengths may differ), in rank order."""
    import torch.distributed as dist

    world = dist.get_world_size()
    lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(lengths, torch.tensor([t.numel()]))
    longest = int(max(n.item() for n in lengths))
    padded = torch.cat([t, t.new_zeros(longest - t.numel())])
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return [o[: int(n.item())] for o, n in zip(out, lengths)]


def threshold_mask(scores: torch.Tensor, value: float, ties: int) -> torch.Tensor:
    """One layer's outliers: bool ``scores.shape``, its scores above ``value`` and its first
    ``ties`` scores equal to ``value`` (row-major order)."""
    mask = (scores > value).contiguous()  # scores may be a transposed view (Conv1D gradients)
    if ties:
        equal = (scores == value).reshape(-1).nonzero().squeeze(1)
        if equal.numel() < ties:
            raise ValueError(f"{ties} ties at the threshold were assigned to a layer that has {equal.numel()}")
        mask.view(-1)[equal[:ties]] = True
    return mask
