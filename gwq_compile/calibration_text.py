"""Calibration text, offline: where quantize-on-load and the examples get their token windows.

Sources (:func:`load_text`):

* ``"default"``: Python's own ``pydoc_data.topics`` (465 KB of real English that ships
  with every CPython).  Its first 90% is the calibration split and the last 10% a
  held-out split, so the demo never evaluates on what it calibrated on.
* a path to a local text file, or a ``datasets.Dataset`` with a ``"text"`` column.

Named benchmark corpora (WikiText-2 from ``../shared/data``) are tooling and live in
:mod:`gwq_tools.data`, which resolves them to files and calls this module.

Example:
    >>> from gwq_compile.calibration_text import default_text
    >>> len(default_text("heldout")) > 10_000
    True
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["calibration_tokens", "default_text", "load_text", "read_text_file", "tokenize"]

_DEFAULT_HELDOUT_FRACTION = 0.1


def default_text(split: str = "calibration") -> str:
    """Real English from ``pydoc_data.topics``; ``split`` is ``"calibration"`` or ``"heldout"``."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    cut = int(len(text) * (1 - _DEFAULT_HELDOUT_FRACTION))
    cut = text.rfind("\n\n", 0, cut)  # cut between topics, not inside a word
    if split == "calibration":
        return text[:cut]
    if split == "heldout":
        return text[cut:]
    raise ValueError(f"split must be 'calibration' or 'heldout', got {split!r}")


def read_text_file(path: str | os.PathLike) -> str:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {str(path)!r} does not exist")
    return path.read_text(encoding="utf-8-sig")  # the WikiText tokens file starts with a BOM


def load_text(source: Any, split: str = "calibration") -> str:
    """Resolve a text source (see module docstring) to one string."""
    if isinstance(source, str):
        if source == "default":
            return default_text(split)
        return read_text_file(source)
    if isinstance(source, os.PathLike):
        return read_text_file(source)
    column = getattr(source, "column_names", None)
    if column is not None:  # a datasets.Dataset
        if "text" not in column:
            raise ValueError(f"dataset has no 'text' column (columns: {column})")
        return "\n\n".join(t for t in source["text"] if t)
    raise TypeError(f"unsupported text source {type(source).__name__}: give 'default', a path, or a datasets.Dataset")


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids ``[1, T]`` of ``text``, tokenized once as one string (the standard protocol)."""
    ids = tokenizer(text, return_tensors="pt").input_ids
    if ids.numel() == 0:
        raise ValueError("the text tokenized to nothing")
    return ids


def calibration_tokens(tokenizer, source: Any = "default", n_samples: int = 1, seq_len: int = 512, seed: int = 0) -> torch.Tensor:
    """``n_samples`` random windows of ``seq_len`` tokens: a LongTensor ``[n_samples, seq_len]``.

    Example:
        >>> from transformers import AutoTokenizer                 # doctest: +SKIP
        >>> ids = calibration_tokens(tokenizer, "default", 1, 512)  # doctest: +SKIP
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1 for calibration, got {n_samples}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 for a next-token calibration loss, got {seq_len}")
    ids = tokenize(tokenizer, load_text(source, "calibration"))[0]
    if ids.numel() < seq_len:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n_samples,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
