"""Start-up: what `import gwq_compile` and `gwq --help` load, what they print, and when GWQ joins transformers' registry."""

from __future__ import annotations

import enum
import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gwq_compile import import_noise

HEAVY = ("torch", "torchao", "triton", "transformers", "torch._dynamo")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_import_loads_nothing_heavy() -> None:
    proc = _run(f"import sys, gwq_compile; print([m for m in {HEAVY!r} if m in sys.modules])")
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_gwq_help_imports_no_torch() -> None:
    proc = _run(
        f"""
        import sys
        from gwq_tools.cli import build_parser
        text = build_parser().format_help()
        assert "quantize" in text and "eval" in text
        print([m for m in {HEAVY!r} if m in sys.modules])
        """
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
    help_run = subprocess.run([sys.executable, "-m", "gwq_compile", "quantize", "--help"], capture_output=True, text=True, timeout=300)
    assert help_run.returncode == 0 and "--calib-seqlen" in help_run.stdout


def test_nothing_on_stderr_when_importing_and_using_the_api() -> None:
    proc = _run(
        """
        import gwq_compile
        from gwq_compile import GWQConfig, GWQTensor, quantize_
        import transformers.quantizers.auto
        print(GWQConfig().bits)
        """
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "4"
    assert proc.stderr == "", proc.stderr


@pytest.mark.parametrize("transformers_first", [False, True])
def test_gwq_is_in_transformers_registry_after_import(transformers_first) -> None:
    imports = "import transformers.quantizers.auto as auto\nimport gwq_compile" if transformers_first else "import gwq_compile\nimport transformers.quantizers.auto as auto"
    proc = _run(imports + "\nprint(auto.AUTO_QUANTIZER_MAPPING['gwq'].__name__, auto.AUTO_QUANTIZATION_CONFIG_MAPPING['gwq'].__name__)")
    assert proc.returncode == 0 and proc.stdout.split() == ["GWQHfQuantizer", "GWQHfConfig"], proc.stdout + proc.stderr


def test_backend_is_the_function() -> None:
    import gwq_compile
    import gwq_compile.compile_backend  # importing the module must not shadow the function

    assert gwq_compile.backend is gwq_compile.compile_backend.backend


# ----------------------------------------------------------------------------- the noise filters drop only their message


def _passes(logger_name: str, msg: str, *args) -> bool:
    record = logging.LogRecord(logger_name, logging.WARNING, __file__, 1, msg, args, None)
    return logging.getLogger(logger_name).filter(record)


def test_torchao_cuda_extension_message_is_dropped_only_on_cpu_torch(monkeypatch) -> None:
    import torch

    import_noise.install()
    mxfp8 = "Failed to load /site/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: Could not load this library"
    monkeypatch.setattr(torch.version, "cuda", None)
    assert not _passes("torchao", mxfp8)
    assert _passes("torchao", "Failed to load /site/torchao/_C.abi3.so: undefined symbol")  # any other library stays
    assert _passes("torchao", "something else went wrong")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert _passes("torchao", mxfp8)  # on a CUDA build it is a real problem


def test_pytree_enum_deprecation_is_dropped_only_for_torchao_enums() -> None:
    import_noise.install()
    msg = "%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type."
    torchao_enum = enum.Enum("KernelPreference", "AUTO")
    torchao_enum.__module__ = "torchao.quantization.quantize_.common.kernel_preference"
    mine = enum.Enum("Mine", "A")
    assert not _passes("torch.utils._pytree", msg, torchao_enum)
    assert _passes("torch.utils._pytree", msg, mine)


def test_the_library_never_imports_the_tooling() -> None:
    """gwq_compile, passes and codegen import nothing from gwq_tools (evaluation, data, models, CLI, peers);
    only ``python -m gwq_compile`` (the CLI shim, kept for ``torchrun -m gwq_compile``) may."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    offenders = []
    for folder in ("gwq_compile", "passes", "codegen"):
        for path in sorted((root / folder).rglob("*.py")):
            if path.name == "__main__.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                offenders += [f"{path.relative_to(root)}:{node.lineno} imports {n}" for n in names if n.split(".")[0] == "gwq_tools"]
    assert offenders == []


def test_every_script_answers_help() -> None:
    """Each example and benchmark script with a ``__main__`` entry builds its command line and
    exits 0 on ``--help``: a name or import broken by a refactor fails here, not in a user's hands.
    One subprocess runs them all (imports are shared, so it takes seconds, not minutes)."""
    root = Path(__file__).resolve().parents[1]
    scripts = sorted(p for d in ("examples", "benchmarks") for p in (root / d).glob("*.py") if '__name__ == "__main__"' in p.read_text())
    assert len(scripts) >= 15
    check = textwrap.dedent(
        """
        import contextlib, io, json, runpy, sys
        failures = {}
        for path in sys.argv[1:]:
            sys.argv = [path, "--help"]
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    runpy.run_path(path, run_name="__main__")
                failures[path] = "ran instead of printing its help"
            except SystemExit as e:
                if e.code not in (0, None):
                    failures[path] = f"exit {e.code}"
            except BaseException as e:
                failures[path] = f"{type(e).__name__}: {e}"
        print(json.dumps(failures))
        """
    )
    result = subprocess.run([sys.executable, "-c", check, *map(str, scripts)], capture_output=True, text=True, timeout=600, cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {}
