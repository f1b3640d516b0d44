"""The ``gwq`` torch.compile backend: discovery, eager equivalence, recompiles, graph breaks,
memory, options, HF models (Llama, Qwen2 fullgraph; GPT-2 Conv1D) and the passes themselves.

Compiling on CPU is slow (seconds per small graph, ~30 s per tiny HF model when the
Inductor cache is cold), so compiled models are module-scoped fixtures shared by the
tests that only look at them.  Inference runs under ``no_grad``.
"""

from __future__ import annotations

import copy
import gc
import json
import subprocess
import sys
import textwrap
import weakref
from importlib.metadata import entry_points

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from gwq_compile import GWQConfig, GWQTensor, quantization_report, quantize_
from gwq_compile.compile_backend import CalibrationData, backend, parse_options, valid_options
from gwq_compile.calibration import logits_of, next_token_nll
from gwq_compile.passes import (
    annotate_linears,
    calibrate_model,
    capture_linears,
    model_quantization,
    rewrite_linears,
    weights_with_other_uses,
)
from gwq_compile.selection import select_outliers

CFG = dict(bits=4, group_size=32, outlier_ratio=0.02, progress=False)
VOCAB = 64


# ----------------------------------------------------------------------------- helpers


class TinyLM(torch.nn.Module):
    """Embedding -> Linear -> ReLU -> Linear -> (optional graph break) -> Linear head."""

    def __init__(self, seed: int = 0, graph_break: bool = False, dim: int = 64) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(VOCAB, dim)
        self.up = torch.nn.Linear(dim, 2 * dim)
        self.down = torch.nn.Linear(2 * dim, dim)
        self.proj_out = torch.nn.Linear(dim, VOCAB)
        self.graph_break = graph_break

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.down(torch.relu(self.up(self.emb(ids))))
        if self.graph_break:
            torch._dynamo.graph_break()
        return self.proj_out(h)


def token_ids(batch: int, seq: int, seed: int = 1, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def eager_gwq(fp_model: torch.nn.Module, calibration_data, **cfg) -> torch.nn.Module:
    model = copy.deepcopy(fp_model)
    quantize_(model, GWQConfig(**{**CFG, **cfg}), calibration_data=calibration_data)
    return model


def gwq_masks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.outlier_mask() for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), GWQTensor)}


def assert_masks_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), f"outlier mask of {name} differs"


def assert_within_10_percent(compiled: torch.Tensor, eager: torch.Tensor, fp: torch.Tensor) -> None:
    """The issue's criterion: |compiled - eager GWQ| <= 10% of |eager GWQ - FP| (max abs)."""
    quant_err = (eager - fp).abs().max().item()
    assert quant_err > 0, "quantization changed nothing: the test would be vacuous"
    assert (compiled - eager).abs().max().item() <= 0.1 * quant_err


def counts() -> dict[str, int]:
    return dict(counters["gwq"])


def delta(before: dict[str, int]) -> dict[str, int]:
    now = counts()
    return {k: now.get(k, 0) - before.get(k, 0) for k in set(now) | set(before) if now.get(k, 0) != before.get(k, 0)}


def param_bytes(model: torch.nn.Module) -> int:
    """Bytes of memory behind the model's parameters (packed tensors for GWQ weights)."""
    total, seen = 0, set()
    for p in model.parameters():
        tensors = [getattr(p, f) for f in p.__tensor_flatten__()[0]] if isinstance(p, GWQTensor) else [p]
        for t in tensors:
            storage = t.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
    return total


def unique_graphs() -> int:
    return counters["stats"]["unique_graphs"]


# ----------------------------------------------------------------------------- discovery


def test_entry_point_is_declared_and_listed() -> None:
    eps = {ep.name: ep.value for ep in entry_points(group="torch_dynamo_backends")}
    assert eps.get("gwq") == "gwq_compile.compile_backend:gwq_backend"
    assert "gwq" in torch._dynamo.list_backends()


FRESH_PROCESS = textwrap.dedent(
    """
    import copy, json, sys
    import torch
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(64, 64), torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 64))
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(3))
    options = {"bits": 4, "group_size": 32, "outlier_ratio": 0.02, "progress": False,
               "skip_modules": (), "calibration_data": ids}
    imported_before = "gwq_compile" in sys.modules
    compiled = torch.compile(model, backend="gwq", options=options)
    with torch.no_grad():
        out = compiled(ids)
    import gwq_compile
    from torch._dynamo.utils import counters
    options = {k: v for k, v in options.items() if k != "calibration_data"}
    gwq_compile.quantize_(reference, gwq_compile.GWQConfig(**options), calibration_data=ids)
    with torch.no_grad():
        eager = reference(ids)
    print(json.dumps({
        "imported_before": imported_before,
        "rewritten": counters["gwq"]["linear_rewritten"],
        "weights": [type(model[i].weight).__name__ for i in (1, 3)],
        "max_diff": (out - eager).abs().max().item(),
    }))
    """
)


def test_backend_found_through_entry_point_in_fresh_process(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["imported_before"] is False  # torch found the backend by itself
    assert report["rewritten"] == 2
    assert report["weights"] == ["GWQTensor", "GWQTensor"]
    assert report["max_diff"] < 1e-5


# ----------------------------------------------------------------------------- the tiny model, compiled once


@pytest.fixture(scope="module")
def tiny():
    """TinyLM compiled with backend="gwq" and plain-tensor options, plus its eager references."""
    fp = TinyLM(seed=0)
    model = copy.deepcopy(fp)
    ids = token_ids(2, 16)
    dense = {name: weakref.ref(getattr(model, name).weight) for name in ("up", "down", "proj_out")}
    bytes_before = param_bytes(model)
    before = counts()
    compiled = torch.compile(model, backend="gwq", options={**CFG, "calibration_data": ids})
    with torch.no_grad():
        out = compiled(ids)
    gc.collect()
    return dict(
        fp=fp, model=model, compiled=compiled, ids=ids, out=out, counts=delta(before), dense=dense,
        bytes_before=bytes_before, eager=eager_gwq(fp, ids),
    )  # fmt: skip


def test_compiled_matches_eager_gwq(tiny) -> None:
    with torch.no_grad():
        eager, fp = tiny["eager"](tiny["ids"]), tiny["fp"](tiny["ids"])
    assert_within_10_percent(tiny["out"], eager, fp)
    assert_masks_equal(gwq_masks(tiny["model"]), gwq_masks(tiny["eager"]))
    for name in ("up", "down", "proj_out"):
        ours, theirs = getattr(tiny["model"], name).weight, getattr(tiny["eager"], name).weight
        assert torch.equal(ours.dequantize(), theirs.dequantize()), name


def test_every_stage_is_counted(tiny) -> None:
    c = tiny["counts"]
    assert c["linear_captured"] == 3
    assert c["calibrations"] == 1
    assert c["layers_calibrated"] == 3
    assert c["linear_annotated"] == 3
    assert c["linear_rewritten"] == 3
    assert c["graphs_compiled"] == 1


def test_calibration_result_is_registered(tiny) -> None:
    quant = model_quantization(tiny["model"])
    assert sorted(quant.names()) == ["down", "proj_out", "up"]
    assert_masks_equal(quant.masks(), gwq_masks(tiny["eager"]))


def test_dense_weights_are_freed(tiny) -> None:
    gc.collect()
    assert all(ref() is None for ref in tiny["dense"].values()), "a dense weight is still alive"
    after = param_bytes(tiny["model"])
    dense_linear_bytes = sum(getattr(tiny["fp"], n).weight.numel() * 4 for n in ("up", "down", "proj_out"))
    resident = sum(quantization_report(tiny["model"])["layers"][n]["resident_bytes"] for n in ("up", "down", "proj_out"))
    assert after < tiny["bytes_before"]
    # the drop is the dense weights minus what their quantized form holds in memory
    assert tiny["bytes_before"] - after == dense_linear_bytes - resident


def test_recompiles_reuse_weights_and_never_recalibrate(tiny) -> None:
    model, compiled = tiny["model"], tiny["compiled"]
    weights = {n: getattr(model, n).weight for n in ("up", "down", "proj_out")}
    before, graphs_before = counts(), unique_graphs()
    for batch, seq in [(2, 16), (2, 20), (2, 24), (3, 24), (3, 28), (4, 9)]:
        ids = token_ids(batch, seq, seed=batch * 100 + seq)
        with torch.no_grad():
            assert_within_10_percent(compiled(ids), tiny["eager"](ids), tiny["fp"](ids))
    d = delta(before)
    assert d.get("calibrations", 0) == 0
    assert d.get("layers_calibrated", 0) == 0
    assert unique_graphs() - graphs_before <= 3  # static shape once, then dynamic batch / seq
    assert all(getattr(model, n).weight is w for n, w in weights.items())
    assert d.get("graphs_compiled", 0) >= 1
    # recompiles read the GWQ weights, and annotate/rewrite still turn each of them into the explicit op
    assert d.get("linear_prequantized", 0) == 3 * d["graphs_compiled"]
    assert d.get("linear_rewritten", 0) == 3 * d["graphs_compiled"]


# ----------------------------------------------------------------------------- graph breaks, several models


def test_graph_break_uses_whole_model_gradients() -> None:
    fp = TinyLM(seed=2, graph_break=True)
    model = copy.deepcopy(fp)
    ids = token_ids(2, 16, seed=5)
    before, graphs_before = counts(), unique_graphs()
    compiled = torch.compile(model, backend="gwq", options={**CFG, "calibration_data": ids})
    with torch.no_grad():
        out = compiled(ids)
    assert unique_graphs() - graphs_before >= 2, "the model was meant to break the graph"
    d = delta(before)
    assert d["calibrations"] == 1
    assert all(isinstance(getattr(model, n).weight, GWQTensor) for n in ("up", "down", "proj_out"))
    # the graph after the break reads proj_out quantized already; it is rewritten all the same
    assert d["linear_prequantized"] >= 1 and d["linear_rewritten"] == 3
    eager = eager_gwq(fp, ids)
    assert_masks_equal(gwq_masks(model), gwq_masks(eager))
    with torch.no_grad():
        assert_within_10_percent(out, eager(ids), fp(ids))


def test_model_quantized_before_compile_is_rewritten_without_recalibrating() -> None:
    fp = TinyLM(seed=3)
    ids = token_ids(2, 16, seed=7)
    model = eager_gwq(fp, ids)
    weights = {n: getattr(model, n).weight for n in ("up", "down", "proj_out")}
    reference = copy.deepcopy(model)
    before = counts()
    compiled = torch.compile(model, backend="gwq", options={**CFG, "calibration_data": ids})
    with torch.no_grad():
        out = compiled(ids)
        expected = reference(ids)
    d = delta(before)
    assert d.get("layers_calibrated", 0) == 0
    assert d["linear_prequantized"] == d["linear_rewritten"] == 3  # the explicit op on the existing packed weights
    assert all(getattr(model, n).weight is w for n, w in weights.items())
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_two_models_with_plain_tensor_options() -> None:
    fps = [TinyLM(seed=10), TinyLM(seed=11)]
    models = [copy.deepcopy(m) for m in fps]
    data = [token_ids(2, 16, seed=20), token_ids(2, 16, seed=21)]
    options = [{**CFG, "calibration_data": ids} for ids in data]
    compiled = [torch.compile(m, backend="gwq", options=o) for m, o in zip(models, options)]
    eager = [eager_gwq(fp, ids) for fp, ids in zip(fps, data)]
    with torch.no_grad():
        for _ in range(2):  # the second round reuses each model's own compiled graph
            for c, e, fp, ids in zip(compiled, eager, fps, data):
                assert_within_10_percent(c(ids), e(ids), fp(ids))
    for m, e in zip(models, eager):
        assert_masks_equal(gwq_masks(m), gwq_masks(e))
    assert all(isinstance(o["calibration_data"], CalibrationData) for o in options)


def test_module_compiled_in_place() -> None:
    """model.compile(backend="gwq"): calibration must not re-enter the in-place compiled call."""
    fp = TinyLM(seed=30)
    model = copy.deepcopy(fp)
    ids = token_ids(2, 16, seed=31)
    model.compile(backend="gwq", options={**CFG, "calibration_data": ids})
    eager = eager_gwq(fp, ids)
    with torch.no_grad():
        assert_within_10_percent(model(ids), eager(ids), fp(ids))
    assert_masks_equal(gwq_masks(model), gwq_masks(eager))


def test_compiled_function_needs_the_model(monkeypatch) -> None:
    fp = TinyLM(seed=3)
    model = copy.deepcopy(fp)
    ids = token_ids(1, 12, seed=6)
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="could not find the model"):
        torch.compile(lambda x: model(x), backend="gwq", options={**CFG, "calibration_data": ids})(ids)
    be = backend(GWQConfig(**CFG), calibration_data=ids, model=model)

    def no_stack_walk(*args, **kwargs):
        raise AssertionError("the backend walked the stack although it was given the model and the data")

    monkeypatch.setattr("gwq_compile.compile_backend.find_model_call", no_stack_walk)
    with torch.no_grad():
        out = torch.compile(lambda x: model(x) * 1.0, backend=be)(ids)
        assert_within_10_percent(out, eager_gwq(fp, ids)(ids), fp(ids))


def test_calibration_runs_without_rebinding_the_compiler_flag(monkeypatch) -> None:
    """The backend calibrates with torch.compiler.is_compiling() as torch reports it (True for the
    whole compile session): no compiler flag is rebound, and the masks still equal eager GWQ's."""
    from gwq_compile import calibration

    seen = []
    run = calibration.run_calibration

    def recording(*args, **kwargs):
        seen.append(torch.compiler.is_compiling())
        return run(*args, **kwargs)

    monkeypatch.setattr(calibration, "run_calibration", recording)
    fp = TinyLM(seed=4)
    model = copy.deepcopy(fp)
    ids = token_ids(2, 16, seed=8)
    with torch.no_grad():
        torch.compile(model, backend="gwq", options={**CFG, "calibration_data": ids})(ids)
    assert seen == [True]
    monkeypatch.setattr(calibration, "run_calibration", run)
    assert_masks_equal(gwq_masks(model), gwq_masks(eager_gwq(fp, ids)))


def test_weight_read_outside_a_linear_stays_dense(monkeypatch) -> None:
    monkeypatch.setenv("GWQ_KERNEL", "reference")  # exact comparison below (the CPU fast path computes in bf16)

    class Mixed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(4)
            self.emb = torch.nn.Embedding(VOCAB, 32)
            self.a = torch.nn.Linear(32, 32)
            self.b = torch.nn.Linear(32, VOCAB)

        def forward(self, ids):
            h = self.a(self.emb(ids))
            return self.b(h) + self.a.weight.mean()  # a.weight is also read directly

    model, ids = Mixed(), token_ids(1, 10, seed=7)
    fp = copy.deepcopy(model)
    compiled = torch.compile(model, backend="gwq", options={**CFG, "calibration_data": ids})
    with pytest.warns(UserWarning, match="'a': the graph reads its weight other than through a linear"), torch.no_grad():
        out = compiled(ids)
    assert not isinstance(model.a.weight, GWQTensor)
    assert isinstance(model.b.weight, GWQTensor)
    with torch.no_grad():
        expected = F.linear(fp.a(fp.emb(ids)), model.b.weight.dequantize(), fp.b.bias) + fp.a.weight.mean()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_linear_weight_read_untransposed_stays_dense(monkeypatch) -> None:
    monkeypatch.setenv("GWQ_KERNEL", "reference")  # exact comparison below (the CPU fast path computes in bf16)
    """addmm(b, x, W) with an nn.Linear's [out, in] weight is not that layer's linear: keep W dense."""

    class Odd(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(5)
            self.emb = torch.nn.Embedding(VOCAB, 32)
            self.sq = torch.nn.Linear(32, 32)
            self.out = torch.nn.Linear(32, VOCAB)

        def forward(self, ids):
            h = self.emb(ids).view(-1, 32)
            return self.out(torch.addmm(self.sq.bias, h, self.sq.weight)).view(*ids.shape, VOCAB)

    model, ids = Odd(), token_ids(1, 10, seed=8)
    fp = copy.deepcopy(model)
    compiled = torch.compile(model, backend="gwq", options={**CFG, "calibration_data": ids})
    with pytest.warns(UserWarning, match="'sq': the graph reads its weight"), torch.no_grad():
        out = compiled(ids)
    assert not isinstance(model.sq.weight, GWQTensor) and isinstance(model.out.weight, GWQTensor)
    with torch.no_grad():
        h = torch.addmm(fp.sq.bias, fp.emb(ids).view(-1, 32), fp.sq.weight)
        expected = F.linear(h, model.out.weight.dequantize(), fp.out.bias).view(*ids.shape, VOCAB)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- calibration without data


def test_first_call_calibration_uses_next_token_loss() -> None:
    fp = TinyLM(seed=5)
    model = copy.deepcopy(fp)
    ids = token_ids(1, 16, seed=8)  # one sample: eager quantize_ computes exactly this loss
    compiled = torch.compile(model, backend="gwq", options=CFG)
    with pytest.warns(UserWarning, match="first call's inputs with the 'next_token' loss"), torch.no_grad():
        out = compiled(ids)
    assert model_quantization(model).calibration_loss == "next_token"
    eager = eager_gwq(fp, ids)
    assert_masks_equal(gwq_masks(model), gwq_masks(eager))
    with torch.no_grad():
        assert_within_10_percent(out, eager(ids), fp(ids))


def test_first_call_calibration_of_a_non_lm_uses_output_energy() -> None:
    torch.manual_seed(6)
    fp = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
    model = copy.deepcopy(fp)
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(9))
    cfg = {**CFG, "skip_modules": (), "saliency": "grad", "outlier_scope": "layer"}  # the paper's |g| per layer: checkable by hand
    compiled = torch.compile(model, backend="gwq", options=cfg)
    with pytest.warns(UserWarning, match="'output_energy' loss"), torch.no_grad():
        compiled(x)
    # the saliency by hand: |dL/dW| of L = 0.5 * mean(y^2), then the same top-k selection
    y = fp(x)
    (0.5 * (y.square().sum() / y.numel())).backward()
    for name in ("0", "2"):
        grad = getattr(fp, name).weight.grad
        expected = select_outliers(grad.abs(), cfg["outlier_ratio"], "layer")
        assert torch.equal(getattr(model, name).weight.outlier_mask(), expected), name


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "options, message",
    [
        ({"bitz": 4}, r"unknown gwq backend option\(s\) \['bitz'\]; valid options: bits, group_size, .*calibration_data"),
        ({"bits": 5}, r"GWQConfig.bits must be an int, one of \(2, 3, 4, 8\), got 5"),
        ({"outlier_ratio": 0.9}, r"GWQConfig.outlier_ratio must be in \[0, 0.5\]"),
        ({"saliency": "magic"}, r"GWQConfig.saliency must be one of"),
        ({"step": "prepare"}, r"option step must be None"),
    ],
)
def test_bad_options_are_rejected_by_name(options, message) -> None:
    model, ids = TinyLM(seed=7), token_ids(1, 8)
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match=message):
        torch.compile(model, backend="gwq", options={**options, "calibration_data": ids})(ids)
    assert not any(isinstance(p, GWQTensor) for p in model.parameters())


def test_option_helpers() -> None:
    assert valid_options()[-1] == "calibration_data" and "bits" in valid_options()
    cfg, data = parse_options({"bits": 3, "calibration_data": CalibrationData([1, 2])})
    assert cfg.bits == 3 and data == [1, 2]
    with pytest.raises(ValueError, match=r"unknown gwq backend option\(s\) \['bitz'\]"):
        backend(bitz=3)
    with pytest.raises(TypeError, match="config must be a GWQConfig"):
        backend({"bits": 3})
    a, b = CalibrationData(torch.ones(3, 3)), CalibrationData(torch.ones(3, 3))
    assert a == a and a != b and {"x": a} != {"x": b}  # no "Boolean value of Tensor" error


# ----------------------------------------------------------------------------- the passes on a Dynamo graph


class AllPatterns(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        torch.manual_seed(8)
        self.a, self.b, self.d = torch.nn.Linear(32, 32), torch.nn.Linear(32, 32, bias=False), torch.nn.Linear(32, 32)
        self.c = Conv1D(32, 32)

    def forward(self, x):
        y = torch.addmm(self.a.bias, x.view(-1, 32), self.a.weight.t()).view(x.shape)  # addmm(b, x, W^T)
        y = y @ self.b.weight.T  # matmul(x, W.T)
        y = torch.matmul(y, self.b.weight.transpose(0, 1))  # matmul(x, W.transpose)
        y = self.c(y)  # HF Conv1D: addmm(b, x, W[in, out])
        y = y.matmul(self.d.weight.permute(1, 0)) + self.d.bias  # method matmul, permute
        y = y @ self.d.weight  # matmul against an un-transposed weight: not a linear
        return F.linear(y, self.a.weight, self.a.bias)  # F.linear


def _record(model, *args):
    graphs = []

    def recorder(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch.compile(model, backend=recorder)(*args)
    return graphs[0]


def test_capture_finds_every_linear_form() -> None:
    gm, _ = _record(AllPatterns(), torch.randn(2, 3, 32))
    sites = capture_linears(gm)
    found = [(s.pattern, s.layout, s.transpose is not None) for s in sites]
    assert found == [
        ("addmm", "out_in", True),
        ("matmul", "out_in", True),
        ("matmul", "out_in", True),
        ("addmm", "in_out", False),
        ("matmul", "out_in", True),
        ("linear", "out_in", False),
    ]
    assert all((s.out_features, s.in_features) == (32, 32) for s in sites)
    # d.weight is also read un-transposed by a plain matmul: it must stay dense
    assert {n.name for n in weights_with_other_uses(sites)} == {"l_self_modules_d_parameters_weight_"}


def test_annotate_and_rewrite_preserve_the_quantized_model() -> None:
    model = AllPatterns()
    x = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(2))
    gm, example_inputs = _record(model, x)
    energy_cfg = GWQConfig(**{**CFG, "skip_modules": ()})
    sites = capture_linears(gm)
    shared = {id(i) for n, i in zip(gm.graph.find_nodes(op="placeholder"), example_inputs) if n in weights_with_other_uses(sites)}
    from gwq_compile.passes import ModelCall

    with pytest.warns(UserWarning):
        quant = calibrate_model(model, energy_cfg, call=ModelCall(model, (x,)), exclude=frozenset(shared))
    assert sorted(quant.names()) == ["a", "b", "c"]
    annotated = annotate_linears(gm, sites, example_inputs, quant)
    assert len(annotated) == 5  # every site but the two reading the excluded d.weight
    for site in annotated:
        annotation = site.node.meta["gwq"]
        assert torch.equal(annotation.outlier_mask(), quant.masks()[annotation.name])
        assert annotation.group_scales.shape == (32, 1) and annotation.bits == 4
    baked = rewrite_linears(gm, annotated)
    assert {n.name for n in baked} == {f"l_self_modules_{m}_parameters_weight_" for m in "abc"}
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.gwq.linear_cpu.default) == 5  # CPU weights: the int4 CPU op
    assert all(not n.users for n in baked)  # the dense weights are no longer read
    # the Conv1D holds its quantized weight like the Linears: transposed, in the module's [in, out] shape
    assert isinstance(model.c.weight, GWQTensor) and model.c.weight.transposed and model.c.weight.shape == (32, 32)
    assert quant.layers[next(k for k, v in quant.layers.items() if v.name == "c")].weight is model.c.weight
    # the graph now computes what the quantized weights compute in eager mode
    with torch.no_grad():
        (out,) = gm(*example_inputs)
        wc = model.c.weight.dequantize()  # [in, out], as Conv1D uses it
        wa, wb = model.a.weight.dequantize(), model.b.weight.dequantize()
        y = F.linear(x, wa, model.a.bias)
        y = F.linear(F.linear(y, wb), wb)
        y = torch.addmm(model.c.bias, y.view(-1, 32), wc).view(y.shape)
        y = F.linear(y, model.d.weight, model.d.bias)
        y = y @ model.d.weight
        expected = F.linear(y, wa, model.a.bias)
    torch.testing.assert_close(out, expected, rtol=0.02, atol=0.02)  # gwq.linear_cpu computes in bf16


# ----------------------------------------------------------------------------- HF models


def _hf_small(kind: str, seed: int = 0) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=1, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=1)).eval()
    common = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    config_cls, model_cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[kind]
    return model_cls(config_cls(**common)).eval()


def _lm_logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.fixture(scope="module")
def llama_fullgraph():
    fp = _hf_small("llama")
    model = copy.deepcopy(fp)
    ids = token_ids(2, 16, seed=11, vocab=128)
    before = counts()
    compiled = torch.compile(model, backend="gwq", options={**CFG, "calibration_data": ids}, fullgraph=True)
    out = _lm_logits(compiled, ids)
    return dict(fp=fp, model=model, compiled=compiled, ids=ids, out=out, counts=delta(before), eager=eager_gwq(fp, ids))


def test_llama_fullgraph_matches_eager(llama_fullgraph) -> None:
    r = llama_fullgraph
    assert_within_10_percent(r["out"], _lm_logits(r["eager"], r["ids"]), _lm_logits(r["fp"], r["ids"]))
    assert_masks_equal(gwq_masks(r["model"]), gwq_masks(r["eager"]))
    assert r["counts"]["linear_rewritten"] == 7  # q, k, v, o, gate, up, down; lm_head is skipped
    assert r["counts"]["linear_skipped"] == 1
    assert r["model"].lm_head.weight.dtype == torch.float32 and not isinstance(r["model"].lm_head.weight, GWQTensor)


def test_llama_new_sequence_length_recompiles_without_recalibrating(llama_fullgraph) -> None:
    r = llama_fullgraph
    before, graphs_before = counts(), unique_graphs()
    ids = token_ids(2, 24, seed=12, vocab=128)
    assert_within_10_percent(_lm_logits(r["compiled"], ids), _lm_logits(r["eager"], ids), _lm_logits(r["fp"], ids))
    d = delta(before)
    assert unique_graphs() - graphs_before == 1
    assert d.get("calibrations", 0) == 0
    assert d["linear_prequantized"] == 7
    assert d["linear_rewritten"] == 7  # the new graph gets the explicit op too, not the subclass's dispatch


def test_qwen2_fullgraph_matches_eager() -> None:
    fp = _hf_small("qwen2", seed=1)
    model = copy.deepcopy(fp)
    ids = token_ids(1, 20, seed=13, vocab=128)
    compiled = torch.compile(model, backend="gwq", options={**CFG, "calibration_data": ids}, fullgraph=True)
    out = _lm_logits(compiled, ids)
    eager = eager_gwq(fp, ids)
    assert_within_10_percent(out, _lm_logits(eager, ids), _lm_logits(fp, ids))
    assert_masks_equal(gwq_masks(model), gwq_masks(eager))


@pytest.mark.parametrize(
    "selection",
    [
        {"saliency": "grad", "outlier_scope": "layer"},  # the paper's
        {"saliency": "grad_error", "outlier_scope": "model", "clip_search": False},  # the default's ranking (min/max grid: checkable by hand)
    ],
)
def test_gpt2_conv1d_layers_are_captured_and_quantized(selection) -> None:
    from transformers.pytorch_utils import Conv1D

    from gwq_compile import packing
    from gwq_compile.selection import model_outlier_counts

    fp = _hf_small("gpt2", seed=2)
    model = copy.deepcopy(fp)
    ids = token_ids(2, 16, seed=14, vocab=128)
    before = counts()
    options = {**CFG, **selection}
    compiled = torch.compile(model, backend="gwq", options={**options, "calibration_data": ids}, fullgraph=True)
    out = _lm_logits(compiled, ids)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, Conv1D)}
    assert delta(before)["linear_rewritten"] == len(convs) == 4
    quant = model_quantization(model)
    layers = {layer.name: layer for layer in quant.layers.values()}
    assert sorted(layers) == sorted(convs)
    # each Conv1D holds its quantized weight (transposed, the module's [in, out] shape): no split brain
    assert all(isinstance(m.weight, GWQTensor) and m.weight.transposed and m.weight.shape == fp.get_submodule(n).weight.shape for n, m in convs.items())
    # masks: the per-sample |dL/dW| sums of the whole-model next-token loss, by hand
    saliency = {n: 0 for n in convs}
    reference = copy.deepcopy(fp)
    for row in ids:
        reference.zero_grad()
        next_token_nll(logits_of(reference(row[None])), row[None]).backward()  # as run_calibration does
        for n, m in reference.named_modules():
            if n in saliency:
                saliency[n] = saliency[n] + m.weight.grad.abs().t()
    if selection["saliency"] == "grad_error":  # |g| x squared rounding error on the [out, in] min/max grid
        for n, m in fp.named_modules():
            if n in saliency:
                w = m.weight.detach().t().contiguous()
                rtn = packing.dequantize_weight(packing.quantize_weight(w, None, CFG["bits"], CFG["group_size"]))
                saliency[n] = saliency[n] * (w - rtn).square()
    names = sorted(saliency)
    shares = dict(zip(names, model_outlier_counts([saliency[n] for n in names], CFG["outlier_ratio"])))
    for n, layer in layers.items():
        assert layer.layout == "in_out"
        expected = select_outliers(saliency[n], CFG["outlier_ratio"], selection["outlier_scope"], shares[n])
        assert torch.equal(layer.outlier_mask, expected), n
    # output: the FP model with each Conv1D weight replaced by its dequantized packed weight
    dense_gwq = copy.deepcopy(fp)
    for n, m in dense_gwq.named_modules():
        if n in layers:
            m.weight = torch.nn.Parameter(layers[n].weight.dequantize())  # [in, out], the Conv1D's own orientation
    assert_within_10_percent(out, _lm_logits(dense_gwq, ids), _lm_logits(fp, ids))


def test_gpt2_after_compile_is_one_quantized_model(tmp_path) -> None:
    """After torch.compile(gpt2, backend="gwq") the Conv1D weights live in the model, not only in
    the graph: the report counts them, the eager model runs them, save_quantized writes them, and
    all of it equals eager quantize_ on the same data (the backend calls the same functions)."""
    from gwq_compile import load_quantized, quantization_report, save_quantized

    fp = _hf_small("gpt2", seed=3)
    ids = token_ids(2, 16, seed=15, vocab=128)
    model = copy.deepcopy(fp)
    compiled = torch.compile(model, backend="gwq", options={**CFG, "calibration_data": ids})
    out = _lm_logits(compiled, ids)
    report = quantization_report(model)
    assert report["quantized_layers"] == 4 and all(r["shape"] == list(fp.get_submodule(n).weight.shape) for n, r in report["layers"].items())
    eager = eager_gwq(fp, ids)
    assert_masks_equal(gwq_masks(model), gwq_masks(eager))
    for name, mod in eager.named_modules():
        if isinstance(getattr(mod, "weight", None), GWQTensor):
            mine, theirs = mod.weight.packed(), model.get_submodule(name).weight.packed()
            assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in zip(mine, theirs)), name
    with torch.no_grad():
        own = model(ids).logits  # the eager call of the compiled model's own modules
        torch.testing.assert_close(own, out, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(own, eager(ids).logits, rtol=0, atol=0)
    save_quantized(model, tmp_path / "gpt2")
    import transformers as tf

    for loaded in (load_quantized(copy.deepcopy(fp), tmp_path / "gpt2"), tf.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2")):
        assert loaded.transformer.h[0].attn.c_attn.weight.transposed
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, own, rtol=0, atol=0)
