"""Where the calibration peak happens: an RSS timeline of one ``quantize_`` child, by stage.

    python benchmarks/calibration_memory_probe.py --work /tmp/calmem --samples 2 [--chunk 2097152] [--mmap 4194304]

``--work`` is a folder made by ``python benchmarks/calibration_memory.py --child prepare --work DIR``
(SmolLM2-135M saved as an HF folder, and the calibration tokens).  A thread samples VmRSS every
20 ms; the stages are marked at each sample's forward (+ chunked loss) and backward, and around
the ranking.  Prints one JSON line: the child's peak (``ru_maxrss``) and the highest sampled RSS
per stage.  ``--chunk`` overrides ``lean_backward.CHUNK_LOGIT_ELEMENTS`` and ``--mmap`` the
calibration's ``heap.MMAP_THRESHOLD``, to compare settings (the results in
``benchmarks/results/calibration_memory_probe.md``).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import calibration_memory as cm  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=None, help="lean_backward.CHUNK_LOGIT_ELEMENTS")
    ap.add_argument("--mmap", type=int, default=None, help="heap.returned_large_buffers' threshold (bytes)")
    args = ap.parse_args()

    from gwq_compile import calibration, heap, lean_backward, quantize

    if args.chunk is not None:
        lean_backward.CHUNK_LOGIT_ELEMENTS = args.chunk
    if args.mmap is not None:
        heap.returned_large_buffers.__wrapped__.__defaults__ = (args.mmap,)
    t0 = time.perf_counter()
    samples: list[tuple[float, int]] = []
    marks: list[tuple[float, str]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append((time.perf_counter() - t0, cm.current_rss_bytes()))
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()

    def marked(module, name: str, before: str, after: str) -> None:
        """Mark ``before`` when ``module.name`` is called and ``after`` when it returns."""
        inner = getattr(module, name)

        def wrapper(*a, **k):
            marks.append((time.perf_counter() - t0, before))
            out = inner(*a, **k)
            marks.append((time.perf_counter() - t0, after))
            return out

        setattr(module, name, wrapper)

    marked(calibration, "_batch_loss", "forward + loss", "backward")
    marked(quantize, "rank_model_outliers", "ranking", "packing")
    result = cm.child_quantize(args.work, args.samples, None)
    done.set()
    stages, start = [], (0.0, "load")
    for mark in [*marks, (float("inf"), "end")]:
        peak = max((rss for t, rss in samples if start[0] <= t < mark[0]), default=0)
        stages.append({"stage": start[1], "from_s": round(start[0], 1), "peak_gb": round(peak / 1e9, 3)})
        start = mark
    print(json.dumps({"samples": args.samples, "chunk": lean_backward.CHUNK_LOGIT_ELEMENTS, "peak_gb": round(result["peak_rss"] / 1e9, 3),
                      "quantize_s": round(result["quantize_s"], 1), "stages": stages}))  # fmt: skip


if __name__ == "__main__":
    main()
