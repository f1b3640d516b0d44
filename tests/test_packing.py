"""The packed format: bit packing, CSR outliers, whole-weight quantize/dequantize (property-based).

The grid stage (range search, refit) is in ``tests/test_grid.py``."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gwq_compile import packing

BITS = st.sampled_from(packing.SUPPORTED_BITS)


@settings(max_examples=60, deadline=None)
@given(bits=BITS, n=st.integers(1, 9), k=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(bits: int, n: int, k: int, seed: int) -> None:
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    packed = packing.pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (n, packing.packed_row_bytes(k, bits))
    assert torch.equal(packing.unpack_codes(packed, bits, k), codes)


@pytest.mark.parametrize("bits", packing.SUPPORTED_BITS)
def test_packing_is_dense(bits: int) -> None:
    # 3 and 2 bits are really packed: bytes per row = ceil(K * bits / 8) up to one byte per plane.
    k = 4096
    assert packing.packed_row_bytes(k, bits) == k * bits // 8


@settings(max_examples=40, deadline=None)
@given(
    bits=BITS,
    n=st.integers(1, 12),
    k=st.integers(2, 260),
    group_size=st.sampled_from([-1, 16, 32, 64, 100, 128]),
    density=st.floats(0.0, 0.3),
    symmetric=st.booleans(),
    clip_search=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_quantize_weight_properties(bits, n, k, group_size, density, symmetric, clip_search, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    mask = torch.rand(n, k, generator=gen) < density
    p = packing.quantize_weight(w, mask, bits, group_size, symmetric, clip_search)
    g = packing.effective_group_size(k, group_size)
    n_groups = math.ceil(k / g)
    assert p.group_scales.shape == (n, n_groups) and p.group_scales.dtype == torch.float16
    assert p.group_zeros.shape == (n, n_groups) and p.group_zeros.dtype == torch.uint8
    assert p.outlier_values.numel() == int(mask.sum())
    assert torch.equal(packing.csr_to_mask(p.outlier_row_ptr, p.outlier_col_idx, (n, k)), mask)

    dense = packing.dequantize_weight(p)
    # outliers are stored exactly at fp16
    assert torch.equal(dense[mask], w[mask].half().float())
    # non-outliers take at most 2**bits distinct values per group, and lie on the group grid
    codes = packing.unpack_codes(p.packed_codes, bits, k)
    for gi in range(n_groups):
        cols = slice(gi * g, min(k, (gi + 1) * g))
        block = dense[:, cols].masked_fill(mask[:, cols], float("nan"))
        for row in {0, n - 1}:
            vals = block[row][~block[row].isnan()]
            assert vals.unique().numel() <= 2**bits
    # without clipping, a non-outlier is off by at most half a step (plus the fp16
    # rounding of the scale, which the zero point's rounding can amplify by maxq)
    scales = p.group_scales.float().repeat_interleave(g, 1)[:, :k]
    err = (dense - w).abs()[~mask]
    if not clip_search and not symmetric:
        assert (err <= scales[~mask] * (0.5 + (2**bits) * 2**-10) + 1e-6).all()
    assert int(codes.max()) < 2**bits


def test_outliers_excluded_from_group_range() -> None:
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 0.01  # seeded: the global RNG made it flaky
    w[0, 5] = 50.0  # a huge outlier would stretch the grid of its group
    mask = torch.zeros_like(w, dtype=torch.bool)
    mask[0, 5] = True
    with_mask = packing.quantize_weight(w, mask, 4, 64)
    without = packing.quantize_weight(w, None, 4, 64)
    assert with_mask.group_scales[0, 0] < 0.01 < without.group_scales[0, 0]
    err = (packing.dequantize_weight(with_mask) - w).abs()
    assert err[~mask].max() < 0.002
    assert err[0, 5] < 0.02  # fp16 rounding of 50.0 only


def test_partial_last_group_matches_smollm2_shape() -> None:
    # SmolLM2: in_features 576 with group 128 -> 4 full groups + one of 64
    w = torch.randn(8, 576)
    p = packing.quantize_weight(w, None, 4, 128)
    assert p.group_scales.shape == (8, 5)
    assert (packing.dequantize_weight(p) - w).abs().max() < 0.5


def test_bad_bits_and_group_size() -> None:
    with pytest.raises(ValueError, match="bits"):
        packing.quantize_weight(torch.randn(2, 8), None, 5, 8)
    with pytest.raises(ValueError, match="group_size"):
        packing.quantize_weight(torch.randn(2, 8), None, 4, 0)


def test_outlier_out_of_fp16_range_is_rejected() -> None:
    w = torch.randn(2, 8)
    w[0, 0] = 1e6
    mask = torch.zeros_like(w, dtype=torch.bool)
    mask[0, 0] = True
    with pytest.raises(ValueError, match="fp16"):
        packing.quantize_weight(w, mask, 4, 8)
