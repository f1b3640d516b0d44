"""The ``gwq`` command line: ``gwq eval`` (perplexity) and ``gwq quantize`` (GWQ + save).

Also ``python -m gwq_compile ...``.  Bad input (unknown model path, unreadable GGUF,
missing data file, seqlen beyond the model's context, ...) ends with a one-line
``gwq <command>: error: ...`` on stderr and exit status 1, never a traceback
(``--debug`` shows it).  Results are written only at the end and atomically (temporary
file or folder, then ``os.replace``), so a failed run leaves nothing partial behind.

Examples (shell)::

    gwq eval --seqlen 2048 --max-windows 16                  # SmolLM2-135M, WikiText-2 test
    gwq eval --model path/to/hf_dir --dataset c4 --data-file c4-validation.00000-of-00008.json.gz
    gwq quantize smollm2 --bits 3 --group-size 64 --outlier-ratio 0.01 --out out/smollm2-w3
    gwq eval --model out/smollm2-w3 --output out/w3.json

Example (Python):
    >>> from gwq_tools.cli import main
    >>> main(["eval", "--model", "/no/such/model"])   # doctest: +SKIP
    1
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

# Only the standard library and gwq_compile.options here: `gwq --help` must not import
# torch (seconds); each command imports what it needs when it runs.
from gwq_compile.options import CLIP_SEARCH_NAMES, COMPENSATION_CHOICES, DATASETS, DTYPE_NAMES, LOADERS, SALIENCY_CHOICES, SCOPE_CHOICES

# Errors that mean "bad input", reported in one line.  Anything else is a bug: traceback.
USER_ERRORS = (ValueError, OSError, KeyError, ImportError)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


# ----------------------------------------------------------------------------- model loading


def gwq_quantization_config(path: str | os.PathLike) -> dict | None:
    """The ``quantization_config`` of a GWQ folder (``quant_method: "gwq"``), else None."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    try:
        qc = json.loads(config_file.read_text()).get("quantization_config")
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not valid JSON: {err}") from err
    return qc if isinstance(qc, dict) and qc.get("quant_method") == "gwq" else None


def is_gwq_checkpoint(path: str | os.PathLike) -> bool:
    """True for a folder written by ``gwq quantize`` / ``save_quantized`` / GWQ ``save_pretrained``."""
    from gwq_compile.serialization import LEGACY_MANIFEST_FILE

    path = Path(path)
    return path.is_dir() and (gwq_quantization_config(path) is not None or (path / LEGACY_MANIFEST_FILE).is_file())


def load_gwq_checkpoint(path: str | os.PathLike, dtype_name: str = "float32"):
    """``(model, tokenizer)`` from a GWQ folder, through ``from_pretrained``.

    Example:
        >>> model, tok = load_gwq_checkpoint("out/smollm2-w3")   # doctest: +SKIP
    """
    import gwq_compile  # noqa: F401  (registers GWQ with transformers)
    from gwq_compile.serialization import LEGACY_MANIFEST_FILE, read_checkpoint

    path = Path(path)
    if (path / LEGACY_MANIFEST_FILE).is_file():
        read_checkpoint(path)  # raises the format-1 error
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"GWQ checkpoint {str(path)!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): "
            "save it with save_quantized(model, dir, tokenizer=tokenizer) or gwq quantize"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype_name), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer


def load_model(model: str | None, dtype_name: str, progress: bool = True):
    """A GWQ checkpoint folder, a HF folder, a GGUF file, or the default SmolLM2-135M."""
    from gwq_tools.models import load_causal_lm

    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # transformers' own loading bars

    if model is not None and is_gwq_checkpoint(Path(model).expanduser()):
        return load_gwq_checkpoint(Path(model).expanduser(), dtype_name)
    return load_causal_lm(model, torch_dtype(dtype_name))


def check_seqlen(option: str, seqlen: int, model: str | None) -> None:
    """Fail before loading when ``seqlen`` exceeds the model's context (read from its metadata)."""
    from gwq_tools.models import context_length_of

    limit = context_length_of(model)
    if limit is not None and seqlen > limit:
        raise ValueError(f"{option} {seqlen} is longer than the model's context ({limit} tokens)")


# ----------------------------------------------------------------------------- gwq eval


def _machine() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _command_line(args: argparse.Namespace) -> str:
    words = sys.argv[1:] if args.argv is None else args.argv
    return " ".join(["gwq", *words])


def _check_output_path(path: str | None) -> Path | None:
    """Fail before any work when the results file could not be written."""
    if path is None:
        return None
    out = Path(path).expanduser()
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--output folder {str(out.parent)!r} does not exist")
    if out.is_dir():
        raise IsADirectoryError(f"--output {str(out)!r} is a folder; give a file name")
    return out


def run_eval(args: argparse.Namespace) -> int:
    from gwq_compile import atomic_write
    from gwq_tools import eval as gwq_eval

    output = _check_output_path(args.output)
    # Cheap checks first: the text and the settings, then the (slow) model.
    text = gwq_eval.load_eval_text(args.dataset, args.data_file, args.loader)
    gwq_eval.check_window(None, sys.maxsize, args.seqlen, args.max_windows)
    check_seqlen("--seqlen", args.seqlen, args.model)
    model, tokenizer = load_model(args.model, args.dtype, progress=not args.no_progress)
    limit = gwq_eval.context_length(model)
    if limit is not None and args.seqlen > limit:
        raise ValueError(f"--seqlen {args.seqlen} is longer than the model's context ({limit} tokens)")
    from gwq_tools.data import tokenize

    ids = tokenize(tokenizer, text)
    res = gwq_eval.perplexity_details(model, ids, args.seqlen, args.max_windows, progress=not args.no_progress)
    where = args.data_file or ("datasets hub" if args.loader == "datasets" else "shared data")
    print(f"{args.dataset} ({where}) perplexity {res.perplexity:.4f}  [seqlen {res.seqlen}, {res.n_windows} windows, {res.n_predicted} predicted tokens]")
    if output is not None:
        record = {
            "command": _command_line(args),
            "model": args.model or "smollm2",
            "dtype": args.dtype,
            "dataset": args.dataset,
            "data_file": None if args.data_file is None else str(args.data_file),
            "loader": args.loader,
            **res.__dict__,
            "machine": _machine(),
        }
        atomic_write.write_json(output, record)
    return 0


# ----------------------------------------------------------------------------- gwq quantize


def _prepare_out_dir(out: str) -> Path:
    path = Path(out).expanduser()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"--out {str(path)!r} already exists and is not an empty folder; choose a new one")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"--out folder's parent {str(path.parent)!r} does not exist")
    return path


def run_quantize(args: argparse.Namespace) -> int:
    # Everything that can be checked without the model is checked before loading it.
    out = _prepare_out_dir(args.out)
    if args.model is not None and is_gwq_checkpoint(Path(args.model).expanduser()):
        qc = gwq_quantization_config(Path(args.model).expanduser()) or {}
        raise ValueError(
            f"{args.model!r} is already a GWQ checkpoint ({qc.get('bits', '?')} bits); GWQ does not re-quantize: "
            "give the original (unquantized) model"
        )
    import gwq_compile
    from gwq_tools import data

    config = gwq_compile.GWQConfig(
        bits=args.bits,
        group_size=args.group_size,
        outlier_ratio=args.outlier_ratio,
        **({} if args.saliency is None else {"saliency": args.saliency}),
        **({} if args.outlier_scope is None else {"outlier_scope": args.outlier_scope}),
        symmetric=args.symmetric,
        compensation=args.compensation,
        **({} if args.clip_search is None else {"clip_search": args.clip_search}),
        double_quant=args.double_quant,
        bits_budget=args.bits_budget,
        head_bits=args.head_bits,
        **({} if args.head_group_size is None else {"head_group_size": args.head_group_size}),
        damp=args.damp,
        progress=not args.no_progress,
    )
    data.load_text(args.calib_data, "calibration")  # a missing file or data folder fails here
    check_seqlen("--calib-seqlen", args.calib_seqlen, args.model)
    from gwq_compile import distributed

    if distributed.launched_distributed():  # torchrun --nproc-per-node N: FSDP2, each rank its rows
        model, tokenizer = _quantize_distributed(args, config)
        if model is None:
            return 0  # not rank 0: rank 0 saves the one checkpoint
    else:
        model, tokenizer = load_model(args.model, args.dtype, progress=not args.no_progress)
        calib = data.calibration_tokens(tokenizer, args.calib_data, args.calib_samples, args.calib_seqlen, args.seed)
        gwq_compile.quantize_(model, config, calibration_data=calib)
    report = gwq_compile.quantization_report(model)
    # save_quantized builds the folder beside `out` and moves it into place in one step.
    gwq_compile.save_quantized(model, out, tokenizer=tokenizer)
    print(
        f"quantized {report['quantized_layers']} layers ({report['quantized_weights']} weights) to "
        f"{report['bits_per_weight']:.4f} bits/weight, {report['outliers']} fp16 outliers -> {out}"
    )
    return 0


def _quantize_distributed(args: argparse.Namespace, config):
    """``(model, tokenizer)`` on rank 0, ``(None, None)`` elsewhere: FSDP2 GWQ of a HF folder."""
    from transformers import AutoTokenizer

    from gwq_compile import distributed
    from gwq_tools import data

    if args.model is None or not Path(args.model).expanduser().is_dir():
        raise ValueError(f"distributed GWQ (torchrun) reads a HF safetensors folder; got {args.model or 'smollm2'!r}")
    folder = Path(args.model).expanduser()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    calib = data.calibration_tokens(tokenizer, args.calib_data, args.calib_samples, args.calib_seqlen, args.seed)
    model = distributed.quantize_pretrained(folder, config, calib, torch_dtype(args.dtype))
    return (model, tokenizer) if model is not None else (None, None)


# ----------------------------------------------------------------------------- parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gwq", description="GWQ gradient-aware weight quantization: evaluate and quantize causal LMs.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("eval", help="perplexity on WikiText-2 test (default) or C4 validation")
    ev.add_argument("--model", default=None, help="HF model folder, .gguf file, `gwq quantize` output folder, or 'smollm2' (default)")
    ev.add_argument("--dataset", choices=DATASETS, default="wikitext2")
    ev.add_argument("--data-file", default=None, help="local text (wikitext2/text) or JSON-lines (c4) file; default: the shared WikiText-2 test")
    ev.add_argument("--loader", choices=LOADERS, default="plain", help="read files directly, or through the `datasets` library")
    ev.add_argument("--seqlen", type=_positive_int, default=2048)
    ev.add_argument("--max-windows", type=_positive_int, default=None)
    ev.add_argument("--dtype", choices=DTYPE_NAMES, default="float32")
    ev.add_argument("--output", default=None, help="write the result as JSON here (atomically)")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(func=run_eval)

    qz = sub.add_parser("quantize", help="GWQ-quantize a model and save it")
    qz.add_argument("model", nargs="?", default=None, help="HF model folder, .gguf file, or 'smollm2' (default)")
    qz.add_argument("--out", required=True, help="new (or empty) folder for the checkpoint")
    qz.add_argument("--bits", type=int, default=4)
    qz.add_argument("--group-size", type=int, default=64, help="default: GWQConfig's (64)")
    qz.add_argument("--outlier-ratio", type=float, default=0.005, help="default: GWQConfig's (0.005)")
    qz.add_argument("--saliency", default=None, choices=list(SALIENCY_CHOICES), help="how weights are scored (default: GWQConfig's)")
    qz.add_argument("--outlier-scope", default=None, choices=list(SCOPE_CHOICES), help="where the top outlier_ratio is taken (default: GWQConfig's)")
    qz.add_argument("--compensation", default="none", choices=list(COMPENSATION_CHOICES), help="error compensation of the non-outliers")
    qz.add_argument("--clip-search", default=None, choices=list(CLIP_SEARCH_NAMES), help="how each group's range is chosen (default: GWQConfig's)")
    qz.add_argument("--symmetric", action="store_true")
    qz.add_argument("--double-quant", action="store_true", help="8-bit scale codes under one power-of-two exponent per row, zeros at the code width")
    qz.add_argument("--bits-budget", type=float, default=None, help="mean code bits: per-layer widths chosen from the saliency (e.g. 3.64)")
    qz.add_argument("--head-bits", type=int, default=None, help="also quantize the LM head (and a tied input embedding) at these bits")
    qz.add_argument("--head-group-size", type=int, default=None, help="the head's group size (default: GWQConfig's)")
    qz.add_argument("--damp", type=float, default=0.01)
    qz.add_argument("--calib-data", default="wikitext2", help="'wikitext2' (validation split), 'default', or a text file")
    qz.add_argument("--calib-samples", type=_positive_int, default=1)
    qz.add_argument("--calib-seqlen", type=_positive_int, default=2048)
    qz.add_argument("--seed", type=int, default=0)
    qz.add_argument("--dtype", choices=DTYPE_NAMES, default="float32")
    qz.add_argument("--no-progress", action="store_true")
    qz.set_defaults(func=run_quantize)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``gwq`` CLI; returns the exit status (0 ok, 1 bad input, 2 bad usage, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = None if argv is None else list(argv)
    try:
        return args.func(args)
    except USER_ERRORS as err:
        if args.debug:
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"gwq {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"gwq {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
