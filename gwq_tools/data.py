"""The benchmark corpora, offline: WikiText-2 from ``../shared/data``, on top of the library's
calibration text (:mod:`gwq_compile.calibration_text`).

* ``"wikitext2"``: WikiText-2 from ``../shared/data`` (validation split for calibration,
  raw test split for perplexity), located via ``$GWQ_DATA_DIR`` or next to the repo.
* anything else (``"default"``, a path, a ``datasets.Dataset``) as the library reads it.

Example:
    >>> from gwq_tools.data import default_text
    >>> len(default_text("heldout")) > 10_000
    True
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from gwq_compile import calibration_text
from gwq_compile.calibration_text import default_text, read_text_file, tokenize

__all__ = ["calibration_tokens", "default_text", "load_text", "read_text_file", "shared_data_dir", "tokenize", "wikitext2_text"]

WIKITEXT2_TEST = "wikitext-2-raw/wiki.test.raw"
WIKITEXT2_VALID = "wikitext-2/wiki.valid.tokens"


def shared_data_dir() -> Path:
    """``$GWQ_DATA_DIR``, else ``../shared/data`` beside the repository (or the working directory)."""
    env = os.environ.get("GWQ_DATA_DIR")
    candidates = [Path(env)] if env else []
    candidates += [Path(__file__).resolve().parents[1].parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    for cand in candidates:
        if cand.is_dir():
            return cand
    raise FileNotFoundError(
        "WikiText-2 not found: set GWQ_DATA_DIR to the folder holding wikitext-2-raw/ and wikitext-2/ "
        f"(looked in {', '.join(str(c) for c in candidates)})"
    )


def wikitext2_path(split: str = "test") -> Path:
    """The shared WikiText-2 test (raw) or validation file."""
    rel = {"test": WIKITEXT2_TEST, "validation": WIKITEXT2_VALID, "valid": WIKITEXT2_VALID}.get(split)
    if rel is None:
        raise ValueError(f"WikiText-2 split must be 'test' or 'validation', got {split!r}")
    return shared_data_dir() / rel


def wikitext2_text(split: str = "test") -> str:
    """WikiText-2 test (raw) or validation text from the shared data folder."""
    return read_text_file(wikitext2_path(split))


def _resolve(source: Any, split: str) -> Any:
    if isinstance(source, str) and source == "wikitext2":
        return wikitext2_path("validation" if split == "calibration" else "test")
    return source


def load_text(source: Any, split: str = "calibration") -> str:
    """:func:`gwq_compile.calibration_text.load_text`, plus ``"wikitext2"``."""
    return calibration_text.load_text(_resolve(source, split), split)


def calibration_tokens(tokenizer, source: Any = "default", n_samples: int = 1, seq_len: int = 512, seed: int = 0) -> torch.Tensor:
    """:func:`gwq_compile.calibration_text.calibration_tokens`, plus ``"wikitext2"`` (its validation split)."""
    return calibration_text.calibration_tokens(tokenizer, _resolve(source, "calibration"), n_samples, seq_len, seed)
