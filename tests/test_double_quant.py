"""Double-quantized grids (``GWQConfig.double_quant``): 8-bit scale codes under a power-of-two row
exponent, zeros at the code width; exact in checkpoints, counted as stored, same kernels."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from gwq_compile import GWQConfig, GWQTensor, load_quantized, quantization_report, quantize_, save_quantized
from gwq_compile import distributed, grid, packing
from gwq_compile import serialization as ser
from tests.conftest import tiny_llama
from tests.test_serialization import assert_same_model

CFG = GWQConfig(bits=4, group_size=32, outlier_ratio=0.02, double_quant=True, progress=False)


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from(packing.SUPPORTED_BITS),
    n=st.integers(1, 10),
    k=st.integers(2, 260),
    group_size=st.sampled_from([-1, 16, 32, 64, 100]),
    density=st.floats(0.0, 0.3),
    symmetric=st.booleans(),
    clip_search=st.sampled_from([False, "mse", "mse_wls"]),
    spread=st.floats(1e-6, 1e3),
    seed=st.integers(0, 2**16),
)
def test_scales_lie_on_the_row_grid_and_the_stored_form_is_exact(bits, n, k, group_size, density, symmetric, clip_search, spread, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen) * spread  # rows of very different magnitudes
    mask = torch.rand(n, k, generator=gen) < density
    p = packing.quantize_weight(w, mask, bits, group_size, symmetric, clip_search, double_quant=True)
    assert p.double_quant and p.group_scales.dtype == torch.float16
    exponents = grid.scale_exponents(p.group_scales)
    codes = p.group_scales.float() / torch.exp2(exponents.float()).unsqueeze(-1)
    assert torch.equal(codes, codes.round()) and bool((codes >= 1).all()) and bool((codes <= 255).all())
    stored_scales, stored_zeros = packing.encode_grid(p.group_scales, p.group_zeros, bits)
    assert stored_scales.dtype == torch.uint8 and stored_scales.shape == (n, p.group_scales.shape[1] + 1)
    scales, zeros = packing.decode_grid(stored_scales, stored_zeros, bits)
    assert torch.equal(scales, p.group_scales) and torch.equal(zeros, p.group_zeros)
    # what the report counts is what the stored form holds
    bits_of = packing.storage_bits(p)
    assert bits_of["scales"] == stored_scales.numel() * 8 and bits_of["zeros"] == stored_zeros.numel() * 8
    # outliers stay exact, and the dense part is still on the grid (code - zero) * scale
    dense = packing.dequantize_weight(p)
    assert torch.equal(dense[mask], w[mask].half().float())


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("clip_search", [False, "mse"])
def test_double_quant_costs_little_error_at_low_bits(bits, clip_search) -> None:
    # 8-bit scale codes are much finer than a 2-4 bit code grid: within 1 % of the fp16 grid's error
    # (measured 0.9997-1.0018x); an exponent or code off by one step costs far more than that.
    w = torch.randn(64, 576, generator=torch.Generator().manual_seed(bits)) * torch.linspace(0.01, 1, 64).unsqueeze(1)
    errors = [
        (packing.dequantize_weight(packing.quantize_weight(w, None, bits, 32, clip_search=clip_search, double_quant=dq)) - w).square().mean()
        for dq in (False, True)
    ]
    assert errors[1] <= 1.01 * errors[0]


def test_the_stored_grid_rejects_scales_off_the_grid_and_wide_zeros() -> None:
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    plain = packing.quantize_weight(w, None, 4, 32)
    with pytest.raises(ValueError, match="power-of-two grid"):
        packing.encode_grid(plain.group_scales, plain.group_zeros, 4)
    dq = packing.quantize_weight(w, None, 4, 32, double_quant=True)
    with pytest.raises(ValueError, match="does not fit in 2 bits"):
        packing.encode_grid(dq.group_scales, dq.group_zeros.clamp(min=4), 2)
    with pytest.raises(ValueError, match="power-of-two grid"):  # an algorithm's own scales must be on the stored grid
        packing.quantize_weight(w, None, 4, 32, group_scales=plain.group_scales, group_zeros=plain.group_zeros, double_quant=True)


def test_config_refuses_double_quant_with_gptq_and_non_bools() -> None:
    with pytest.raises(ValueError, match="double_quant needs compensation='none'"):
        GWQConfig(double_quant=True, compensation="gptq_act")
    with pytest.raises(ValueError, match="double_quant must be True or False"):
        GWQConfig(double_quant=1)


def test_quantize_save_load_and_hf_round_trip_are_exact(token_ids, tmp_path) -> None:
    plain, dq = tiny_llama(), tiny_llama()
    quantize_(plain, CFG.replace(double_quant=False), calibration_data=token_ids[:1])
    quantize_(dq, CFG, calibration_data=token_ids[:1])
    weight = dq.model.layers[0].mlp.down_proj.weight
    assert isinstance(weight, GWQTensor) and weight.double_quant and weight.code_layout == "cpu_int4"
    # 4-bit g32: 8 + 4 bits a group (+ 8 bits a row exponent) instead of 16 + 8
    n, k = weight.shape
    groups = n * ((k + 31) // 32)
    def grid_bits(model):  # (the outliers differ: their model-wide ranking scores each grid's own rounding error)
        parts = quantization_report(model)["layers"]["model.layers.0.mlp.down_proj"]["bits_breakdown"]
        return (parts["scales"] + parts["zeros"]) * weight.numel()

    per_row = (k + 31) // 32
    assert grid_bits(plain) == pytest.approx(24 * groups)
    assert grid_bits(dq) == pytest.approx(n * (8 * per_row + 8 + 8 * ((4 * per_row + 7) // 8)))  # zeros padded to a byte a row
    # the fast path runs on the decoded grid and matches the reference
    x = torch.randn(3, k)
    ref = x @ weight.dequantize().T
    assert torch.allclose(torch.nn.functional.linear(x, weight), ref, rtol=2e-2, atol=2e-2)  # the CPU kernel computes in bf16

    save_quantized(dq, tmp_path / "ck")
    with safe_open(tmp_path / "ck" / ser.WEIGHTS_FILE, framework="pt") as f:
        key = ser.field_key("model.layers.0.mlp.down_proj.weight", "group_scales")
        stored = f.get_tensor(key)
        assert stored.dtype == torch.uint8 and stored.shape == (n, (k + 31) // 32 + 1)
        layers = ser.read_header(tmp_path / "ck" / ser.WEIGHTS_FILE)[ser.META_LAYERS]
    assert layers["model.layers.0.mlp.down_proj.weight"]["double_quant"] is True
    loaded = load_quantized(tiny_llama(seed=5), tmp_path / "ck")
    assert_same_model(dq, loaded)
    assert loaded.model.layers[0].mlp.down_proj.weight.double_quant
    assert torch.equal(loaded(token_ids).logits, dq(token_ids).logits)

    dq.save_pretrained(tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf.model.layers[1].self_attn.q_proj.weight.double_quant
    assert torch.equal(hf(token_ids).logits, dq(token_ids).logits)


def test_moves_pickles_and_row_merges_keep_double_quant(tmp_path) -> None:
    w = torch.randn(40, 100, generator=torch.Generator().manual_seed(2))
    qw = GWQTensor.from_float(w, torch.rand(40, 100) < 0.05, 3, 32, double_quant=True)
    assert qw.to(torch.bfloat16).double_quant and qw.to_layout("planes").double_quant
    torch.save(qw, tmp_path / "w.pt")
    back = torch.load(tmp_path / "w.pt", weights_only=True)
    assert back.double_quant and torch.equal(back.dequantize(), qw.dequantize())
    halves = [tuple(GWQTensor.from_float(part, None, 3, 32, double_quant=True).packed()) for part in (w[:25], w[25:])]
    merged = distributed.merge_rows(halves)
    assert merged.double_quant and packing.storage_bits(merged)["scales"] == 40 * (4 * 8 + 8)
