"""gwq_compile.heap: the calibration hands its large CPU buffers back to glibc's malloc."""

from __future__ import annotations

import ctypes

import pytest
import torch

from gwq_compile import GWQConfig, heap, quantize_
from tests.conftest import tiny_llama


class RecordingLibc:
    """Stands in for glibc: records mallopt / malloc_trim calls."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def mallopt(self, param, value) -> int:
        self.calls.append(("mallopt", param, value.value))
        return 1

    def malloc_trim(self, pad) -> int:
        self.calls.append(("malloc_trim", pad.value))
        return 1


@pytest.fixture
def libc(monkeypatch) -> RecordingLibc:
    fake = RecordingLibc()
    monkeypatch.setattr(heap, "_glibc", lambda: fake)
    monkeypatch.delenv("GWQ_MALLOC", raising=False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    return fake


def test_threshold_is_set_for_the_block_then_raised_and_the_heap_trimmed(libc) -> None:
    with heap.returned_large_buffers():
        assert libc.calls == [("mallopt", -3, heap.MMAP_THRESHOLD)]
    assert libc.calls[1:] == [("mallopt", -3, 32 << 20), ("malloc_trim", 0)]


@pytest.mark.parametrize("env", [("GWQ_MALLOC", "keep"), ("MALLOC_MMAP_THRESHOLD_", "131072")])
def test_the_users_choice_is_left_alone(libc, monkeypatch, env) -> None:
    monkeypatch.setenv(*env)
    with heap.returned_large_buffers():
        pass
    assert libc.calls == []


def test_quantize_calibrates_inside_it(libc) -> None:
    model = tiny_llama(seed=0)
    quantize_(model, GWQConfig(group_size=32, progress=False), calibration_data=torch.randint(0, 300, (1, 16)))
    assert [c[0] for c in libc.calls] == ["mallopt", "mallopt", "malloc_trim"]


def test_this_machines_glibc_is_found() -> None:
    """CI runs on glibc Linux: the real handle must be there (else the peak bound silently goes)."""
    assert isinstance(heap._glibc(), ctypes.CDLL)
