"""GWQTensor: F.linear dispatch, torch.compile, state_dict / torch.save, op errors."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from gwq_compile import GWQTensor, packing


def _qlinear(n=40, k=100, bias=True, bits=4, group_size=32, density=0.02, dtype=torch.float32):
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=bias).to(dtype)
    mask = torch.rand(n, k) < density
    lin.weight = torch.nn.Parameter(GWQTensor.from_float(lin.weight.detach(), mask, bits, group_size), requires_grad=False)
    return lin


@pytest.mark.parametrize("kernel, op", [("", "gwq::linear_cpu"), ("triton", "gwq::linear")])
def test_linear_dispatches_to_the_registered_op(kernel, op, monkeypatch) -> None:
    monkeypatch.setenv("GWQ_KERNEL", kernel)
    lin = _qlinear()
    x = torch.randn(2, 3, 100)
    with torch.profiler.profile() as prof:
        y = lin(x)
    assert any(e.name == op for e in prof.events())
    ref = x @ lin.weight.dequantize().T + lin.bias
    torch.testing.assert_close(y, ref, **({"rtol": 0.03, "atol": 0.03} if kernel == "" else {}))  # "": bf16 compute


def test_compile_fullgraph_matches_eager() -> None:
    lin = _qlinear()
    x = torch.randn(4, 100)
    compiled = torch.compile(lin, fullgraph=True)
    torch.testing.assert_close(compiled(x), lin(x))


def test_gradients_reach_input_and_bias() -> None:
    lin = _qlinear()
    x = torch.randn(3, 100, requires_grad=True)
    lin(x).sum().backward()
    torch.testing.assert_close(x.grad, lin.weight.dequantize().sum(0).expand(3, -1))
    torch.testing.assert_close(lin.bias.grad, torch.full((40,), 3.0))


def test_state_dict_torch_save_weights_only() -> None:
    lin = _qlinear()
    buf = io.BytesIO()
    torch.save(lin.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert isinstance(sd["weight"], GWQTensor)
    fresh = torch.nn.Linear(100, 40)
    fresh.load_state_dict(sd, assign=True)
    x = torch.randn(2, 100)
    torch.testing.assert_close(fresh(x), lin(x), rtol=0, atol=0)


def test_outlier_mask_and_dequantize_dtype() -> None:
    lin = _qlinear(dtype=torch.bfloat16)
    w = lin.weight
    assert w.dequantize().dtype == torch.bfloat16
    assert w.outlier_mask().dtype == torch.bool and int(w.outlier_mask().sum()) == w.num_outliers


def test_unsupported_op_raises_naming_it() -> None:
    lin = _qlinear()
    with pytest.raises(NotImplementedError):
        torch.mm(torch.randn(2, 40), lin.weight)


def test_op_rejects_wrong_feature_count_and_device() -> None:
    lin = _qlinear()
    with pytest.raises(ValueError, match="features"):
        lin(torch.randn(2, 99))
    with pytest.raises(TypeError, match="floating"):
        F.linear(torch.ones(2, 100, dtype=torch.long), lin.weight)


def test_bad_kernel_choice(monkeypatch) -> None:
    monkeypatch.setenv("GWQ_KERNEL", "cuda-magic")
    with pytest.raises(ValueError, match="GWQ_KERNEL"):
        _qlinear()(torch.randn(1, 100))


def test_reference_op_equals_packing_reference() -> None:
    p = packing.quantize_weight(torch.randn(16, 40), torch.rand(16, 40) < 0.1, 3, 16)
    x = torch.randn(3, 40)
    y = torch.ops.gwq.linear(x, *p[:6], None, p.bits, p.group_size, p.in_features)
    torch.testing.assert_close(y, x @ packing.dequantize_weight(p).T)


def test_fast_flatten_equals_torchaos_generic_one() -> None:
    """GWQTensor.__tensor_flatten__ (cheap: compiled graphs' guards call it per weight per call)
    gives what torchao's generic version gives, in both layouts, after copies and dtype moves."""
    import copy

    from torchao.utils import TorchAOBaseTensor

    w = torch.randn(70, 150)
    mask = torch.rand(70, 150) < 0.02
    for layout, transposed in (("planes", False), ("cpu_int4", False), ("cpu_int4", True)):
        q = GWQTensor.from_packed(packing.quantize_weight(w, mask, bits=3, group_size=64), torch.float32, layout=layout, transposed=transposed)
        for t in (q, copy.deepcopy(q), q.to(torch.bfloat16), q.detach()):
            assert t.__tensor_flatten__() == TorchAOBaseTensor.__tensor_flatten__(t)


# ----------------------------------------------------------------------------- transposed (HF Conv1D) weights


def _qconv1d(nx=100, nf=40, bits=4, group_size=32, density=0.02, dtype=torch.float32):
    """An HF Conv1D (weight [nx, nf] = [in, out]) holding a transposed GWQTensor."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(1)
    conv = Conv1D(nf, nx).to(dtype)
    torch.nn.init.normal_(conv.bias)
    w_out_in = conv.weight.detach().t()
    mask = torch.rand(nf, nx) < density
    packed = packing.quantize_weight(w_out_in, mask, bits, group_size)
    conv.weight = torch.nn.Parameter(GWQTensor.from_packed(packed, dtype, transposed=True), requires_grad=False)
    return conv, w_out_in, mask


@pytest.mark.parametrize("kernel", ["", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 100), (5, 100), (2, 3, 100)])
def test_transposed_weight_runs_as_conv1d_uses_it(kernel, dtype, shape, monkeypatch) -> None:
    from gwq_compile import dispatch

    monkeypatch.setenv("GWQ_KERNEL", kernel)
    conv, w_out_in, mask = _qconv1d(dtype=dtype)
    w = conv.weight
    assert w.transposed and w.shape == (100, 40) and w.linear_shape == (40, 100) and (w.in_features, w.out_features) == (100, 40)
    dense = w.dequantize()
    assert dense.shape == (100, 40)
    torch.testing.assert_close(dense.t()[mask], w_out_in[mask].to(dtype), rtol=1e-3, atol=1e-3)  # the fp16 outliers, exact
    assert torch.equal(w.outlier_mask(), mask.t())
    x = torch.randn(*shape, dtype=dtype)
    before = dispatch.CALLS["cpu_int4"]
    with torch.no_grad():
        y = conv(x)  # Conv1D.forward: torch.addmm(b, x.view(-1, nx), W)
        y_mm = x @ w
    assert dispatch.CALLS["cpu_int4"] - before == (2 if kernel == "" else 0)  # the fast path ran (or, asked, the reference)
    ref = (x.float() @ dense.float() + conv.bias.float()).to(dtype)
    tol = {"rtol": 0.03, "atol": 0.05} if kernel == "" or dtype == torch.bfloat16 else {}
    assert y.shape == (*shape[:-1], 40) and y.dtype == dtype
    torch.testing.assert_close(y, ref, **tol)
    torch.testing.assert_close(y_mm, (x.float() @ dense.float()).to(dtype), **tol)


def test_transposed_weight_compiles_and_saves() -> None:
    conv, _, _ = _qconv1d()
    x = torch.randn(3, 100)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(conv, fullgraph=True)(x), conv(x))
    buf = io.BytesIO()
    torch.save(conv.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert sd["weight"].transposed and sd["weight"].shape == (100, 40)
    fresh, _, _ = _qconv1d()
    fresh.load_state_dict(sd, assign=True)
    moved = conv.weight.to(torch.bfloat16)
    assert moved.transposed and moved.dtype == torch.bfloat16 and moved.shape == (100, 40)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), conv(x), rtol=0, atol=0)


def test_transposed_weight_rejects_linear_uses_and_a_linear_weight_rejects_matmul() -> None:
    conv, _, _ = _qconv1d()
    with pytest.raises(NotImplementedError, match="Conv1D"):
        F.linear(torch.randn(2, 40), conv.weight)
    with pytest.raises(NotImplementedError, match="transposed"):
        F.embedding(torch.tensor([0, 1]), conv.weight)
    with pytest.raises(NotImplementedError, match="beta"):
        torch.addmm(conv.bias, torch.randn(2, 100), conv.weight, beta=0.5)
    lin = _qlinear()
    with pytest.raises(NotImplementedError, match="F.linear"):
        torch.randn(2, 40) @ lin.weight
