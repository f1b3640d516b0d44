"""The streaming model-wide ranking (gwq_compile.ranking) against an exact top-k."""

from __future__ import annotations

import pytest
import torch

from gwq_compile import ranking
from gwq_compile.selection import model_outlier_counts


def exact_top_masks(scores: list[torch.Tensor], count: int) -> list[torch.Tensor]:
    """The exact top ``count`` of all layers' scores together, by a stable sort of the
    concatenation: ties go to the lower flat index (earlier layer, then row-major)."""
    flat = torch.cat([s.reshape(-1) for s in scores])
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[flat.sort(descending=True, stable=True).indices[:count]] = True
    masks, start = [], 0
    for s in scores:
        masks.append(chosen[start : start + s.numel()].view(s.shape))
        start += s.numel()
    return masks


def streaming_masks(scores: list[torch.Tensor], count: int) -> list[torch.Tensor]:
    threshold = ranking.model_threshold(iter(scores), count)
    ties = ranking.tie_shares(iter(scores), threshold)
    return [ranking.threshold_mask(s, threshold.value, t) for s, t in zip(scores, ties)]


def random_layers(seed: int, levels: int) -> list[torch.Tensor]:
    """Layers of different shapes whose scores take ``levels`` distinct values: many ties."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(17, 9), (5, 40), (64, 3), (1, 1), (33, 31)]
    layers = [torch.randint(0, levels, shape, generator=g).float() for shape in shapes]
    layers[2] = layers[2].t().contiguous().t()  # a transposed layout (Conv1D scores are views)
    return layers


@pytest.mark.parametrize("levels", [2, 5, 1000])
@pytest.mark.parametrize("seed", range(4))
def test_streaming_ranking_equals_exact_top_k_with_ties(seed: int, levels: int) -> None:
    layers = random_layers(seed, levels)
    total = sum(s.numel() for s in layers)
    for count in sorted({0, 1, 7, total // 100, total // 3, total // 2, total - 1, total}):
        expected = exact_top_masks(layers, count)
        got = streaming_masks(layers, count)
        assert sum(int(m.sum()) for m in got) == count
        for i, (g, e) in enumerate(zip(got, expected)):
            assert torch.equal(g, e), (seed, levels, count, i)


def test_running_buffer_is_exact_when_a_later_layer_holds_the_top() -> None:
    """The buffer drops scores below its minimum: a later layer's larger scores must still win."""
    layers = [torch.full((4, 4), 1.0), torch.arange(16.0).view(4, 4), torch.full((2, 2), 20.0)]
    assert streaming_masks(layers, 6)[2].all() and int(streaming_masks(layers, 6)[1].sum()) == 2
    for count in range(0, 37):
        assert all(torch.equal(g, e) for g, e in zip(streaming_masks(layers, count), exact_top_masks(layers, count)))


def test_counts_equal_topk_over_the_concatenation_without_ties() -> None:
    """On continuous scores (no ties), the shares equal the concatenated topk's (the ranking before)."""
    g = torch.Generator().manual_seed(3)
    layers = [torch.rand(shape, generator=g) for shape in [(64, 96), (200, 96), (96, 200), (300, 96)]]
    flat = torch.cat([s.reshape(-1) for s in layers])
    for ratio in (0.001, 0.005, 0.05):
        count = round(ratio * flat.numel())
        owner = torch.repeat_interleave(torch.arange(len(layers)), torch.tensor([s.numel() for s in layers]))
        expected = torch.bincount(owner[flat.topk(count).indices], minlength=len(layers)).tolist()
        assert model_outlier_counts(layers, ratio) == expected


def test_changed_scores_between_passes_are_an_error() -> None:
    layers = [torch.ones(2, 2), torch.ones(2, 2)]
    threshold = ranking.model_threshold(iter(layers), 6)
    with pytest.raises(ValueError, match="changed between"):
        ranking.tie_shares(iter([torch.zeros(2, 2), torch.zeros(2, 2)]), threshold)
