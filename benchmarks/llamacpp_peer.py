"""llama.cpp with an importance matrix as a quality peer (a benchmark-time step, never in CI).

The peer most users pick for small models is llama.cpp's ``llama-quantize`` with an
importance matrix (``llama-imatrix``).  This module builds the two tools from the vendored
source of the ``llama-cpp-python`` 0.3.36 sdist (downloaded through pip, cached under
``~/.cache/gwq_compile/llamacpp``), computes the imatrix on WikiText-2 **validation**
text only, re-quantizes the SmolLM2 Q4_1 GGUF to each type (token embeddings and output
kept f32, as GWQ keeps the tied head dense), and returns the quantized file.  The caller
loads it with transformers (which dequantizes every GGUF type, the IQ ones included,
through gguf-py) and scores it with the same harness as every other row.

Bits per weight count the decoder linears only (``blk.*.attn_{q,k,v,output}`` and
``blk.*.ffn_{gate,up,down}``), from the GGUF tensors' stored bytes: everything a type
stores (block scales, super-block scales, sign/grid indices) is included.

Caveats (they favour llama.cpp, and each row says so): SmolLM2's K = 576 is not a multiple
of 256, so llama.cpp falls back from k-quants/IQ super-blocks to block-32 types
(Q4_0/Q5_0/IQ4_NL...) for most tensors; block-32 grids sit on the source's own Q4_1 grid.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

SDIST_VERSION = "0.3.36"
CACHE = Path(os.environ.get("GWQ_LLAMACPP_CACHE", Path.home() / ".cache" / "gwq_compile" / "llamacpp"))
#: The types measured (all with the imatrix), in the order of the issue's table.
TYPES = ("IQ3_XXS", "Q3_K_S", "IQ3_S", "IQ4_XS", "IQ4_NL", "Q3_K_M", "Q4_K_S", "Q4_K_M")
IMATRIX_CHUNKS, IMATRIX_CTX = 16, 512
DECODER_LINEAR = re.compile(r"^blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up|down))\.weight$")
CAVEAT = (
    "llama.cpp: K=576 is not a multiple of 256, so most tensors fall back from k-quants to block-32 "
    "Q4_0/Q5_0/IQ4_NL, whose grids sit on the source's own Q4_1 grid (favours llama.cpp)"
)


def _run(cmd: list[str], log: Path, cwd: Path | None = None) -> None:
    with log.open("a") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        subprocess.run(list(map(str, cmd)), cwd=cwd, stdout=f, stderr=subprocess.STDOUT, check=True)


def source_dir() -> Path:
    """The vendored llama.cpp source of the sdist (downloaded once with pip)."""
    root = CACHE / f"llama_cpp_python-{SDIST_VERSION}" / "vendor" / "llama.cpp"
    if root.is_dir():
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
    if not sdist.is_file():
        _run(["pip", "download", "--no-deps", "--no-binary", ":all:", f"llama-cpp-python=={SDIST_VERSION}", "-d", CACHE], CACHE / "build.log")
    shutil.unpack_archive(sdist, CACHE)
    return root


def tools(jobs: int = 2) -> dict[str, Path]:
    """``{"imatrix": path, "quantize": path}``, built (only those two targets) if missing."""
    src = source_dir()
    build = src / "build"
    bins = {"imatrix": build / "bin" / "llama-imatrix", "quantize": build / "bin" / "llama-quantize"}
    if all(p.is_file() for p in bins.values()):
        return bins
    log = CACHE / "build.log"
    _run(["cmake", "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
          "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_OPENMP=OFF"], log, cwd=src)  # fmt: skip
    _run(["cmake", "--build", build, f"-j{jobs}", "--target", "llama-imatrix", "llama-quantize"], log, cwd=src)
    return bins


def imatrix(source_gguf: Path, validation_text: str, threads: int = 2) -> Path:
    """The importance matrix of ``source_gguf`` on the first 16 x 512 tokens of ``validation_text``."""
    out = CACHE / f"imatrix_{source_gguf.stem}_{IMATRIX_CHUNKS}x{IMATRIX_CTX}.gguf"
    if out.is_file():
        return out
    text = CACHE / "wiki.valid.txt"
    text.write_text(validation_text)
    tmp = out.with_name(out.name + ".tmp.gguf")
    _run([tools()["imatrix"], "-m", source_gguf, "-f", text, "-o", tmp, "-c", IMATRIX_CTX, "--chunks", IMATRIX_CHUNKS, "-t", threads],
         CACHE / "imatrix.log")  # fmt: skip
    tmp.replace(out)
    return out


def quantize(source_gguf: Path, qtype: str, imatrix_file: Path | None, threads: int = 2) -> Path:
    """``source_gguf`` re-quantized to ``qtype`` (with ``imatrix_file`` if given); embeddings and output f32."""
    tag = "imat" if imatrix_file else "plain"
    out = CACHE / f"{source_gguf.stem}.{qtype}.{tag}.gguf"
    if out.is_file():
        return out
    tmp = out.with_name(out.name + ".tmp.gguf")
    cmd = [tools()["quantize"], "--allow-requantize", "--token-embedding-type", "f32", "--output-tensor-type", "f32"]
    if imatrix_file:
        cmd += ["--imatrix", imatrix_file]
    _run([*cmd, source_gguf, tmp, qtype, threads], CACHE / "quantize.log")
    tmp.replace(out)
    return out


def decoder_linear_bits(path: Path) -> dict:
    """Bits per weight of the decoder linears from the GGUF tensor bytes, and the types used."""
    import gguf

    reader = gguf.GGUFReader(path)
    n_bytes = n_weights = 0
    types: dict[str, int] = {}
    for t in reader.tensors:
        if not DECODER_LINEAR.match(t.name):
            continue
        n_bytes += int(t.n_bytes)
        n_weights += int(t.n_elements)
        name = gguf.GGMLQuantizationType(t.tensor_type).name
        types[name] = types.get(name, 0) + 1
    if not n_weights:
        raise ValueError(f"{path}: no decoder linear tensors found")
    return {"bits_per_weight": 8 * n_bytes / n_weights, "n_weights": n_weights, "tensor_types": types}
