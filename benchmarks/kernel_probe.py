"""Kernel probe: the questions of ``results/kernels_notes.md`` answered in one GPU call.

Not the product benchmark (that is ``kernels.py``); this times *variants* side by side
so the next kernel version is chosen from measurements:

* GEMV (M = 1, 4): the shipped split-K kernel (autotuned; with and without outliers)
  against a row-major GEMV candidate (``[BLOCK_N, BLOCK_K]`` tiles contiguous along K,
  scale/zero factored out of the K reduction: ``s * (sum c x - z * sum x)``), swept over
  tile sizes, split counts, warps and stages;
* GEMM (M = 256, 2048): the shipped tiled kernel with and without outliers (is the
  outlier epilogue what costs?), with a column-major ``x`` (coalesced epilogue gathers),
  dequantize-to-fp16 + cuBLAS, and the outlier SpMM alone through cuSPARSE.  The
  dequantization is the shipped dense path's (``launch.gwq_dequantize_triton``); the
  committed ``kernel_probe_*.json`` of 2026-11-23 was taken with an earlier, naive
  dequantization kernel written here (see ``results/kernels_notes.md``).

Every variant is checked against the fp64 reference before it is timed.  Prints a table;
``--out-dir`` gets a JSON with every timing.  Without CUDA: ``--dry-run`` runs the GEMV
candidate on tiny shapes under the Triton interpreter (correctness only).

    python benchmarks/kernel_probe.py --out-dir $OUT
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernels as bench  # noqa: E402  (benchmarks/kernels.py: timer, reference check)

from gwq_compile import packing  # noqa: E402
from gwq_compile.codegen import launch  # noqa: E402


@triton.jit
def _unpack_rows(row_ptrs, k0, K, mask_n, BLOCK_K: tl.constexpr, WIDTH: tl.constexpr):
    """Codes ``[BLOCK_N, BLOCK_K]`` of one plane, bytes loaded as ``[BLOCK_N, BYTES]``
    tiles contiguous along K (each byte once)."""
    PER_BYTE: tl.constexpr = 8 // WIDTH
    BYTES: tl.constexpr = BLOCK_K // PER_BYTE
    offs_b = k0 // PER_BYTE + tl.arange(0, BYTES)
    mask = mask_n[:, None] & (offs_b[None, :] * PER_BYTE < K)
    byte = tl.load(row_ptrs + offs_b[None, :], mask=mask, other=0).to(tl.int32)
    if PER_BYTE == 1:
        return byte
    shifts = tl.arange(0, PER_BYTE) * WIDTH
    codes = (byte[:, :, None] >> shifts[None, None, :]) & ((1 << WIDTH) - 1)
    return tl.reshape(codes, (byte.shape[0], BLOCK_K))


@triton.jit
def _codes_rows(row_ptrs, k0, K, mask_n, plane1_offset, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    if BITS == 3:
        c = _unpack_rows(row_ptrs, k0, K, mask_n, BLOCK_K, 2) | (_unpack_rows(row_ptrs + plane1_offset, k0, K, mask_n, BLOCK_K, 1) << 2)
    else:
        c = _unpack_rows(row_ptrs, k0, K, mask_n, BLOCK_K, BITS)
    return c


@triton.jit
def gemv_rows_kernel(
    x_ptr, codes_ptr, scales_ptr, zeros_ptr, row_ptr_ptr, col_idx_ptr, values_ptr, out_ptr,
    M, N, K, G, plane1_offset, stride_xm, stride_cn, stride_sn, stride_zn, stride_om,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_OUTLIERS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    """out[M, N] (+)= x @ W.T for small M; requires BLOCK_K % GROUP_SIZE == 0 or
    GROUP_SIZE % BLOCK_K == 0.  SPLIT_K > 1: fp32 atomics into a zeroed ``out``."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_m = offs_m < M
    row_ptrs = codes_ptr + offs_n[:, None].to(tl.int64) * stride_cn
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k_tile in range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K):
        k0 = k_tile * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0).to(tl.float32)
        c = _codes_rows(row_ptrs, k0, K, mask_n, plane1_offset, BITS, BLOCK_K).to(tl.float32)
        if GROUP_SIZE >= BLOCK_K:
            g = k0 // GROUP_SIZE
            s = tl.load(scales_ptr + offs_n * stride_sn + g, mask=mask_n, other=0.0).to(tl.float32)
            z = tl.load(zeros_ptr + offs_n * stride_zn + g, mask=mask_n, other=0).to(tl.float32)
            cx = tl.sum(c[None, :, :] * x[:, None, :], axis=2)
            xs = tl.sum(x, axis=1)
            acc += s[None, :] * (cx - z[None, :] * xs[:, None])
        else:
            GPT: tl.constexpr = BLOCK_K // GROUP_SIZE
            c3 = tl.reshape(c, (BLOCK_N, GPT, GROUP_SIZE))
            x3 = tl.reshape(x, (BLOCK_M, GPT, GROUP_SIZE))
            cx = tl.sum(c3[None, :, :, :] * x3[:, None, :, :], axis=3)  # [BM, BN, GPT]
            xs = tl.sum(x3, axis=2)  # [BM, GPT]
            g = k0 // GROUP_SIZE + tl.arange(0, GPT)
            gmask = mask_n[:, None] & (g[None, :] < G)
            s = tl.load(scales_ptr + offs_n[:, None] * stride_sn + g[None, :], mask=gmask, other=0.0).to(tl.float32)
            z = tl.load(zeros_ptr + offs_n[:, None] * stride_zn + g[None, :], mask=gmask, other=0).to(tl.float32)
            acc += tl.sum(s[None, :, :] * (cx - z[None, :, :] * xs[:, None, :]), axis=2)
    if HAS_OUTLIERS:
        start = tl.load(row_ptr_ptr + offs_n, mask=mask_n, other=0)
        count = tl.load(row_ptr_ptr + offs_n + 1, mask=mask_n, other=0) - start
        max_count = tl.max(count, axis=0)
        for j in range(pid_k, max_count, SPLIT_K):
            valid = j < count
            col = tl.load(col_idx_ptr + start + j, mask=valid, other=0).to(tl.int32)
            val = tl.load(values_ptr + start + j, mask=valid, other=0.0).to(tl.float32)
            xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + col[None, :], mask=mask_m[:, None] & valid[None, :], other=0.0)
            acc += xv.to(tl.float32) * val[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=mask)


def gemv_rows(x: torch.Tensor, p: packing.PackedWeight, cfg: dict, has_outliers: bool = True) -> torch.Tensor:
    m, k = x.shape
    n = p.packed_codes.shape[0]
    split = cfg["SPLIT_K"]
    out = torch.zeros(m, n, device=x.device, dtype=torch.float32) if split > 1 else torch.empty(m, n, device=x.device, dtype=x.dtype)
    plane1 = packing.plane_offsets(k, p.bits)[1] if p.bits == 3 else 0
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), split)
    gemv_rows_kernel[grid](
        x, p.packed_codes, p.group_scales, p.group_zeros, p.outlier_row_ptr, p.outlier_col_idx, p.outlier_values, out,
        m, n, k, p.group_scales.shape[1], plane1, x.stride(0), p.packed_codes.stride(0), p.group_scales.stride(0),
        p.group_zeros.stride(0), out.stride(0),
        BITS=p.bits, GROUP_SIZE=p.group_size, HAS_OUTLIERS=has_outliers and p.outlier_values.numel() > 0,
        BLOCK_M=max(1, triton.next_power_of_2(m)), BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], SPLIT_K=split,
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3),
    )  # fmt: skip
    return out.to(x.dtype) if split > 1 else out


def no_outliers(p: packing.PackedWeight) -> packing.PackedWeight:
    n = p.packed_codes.shape[0]
    dev = p.packed_codes.device
    return p._replace(
        outlier_row_ptr=torch.zeros(n + 1, dtype=torch.int32, device=dev),
        outlier_col_idx=torch.zeros(0, dtype=p.outlier_col_idx.dtype, device=dev),
        outlier_values=torch.zeros(0, dtype=torch.float16, device=dev),
    )


def gemv_configs(quick: bool) -> list[dict]:
    if quick:
        return [dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=s, num_warps=4, num_stages=2) for bn, bk, s in [(8, 64, 1), (4, 128, 2), (16, 256, 4)]]
    return [
        dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=s, num_warps=w, num_stages=st)
        for bn, bk, s, w, st in itertools.product((8, 16, 32), (128, 256, 512), (1, 2, 4), (4,), (3,))
    ]


def refine(cfg: dict) -> list[dict]:
    return [dict(cfg, num_warps=w, num_stages=st) for w, st in itertools.product((2, 4, 8), (2, 3, 4)) if (w, st) != (cfg["num_warps"], cfg["num_stages"])]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", type=Path, default=None)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--skip-gemm", action="store_true")
    args = ap.parse_args(argv)
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("skip: no CUDA GPU")
        return 0
    dev = "cpu" if dry else "cuda"
    act = torch.float32 if dry else torch.float16
    timer = bench.make_timer(torch, "cudagraph", dry)
    gen = torch.Generator().manual_seed(0)
    shapes = [(40, 300), (33, 256)] if dry else [(4096, 4096), (4096, 11008), (11008, 4096)]
    gemv_ms = (1, 3) if dry else (1, 4)
    group = 64 if dry else 128
    results, lines = [], []

    def record(**row):
        results.append(row)
        line = " | ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        lines.append(line)
        print(line, flush=True)

    out_path = None
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        name = "kernel_probe_dry.json" if dry else f"kernel_probe_{bench.file_stem(torch.cuda.get_device_name())[8:]}.json"
        out_path = args.out_dir / name
    env = bench.environment(torch)

    def save():
        if out_path:
            out_path.write_text(json.dumps({"env": env, "rows": results}, indent=1))

    weights = {}
    for n, k in shapes:
        w = torch.randn(n, k, generator=gen) * 0.02
        mask = torch.rand(n, k, generator=gen) < 0.01
        w = torch.where(mask, w * 10, w).to(dev)
        mask = mask.to(dev)
        for bits in (4, 3):
            p = packing.quantize_weight(w, mask, bits=bits, group_size=group)
            weights[n, k, bits] = (p, packing.dequantize_weight(p))

    best_gemv = {}

    def probe_gemv(n, k, bits, m, configs):
        p, w_ref = weights[n, k, bits]
        p0 = no_outliers(p)
        dense = w_ref.to(act)
        x = torch.randn(m, k, generator=gen).to(dev, act)
        t_cublas = timer(lambda: torch.matmul(x, dense.T))
        base = lambda: launch.gwq_linear_triton(x, *p[:6], None, p.bits, p.group_size, k)  # noqa: E731
        err = bench.max_error_ratio(torch, base(), x, w_ref, k)
        t_base = timer(base)
        t_base0 = timer(lambda: launch.gwq_linear_triton(x, *p0[:6], None, p.bits, p.group_size, k))
        record(case="gemv", n=n, k=k, bits=bits, m=m, cublas=t_cublas, shipped=t_base, shipped_no_outliers=t_base0, shipped_err=round(err, 3))
        timed = []
        for cfg in configs:
            if cfg["BLOCK_K"] < group and group % cfg["BLOCK_K"]:
                continue
            try:
                err = bench.max_error_ratio(torch, gemv_rows(x, p, cfg), x, w_ref, k)
                if err > 1.0:
                    record(case="gemv_rows_FAIL", n=n, k=k, bits=bits, m=m, cfg=str(cfg), err=err)
                    continue
                timed.append((timer(lambda: gemv_rows(x, p, cfg)), cfg))
            except Exception as exc:  # noqa: BLE001 - a config that does not compile is reported, not fatal
                record(case="gemv_rows_error", cfg=str(cfg), error=f"{type(exc).__name__}: {str(exc)[:200]}")
        timed.sort(key=lambda t: t[0])
        for t, cfg in timed[:3]:
            t0 = timer(lambda: gemv_rows(x, p, cfg, has_outliers=False)) if not dry else float("nan")
            record(case="gemv_rows", n=n, k=k, bits=bits, m=m, us=t, no_outliers=t0, vs_cublas=t_cublas / t, vs_shipped=t_base / t, cfg=str(cfg))
        best_gemv[n, k, bits, m] = [cfg for _, cfg in timed[:4]]
        save()

    # A: GEMV at M = 1, full sweep, then warps/stages around the best
    for n, k in shapes:
        for bits in (4, 3):
            probe_gemv(n, k, bits, gemv_ms[0], gemv_configs(dry))
    if not dry:
        for n, k in shapes:
            probe_gemv(n, k, 4, 1, [c for c in refine(best_gemv[n, k, 4, 1][0])] + best_gemv[n, k, 4, 1][:1])
    # B: GEMM
    if not (args.skip_gemm or dry):
        for n, k in shapes[:2]:
            p, w_ref = weights[n, k, 4]
            p0 = no_outliers(p)
            dense = w_ref.to(act)
            for m in (256, 2048):
                x = torch.randn(m, k, generator=gen).to(dev, act)
                t_cublas = timer(lambda: torch.matmul(x, dense.T))
                x_cm = x.t().contiguous().t()
                fused = lambda xx, pp: launch.gwq_linear_triton(xx, *pp[:6], None, p.bits, p.group_size, k, path="gemm")  # noqa: E731
                err_cm = bench.max_error_ratio(torch, fused(x_cm, p), x, w_ref, k)
                err_dq = bench.max_error_ratio(torch, torch.matmul(x, launch.gwq_dequantize_triton(p, act).T), x, w_ref, k)
                s_csr = torch.sparse_csr_tensor(p.outlier_row_ptr.long(), p.outlier_col_idx.long(), p.outlier_values, (n, k))
                xt = x.t().contiguous()
                try:
                    t_sp = timer(lambda: torch.sparse.mm(s_csr, xt))
                except Exception as exc:  # noqa: BLE001
                    t_sp = float("nan")
                    print(f"cusparse: {type(exc).__name__}: {exc}", flush=True)
                record(
                    case="gemm", n=n, k=k, bits=4, m=m, cublas=t_cublas,
                    shipped=timer(lambda: fused(x, p)), shipped_no_outliers=timer(lambda: fused(x, p0)),
                    x_colmajor=timer(lambda: fused(x_cm, p)), x_colmajor_plus_copy=timer(lambda: fused(x.t().contiguous().t(), p)),
                    dequant_cublas=timer(lambda: torch.matmul(x, launch.gwq_dequantize_triton(p, act).T)),
                    dequant_only=timer(lambda: launch.gwq_dequantize_triton(p, act)), cusparse_outliers=t_sp,
                    err_cm=round(err_cm, 3), err_dq=round(err_dq, 3),
                )  # fmt: skip
                save()
    # C: GEMV at M = 4 (and 3 on the dry run) over the best M = 1 tiles
    for n, k in shapes:
        for bits in (4, 3):
            probe_gemv(n, k, bits, gemv_ms[1], best_gemv[n, k, bits, gemv_ms[0]])
    print("\n".join(lines))
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
