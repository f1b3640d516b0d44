"""End-to-end decode benchmark: tokens/s of a Llama-7B-shaped model, FP16 vs GWQ weights.

The model is a ``transformers`` ``LlamaForCausalLM`` built from a Llama-2-7B-shaped
``LlamaConfig`` (hidden 4096, MLP 11008, 32 heads, vocab 32000; ``--layers`` shrinks
it) with random weights: speed does not depend on the values.  Variants (``--variants``):

* ``fp16``: the dense model;
* ``gwq4`` / ``gwq3``: every decoder ``nn.Linear`` (attention and MLP projections; the
  embedding and the output head stay fp16) gets a
  :class:`~gwq_compile.tensor.GWQTensor` weight from ``GWQTensor.from_float`` with a
  random 1 % outlier mask (``--outliers``) and group 128 (``--group-size``).  No
  calibration: the mask only has to have the right density.

Each variant is decoded greedily at batch 1 with a ``StaticCache``: the prompt
(``--prompt-len``) is prefilled eagerly, then the one-token decode step runs through
``torch.compile(model.forward)`` (Inductor, ``--compile-mode``; on CUDA the GWQ linears
are the ``gwq::linear_triton`` triton_op, visible to Inductor).  A warm-up decode
(compilation) is followed by a timed decode of ``--new-tokens`` tokens; tokens/s = new
tokens / wall time of the timed decode (synchronized).  Before compiling, ``--eager-steps``
eager decode steps run: the GWQ launcher times its candidate configs there, once per
shape, and the compiled graph then launches the chosen ones (a traced call cannot time
anything).  Each row records ``cudagraph_skips`` (Inductor's count of graphs it did not
run as CUDA graphs; 0 means reduce-overhead really used them; run with
``TORCH_LOGS=perf_hints`` to see why one was skipped).

Results go to ``benchmarks/results/decode_<gpu>[_<mode>].md`` and ``.json`` with the device
name, versions, date and command, rewritten after each variant (a run cut short keeps the
variants it finished).  Without a CUDA GPU the script prints ``skip: no CUDA GPU``
and exits 0.  ``--dry-run`` decodes a few tokens of a tiny model on CPU with the Triton
interpreter (``GWQ_KERNEL=triton``; at most 2 layers, a 4-token prompt, 2 timed tokens),
writing nothing.

Examples::

    python benchmarks/decode.py                               # 32 layers, fp16 vs gwq4 vs gwq3
    python benchmarks/decode.py --layers 4 --compile-mode reduce-overhead
    python benchmarks/decode.py --dry-run --compile-mode none  # CPU smoke test
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
VARIANTS = {"fp16": None, "gwq4": 4, "gwq3": 3, "gwq2": 2, "gwq8": 8}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "none")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32, help="decoder layers (Llama-2-7B: 32)")
    p.add_argument("--variants", nargs="+", default=["fp16", "gwq4", "gwq3"], choices=list(VARIANTS))
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--warmup-tokens", type=int, default=8)
    p.add_argument("--eager-steps", type=int, default=1, help="eager decode steps before compiling (choose the GWQ kernel configs)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--outliers", type=float, default=0.01)
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="tiny model on CPU, GWQ_KERNEL=triton (Triton interpreter); writes nothing")
    args = p.parse_args(argv)
    if args.eager_steps < 0:
        p.error(f"--eager-steps must be >= 0, got {args.eager_steps}")
    for name in ("layers", "prompt_len", "new_tokens", "warmup_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0.0 <= args.outliers < 1.0:
        p.error(f"--outliers must be in [0, 1), got {args.outliers}")
    if args.dry_run:  # every kernel launch takes ~0.5 s on the interpreter: keep the smoke test small
        args.layers = min(args.layers, 2)
        args.prompt_len = min(args.prompt_len, 4)
        args.new_tokens = min(args.new_tokens, 2)
        args.warmup_tokens = 1
        args.eager_steps = min(args.eager_steps, 1)
    return args


def llama_config(args: argparse.Namespace) -> Any:
    from transformers import LlamaConfig

    if args.dry_run:  # tiny (hidden 96, MLP 200: in_features not multiples of the tiles)
        return LlamaConfig(
            hidden_size=96, intermediate_size=200, num_hidden_layers=args.layers, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=256,
        )  # fmt: skip
    return LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=args.layers, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False,
    )  # fmt: skip


def build_model(args: argparse.Namespace, bits: int | None, device: Any, dtype: Any) -> tuple[Any, dict]:
    """The random model (same seed for every variant), its decoder linears GWQ-quantized if ``bits``."""
    import torch
    from transformers import LlamaForCausalLM

    from gwq_compile.tensor import GWQTensor

    torch.manual_seed(args.seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(llama_config(args)).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    dense_bytes = packed_bytes = 0
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    for name, module in model.model.layers.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        w = module.weight.detach()
        dense_bytes += w.numel() * w.element_size()
        if bits is None:
            continue
        mask = torch.rand(w.shape, device=device, generator=gen) < args.outliers
        qw = GWQTensor.from_float(w, mask, bits=bits, group_size=args.group_size)
        packed_bytes += sum(qw.storage_bits().values()) // 8
        module.weight = torch.nn.Parameter(qw, requires_grad=False)
        del w, mask
    gc.collect()
    return model, {"decoder_linear_bytes_fp16": dense_bytes, "decoder_linear_bytes_stored": packed_bytes or dense_bytes}


def decode(args: argparse.Namespace, model: Any, device: Any) -> dict:
    """Greedy batch-1 decode with a StaticCache: warm-up, then a timed run."""
    import torch
    from transformers import StaticCache

    forward = model.forward
    step = forward if args.compile_mode == "none" else torch.compile(forward, mode=None if args.compile_mode == "default" else args.compile_mode)
    max_len = args.prompt_len + max(args.new_tokens, args.warmup_tokens) + 1
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_len), device=device, generator=torch.Generator(device=device).manual_seed(args.seed))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def generate(n_tokens: int, fn: Any = step) -> tuple[float, list[int]]:
        cache.reset()
        with torch.no_grad():
            positions = torch.arange(args.prompt_len, device=device)
            logits = forward(input_ids=prompt, past_key_values=cache, cache_position=positions, use_cache=True).logits
            token = logits[:, -1:].argmax(-1)
            sync()
            start = time.perf_counter()
            tokens = []
            for i in range(n_tokens):
                position = torch.tensor([args.prompt_len + i], device=device)
                logits = fn(input_ids=token, past_key_values=cache, cache_position=position, use_cache=True).logits
                token = logits[:, -1:].argmax(-1).clone()  # clone: CUDA-graph outputs are overwritten
                tokens.append(token)
            sync()
            elapsed = time.perf_counter() - start
        return elapsed, [int(t) for t in torch.cat(tokens, 1)[0].tolist()]

    from torch._dynamo.utils import counters

    t0 = time.perf_counter()
    if args.eager_steps:
        generate(args.eager_steps, forward)  # eager: the GWQ configs are timed and cached here
    eager_s = time.perf_counter() - t0
    skips_before = counters["inductor"]["cudagraph_skips"]
    t0 = time.perf_counter()
    generate(args.warmup_tokens)
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    elapsed, tokens = generate(args.new_tokens)
    return {
        "tokens_per_s": args.new_tokens / elapsed,
        "ms_per_token": 1e3 * elapsed / args.new_tokens,
        "warmup_s": warmup_s,
        "eager_tune_s": eager_s,
        "cudagraph_skips": counters["inductor"]["cudagraph_skips"] - skips_before,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "first_tokens": tokens[:8],
    }


def environment() -> dict[str, str]:
    import torch
    import transformers
    import triton

    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def markdown(rows: list[dict], env: dict, args: argparse.Namespace) -> str:
    base = next((r for r in rows if r["variant"] == "fp16"), None)
    lines = [
        f"# Decode throughput on {env['device']}",
        "",
        f"Generated {env['date']} by `{env['command']}`.",
        f"torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}, Python {env['python']}.",
        f"{'Tiny (hidden 96)' if args.dry_run else 'Llama-2-7B-shaped'} random model, {args.layers} layers; batch 1, prompt {args.prompt_len}, {args.new_tokens} greedy "
        f"tokens timed after {args.warmup_tokens} warm-up tokens; torch.compile mode `{args.compile_mode}`; GWQ: group "
        f"{args.group_size}, {args.outliers:.0%} random fp16 outliers, decoder linears only."
        + (" DRY RUN on CPU (interpreter): numbers are meaningless as speed." if args.dry_run else ""),
        "",
        "| variant | tokens/s | ms/token | vs fp16 | decoder linear weights (GiB) | peak memory (GiB) | warm-up (s) | cudagraph skips |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speedup = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "n/a"
        peak = f"{r['peak_memory_gib']:.2f}" if r["peak_memory_gib"] is not None else "n/a"
        lines.append(
            f"| {r['variant']} | {r['tokens_per_s']:.1f} | {r['ms_per_token']:.2f} | {speedup} | "
            f"{r['decoder_linear_bytes_stored'] / 2**30:.3f} | {peak} | {r['warmup_s']:.1f} | {r['cudagraph_skips']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        # On CPU torch.ops.gwq.linear uses the reference path unless asked for the kernels
        # (which then run on the Triton interpreter).
        os.environ["GWQ_KERNEL"] = "triton"
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("skip: no CUDA GPU (the decode benchmark needs one; --dry-run exercises the script on CPU)")
        return 0
    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = torch.float32 if args.dry_run else torch.float16
    env = environment()
    print(f"device: {env['device']}; torch {env['torch']}, triton {env['triton']}", flush=True)
    rows = []
    suffix = "" if args.compile_mode == "default" else "_" + args.compile_mode
    stem = args.out_dir / ("decode_" + re.sub(r"[^A-Za-z0-9]+", "-", env["device"]).strip("-").lower() + suffix)
    for variant in args.variants:
        model, sizes = build_model(args, VARIANTS[variant], device, dtype)
        torch._dynamo.reset()  # each variant compiles its own graph
        result = {"variant": variant, **sizes, **decode(args, model, device)}
        rows.append(result)
        print(f"{variant}: {result['tokens_per_s']:.1f} tokens/s ({result['ms_per_token']:.2f} ms/token)", flush=True)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if not args.dry_run:  # after every variant: a run cut short keeps what it measured
            args.out_dir.mkdir(parents=True, exist_ok=True)
            stem.with_suffix(".md").write_text(markdown(rows, env, args))
            stem.with_suffix(".json").write_text(json.dumps({"environment": env, "settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
            print(f"wrote {stem.with_suffix('.md')} and {stem.with_suffix('.json')}", flush=True)
    if args.dry_run:
        print(markdown(rows, env, args))
        print("dry run: nothing written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
