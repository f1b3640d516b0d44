"""gwq_compile.torch_internals: every private torch name the backend uses exists in this torch,
the attributes Dynamo sets are where the backend reads them, and a missing one fails loudly."""

from __future__ import annotations

import re

import pytest
import torch

from gwq_compile import torch_internals
from gwq_compile.torch_internals import DYNAMO_ATTRIBUTES, INTERNALS, MissingTorchInternal


@pytest.mark.parametrize("name", sorted(INTERNALS))
def test_every_listed_internal_exists_in_this_torch(name) -> None:
    torch_internals.resolve.cache_clear()
    assert torch_internals.resolve(name) is not None


def test_a_missing_internal_names_itself_and_the_torch_version(monkeypatch) -> None:
    torch_internals.resolve.cache_clear()
    monkeypatch.delattr(torch._dynamo.eval_frame, "cached_backends")
    with pytest.raises(MissingTorchInternal, match=rf"torch\._dynamo\.eval_frame\.cached_backends.*{re.escape(torch.__version__)}"):
        torch_internals.pending_compile_options(object())
    torch_internals.resolve.cache_clear()


def test_a_missing_dynamo_attribute_is_an_error_not_a_default(monkeypatch) -> None:
    module = torch.nn.Linear(2, 2)
    monkeypatch.delattr(torch.nn.Module, "_compiled_call_impl")  # as if torch renamed it
    module.__dict__.pop("_compiled_call_impl", None)
    with pytest.raises(MissingTorchInternal, match="_compiled_call_impl"):
        torch_internals.compiled_call(module)


def test_dynamo_sets_the_attributes_the_backend_reads() -> None:
    """One real compile with a recording backend: each entry of DYNAMO_ATTRIBUTES is checked."""
    assert len(DYNAMO_ATTRIBUTES) == 8  # a new entry needs a check below
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    seen = {}

    def recorder(gm, example_inputs):
        seen["param_sources"] = getattr(gm, "_param_name_to_source", None)
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        sources = [torch_internals.node_source(n) for n in placeholders]
        seen["sources"] = sources
        seen["grapharg_examples"] = [getattr(n.meta.get("grapharg"), "example", None) for n in placeholders]
        seen["locals"] = [torch_internals.module_local(s) for s in sources if s is not None]
        context = torch_internals.resolve("torch._guards.TracingContext").try_get()
        seen["guards"] = context.guards_context.dynamo_guards
        return gm.forward

    compiled = torch.compile(model, backend=recorder)
    assert torch_internals.compiled_module(compiled) is model  # OptimizedModule._orig_mod
    from gwq_compile.compile_backend import gwq_backend

    options = {"progress": False}
    torch.compile(torch.nn.Linear(8, 8), backend="gwq", options=options)  # compiled, never run: pending
    assert any(o is options for o in torch_internals.pending_compile_options(gwq_backend))  # .compiler_fn / .kwargs
    compiled(torch.randn(2, 8))
    assert isinstance(seen["param_sources"], dict)
    assert all(s is not None for s in seen["sources"])  # node._dynamo_source / grapharg.source
    assert any(isinstance(e, torch.nn.Parameter) for e in seen["grapharg_examples"])  # grapharg.example
    assert any(local is not None for local in seen["locals"])  # Source.base chains reach a LocalSource through a module
    assert hasattr(seen["guards"], "add")  # guards_context.dynamo_guards
    in_place = torch.nn.Linear(8, 8)
    assert torch_internals.compiled_call(in_place) is None
    in_place.compile(backend=recorder)
    assert torch_internals.compiled_call(in_place) is not None and torch_internals.compiled_module(in_place) is in_place
    torch._dynamo.reset()


def test_the_backend_reaches_torch_internals_only_through_this_module() -> None:
    """passes/ and compile_backend.py name no private torch attribute themselves (the counters
    import aside): each goes through torch_internals, which lists it and looks it up strictly."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    offenders = []
    for path in sorted((root / "passes").glob("*.py")) + [root / "gwq_compile" / "compile_backend.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch._"):
                if node.module != "torch._dynamo.utils" or [a.name for a in node.names] != ["counters"]:
                    offenders.append(f"{path.name}:{node.lineno} from {node.module} import ...")
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                text = ast.unparse(node)
                if text.startswith("torch.") or node.attr in ("_orig_mod", "_compiled_call_impl", "_param_name_to_source", "_dynamo_source", "_is_compiling_flag"):
                    offenders.append(f"{path.name}:{node.lineno} {text}")
    assert offenders == []
