"""save_quantized / load_quantized: bit-exact, meta skeletons, and every way a checkpoint can be wrong."""

from __future__ import annotations

import json

import pytest
import torch

from gwq_compile import GWQConfig, GWQTensor, load_quantized, quantize_, save_quantized
from gwq_compile.serialization import MANIFEST_FILE, WEIGHTS_FILE
from tests.conftest import tiny_llama

CFG = GWQConfig(bits=3, group_size=64, outlier_ratio=0.02, progress=False)


@pytest.fixture
def quantized(token_ids):
    model = tiny_llama()
    quantize_(model, CFG, calibration_data=token_ids[:1])
    return model


def _skeleton(device: str = "cpu"):
    with torch.device(device):
        return tiny_llama(seed=123)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_round_trip_is_bit_exact(quantized, token_ids, tmp_path, device) -> None:
    save_quantized(quantized, tmp_path / "ck")
    loaded = load_quantized(_skeleton(device), tmp_path / "ck")
    for (n1, t1), (n2, t2) in zip(quantized.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and type(t1) is type(t2)
        if isinstance(t1, GWQTensor):
            assert t1.code_layout == t2.code_layout == "cpu_int4"
            for a, b in zip(t1.packed(), t2.packed()):
                assert a == b if isinstance(a, int) else torch.equal(a, b), n1
        else:
            assert torch.equal(t1, t2), n1
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded(token_ids).logits, quantized(token_ids).logits)
    assert loaded._gwq_config == CFG


def test_save_leaves_no_temp_files(quantized, tmp_path) -> None:
    save_quantized(quantized, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([MANIFEST_FILE, WEIGHTS_FILE])


def test_failed_save_leaves_nothing_half_written(quantized, tmp_path, monkeypatch) -> None:
    import gwq_compile.serialization as ser

    def boom(tensors, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ser, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(quantized, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_truncated_file(quantized, tmp_path) -> None:
    save_quantized(quantized, tmp_path)
    data = (tmp_path / WEIGHTS_FILE).read_bytes()
    (tmp_path / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_quantized(_skeleton(), tmp_path)


def test_corrupted_file(quantized, tmp_path) -> None:
    save_quantized(quantized, tmp_path)
    data = bytearray((tmp_path / WEIGHTS_FILE).read_bytes())
    data[-10] ^= 0xFF
    (tmp_path / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted"):
        load_quantized(_skeleton(), tmp_path)


def test_unknown_format_version(quantized, tmp_path) -> None:
    save_quantized(quantized, tmp_path)
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    manifest["format_version"] = 99
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="version 99"):
        load_quantized(_skeleton(), tmp_path)


def test_mismatched_model(quantized, tmp_path) -> None:
    save_quantized(quantized, tmp_path)
    with pytest.raises(ValueError, match="does not match"):
        load_quantized(tiny_llama(hidden=64, inter=128), tmp_path)
    other = tiny_llama()
    other.extra = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="extra"):
        load_quantized(other, tmp_path)


def test_missing_checkpoint(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no GWQ checkpoint"):
        load_quantized(_skeleton(), tmp_path / "nope")
