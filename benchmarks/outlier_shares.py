"""Where the default GWQConfig's model-wide outlier ranking puts SmolLM2-135M's outliers.

``outlier_scope="model"`` keeps the same total (``outlier_ratio`` of all quantized weights)
as the paper's per-layer top-k, but lets each layer's share vary.  This quantizes the model
with the default config (one 2048-token WikiText-2 validation sample, seed 0: the same
calibration as ``quality.py``'s GWQ rows) and writes each projection kind's and each
decoder layer's share, and the extreme layers, to ``results/outlier_shares_smollm2.md``.

Example (about 2 minutes on 2 CPU cores)::

    python benchmarks/outlier_shares.py
"""

from __future__ import annotations

import argparse
import collections
import datetime
import platform
from pathlib import Path

import torch

from gwq_compile import GWQConfig, quantize_
from gwq_tools import data
from gwq_tools import peers
from gwq_compile.atomic_write import write_text as write_text_atomic
from gwq_tools.models import load_causal_lm

RESULTS = Path(__file__).resolve().parent / "results" / "outlier_shares_smollm2.md"


def shares(model: torch.nn.Module) -> tuple[dict[str, float], dict[int, float], list[tuple[float, str]]]:
    """Outlier % per projection kind, per decoder layer, and per linear (sorted)."""
    by_kind: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    by_layer: dict[int, list[int]] = collections.defaultdict(lambda: [0, 0])
    per_linear = []
    for name in peers.quantizable_linear_names(model):
        w = model.get_submodule(name).weight
        kind, layer = name.split(".")[-1], int(name.split(".")[2])
        for acc in (by_kind[kind], by_layer[layer]):
            acc[0] += w.num_outliers
            acc[1] += w.numel()
        per_linear.append((100 * w.num_outliers / w.numel(), name))
    pct = lambda acc: 100 * acc[0] / acc[1]  # noqa: E731
    return {k: pct(v) for k, v in by_kind.items()}, {k: pct(v) for k, v in sorted(by_layer.items())}, sorted(per_linear)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    model, tokenizer = load_causal_lm(None, torch.float32)
    config = GWQConfig(progress=False)
    quantize_(model, config, calibration_data=data.calibration_tokens(tokenizer, "wikitext2", 1, 2048, seed=0))
    kinds, layers, linears = shares(model)
    total = sum(model.get_submodule(n).weight.num_outliers for n in peers.quantizable_linear_names(model))
    lines = [
        "# Outlier shares of the default GWQConfig on SmolLM2-135M",
        "",
        f"Generated {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')} by "
        f"`python benchmarks/outlier_shares.py` on {platform.machine()} CPU, torch {torch.__version__}.",
        f"Config: W{config.bits} g{config.group_size}, outlier_ratio {config.outlier_ratio}, saliency {config.saliency!r}, "
        f"outlier_scope {config.outlier_scope!r}, clip_search {config.clip_search!r}; one 2048-token WikiText-2 validation sample.",
        f"Outliers in total: {total} over 210 linears (a per-layer top-k would give each layer {100 * config.outlier_ratio:g}%).",
        "",
        "| projection | outliers (% of its weights) |",
        "| --- | --- |",
        *[f"| {k} | {v:.2f} |" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])],
        "",
        "| decoder layer | " + " | ".join(str(k) for k in layers) + " |",
        "| --- | " + " | ".join("---" for _ in layers) + " |",
        "| outliers (%) | " + " | ".join(f"{v:.2f}" for v in layers.values()) + " |",
        "",
        "Most outliers: " + ", ".join(f"`{n}` {v:.2f}%" for v, n in reversed(linears[-6:])) + ".",
        "",
        "Fewest: " + ", ".join(f"`{n}` {v:.2f}%" for v, n in linears[:6]) + ".",
    ]
    write_text_atomic(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
