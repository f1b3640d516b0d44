"""Kernel benchmark: the fused GWQ Triton linear vs FP16 cuBLAS and torchao int4 (tinygemm).

For the linear layers of Llama-2-7B (N x K = 4096 x 4096, 11008 x 4096, 4096 x 11008)
and M in {1, 4, 16, 64, 256, 2048} rows, with 4- and 3-bit GWQ weights (group 128,
1 % fp16 outliers), it times, side by side in one run and on the same inputs:

* ``gwq``: :func:`gwq_compile.codegen.launch.gwq_linear_triton`, fp16 activations; its
  first call (the correctness check, untimed) chooses the kernel config for the shape
  once, and the config it chose is recorded with the row;
* ``cublas``: ``torch.matmul(x, W.T)`` on the dense fp16 weight;
* ``torchao int4``: ``torchao.quantization.quantize_`` with ``Int4WeightOnlyConfig``
  (tinygemm, ``tile_packed_to_4d``; group 128; bf16 activations, which tinygemm
  requires), when the installed torchao offers it on this GPU.

Each GWQ case is first checked against the reference (dense dequantized weight, fp64
accumulation) with the bound the tests use: ``|y - ref| <= (2**-10 + (2K+4) 2**-24) *
(|x| @ |W|.T) + 2**-24``.  Timing (medians, microseconds) is CUDA-graph replay by
default: GPU time without Python launch overhead, as under
``torch.compile(mode="reduce-overhead")``, with L2 flushed before every call so weights
come from HBM (see :func:`make_timer`); ``--timer eager`` uses
``triton.testing.do_bench``.  Speed-ups are ratios of times measured in this run.

Results go to ``benchmarks/results/kernels_<gpu>.md`` and ``.json`` (command, device,
torch/triton/torchao versions, date), rewritten after every shape so that a run cut short
(e.g. by a time limit) keeps what it measured.  Without a CUDA GPU the script prints
``skip: no CUDA GPU`` and exits 0.  ``--dry-run`` runs the same code on tiny shapes on
CPU under the Triton interpreter (wall-clock timing, no torchao, nothing written).

Examples::

    python benchmarks/kernels.py                      # full grid on the local GPU
    python benchmarks/kernels.py --bits 4 --m 1 16 --shapes 4096x4096
    python benchmarks/kernels.py --dry-run            # CPU smoke test of the script
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

RESULTS_DIR = Path(__file__).resolve().parent / "results"
LLAMA2_7B_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
DRY_RUN_SHAPES = ((64, 96), (40, 160))
DEFAULT_M = (1, 4, 16, 64, 256, 2048)
DRY_RUN_M = (1, 4, 33)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=None, help="N x K pairs like 4096x4096 (default: Llama-2-7B linears)")
    p.add_argument("--m", nargs="+", type=int, default=None, help=f"rows of x (default: {' '.join(map(str, DEFAULT_M))})")
    p.add_argument("--bits", nargs="+", type=int, default=[4, 3], choices=[2, 3, 4, 8])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--outliers", type=float, default=0.01, help="fraction of weights kept as fp16 outliers")
    p.add_argument("--timer", choices=["cudagraph", "eager"], default="cudagraph")
    p.add_argument("--no-torchao", action="store_true", help="skip the torchao int4 baseline")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--graph-calls", type=int, default=50, help="calls per CUDA graph in the cudagraph timer")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (Triton interpreter); writes nothing")
    args = p.parse_args(argv)
    for s in args.shapes or []:
        if not re.fullmatch(r"\d+x\d+", s):
            p.error(f"--shapes: expected NxK like 4096x11008, got {s!r}")
    if not 0.0 <= args.outliers < 1.0:
        p.error(f"--outliers must be in [0, 1), got {args.outliers}")
    if args.graph_calls < 1:
        p.error(f"--graph-calls must be >= 1, got {args.graph_calls}")
    return args


# ----------------------------------------------------------------------------- environment


def environment(torch_mod: Any) -> dict[str, str]:
    """Device and library versions for the results header."""
    import triton

    info = {
        "device": torch_mod.cuda.get_device_name() if torch_mod.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})",
        "torch": torch_mod.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    try:
        import torchao

        info["torchao"] = torchao.__version__
    except ImportError:
        info["torchao"] = "not installed"
    return info


def file_stem(device_name: str) -> str:
    return "kernels_" + re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-").lower()


# ----------------------------------------------------------------------------- timing and checks


def make_timer(torch_mod: Any, kind: str, dry_run: bool, graph_calls: int = 50) -> Callable[[Callable[[], Any]], float]:
    """A function returning the median time of one ``fn()`` in microseconds.

    ``cudagraph``: ``fn`` is captured ``n`` times in a CUDA graph, each call preceded by a
    write of a buffer larger than L2 (weights come from HBM, as in a real model where
    the other layers evict them); the same graph of flushes alone is timed too and
    subtracted.  No Python launch overhead is timed.  ``eager``:
    ``triton.testing.do_bench`` (also flushes L2, but times host launch gaps too).
    """
    if dry_run:

        def wall(fn: Callable[[], Any]) -> float:
            fn()
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return statistics.median(times) * 1e6

        return wall
    import triton.testing

    torch = torch_mod
    l2_bytes = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    flush_buf = torch.empty(max(2 * l2_bytes, 64 << 20) // 4, dtype=torch.int32, device="cuda")

    def graph_us(calls: Callable[[], None], n: int) -> float:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(n):
                calls()
        torch.cuda.synchronize()
        times = []
        for _ in range(7):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / n)
        return statistics.median(times)

    def cudagraph(fn: Callable[[], Any]) -> float:
        # warm-up on a side stream (as graph capture wants): compilation and autotuning happen here
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        n = graph_calls
        both = graph_us(lambda: (flush_buf.zero_(), fn()), n)
        flush_only = graph_us(flush_buf.zero_, n)
        return max(both - flush_only, 0.0)

    def eager(fn: Callable[[], Any]) -> float:
        fn()  # compilation and autotuning happen here, outside the timed region
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3

    return cudagraph if kind == "cudagraph" else eager


def max_error_ratio(torch_mod: Any, y: Any, x: Any, w_ref: Any, k: int) -> float:
    """Largest ``|y - ref| / bound`` over the output (<= 1 passes), bound as in the tests."""
    rounding = {torch_mod.float32: 0.0, torch_mod.float16: 2 * 2.0**-11, torch_mod.bfloat16: 2 * 2.0**-8}[x.dtype]
    x64 = x.double()
    ref = x64 @ w_ref.double().T
    scale = x64.abs() @ w_ref.double().abs().T
    bound = (rounding + (2 * k + 4) * 2.0**-24) * scale + 2.0**-24
    return float(((y.double() - ref).abs() / bound).max())


def torchao_int4(torch_mod: Any, weight: Any, group_size: int) -> tuple[Any, str]:
    """A bf16 ``nn.Linear`` quantized by torchao int4 weight-only (tinygemm), and its label.

    torchao renamed the options between 0.13 and 0.18, so the known spellings are tried
    in turn; a RuntimeError says why none worked.
    """
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    n, k = weight.shape
    attempts = [
        dict(int4_packing_format="tile_packed_to_4d"),  # torchao >= 0.15: tinygemm
        dict(packing_format="tile_packed_to_4d"),  # torchao 0.13/0.14
        dict(version=1),  # legacy AffineQuantizedTensor + TensorCoreTiledLayout (tinygemm)
    ]
    errors = []
    for extra in attempts:
        try:
            config = Int4WeightOnlyConfig(group_size=group_size, **extra)
            lin = torch_mod.nn.Linear(k, n, bias=False, device=weight.device, dtype=torch_mod.bfloat16)
            with torch_mod.no_grad():
                lin.weight.copy_(weight.to(torch_mod.bfloat16))
            quantize_(lin, config)
            lin(torch_mod.randn(1, k, device=weight.device, dtype=torch_mod.bfloat16))
            return lin, f"torchao int4 ({type(lin.weight).__name__}, {extra})"
        except Exception as exc:  # noqa: BLE001 - every failure is reported below
            errors.append(f"{extra}: {type(exc).__name__}: {exc}")
    raise RuntimeError("torchao int4 weight-only is unavailable here: " + " | ".join(errors))


# ----------------------------------------------------------------------------- run


def run(args: argparse.Namespace, save: Callable[[dict], None] = lambda result: None) -> dict:
    import torch

    from gwq_compile import packing
    from gwq_compile import dispatch
    from gwq_compile.codegen import launch

    device = torch.device("cpu" if args.dry_run else "cuda")
    act_dtype = torch.float32 if args.dry_run else torch.float16
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes] if args.shapes else (DRY_RUN_SHAPES if args.dry_run else LLAMA2_7B_SHAPES)
    ms = args.m or (DRY_RUN_M if args.dry_run else DEFAULT_M)
    timer = make_timer(torch, args.timer, args.dry_run, args.graph_calls)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    rows, failures = [], []
    result = {"rows": rows, "failures": failures, "torchao": "torchao int4: skipped"}

    for n, k in shapes:
        weight = (torch.randn(n, k, generator=gen) * 0.02).to(device)
        mask = (torch.rand(n, k, generator=gen) < args.outliers).to(device)
        weight = torch.where(mask, weight * 10, weight)  # salient weights are the large ones
        dense = weight.to(act_dtype)
        ao_lin, ao_label = None, "torchao int4: skipped"
        if not args.dry_run and not args.no_torchao:
            try:
                ao_lin, ao_label = torchao_int4(torch, weight, args.group_size)
            except RuntimeError as exc:
                ao_label = str(exc)
                print(f"note: {ao_label}", file=sys.stderr)
        result["torchao"] = ao_label
        packed = {b: packing.quantize_weight(weight, mask, bits=b, group_size=args.group_size) for b in args.bits}
        w_ref = {b: packing.dequantize_weight(p) for b, p in packed.items()}

        for m in ms:
            x = (torch.randn(m, k, generator=gen)).to(device=device, dtype=act_dtype)
            t_cublas = timer(lambda: torch.matmul(x, dense.T))
            t_ao = None
            if ao_lin is not None:
                x_bf16 = x.to(torch.bfloat16)
                t_ao = timer(lambda: ao_lin(x_bf16))
            for b, p in packed.items():
                args_b = (x, *p[:6], None, p.bits, p.group_size, p.in_features)
                known = set(launch.CHOSEN)
                t0 = time.perf_counter()
                y = launch.gwq_linear_triton(*args_b)  # first call of this shape: the config is chosen here
                choose_s = time.perf_counter() - t0
                chosen = [f"{key[0]} {_cfg(cfg, tuned)}" for key, (cfg, tuned) in launch.CHOSEN.items() if key not in known]
                ratio = max_error_ratio(torch, y, x, w_ref[b], k)
                ok = ratio <= 1.0
                if not ok:
                    failures.append(f"{n}x{k} bits={b} M={m}: error x{ratio:.3g} over the bound")
                t_gwq = timer(lambda: launch.gwq_linear_triton(*args_b))
                row = dict(
                    n=n, k=k, m=m, bits=b, path=dispatch.triton_family(m), correct=ok, error_ratio=ratio,
                    gwq_us=t_gwq, cublas_us=t_cublas, torchao_int4_us=t_ao,
                    speedup_vs_cublas=t_cublas / t_gwq, speedup_vs_torchao=(t_ao / t_gwq) if t_ao else None,
                    bits_per_weight=sum(packing.storage_bits(p).values()) / (n * k),
                    config="; ".join(chosen) or "cached", first_call_s=choose_s,
                )  # fmt: skip
                rows.append(row)
                print(_row_line(row), f"first call {choose_s:.1f} s", flush=True)
        save(result)
    return result


def _cfg(cfg: Any, tuned: bool) -> str:
    knobs = ",".join(f"{k}={v}" for k, v in cfg.kwargs.items())
    return f"{knobs},warps={cfg.num_warps},stages={cfg.num_stages}" + ("" if tuned else " (default, untuned)")


def _fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def _row_line(r: dict) -> str:
    return (
        f"| {r['n']}x{r['k']} | {r['bits']} | {r['m']} | {r['path']} | {_fmt(r['gwq_us'], '.1f')} | {_fmt(r['cublas_us'], '.1f')} "
        f"| {_fmt(r['torchao_int4_us'], '.1f')} | {_fmt(r['speedup_vs_cublas'], '.2f')} | {_fmt(r['speedup_vs_torchao'], '.2f')} "
        f"| {r['bits_per_weight']:.2f} | {'ok' if r['correct'] else 'FAIL'} ({r['error_ratio']:.2g}) | {r['config']} |"
    )


def _setup(args: argparse.Namespace, result: dict) -> str:
    if args.dry_run:
        return "DRY RUN: fp32 activations on CPU under the Triton interpreter, wall-clock times (meaningless as speed)."
    timing = (
        "CUDA-graph replay, L2 flushed before each call (flush time subtracted)" if args.timer == "cudagraph" else "eager triton do_bench"
    )
    return (
        f"fp16 activations; cuBLAS: fp16 `torch.matmul`; torchao: {result['torchao']} (bf16 activations).  "
        f"Times: median microseconds, {timing}; speed-up = baseline time / GWQ time, same run."
    )


def markdown(result: dict, env: dict, args: argparse.Namespace) -> str:
    head = [
        f"# GWQ kernel latency on {env['device']}",
        "",
        f"Generated {env['date']} by `{env['command']}`.",
        f"torch {env['torch']}, triton {env['triton']}, torchao {env['torchao']}, Python {env['python']}.",
        f"GWQ: group {args.group_size}, {args.outliers:.0%} fp16 outliers, {_setup(args, result)}",
        "Check: GWQ output vs fp64 reference, error / tolerance bound in parentheses (<= 1 passes).",
        "",
        "| N x K | bits | M | path | GWQ (us) | cuBLAS fp16 (us) | torchao int4 (us) | vs cuBLAS | vs torchao | bits/weight | check | config chosen |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join(head + [_row_line(r) for r in result["rows"]]) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("skip: no CUDA GPU (the kernel benchmark needs one; --dry-run exercises the script on CPU)")
        return 0
    env = environment(torch)
    print(f"device: {env['device']}; torch {env['torch']}, triton {env['triton']}, torchao {env['torchao']}", flush=True)
    stem = args.out_dir / file_stem(env["device"])

    def save(result: dict) -> None:
        if args.dry_run:
            return
        args.out_dir.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".md").write_text(markdown(result, env, args))
        stem.with_suffix(".json").write_text(json.dumps({"environment": env, "settings": {k: str(v) for k, v in vars(args).items()}, **result}, indent=2))

    result = run(args, save)
    for f in result["failures"]:
        print(f"FAILED correctness: {f}", file=sys.stderr)
    if args.dry_run:
        print(markdown(result, env, args))
        print("dry run: nothing written")
    else:
        save(result)
        print(f"wrote {stem.with_suffix('.md')} and {stem.with_suffix('.json')}")
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
