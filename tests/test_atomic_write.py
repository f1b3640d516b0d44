"""Crash-safe files and folders (``gwq_compile.atomic_write``); the checkpoint-level cases
(a kill mid-save, no atomic exchange) are in test_serialization.py."""

from __future__ import annotations

import json

import pytest

from gwq_compile import atomic_write


def test_write_text_leaves_no_temporary(tmp_path) -> None:
    target = tmp_path / "r.json"
    atomic_write.write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    with pytest.raises(FileNotFoundError):
        atomic_write.write_text(tmp_path / "no_dir" / "r.json", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temporary left behind


def test_write_folder_keeps_what_it_does_not_replace(tmp_path) -> None:
    out = tmp_path / "ck"
    atomic_write.write_folder(out, lambda tmp: [(tmp / n).write_text("old") for n in ("w.bin", "README")])
    atomic_write.write_folder(out, lambda tmp: (tmp / "new.bin").write_text("new"), replaced=lambda name: name.endswith(".bin"))
    assert sorted(p.name for p in out.iterdir()) == ["README", "new.bin"]  # the old w.bin was replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_a_failed_build_leaves_the_old_folder(tmp_path) -> None:
    out = tmp_path / "ck"
    atomic_write.write_folder(out, lambda tmp: (tmp / "w.bin").write_text("old"))

    def fail(tmp):
        (tmp / "w.bin").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write.write_folder(out, fail)
    assert (out / "w.bin").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
