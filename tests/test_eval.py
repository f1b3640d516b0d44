"""Perplexity protocol, evaluation text sources, atomic results files and the ``gwq`` CLI (CPU, tiny models)."""

from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gwq_tools import eval as gwq_eval
from gwq_tools.cli import main
from tests.conftest import byte_tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
    "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow. "
) * 8


def _tiny_llama(context: int = 64) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=context,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_llama")
    _tiny_llama().save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture()
def text_file(tmp_path) -> Path:
    path = tmp_path / "eval.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- perplexity protocol


def _hand_perplexity(model, ids: torch.Tensor, seqlen: int, windows: int) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(windows):
            chunk = ids[w * seqlen : (w + 1) * seqlen]
            logp = torch.log_softmax(model(chunk[None]).logits[0].double(), dim=-1)
            for t in range(seqlen - 1):
                nll -= logp[t, chunk[t + 1]].item()
                count += 1
    return math.exp(nll / count)


def test_perplexity_equals_hand_computation() -> None:
    model = _tiny_llama()
    ids = torch.randint(0, 256, (1, 100), generator=torch.Generator().manual_seed(0))
    got = gwq_eval.perplexity_details(model, ids, seqlen=32, progress=False)
    assert (got.n_windows, got.n_predicted, got.n_tokens_available) == (3, 93, 100)  # the 4 leftover tokens are dropped
    assert got.perplexity == pytest.approx(_hand_perplexity(model, ids[0], 32, 3), rel=1e-5)
    assert gwq_eval.perplexity(model, ids, seqlen=32, max_windows=2, progress=False) == pytest.approx(
        _hand_perplexity(model, ids[0], 32, 2), rel=1e-5
    )


def test_perplexity_rejects_bad_settings() -> None:
    model = _tiny_llama(context=64)
    ids = torch.randint(0, 256, (1, 1000))
    with pytest.raises(ValueError, match="longer than the model's context"):
        gwq_eval.perplexity(model, ids, seqlen=128, progress=False)
    with pytest.raises(ValueError, match="fewer than one window"):
        gwq_eval.perplexity(model, ids[:, :40], seqlen=64, progress=False)
    with pytest.raises(ValueError, match="seqlen must be >= 2"):
        gwq_eval.perplexity(model, ids, seqlen=1, progress=False)
    with pytest.raises(ValueError, match="max_windows"):
        gwq_eval.perplexity(model, ids, seqlen=32, max_windows=0, progress=False)


# ----------------------------------------------------------------------------- text sources


def test_eval_text_sources(tmp_path, text_file) -> None:
    assert gwq_eval.load_eval_text("wikitext2", text_file) == TEXT
    assert gwq_eval.load_eval_text("text", text_file) == TEXT
    with pytest.raises(FileNotFoundError, match="does not exist"):
        gwq_eval.load_eval_text("wikitext2", tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="needs --data-file"):
        gwq_eval.load_eval_text("c4")
    with pytest.raises(ValueError, match="unknown dataset"):
        gwq_eval.load_eval_text("ptb")
    # C4: the first 1100 JSON-lines documents joined with " " (GPTQ's protocol), gzip or not.
    c4 = tmp_path / "c4-validation.json.gz"
    with gzip.open(c4, "wt", encoding="utf-8") as f:
        for i in range(1200):
            f.write(json.dumps({"text": f"doc {i}", "url": "u"}) + "\n")
    text = gwq_eval.load_eval_text("c4", c4)
    assert text.startswith("doc 0 doc 1 ") and text.endswith("doc 1099")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match="JSON-lines"):
        gwq_eval.load_eval_text("c4", bad)


def test_datasets_loader_reproduces_the_file(text_file) -> None:
    pytest.importorskip("datasets")
    multiline = text_file.with_name("multi.txt")
    multiline.write_text(" = Title = \n\n Body line one .\n Body line two .\n", encoding="utf-8")
    assert gwq_eval.load_eval_text("wikitext2", multiline, loader="datasets") == multiline.read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- CLI


def test_module_cli_bad_model_path_is_one_clear_line(tmp_path) -> None:
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "gwq_compile", "eval", "--model", str(tmp_path / "no_such_model"), "--output", str(out)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "TQDM_DISABLE": "1"},
    )  # fmt: skip
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("gwq eval: error:") and "does not exist" in last
    assert not out.exists()


def test_cli_eval_on_tiny_model(tiny_dir, text_file, tmp_path, capsys) -> None:
    out = tmp_path / "r.json"
    rc = main(["eval", "--model", str(tiny_dir), "--data-file", str(text_file), "--seqlen", "32", "--output", str(out), "--no-progress"])
    assert rc == 0
    record = json.loads(out.read_text())
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    ids = transformers.AutoTokenizer.from_pretrained(tiny_dir)(TEXT, return_tensors="pt").input_ids
    assert record["perplexity"] == pytest.approx(gwq_eval.perplexity(model, ids, seqlen=32, progress=False), rel=1e-6)
    assert record["n_windows"] == ids.numel() // 32 and record["seqlen"] == 32
    assert "perplexity" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--seqlen", "128"], "longer than the model's context"),  # the tiny model's context is 64
        (["--seqlen", "32", "--dataset", "c4"], "JSON-lines"),  # a plain text file is not C4
        (["--seqlen", "32", "--model", "/nonexistent/model.gguf"], "does not exist"),
        (["--seqlen", "32", "--model", "{tmp}/broken.gguf"], "could not read the GGUF metadata"),  # garbage bytes
        (["--seqlen", "32", "--data-file", "{tmp}/missing.txt"], "does not exist"),
    ],
)
def test_cli_eval_failures_leave_nothing(tiny_dir, text_file, tmp_path, capsys, extra, message) -> None:
    out = tmp_path / "r.json"
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    args = ["eval", "--model", str(tiny_dir), "--data-file", str(text_file), "--output", str(out), "--no-progress"]
    rc = main(args + [a.replace("{tmp}", str(tmp_path)) for a in extra])  # a later --model / --data-file overrides
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and message in err[0], err
    assert sorted(tmp_path.iterdir()) == sorted([text_file, broken])  # no results file, no temporary file


def test_cli_unknown_dataset_name(tiny_dir, text_file, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--model", str(tiny_dir), "--data-file", str(text_file), "--dataset", "wikitext103"])
    assert exc.value.code == 2 and "invalid choice: 'wikitext103'" in capsys.readouterr().err


def test_cli_quantize_then_eval(tiny_dir, text_file, tmp_path, capsys) -> None:
    out = tmp_path / "q"
    rc = main([
        "quantize", str(tiny_dir), "--bits", "4", "--group-size", "32", "--outlier-ratio", "0.01",
        "--calib-data", str(text_file), "--calib-seqlen", "32", "--out", str(out), "--no-progress",
    ])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "gwq"
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert "bits/weight" in capsys.readouterr().out
    rc = main(["eval", "--model", str(out), "--data-file", str(text_file), "--seqlen", "32", "--no-progress"])
    assert rc == 0
    assert "perplexity" in capsys.readouterr().out
    # A failing quantize (calibration window beyond the context) leaves no output folder.
    bad = tmp_path / "q2"
    rc = main(["quantize", str(tiny_dir), "--calib-data", str(text_file), "--calib-seqlen", "128", "--out", str(bad), "--no-progress"])
    assert rc == 1 and not bad.exists()
    assert "longer than the model's context" in capsys.readouterr().err
    # An existing non-empty --out is refused before any work.
    rc = main(["quantize", str(tiny_dir), "--out", str(out), "--no-progress"])
    assert rc == 1 and "already exists" in capsys.readouterr().err
