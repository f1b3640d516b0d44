"""Perplexity with the standard protocol (see ``../shared/data/README.md``), and its text sources.

Join the text, tokenize once, cut into non-overlapping windows of ``seqlen`` tokens,
report ``exp(mean next-token NLL over all predicted tokens)``.  Each window predicts its
``seqlen - 1`` last tokens from the ones before it inside the window.

Text sources (:func:`load_eval_text`), all local unless a hub is reachable:

* ``wikitext2``: WikiText-2 raw **test**.  Default: the shared file via
  :func:`gwq_tools.data.wikitext2_text`; ``data_file=``: that file; ``loader="datasets"``
  with a file: ``load_dataset("text", data_files=..., keep_linebreaks=True)`` rows joined
  back into the file's exact text; ``loader="datasets"`` without a file:
  ``load_dataset("wikitext", "wikitext-2-raw-v1", split="test")`` rows joined with
  ``"\\n\\n"`` (GPTQ's convention; needs a reachable hub).
* ``c4``: C4 **validation** from a local ``.json``/``.jsonl`` (optionally ``.gz``) file of
  ``{"text": ...}`` lines (e.g. ``c4-validation.00000-of-00008.json.gz``); the first 1100
  documents joined with ``" "``, as GPTQ's C4 evaluation.
* ``text``: any local UTF-8 text file, as is.

Example:
    >>> from gwq_tools.eval import perplexity
    >>> ppl = perplexity(model, token_ids, seqlen=512, max_windows=8)   # doctest: +SKIP
"""

from __future__ import annotations

import gzip
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from gwq_compile.calibration_inputs import context_length  # noqa: F401  (re-exported for the CLI)
from gwq_tools import data
from gwq_compile.calibration import logits_of, next_token_nll  # noqa: F401  (the loss calibration uses; re-exported)
from gwq_compile.options import DATASETS, LOADERS

C4_DOCUMENTS = 1100  # GPTQ's C4 validation protocol: ' '.join(first 1100 documents)


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity and what it was computed over.

    Attributes:
        perplexity: ``exp(nll)``.
        nll: mean next-token negative log-likelihood (nats) over ``n_predicted`` tokens.
        n_windows: windows evaluated; ``seqlen``: tokens per window.
        n_predicted: ``n_windows * (seqlen - 1)``; ``n_tokens_available``: tokens in the text.
    """

    perplexity: float
    nll: float
    n_windows: int
    seqlen: int
    n_predicted: int
    n_tokens_available: int


def check_window(model: torch.nn.Module | None, n_tokens: int, seqlen: int, max_windows: int | None) -> int:
    """Number of windows to evaluate; raises a clear ``ValueError`` for impossible settings.

    Example:
        >>> check_window(None, 10_000, 2048, None)
        4
    """
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2 (a window predicts seqlen - 1 tokens), got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1, got {max_windows}")
    limit = context_length(model) if model is not None else None
    if limit is not None and seqlen > limit:
        raise ValueError(f"seqlen={seqlen} is longer than the model's context ({limit} tokens)")
    n_windows = n_tokens // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise ValueError(f"the evaluation text has {n_tokens} tokens, fewer than one window of seqlen={seqlen}")
    return n_windows


@torch.no_grad()
def perplexity_details(
    model: torch.nn.Module,
    token_ids: torch.Tensor,
    seqlen: int = 2048,
    max_windows: int | None = None,
    progress: bool = True,
    desc: str = "perplexity",
) -> PerplexityResult:
    """:func:`perplexity` with the NLL and the token counts.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                   num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
        >>> res = perplexity_details(LlamaForCausalLM(cfg).eval(), torch.randint(0, 64, (1, 100)), seqlen=32, progress=False)
        >>> res.n_windows, res.n_predicted
        (3, 93)
    """
    ids = token_ids.reshape(-1)
    n_windows = check_window(model, ids.numel(), seqlen, max_windows)
    device = next(model.parameters()).device
    total_nll = 0.0
    for i in tqdm(range(n_windows), desc=desc, disable=not progress, leave=False):
        window = ids[i * seqlen : (i + 1) * seqlen].unsqueeze(0).to(device)
        total_nll += next_token_nll(logits_of(model(window)), window, reduction="sum").item()
    n_predicted = n_windows * (seqlen - 1)
    nll = total_nll / n_predicted
    return PerplexityResult(math.exp(nll), nll, n_windows, seqlen, n_predicted, ids.numel())


def perplexity(
    model: torch.nn.Module,
    token_ids: torch.Tensor,
    seqlen: int = 2048,
    max_windows: int | None = None,
    progress: bool = True,
    desc: str = "perplexity",
) -> float:
    """Perplexity of ``model`` on ``token_ids`` (``[T]`` or ``[1, T]``) in non-overlapping windows.

    Raises ``ValueError`` when ``seqlen`` exceeds the model's context or the text is
    shorter than one window.
    """
    return perplexity_details(model, token_ids, seqlen, max_windows, progress, desc).perplexity


# ----------------------------------------------------------------------------- text sources


def _read_json_lines(path: Path, limit: int) -> list[str]:
    """The ``"text"`` of the first ``limit`` JSON lines of ``path`` (``.gz`` read transparently)."""
    opener = gzip.open if path.suffix == ".gz" else open
    texts: list[str] = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record, dict) or "text" not in record:
                    raise ValueError(f"{path}:{lineno} has no 'text' field")
                texts.append(record["text"])
                if len(texts) >= limit:
                    break
    except (json.JSONDecodeError, UnicodeDecodeError, gzip.BadGzipFile, EOFError) as err:
        raise ValueError(f"{str(path)!r} is not a JSON-lines file of {{'text': ...}} records: {err}") from err
    if not texts:
        raise ValueError(f"{str(path)!r} holds no documents")
    return texts


def _datasets_text_file(path: Path) -> str:
    from datasets import load_dataset

    rows = load_dataset("text", data_files=str(path), split="train", keep_linebreaks=True)
    return "".join(rows["text"])


def _datasets_json_texts(path: Path, limit: int) -> list[str]:
    from datasets import load_dataset

    rows = load_dataset("json", data_files=str(path), split="train")
    if "text" not in rows.column_names:
        raise ValueError(f"{str(path)!r} has no 'text' column (columns: {rows.column_names})")
    return list(rows.select(range(min(limit, len(rows))))["text"])


def _hub_wikitext2_test() -> str:
    try:
        from datasets import load_dataset

        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    except Exception as err:  # the hub raises many types (ConnectionError, DatasetNotFoundError, ...)
        raise ValueError(
            f"could not load wikitext-2-raw-v1 through the datasets hub ({type(err).__name__}: {err}); "
            "give --data-file with a local wiki.test.raw, or use the default local copy"
        ) from err
    return "\n\n".join(rows["text"])


def load_eval_text(dataset: str = "wikitext2", data_file: str | os.PathLike | None = None, loader: str = "plain") -> str:
    """The evaluation text of ``dataset`` (see the module docstring for the sources).

    Example:
        >>> len(load_eval_text("wikitext2")) > 1_000_000      # doctest: +SKIP
        True
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {DATASETS}")
    if loader not in LOADERS:
        raise ValueError(f"unknown loader {loader!r}; choose one of {LOADERS}")
    path = Path(data_file).expanduser() if data_file is not None else None
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    if dataset == "c4":
        if path is None:
            raise ValueError("C4 needs --data-file: a local c4-validation .json/.jsonl(.gz) file of {'text': ...} lines")
        texts = _datasets_json_texts(path, C4_DOCUMENTS) if loader == "datasets" else _read_json_lines(path, C4_DOCUMENTS)
        text = " ".join(texts)
    elif path is None:
        if dataset == "text":
            raise ValueError("dataset 'text' needs --data-file")
        text = _hub_wikitext2_test() if loader == "datasets" else data.wikitext2_text("test")
    else:
        text = _datasets_text_file(path) if loader == "datasets" else data.read_text_file(path)
    if not text.strip():
        raise ValueError(f"the {dataset} evaluation text is empty")
    return text
