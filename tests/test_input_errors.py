"""quantize_ and GWQConfig: every bad input gets a clear error before any work, good inputs in any common form work."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gwq_compile import GWQConfig, GWQTensor, quantize_
from tests.conftest import tiny_llama
from tests.test_serialization import assert_same_model

CFG = GWQConfig(bits=4, group_size=32, progress=False)


@pytest.fixture
def ids():
    return torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(3))


def _quantized(data) -> torch.nn.Module:
    model = tiny_llama()
    quantize_(model, CFG, calibration_data=data)
    return model


@pytest.mark.parametrize("convert", [lambda t: t.int(), lambda t: t.numpy(), lambda t: t.tolist(), lambda t: t.to(torch.int16)], ids=["int32", "numpy", "list", "int16"])
def test_token_ids_in_any_integer_form_give_the_same_model(ids, convert) -> None:
    assert_same_model(_quantized(ids), _quantized(convert(ids)))


@pytest.mark.parametrize("bad_id", [300, 12345, -1])
def test_out_of_vocabulary_token_id_names_id_position_and_size(ids, bad_id) -> None:
    ids[0, 7] = bad_id
    with pytest.raises(ValueError, match=rf"calibration token id {bad_id} at \[0, 7\] is outside the model's vocabulary of 300 ids"):
        _quantized(ids)


def test_out_of_vocabulary_id_in_a_dict_or_a_later_batch(ids) -> None:
    bad = ids.clone()
    bad[0, 3] = 999
    with pytest.raises(ValueError, match="token id 999"):
        _quantized({"input_ids": bad})
    with pytest.raises(ValueError, match="token id 999"):
        _quantized(batch for batch in (ids, bad))


@pytest.mark.parametrize(
    "data, message",
    [
        (torch.rand(1, 8), "integer token ids"),
        (np.array([[0.5, 1.5]]), "integer token ids"),
        ("the quick brown fox", "must be token ids"),
        ([[1, 2, 3], [4, 5]], "nested lists of equal length"),
        ({"attention_mask": torch.ones(1, 4)}, "needs an 'input_ids' entry"),
    ],
)
def test_unusable_calibration_data(data, message) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        _quantized(data)


def test_meta_device_model(ids) -> None:
    with torch.device("meta"):
        model = tiny_llama()
    with pytest.raises(ValueError, match=r"layer 'model.layers.0.self_attn.q_proj' is on the meta device .*assign=True"):
        quantize_(model, CFG, calibration_data=ids)


def test_already_quantized_model_is_an_error_not_a_warning(ids) -> None:
    model = _quantized(ids)
    with pytest.raises(ValueError, match=r"already GWQ-quantized \(14 layers\)"):
        quantize_(model, CFG.replace(bits=3), calibration_data=ids)
    assert model.model.layers[0].mlp.up_proj.weight.bits == 4


@pytest.mark.parametrize("field, value", [("bits", 4.0), ("bits", "4"), ("group_size", 64.0), ("bits", True)])
def test_config_wants_ints(field, value) -> None:
    with pytest.raises(ValueError, match=f"GWQConfig.{field} must be"):
        GWQConfig(**{field: value})


def test_config_takes_numpy_ints() -> None:
    cfg = GWQConfig(bits=np.int64(3), group_size=np.int32(32))
    assert (type(cfg.bits), type(cfg.group_size)) == (int, int) and cfg.bits == 3
    layer = torch.nn.Linear(64, 8)
    assert isinstance(GWQTensor.from_float(layer.weight.detach(), None, cfg.bits, cfg.group_size), GWQTensor)
