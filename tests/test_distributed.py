"""FSDP2 GWQ over 2 gloo processes (gwq_compile.distributed) against one process, bit for bit."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from gwq_compile import GWQConfig, GWQTensor, quantize_
from tests.conftest import byte_tokenizer, tiny_llama

CONFIG = GWQConfig(group_size=32, progress=False)
TEXT = "GWQ keeps the most gradient-sensitive weights in fp16 and quantizes the rest. " * 40


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Llama (hidden 96, inter 200: rows split 48/48 and 100/100, tied embedding) as a HF folder."""
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama(seed=5).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    (path / "calib.txt").write_text(TEXT)
    return path


def packed_layers(model: torch.nn.Module) -> dict[str, tuple]:
    return {n: m.weight.stored_fields() for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), GWQTensor)}


def _rank_main(rank: int, world: int, port: int, model_dir: str, ids: torch.Tensor, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import torch.distributed as dist

    from gwq_compile import distributed

    try:
        model = distributed.quantize_pretrained(model_dir, CONFIG, ids)
        if rank == 0:
            torch.save(packed_layers(model), out)
        else:
            assert model is None
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_pack_bit_identical_weights(model_dir: Path, tmp_path: Path) -> None:
    from gwq_tools.models import load_causal_lm

    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(3))
    single, _ = load_causal_lm(str(model_dir))
    quantize_(single, CONFIG, calibration_data=ids)
    expected = packed_layers(single)
    out = tmp_path / "packed.pt"
    mp.start_processes(_rank_main, args=(2, _free_port(), str(model_dir), ids, str(out)), nprocs=2, start_method="spawn")
    got = torch.load(out)
    assert sorted(got) == sorted(expected) and len(got) == 14
    for name in expected:
        for field, (a, b) in enumerate(zip(got[name], expected[name])):
            assert a.dtype == b.dtype and torch.equal(a, b), (name, field)
    assert sum(int(f[5].numel()) for f in got.values()) > 0  # some outliers


def _cli(args: list[str], ranks: int | None) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port", str(_free_port())] if ranks else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([*launcher, "-m", "gwq_compile", *args], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_torchrun_cli_checkpoint_equals_one_process(model_dir: Path, tmp_path: Path) -> None:
    common = ["quantize", str(model_dir), "--group-size", "32", "--calib-data", str(model_dir / "calib.txt"),
              "--calib-samples", "2", "--calib-seqlen", "40", "--no-progress"]  # fmt: skip
    _cli([*common, "--out", str(tmp_path / "one")], None)
    _cli([*common, "--out", str(tmp_path / "two")], 2)
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert sorted(one) == sorted(two)
    for name in one:
        assert one[name].dtype == two[name].dtype and torch.equal(one[name], two[name]), name
    assert any(name.endswith("outlier_values") for name in one)
