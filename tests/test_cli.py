"""The gwq CLI on GWQ folders: inputs checked before the (slow) model load, dtypes honoured, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import gwq_tools.cli as cli
from gwq_compile import GWQConfig, GWQTensor, quantize_, save_quantized
from gwq_tools.cli import main
from tests.conftest import byte_tokenizer
from tests.test_eval import TEXT, _tiny_llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_llama")
    _tiny_llama().save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "eval.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def gwq_dir(tiny_dir, text_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("q") / "w4"
    args = ["quantize", str(tiny_dir), "--group-size", "32", "--calib-data", str(text_file), "--calib-seqlen", "32", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    return out


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: the error must come before it."""

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(cli, "load_model", load)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_quantize_refuses_a_gwq_checkpoint_before_loading(gwq_dir, tmp_path, capsys, no_model_load) -> None:
    rc = main(["quantize", str(gwq_dir), "--bits", "3", "--out", str(tmp_path / "again"), "--no-progress"])
    assert rc == 1 and "already a GWQ checkpoint (4 bits)" in _one_error_line(capsys)
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--calib-data", "{tmp}/missing.txt"], "does not exist"),
        (["--calib-data", "{text}", "--calib-seqlen", "128"], "--calib-seqlen 128 is longer than the model's context (64 tokens)"),
        (["--calib-data", "wikitext2"], "does not exist"),  # GWQ_DATA_DIR points at an empty folder
        (["--calib-data", "{text}", "--bits", "5"], "GWQConfig.bits must be"),
        (["--calib-data", "{text}", "--head-bits", "5"], "GWQConfig.head_bits must be"),
        (["--calib-data", "{text}", "--double-quant", "--compensation", "gptq"], "double_quant"),
    ],
)
def test_quantize_checks_its_inputs_before_loading(tiny_dir, text_file, tmp_path, capsys, monkeypatch, no_model_load, extra, message) -> None:
    monkeypatch.setenv("GWQ_DATA_DIR", str(tmp_path))
    args = [a.replace("{tmp}", str(tmp_path)).replace("{text}", str(text_file)) for a in extra]
    rc = main(["quantize", str(tiny_dir), "--out", str(tmp_path / "q"), "--no-progress", *args])
    assert rc == 1 and message in _one_error_line(capsys)


def test_eval_checks_seqlen_before_loading(tiny_dir, text_file, capsys, no_model_load) -> None:
    rc = main(["eval", "--model", str(tiny_dir), "--data-file", str(text_file), "--seqlen", "100", "--no-progress"])
    assert rc == 1 and "--seqlen 100 is longer than the model's context (64 tokens)" in _one_error_line(capsys)


def test_eval_runs_a_gwq_checkpoint_in_the_requested_dtype(gwq_dir, text_file, capsys, monkeypatch) -> None:
    seen = {}
    real = cli.load_model

    def spy(model, dtype_name, progress=True):
        seen["model"], _ = result = real(model, dtype_name, progress)
        return result

    monkeypatch.setattr(cli, "load_model", spy)
    rc = main(["eval", "--model", str(gwq_dir), "--data-file", str(text_file), "--seqlen", "32", "--dtype", "bfloat16", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    weights = [p for p in seen["model"].parameters()]
    assert {p.dtype for p in weights} == {torch.bfloat16}
    assert any(isinstance(p, GWQTensor) for p in weights)


def test_checkpoint_without_tokenizer_is_one_clear_line(text_file, tmp_path, capsys) -> None:
    model = _tiny_llama()
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(0))
    quantize_(model, GWQConfig(group_size=32, progress=False), calibration_data=ids)
    save_quantized(model, tmp_path / "no_tok")
    rc = main(["eval", "--model", str(tmp_path / "no_tok"), "--data-file", str(text_file), "--seqlen", "32", "--no-progress"])
    line = _one_error_line(capsys)
    assert rc == 1 and "has no tokenizer" in line and "save_quantized(model, dir, tokenizer=tokenizer)" in line


def test_quantize_passes_the_grid_options_through(tiny_dir, text_file, tmp_path) -> None:
    """--double-quant, --bits-budget, --head-bits and --head-group-size reach the checkpoint."""
    out = tmp_path / "dq"
    args = ["quantize", str(tiny_dir), "--group-size", "32", "--double-quant", "--bits-budget", "3.5", "--head-bits", "8",
            "--head-group-size", "32", "--calib-data", str(text_file), "--calib-seqlen", "32", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear) and isinstance(m.weight, GWQTensor)]
    assert weights and all(w.double_quant for w in weights)
    assert isinstance(model.lm_head.weight, GWQTensor) and model.lm_head.weight.bits == 8 and model.lm_head.weight.group_size == 32
    decoder = [w for w in weights if w is not model.lm_head.weight]
    mean_bits = sum(w.bits * w.numel() for w in decoder) / sum(w.numel() for w in decoder)
    assert {w.bits for w in decoder} <= {3, 4, 8} and 3 in {w.bits for w in decoder} and mean_bits <= 3.5  # the budget: mean code bits


def test_quantize_output_reloads_with_from_pretrained(gwq_dir) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gwq_dir)
    assert isinstance(model.model.layers[0].self_attn.q_proj.weight, GWQTensor)
