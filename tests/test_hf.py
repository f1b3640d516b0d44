"""transformers integration: from_pretrained / save_pretrained of GWQ folders, quantize on load, the TorchAoConfig route."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, TorchAoConfig

import gwq_compile
from gwq_compile import GWQConfig, GWQHfConfig, GWQTensor, quantize_, save_quantized
from gwq_compile import serialization as ser
from gwq_tools.data import calibration_tokens
from gwq_compile.hf_quantizer import GWQHfQuantizer
from tests.conftest import byte_tokenizer, tiny_llama
from tests.test_serialization import assert_same_model

CFG = GWQConfig(bits=3, group_size=32, outlier_ratio=0.02, progress=False)


def _quantized(token_ids, tie: bool) -> torch.nn.Module:
    model = tiny_llama(tie=tie)
    quantize_(model, CFG, calibration_data=token_ids[:1])
    return model


@pytest.mark.parametrize("tie", [False, True], ids=["llama", "tied_embeddings"])
def test_save_pretrained_from_pretrained_is_bit_exact(token_ids, tmp_path, tie) -> None:
    model = _quantized(token_ids, tie)
    assert isinstance(model.hf_quantizer, GWQHfQuantizer)
    model.save_pretrained(tmp_path / "ck")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    assert_same_model(model, loaded)
    assert torch.equal(loaded(token_ids).logits, model(token_ids).logits)
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) is tie
    assert isinstance(loaded.hf_quantizer, GWQHfQuantizer) and loaded._gwq_config == CFG.replace(step=None)
    assert not loaded.model.layers[0].self_attn.q_proj.weight.requires_grad
    # and again: a reloaded model saves the same tensors
    loaded.save_pretrained(tmp_path / "again")
    assert_same_model(model, AutoModelForCausalLM.from_pretrained(tmp_path / "again"))


def test_weights_tied_between_linears_are_tied_again(token_ids, tmp_path, caplog) -> None:
    """A tie transformers does not know about (two Linears, one weight): stored once, tied on load."""
    model = tiny_llama()
    model.model.layers[1].mlp.up_proj.weight = model.model.layers[0].mlp.up_proj.weight
    quantize_(model, CFG, calibration_data=token_ids[:1])
    model.save_pretrained(tmp_path / "ck")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    assert loaded.model.layers[1].mlp.up_proj.weight is loaded.model.layers[0].mlp.up_proj.weight
    assert torch.equal(loaded(token_ids).logits, model(token_ids).logits)
    assert "MISSING" not in caplog.text


def test_from_pretrained_in_bf16(token_ids, tmp_path) -> None:
    model = _quantized(token_ids, tie=True)
    model.save_pretrained(tmp_path / "ck")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.bfloat16)
    weight = loaded.model.layers[0].mlp.up_proj.weight
    assert isinstance(weight, GWQTensor) and weight.dtype == torch.bfloat16
    assert torch.equal(weight.packed().packed_codes, model.model.layers[0].mlp.up_proj.weight.packed().packed_codes)
    assert loaded(token_ids).logits.dtype == torch.bfloat16


def test_from_pretrained_with_a_device_map(token_ids, tmp_path) -> None:
    model = _quantized(token_ids, tie=True)
    model.save_pretrained(tmp_path / "ck")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ck", device_map="cpu")
    assert_same_model(model, loaded)


def test_one_layout_for_save_quantized_and_save_pretrained(token_ids, tmp_path) -> None:
    model = _quantized(token_ids, tie=True)
    model.save_pretrained(tmp_path / "sp")
    save_quantized(model, tmp_path / "sq", tokenizer=byte_tokenizer())
    sp, sq = sorted(p.name for p in (tmp_path / "sp").iterdir()), sorted(p.name for p in (tmp_path / "sq").iterdir())
    assert set(sp) == {"config.json", "generation_config.json", ser.WEIGHTS_FILE}
    assert set(sq) - set(sp) == {"tokenizer.json", "tokenizer_config.json"} and set(sp) <= set(sq)
    headers = []
    for folder in ("sp", "sq"):
        with safe_open(tmp_path / folder / ser.WEIGHTS_FILE, framework="pt") as f:
            headers.append((sorted(f.keys()), f.metadata()))
    assert headers[0] == headers[1]
    configs = [json.loads((tmp_path / f / "config.json").read_text())["quantization_config"] for f in ("sp", "sq")]
    assert configs[0] == configs[1] and configs[0]["quant_method"] == "gwq" and configs[0]["format_version"] == ser.FORMAT_VERSION


WITHOUT_GWQ = textwrap.dedent(
    """
    import sys
    from transformers import AutoModelForCausalLM
    try:
        AutoModelForCausalLM.from_pretrained(sys.argv[1])
    except Exception as err:
        print("FAILED:", type(err).__name__, "| gwq_compile imported:", "gwq_compile" in sys.modules)
        sys.exit(3)
    print("LOADED A MODEL")
    """
)


def test_without_gwq_compile_from_pretrained_fails_loudly(token_ids, tmp_path) -> None:
    _quantized(token_ids, tie=True).save_pretrained(tmp_path / "ck")
    proc = subprocess.run([sys.executable, "-c", WITHOUT_GWQ, str(tmp_path / "ck")], capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 3 and "LOADED A MODEL" not in output, output[-3000:]
    assert "gwq_compile imported: False" in proc.stdout
    assert "Unknown quantization type, got gwq" in output  # transformers' own warning
    assert "weight_gwq_compile_group_scales" in output and "MISMATCH" in output  # its load report names the GWQ fields


def test_corrupted_folder_fails_to_load(token_ids, tmp_path, caplog) -> None:
    _quantized(token_ids, tie=True).save_pretrained(tmp_path / "ck")
    path = tmp_path / "ck" / ser.WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="CONVERSION"):  # transformers collects the errors of each weight
        AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    assert "does not match its sha256" in caplog.text  # ours, in its load report


@pytest.fixture
def fp_dir(tmp_path):
    path = tmp_path / "fp"
    tiny_llama(tie=True).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def test_quantize_on_load_calibrates_on_the_default_text(fp_dir, tmp_path) -> None:
    config = GWQHfConfig(bits=4, group_size=32, progress=False, seq_len=64)
    model = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=config)
    assert isinstance(model.model.layers[1].mlp.down_proj.weight, GWQTensor)
    # the same as quantize_ by hand on the same calibration window
    by_hand = AutoModelForCausalLM.from_pretrained(fp_dir)
    ids = calibration_tokens(byte_tokenizer(), "default", 1, 64, 0)
    quantize_(by_hand, GWQConfig(bits=4, group_size=32, progress=False), calibration_data=ids)
    assert_same_model(by_hand, model)
    model.save_pretrained(tmp_path / "q")
    assert_same_model(model, AutoModelForCausalLM.from_pretrained(tmp_path / "q"))


def test_quantize_on_load_with_token_ids(fp_dir, token_ids) -> None:
    model = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=GWQHfConfig(CFG, calibration_data=token_ids[:1]))
    by_hand = AutoModelForCausalLM.from_pretrained(fp_dir)
    quantize_(by_hand, CFG, calibration_data=token_ids[:1])
    assert_same_model(by_hand, model)


def test_quantize_on_load_without_tokenizer_says_what_to_pass(tmp_path) -> None:
    tiny_llama().save_pretrained(tmp_path / "fp")
    with pytest.raises(ValueError, match=r"found no tokenizer .*GWQHfConfig\(tokenizer=\.\.\.\)"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=GWQHfConfig(bits=4, progress=False))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"bitz": 4}, TypeError, r"unknown arguments \['bitz'\]"),
        ({"bits": 5}, ValueError, "GWQConfig.bits must be"),
        ({"format_version": 1}, ValueError, "format version 1"),
        ({"config": CFG, "bits": 4}, TypeError, "not both"),
        ({"seq_len": 1}, ValueError, "seq_len must be an int >= 2"),
    ],
)
def test_gwq_hf_config_rejects_bad_arguments(kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        GWQHfConfig(**kwargs)


def test_torchao_one_shot_fails_in_one_line(fp_dir) -> None:
    with pytest.raises(ValueError) as info:
        AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=TorchAoConfig(GWQConfig(progress=False)))
    assert "cannot calibrate while loading" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("convert_with", ["gwq_compile", "torchao"])
def test_torchao_prepare_backward_convert_saves_and_reloads(fp_dir, token_ids, tmp_path, convert_with) -> None:
    model = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=TorchAoConfig(GWQConfig(step="prepare")))
    model(token_ids[:1], labels=token_ids[:1]).loss.backward()
    convert = GWQConfig(step="convert", bits=4, group_size=32, progress=False)
    if convert_with == "gwq_compile":
        quantize_(model, convert)
    else:
        import torchao

        torchao.quantization.quantize_(model, convert, filter_fn=gwq_compile.gwq_filter(model, convert))
    assert isinstance(model.model.layers[0].self_attn.q_proj.weight, GWQTensor)
    model.save_pretrained(tmp_path / "q")
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["quant_method"] == "gwq"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert_same_model(model, loaded)
    assert torch.equal(loaded(token_ids).logits, model(token_ids).logits)


def test_dequantize_gives_a_dense_model(token_ids) -> None:
    model = _quantized(token_ids, tie=True)
    expected = model.model.layers[0].self_attn.q_proj.weight.dequantize()
    model.dequantize()
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert type(weight) is torch.nn.Parameter and torch.equal(weight, expected)
    assert not hasattr(model, "hf_quantizer") and not hasattr(model.config, "quantization_config")
