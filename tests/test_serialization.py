"""save_quantized / load_quantized: bit-exact, meta skeletons, crash-safe overwrites, and every way a checkpoint can be wrong."""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gwq_compile import GWQConfig, GWQTensor, load_quantized, quantize_, save_quantized
from gwq_compile import atomic_write
from gwq_compile import serialization as ser
from tests.conftest import tiny_llama

CFG = GWQConfig(bits=3, group_size=64, outlier_ratio=0.02, progress=False)


@pytest.fixture
def quantized(token_ids):
    model = tiny_llama()
    quantize_(model, CFG, calibration_data=token_ids[:1])
    return model


def _skeleton(device: str = "cpu", dtype: torch.dtype = torch.float32):
    with torch.device(device):
        return tiny_llama(seed=123, dtype=dtype)


def assert_same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Every tensor of the state dicts equal, GWQ fields included, same types."""
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        t1, t2 = sa[name], sb[name]
        assert type(t1) is type(t2) and t1.dtype == t2.dtype, name
        if isinstance(t1, GWQTensor):
            assert t1.code_layout == t2.code_layout, name
            for a, b in zip(t1.packed(), t2.packed()):
                assert a == b if isinstance(a, int) else torch.equal(a, b), name
        else:
            assert torch.equal(t1, t2), name


def _rewrite_header(path, **changes) -> None:
    """Rewrite model.safetensors with some header entries changed (None: removed)."""
    file = path / ser.WEIGHTS_FILE
    with safe_open(file, framework="pt") as f:
        metadata = dict(f.metadata())
    tensors = load_file(file)
    for key, value in changes.items():
        if value is None:
            metadata.pop(key)
        else:
            metadata[key] = value
    save_file(tensors, file, metadata=metadata)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_round_trip_is_bit_exact(quantized, token_ids, tmp_path, device) -> None:
    save_quantized(quantized, tmp_path / "ck")
    loaded = load_quantized(_skeleton(device), tmp_path / "ck")
    assert_same_model(quantized, loaded)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded(token_ids).logits, quantized(token_ids).logits)
    assert loaded._gwq_config == CFG


def test_plain_module_round_trip_on_meta(tmp_path) -> None:
    """Not a transformers model: the folder holds model.safetensors alone, non-persistent buffers included."""

    def build():
        model = torch.nn.Sequential(torch.nn.Embedding(50, 64), torch.nn.Linear(64, 50))
        model.register_buffer("scale", torch.full((3,), 2.0), persistent=False)
        return model

    torch.manual_seed(0)
    model = build()
    ids = torch.randint(0, 50, (1, 24))
    quantize_(model, GWQConfig(group_size=32, skip_modules=(), progress=False), calibration_data=ids)
    save_quantized(model, tmp_path / "ck")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [ser.WEIGHTS_FILE]
    with torch.device("meta"):
        skeleton = build()
    loaded = load_quantized(skeleton, tmp_path / "ck")
    assert_same_model(model, loaded)
    assert torch.equal(loaded.scale, model.scale)


def test_transformers_layout_permissions_and_no_temp_files(quantized, tmp_path) -> None:
    old_umask = os.umask(0o022)
    try:
        out = save_quantized(quantized, tmp_path / "ck")
    finally:
        os.umask(old_umask)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", ser.WEIGHTS_FILE]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gwq" and qc["format_version"] == ser.FORMAT_VERSION
    assert (qc["bits"], qc["group_size"], qc["outlier_ratio"]) == (3, 64, 0.02)
    fields = set(CFG.to_dict())
    assert not fields & {"step", "progress"}
    assert set(qc) == {"quant_method", "format_version"} | fields  # the model's quantization, nothing of one run
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}


def test_run_fields_are_not_recorded_and_old_checkpoints_with_them_load(quantized, tmp_path) -> None:
    """``progress`` (a display flag) and ``step`` describe one run: the header leaves them out, and
    a checkpoint written before that (which holds them) still loads to the same config."""
    out = save_quantized(quantized, tmp_path / "ck")
    with safe_open(out / ser.WEIGHTS_FILE, framework="pt") as f:
        recorded = json.loads(f.metadata()[ser.META_CONFIG])
    assert recorded == CFG.to_dict() and not {"step", "progress"} & set(recorded)
    _rewrite_header(out, **{ser.META_CONFIG: json.dumps({**recorded, "progress": True, "step": None})})
    loaded = load_quantized(_skeleton(), out)
    assert loaded._gwq_config == CFG  # equality ignores progress; loading gives the default
    assert_same_model(quantized, loaded)


def test_overwrite_keeps_other_files_and_replaces_weights(quantized, token_ids, tmp_path) -> None:
    out = tmp_path / "ck"
    first = tiny_llama(seed=5)
    quantize_(first, GWQConfig(bits=4, progress=False), calibration_data=token_ids[:1])
    save_quantized(first, out)
    (out / "README.md").write_text("my notes")
    (out / "adapters").mkdir()
    (out / "adapters" / "a.txt").write_text("adapter")
    save_quantized(quantized, out)
    assert (out / "README.md").read_text() == "my notes" and (out / "adapters" / "a.txt").read_text() == "adapter"
    # a plain module saved over it: the old model's config.json does not survive beside the new weights
    plain = torch.nn.Sequential(torch.nn.Linear(8, 8))
    save_quantized(plain, tmp_path / "plain_over")
    save_quantized(quantized, tmp_path / "plain_over")
    save_quantized(plain, tmp_path / "plain_over")
    assert sorted(p.name for p in (tmp_path / "plain_over").iterdir()) == [ser.WEIGHTS_FILE]
    assert_same_model(quantized, load_quantized(_skeleton(), out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "plain_over"]


def test_failed_save_keeps_the_old_checkpoint(quantized, tmp_path, monkeypatch) -> None:
    out = tmp_path / "ck"
    save_quantized(quantized, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(tensors, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(quantized, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_without_atomic_exchange_an_interrupted_swap_is_repaired(quantized, tmp_path, monkeypatch) -> None:
    """Where renameat2 is missing the swap is two renames; stopped between them, the old
    checkpoint sits in the backup, loading says where, and the next save puts it back first."""
    out = tmp_path / "ck"
    save_quantized(quantized, out)
    monkeypatch.setattr(atomic_write, "_exchange", lambda a, b: False)
    renames, real_rename = [], os.rename

    def rename_then_stop(src, dst):
        renames.append((src, dst))
        if len(renames) == 2:
            raise KeyboardInterrupt  # stands in for a kill between the two renames
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename_then_stop)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(quantized, out)
    monkeypatch.setattr(os, "rename", real_rename)
    assert not out.exists()
    with pytest.raises(FileNotFoundError, match="the previous checkpoint is in .*gwq-old-"):
        load_quantized(_skeleton(), out)
    # the next save puts the old checkpoint back before anything else, even when it then fails
    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        save_quantized(quantized, out)
    assert_same_model(quantized, load_quantized(_skeleton(), out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_stale_temporaries_are_removed_by_the_next_save(quantized, tmp_path) -> None:
    out = tmp_path / "ck"
    save_quantized(quantized, out)
    stale = tmp_path / f".ck{atomic_write.TEMP_MARK}abc123"
    stale.mkdir()
    (stale / ser.WEIGHTS_FILE).write_bytes(b"half a file")
    (out / ".model.safetensors.x1y2.tmp").write_bytes(b"format 1 leftover")
    save_quantized(quantized, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())


def test_interrupted_save_is_reported_as_such(quantized, tmp_path) -> None:
    (tmp_path / f".ck{atomic_write.TEMP_MARK}abc123").mkdir()
    with pytest.raises(FileNotFoundError, match="interrupted"):
        load_quantized(_skeleton(), tmp_path / "ck")
    out = tmp_path / "other"
    save_quantized(quantized, out)
    data = bytearray((out / ser.WEIGHTS_FILE).read_bytes())
    data[-10] ^= 0xFF
    (out / ser.WEIGHTS_FILE).write_bytes(bytes(data))
    (out / ".model.safetensors.x1y2.tmp").write_bytes(b"what format 1 left behind")
    with pytest.raises(ValueError, match="corrupted.*interrupted"):
        load_quantized(_skeleton(), out)


def test_truncated_file(quantized, tmp_path) -> None:
    save_quantized(quantized, tmp_path / "ck")
    data = (tmp_path / "ck" / ser.WEIGHTS_FILE).read_bytes()
    (tmp_path / "ck" / ser.WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_quantized(_skeleton(), tmp_path / "ck")


def test_corrupted_file(quantized, tmp_path) -> None:
    save_quantized(quantized, tmp_path / "ck")
    data = bytearray((tmp_path / "ck" / ser.WEIGHTS_FILE).read_bytes())
    data[-10] ^= 0xFF
    (tmp_path / "ck" / ser.WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted: tensor .* does not match its sha256"):
        load_quantized(_skeleton(), tmp_path / "ck")


def test_unknown_format_version(quantized, tmp_path) -> None:
    save_quantized(quantized, tmp_path / "ck")
    _rewrite_header(tmp_path / "ck", **{ser.META_VERSION: "99"})
    with pytest.raises(ValueError, match="version 99"):
        load_quantized(_skeleton(), tmp_path / "ck")


def test_header_without_sha256(quantized, tmp_path) -> None:
    save_quantized(quantized, tmp_path / "ck")
    _rewrite_header(tmp_path / "ck", **{ser.META_SHA256: None})
    with pytest.raises(ValueError, match=f"no '{ser.META_SHA256}' entry"):
        load_quantized(_skeleton(), tmp_path / "ck")


def test_format_1_folder(tmp_path) -> None:
    (tmp_path / ser.LEGACY_MANIFEST_FILE).write_text("{}")
    with pytest.raises(ValueError, match="format version 1"):
        load_quantized(_skeleton(), tmp_path)


def test_mismatched_model(quantized, tmp_path) -> None:
    save_quantized(quantized, tmp_path / "ck")
    with pytest.raises(ValueError, match="does not match"):
        load_quantized(tiny_llama(hidden=64, inter=128), tmp_path / "ck")
    other = tiny_llama()
    other.extra = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="extra"):
        load_quantized(other, tmp_path / "ck")


def test_missing_checkpoint(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no GWQ checkpoint"):
        load_quantized(_skeleton(), tmp_path / "nope")


def test_bf16_skeleton_gives_a_bf16_model(quantized, token_ids, tmp_path) -> None:
    save_quantized(quantized, tmp_path / "ck")
    loaded = load_quantized(_skeleton("meta", torch.bfloat16), tmp_path / "ck")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    weight = loaded.model.layers[0].self_attn.q_proj.weight
    assert isinstance(weight, GWQTensor) and weight.dequantize().dtype == torch.bfloat16
    assert loaded(token_ids).logits.dtype == torch.bfloat16


def test_meta_model_cannot_be_saved(tmp_path) -> None:
    with pytest.raises(ValueError, match="meta device"):
        save_quantized(_skeleton("meta"), tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- kill during overwrite


SAVE_FOREVER = """
import sys
from gwq_compile import load_quantized, save_quantized
from tests.conftest import tiny_llama

out, *sources = sys.argv[1:]
models = [load_quantized(tiny_llama(hidden=192, inter=512), src) for src in sources]
print("ready", flush=True)
while True:  # alternate two different checkpoints into `out` until killed
    for model in models:
        save_quantized(model, out)
"""


def test_kill_at_random_moments_during_overwrite_leaves_a_loadable_checkpoint(tmp_path) -> None:
    """SIGKILL a process that keeps overwriting a checkpoint, at random moments: every time,
    the folder loads and is one of the two checkpoints, and the next save leaves no temporaries."""
    work, out = tmp_path / "work", tmp_path / "work" / "ck"
    work.mkdir()
    ids = torch.randint(0, 300, (1, 48), generator=torch.Generator().manual_seed(1))
    expected = {}
    for seed, bits in ((11, 4), (12, 3)):
        model = tiny_llama(seed=seed, hidden=192, inter=512)
        quantize_(model, GWQConfig(bits=bits, progress=False), calibration_data=ids)
        expected[bits] = model
        save_quantized(model, tmp_path / f"w{bits}")
    save_quantized(expected[4], out)
    started = time.perf_counter()
    save_quantized(expected[3], out)
    one_save = time.perf_counter() - started

    rng = random.Random(0)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    leftovers = 0
    for _ in range(8):
        child = subprocess.Popen(
            [sys.executable, "-c", SAVE_FOREVER, str(out), str(tmp_path / "w4"), str(tmp_path / "w3")],
            cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        assert child.stdout.readline().strip() == "ready", "the saving child did not start"
        time.sleep(rng.uniform(0, 3 * one_save))
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        leftovers += any(p.name != "ck" for p in work.iterdir())
        loaded = load_quantized(tiny_llama(seed=99, hidden=192, inter=512), out)
        assert_same_model(expected[loaded._gwq_config.bits], loaded)
    save_quantized(expected[4], out)
    assert sorted(p.name for p in work.iterdir()) == ["ck"]
    assert leftovers > 0, "no kill landed inside a save: the test exercised nothing"
