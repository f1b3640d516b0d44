"""Checking what users pass to :func:`gwq_compile.quantize_` before any work starts.

Token ids may come as a LongTensor, any integer tensor, a numpy array or nested lists;
they become int64 tensors here.  Ids outside ``[0, vocabulary size)`` are reported with the
id, its position and the size, instead of ``IndexError: index out of range in self`` from
deep inside the embedding.  Iterables (generators included) are checked batch by batch as
calibration consumes them, so nothing is materialized twice.

Example:
    >>> import torch
    >>> token_batches([[1, 2, 3]], vocab_size=10).tolist()   # one [batch, seq] batch
    [[1, 2, 3]]
    >>> next(iter(token_batches(torch.tensor([[1, 12]]), vocab_size=10)))
    Traceback (most recent call last):
    ...
    ValueError: calibration token id 12 at [0, 1] is outside the model's vocabulary of 10 ids (0..9)
"""

from __future__ import annotations

import collections.abc
from typing import Any, Iterator

import torch


def context_length(model) -> int | None:
    """The model's maximum sequence length (``config.max_position_embeddings``), if it has one."""
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None)


def vocab_size(model: torch.nn.Module) -> int | None:
    """Rows of the model's input embedding, when it has one (``get_input_embeddings``)."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    return getattr(embedding, "num_embeddings", None)


def as_token_tensor(data: Any, what: str = "calibration data") -> torch.Tensor:
    """An int64 tensor from a tensor, numpy array or (nested) list of ints."""
    if isinstance(data, torch.Tensor):
        tensor = data
    elif type(data).__module__ == "numpy" or isinstance(data, (list, tuple)):
        try:
            tensor = torch.as_tensor(data)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{what} must be token ids (ints), nested lists of equal length, got {type(data).__name__}: {err}") from err
    else:
        raise TypeError(f"{what} must be token ids: a tensor, numpy array or list of ints, got {type(data).__name__}")
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"{what} must hold integer token ids, got dtype {tensor.dtype}")
    return tensor.long()


def check_ids(ids: torch.Tensor, size: int | None, what: str = "calibration token id") -> None:
    if size is None or ids.numel() == 0 or ids.device.type == "meta":
        return
    bad = (ids < 0) | (ids >= size)
    if bool(bad.any()):
        where = bad.nonzero()[0].tolist()
        raise ValueError(f"{what} {int(ids[tuple(where)])} at {where} is outside the model's vocabulary of {size} ids (0..{size - 1})")


def _is_token_list(data: Any) -> bool:
    """A (nested) list of ints, as opposed to a list of batches (tensors or dicts)."""
    first = data
    while isinstance(first, (list, tuple)) and first:
        first = first[0]
    return isinstance(first, int) and not isinstance(first, bool)


def token_batches(data: Any, vocab_size: int | None) -> Any:
    """``data`` with its token ids converted and checked; same structure as accepted by quantize_."""
    if data is None or isinstance(data, torch.Tensor) or type(data).__module__ == "numpy" or (isinstance(data, (list, tuple)) and _is_token_list(data)):
        if data is None:
            return None
        ids = as_token_tensor(data)
        check_ids(ids, vocab_size)
        return ids
    if isinstance(data, collections.abc.Mapping):
        return _checked_mapping(data, vocab_size)
    if isinstance(data, collections.abc.Iterable) and not isinstance(data, (str, bytes)):
        return _CheckedBatches(data, vocab_size)
    raise TypeError(
        f"calibration_data must be token ids (a [batch, seq] tensor, numpy array or list), a dict of model inputs "
        f"with 'input_ids', or an iterable of those; got {type(data).__name__}"
    )


def _checked_mapping(batch: collections.abc.Mapping, size: int | None) -> dict:
    if "input_ids" not in batch:
        raise ValueError(f"a dict calibration batch needs an 'input_ids' entry for the next-token loss (keys: {sorted(batch)})")
    ids = as_token_tensor(batch["input_ids"], "calibration input_ids")
    check_ids(ids, size)
    return {**batch, "input_ids": ids}


class _CheckedBatches:
    """An iterable of calibration batches whose token ids are checked as they are consumed."""

    def __init__(self, batches: collections.abc.Iterable, size: int | None):
        self.batches, self.size = batches, size

    def __iter__(self) -> Iterator[Any]:
        for batch in self.batches:
            if isinstance(batch, collections.abc.Mapping):
                yield _checked_mapping(batch, self.size)
            else:
                ids = as_token_tensor(batch, "a calibration batch")
                check_ids(ids, self.size)
                yield ids
