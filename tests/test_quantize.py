"""quantize_ / GWQConfig on tiny random Llamas: calibration, convert, the torchao path, restore, errors (which weights are chosen: test_selection.py)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchao

from gwq_compile import GWQConfig, GWQTensor, dispatch, grid, gwq_filter, packing, quantization_report, quantize_
from gwq_compile.calibration import logits_of, next_token_nll
from tests.conftest import tiny_llama

CFG = dict(bits=3, group_size=64, outlier_ratio=0.02, progress=False)


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _dense_copy(model):
    """The same model with every GWQTensor weight replaced by its dequantized dense weight."""
    dense = copy.deepcopy(model)
    for mod in _linears(dense).values():
        if isinstance(mod.weight, GWQTensor):
            mod.weight = torch.nn.Parameter(mod.weight.dequantize(), requires_grad=False)
    return dense


def _layer_inputs(model, token_ids) -> dict[str, torch.Tensor]:
    """Inputs ``[tokens, in_features]`` (fp32) of every Linear but lm_head in one forward."""
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, name=n: inputs.setdefault(name, []).append(args[0].detach()))
        for n, m in _linears(model).items()
        if n != "lm_head"
    ]
    try:
        with torch.no_grad():
            model(token_ids)
    finally:
        for h in hooks:
            h.remove()
    return {name: torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).float() for name, xs in inputs.items()}


def test_one_shot_quantizes_every_linear_but_lm_head(llama, token_ids) -> None:
    quantize_(llama, GWQConfig(**CFG), calibration_data=token_ids[:1])
    for name, mod in _linears(llama).items():
        assert isinstance(mod.weight, GWQTensor) == (name != "lm_head"), name
    assert llama.lm_head.weight is llama.model.embed_tokens.weight  # tie kept


def test_quantized_forward_equals_dense_dequantized_forward(llama, token_ids, monkeypatch) -> None:
    """Exactly on the plain-PyTorch reference; to bf16 accuracy on the CPU fast path."""
    fp = llama(token_ids).logits
    quantize_(llama, GWQConfig(**CFG), calibration_data=token_ids[:1])
    fast = llama(token_ids).logits
    d = _dense_copy(llama)(token_ids).logits
    monkeypatch.setenv(dispatch.KERNEL_ENV, "reference")
    q = llama(token_ids).logits
    torch.testing.assert_close(q, d, rtol=1e-5, atol=1e-5)
    assert (q - fp).abs().max() > 1e-3  # it really is quantized
    assert (fast - q).norm() < 0.05 * (q - fp).norm()  # bf16 rounding is far below the quantization error


def test_flags_grads_and_mode_are_restored(llama, token_ids) -> None:
    llama.train()
    llama.model.norm.weight.requires_grad_(False)
    old_grad = torch.ones_like(llama.model.embed_tokens.weight)
    llama.model.embed_tokens.weight.grad = old_grad
    quantize_(llama, GWQConfig(**CFG), calibration_data=token_ids[:1])
    assert llama.training and all(m.training for m in llama.modules())
    assert llama.model.norm.weight.requires_grad is False
    assert llama.model.layers[0].input_layernorm.weight.requires_grad is True
    assert llama.model.embed_tokens.weight.grad is old_grad
    assert all(not p.requires_grad for n, p in llama.named_parameters() if isinstance(p, GWQTensor))


def test_prepare_convert_with_own_loss_equals_one_shot(token_ids) -> None:
    a, b = tiny_llama(3), tiny_llama(3)
    quantize_(a, GWQConfig(**CFG), calibration_data=token_ids[:1])
    quantize_(b, GWQConfig(step="prepare"))
    ids = token_ids[:1]
    next_token_nll(b(ids).logits, ids).backward()
    quantize_(b, GWQConfig(step="convert", **CFG))
    for (na, ma), (nb, mb) in zip(_linears(a).items(), _linears(b).items()):
        if isinstance(ma.weight, GWQTensor):
            assert torch.equal(ma.weight.outlier_mask(), mb.weight.outlier_mask()), na
            assert torch.equal(ma.weight.packed().packed_codes, mb.weight.packed().packed_codes), na


def test_torchao_quantize_path(llama, token_ids) -> None:
    ids = token_ids[:1]
    prepare = GWQConfig(step="prepare")
    torchao.quantization.quantize_(llama, prepare, filter_fn=gwq_filter(llama, prepare))
    next_token_nll(llama(ids).logits, ids).backward()
    convert = GWQConfig(step="convert", **CFG)
    torchao.quantization.quantize_(llama, convert, filter_fn=gwq_filter(llama, convert))
    assert quantization_report(llama)["quantized_layers"] == 14
    assert torch.isfinite(llama(ids).logits).all()


@pytest.mark.parametrize("filters", ["gwq_filter", "plain", "none"])
def test_torchao_path_ranks_the_model(llama, token_ids, filters: str) -> None:
    """outlier_scope="model" through torchao's quantize_: the layers prepared together are
    ranked together at the first convert, whatever filter the convert pass uses ("plain": a
    lambda; "none": torchao's default, every nn.Linear, at prepare and convert); masks equal
    the one-shot API's on the same layers."""
    ids = token_ids[:1]
    cfg = GWQConfig(**{**CFG, "outlier_scope": "model"})
    every_linear = filters == "none"
    if every_linear:  # the one-shot API on the same layers: the LM head too (untied: one grid for one weight)
        llama = tiny_llama(tie=False)
        cfg = cfg.replace(skip_modules=())
    reference = copy.deepcopy(llama)
    quantize_(reference, cfg, calibration_data=ids)
    prepare = cfg.replace(step="prepare")
    torchao.quantization.quantize_(llama, prepare, filter_fn=None if every_linear else gwq_filter(llama, prepare))
    next_token_nll(llama(ids).logits, ids).backward()
    convert = cfg.replace(step="convert")
    convert_filter = {
        "gwq_filter": lambda: gwq_filter(llama, convert),
        "plain": lambda: (lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn != "lm_head"),
        "none": lambda: None,
    }[filters]()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every prepared layer converts: none is left dense with a warning
        torchao.quantization.quantize_(llama, convert, filter_fn=convert_filter)
    for name, mod in _linears(llama).items():
        if name != "lm_head" or every_linear:
            assert torch.equal(mod.weight.outlier_mask(), _linears(reference)[name].weight.outlier_mask()), name
    assert isinstance(llama.lm_head.weight, GWQTensor) == every_linear


def test_a_copy_of_a_prepared_model_is_not_prepared(llama, token_ids) -> None:
    """A deep copy does not carry the calibration state (nor its group): converting it is the
    clear "convert without prepare" error, never a ranking over some other set of layers."""
    ids = token_ids[:1]
    prepare = GWQConfig(**{**CFG, "outlier_scope": "model", "step": "prepare"})
    torchao.quantization.quantize_(llama, prepare, filter_fn=gwq_filter(llama, prepare))
    next_token_nll(llama(ids).logits, ids).backward()
    copied = copy.deepcopy(llama)
    with pytest.raises(ValueError, match="convert without prepare"):
        torchao.quantization.quantize_(copied, prepare.replace(step="convert"), filter_fn=lambda m, fqn: fqn != "lm_head" and isinstance(m, torch.nn.Linear))


def test_torchao_one_shot_without_data_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="calibration"):
        torchao.quantization.quantize_(torch.nn.Sequential(torch.nn.Linear(8, 8)), GWQConfig())


def test_single_linear_model(monkeypatch) -> None:
    monkeypatch.setenv(dispatch.KERNEL_ENV, "reference")
    lin = torch.nn.Linear(70, 33)
    x = torch.randn(5, 70)
    quantize_(lin, GWQConfig(step="prepare"))
    lin(x).square().mean().backward()
    quantize_(lin, GWQConfig(step="convert", bits=4, group_size=32, progress=False))
    assert isinstance(lin.weight, GWQTensor)
    torch.testing.assert_close(lin(x), x @ lin.weight.dequantize().T + lin.bias)


def test_tied_linears_are_quantized_once() -> None:
    a, b = torch.nn.Linear(32, 32, bias=False), torch.nn.Linear(32, 32, bias=False)
    b.weight = a.weight
    model = torch.nn.Sequential(torch.nn.Embedding(50, 32), a, torch.nn.ReLU(), b, torch.nn.Linear(32, 50))
    quantize_(model, GWQConfig(bits=4, group_size=32, progress=False, skip_modules=()),
              calibration_data=torch.randint(0, 50, (1, 20)))  # fmt: skip
    assert isinstance(a.weight, GWQTensor) and a.weight is b.weight


def test_lm_head_tied_to_embedding_is_never_untied(token_ids) -> None:
    model = tiny_llama(tie=True)
    with pytest.warns(UserWarning, match="lm_head"):
        quantize_(model, GWQConfig(**CFG, skip_modules=()), calibration_data=token_ids[:1])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not isinstance(model.lm_head.weight, GWQTensor)


def test_untied_lm_head_can_be_quantized(token_ids) -> None:
    model = tiny_llama(tie=False)
    quantize_(model, GWQConfig(**CFG, skip_modules=()), calibration_data=token_ids[:1])
    assert isinstance(model.lm_head.weight, GWQTensor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes(dtype, token_ids) -> None:
    model = tiny_llama(dtype=dtype)
    quantize_(model, GWQConfig(**CFG), calibration_data=token_ids[:1])
    w = model.model.layers[0].mlp.down_proj.weight
    assert isinstance(w, GWQTensor) and w.dtype == dtype and w.dequantize().dtype == dtype
    out = model(token_ids).logits
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_layer_without_gradient_stays_dense_with_warning(token_ids) -> None:
    model = tiny_llama()
    model.unused_head = torch.nn.Linear(96, 4)  # like BERT's pooler: the loss never reaches it
    with pytest.warns(UserWarning, match="unused_head"):
        quantize_(model, GWQConfig(**CFG), calibration_data=token_ids[:1])
    assert not isinstance(model.unused_head.weight, GWQTensor)
    assert isinstance(model.model.layers[0].self_attn.q_proj.weight, GWQTensor)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bits=5), "bits"),
        (dict(bits=1), "bits"),
        (dict(group_size=0), "group_size"),
        (dict(group_size=-2), "group_size"),
        (dict(outlier_ratio=-0.1), "outlier_ratio"),
        (dict(outlier_ratio=0.51), "outlier_ratio"),
        (dict(saliency="hessians"), "saliency"),
        (dict(outlier_scope="global"), "outlier_scope"),
        (dict(step="calibrate"), "step"),
        (dict(clip_search="minmax"), "clip_search"),
        (dict(clip_search=1), "clip_search"),
        (dict(compensation="awq"), "compensation"),
    ],
)
def test_bad_config(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        GWQConfig(**kwargs)


@pytest.mark.parametrize("data", [torch.zeros(0, 8, dtype=torch.long), [], None])
def test_empty_calibration_data(llama, data) -> None:
    with pytest.raises(ValueError, match="calibration"):
        quantize_(llama, GWQConfig(**CFG), calibration_data=data)
    assert not any(isinstance(p, GWQTensor) for p in llama.parameters())
    assert all(p.requires_grad for p in llama.parameters())  # nothing left frozen or hooked


def test_convert_without_prepare(llama) -> None:
    with pytest.raises(ValueError, match="prepare"):
        quantize_(llama, GWQConfig(step="convert"))


def test_convert_with_no_gradient_at_all(llama) -> None:
    quantize_(llama, GWQConfig(step="prepare"))
    with pytest.raises(ValueError, match="backward"):
        quantize_(llama, GWQConfig(step="convert"))


def test_nan_weight_names_the_layer(llama, token_ids) -> None:
    with torch.no_grad():
        llama.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj"):
        quantize_(llama, GWQConfig(**CFG), calibration_data=token_ids[:1])


class _NanGradModel(torch.nn.Module):
    """Finite loss, NaN gradient: d sqrt(z)/dz is inf at z = 0 and dz/dy = 0, so inf * 0 = NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(20, 16)
        self.proj = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 20)

    def forward(self, ids):
        y = self.proj(self.emb(ids))
        y = y + torch.sqrt((y - y.detach()) ** 2)
        return self.head(y)


def test_nan_gradient_names_the_layer() -> None:
    with pytest.raises(ValueError, match=r"'proj'.*NaN"):
        quantize_(_NanGradModel(), GWQConfig(bits=4, group_size=16, progress=False), calibration_data=torch.randint(0, 20, (1, 8)))


def test_model_without_linear_warns_and_changes_nothing() -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.LayerNorm(4))
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.warns(UserWarning, match="no nn.Linear"):
        quantize_(model, GWQConfig(), calibration_data=torch.randint(0, 10, (1, 5)))
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_calibration_data_forms(token_ids) -> None:
    a, b, c = tiny_llama(5), tiny_llama(5), tiny_llama(5)
    quantize_(a, GWQConfig(**CFG), calibration_data=token_ids)  # [2, seq]: two samples
    quantize_(b, GWQConfig(**CFG), calibration_data=[token_ids[0], token_ids[1:]])  # 1-D and 2-D items
    quantize_(c, GWQConfig(**CFG), calibration_data=iter([{"input_ids": token_ids[:1]}, {"input_ids": token_ids[1:]}]))
    for m in (b, c):
        torch.testing.assert_close(m(token_ids).logits, a(token_ids).logits)


@pytest.mark.parametrize("compensation", ["gptq", "gptq_act"])
def test_gptq_compensation_keeps_masks_and_lowers_layer_error(token_ids, compensation) -> None:
    """GPTQ compensation keeps the outlier masks of plain GWQ (same calibration, same
    saliency) and gives a smaller output error than round-to-nearest on the calibration
    inputs of every layer (what it minimises; inputs from the unquantized model)."""
    base = tiny_llama(seed=3)
    inputs = _layer_inputs(base, token_ids)
    plain, comp = copy.deepcopy(base), copy.deepcopy(base)
    quantize_(plain, GWQConfig(**CFG), calibration_data=token_ids)
    quantize_(comp, GWQConfig(**CFG, compensation=compensation), calibration_data=token_ids)
    worse = []
    for name, mod in _linears(comp).items():
        if name == "lm_head":
            continue
        w_fp = _linears(base)[name].weight.detach()
        w_rtn, w_gptq = _linears(plain)[name].weight, mod.weight
        assert torch.equal(w_rtn.outlier_mask(), w_gptq.outlier_mask()), name
        x = inputs[name]
        ref = x @ w_fp.T
        err_rtn = (x @ w_rtn.dequantize().T - ref).norm()
        err_gptq = (x @ w_gptq.dequantize().T - ref).norm()
        if not err_gptq < err_rtn:
            worse.append((name, float(err_gptq), float(err_rtn)))
    assert not worse, worse


def test_act_mse_clip_search_uses_the_calibration_inputs(token_ids) -> None:
    """clip_search="act_mse": same masks as plain GWQ, and each layer's grid is exactly
    packing's importance-weighted search with importance = sum of x_j^2 over the
    calibration tokens (recorded by a forward pre-hook during calibration)."""
    from gwq_compile import packing

    base = tiny_llama(seed=5)
    sq = {name: x.square().sum(0) for name, x in _layer_inputs(base, token_ids).items()}
    plain, searched = copy.deepcopy(base), copy.deepcopy(base)
    quantize_(plain, GWQConfig(**CFG), calibration_data=token_ids)
    quantize_(searched, GWQConfig(**CFG, clip_search="act_mse"), calibration_data=token_ids)
    for name, mod in _linears(searched).items():
        if name == "lm_head":
            continue
        mask = _linears(plain)[name].weight.outlier_mask()
        assert torch.equal(mod.weight.outlier_mask(), mask), name
        w = _linears(base)[name].weight.detach()
        want = packing.quantize_weight(w, mask, CFG["bits"], CFG["group_size"], False, "act_mse", importance=sq[name])
        got = mod.weight.packed()
        assert torch.equal(got.group_scales, want.group_scales) and torch.equal(got.group_zeros, want.group_zeros), name


def test_act_mse_without_a_module_call_falls_back_with_a_warning() -> None:
    """A weight used through F.linear (its module never called) records no input: the
    layer is still quantized, on plain min/max ranges, and a warning names it."""

    class Functional(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.called = torch.nn.Linear(40, 40)
            self.functional = torch.nn.Linear(40, 40)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            h = torch.nn.functional.one_hot(ids, 40).float()
            return torch.nn.functional.linear(self.called(h), self.functional.weight, self.functional.bias)

    torch.manual_seed(0)
    model = Functional()
    w_functional = model.functional.weight.detach().clone()
    ids = torch.randint(0, 40, (2, 12))
    with pytest.warns(UserWarning, match="'functional'.*plain min/max"):
        quantize_(model, GWQConfig(bits=4, group_size=8, outlier_ratio=0.02, progress=False), calibration_data=ids)
    assert isinstance(model.called.weight, GWQTensor) and isinstance(model.functional.weight, GWQTensor)
    from gwq_compile import packing

    mask = model.functional.weight.outlier_mask()
    want = packing.quantize_weight(w_functional, mask, 4, 8)  # plain min/max grid
    assert torch.equal(model.functional.weight.packed().group_scales, want.group_scales)


# ----------------------------------------------------------------------------- the LM head (head_bits)


def _head_cfg(**kw) -> GWQConfig:
    return GWQConfig(**{**CFG, "head_bits": 8, "head_group_size": 32, **kw})


@pytest.mark.parametrize("tie", [True, False])
def test_head_bits_quantizes_the_head_on_its_own_grid(tie, token_ids) -> None:
    model = tiny_llama(tie=tie)
    dense_head = model.lm_head.weight.detach().clone()
    fp = model(token_ids).logits
    quantize_(model, _head_cfg(clip_search="none"), calibration_data=token_ids[:1])  # min/max ranges: no clipping
    head = model.lm_head.weight
    assert isinstance(head, GWQTensor) and (head.bits, head.group_size) == (8, 32)
    assert all(m.weight.bits == CFG["bits"] for n, m in _linears(model).items() if n != "lm_head")
    embedding = model.model.embed_tokens.weight
    assert (embedding is head) == tie  # a tie survives quantization; an untied embedding stays dense
    assert isinstance(embedding, GWQTensor) == tie
    # 8-bit codes on min/max ranges: every weight within one step of its dense value (half a
    # step of rounding, up to half a step more at an end of the range from the integer zero point)
    step = grid.dequantize_codes(torch.ones_like(dense_head, dtype=torch.uint8), head.group_scales, torch.zeros_like(head.group_zeros), 32)
    err = (head.dequantize() - dense_head).abs()
    assert bool((err <= 1.001 * step + 1e-6).all()) and float(err.mean()) < float(step.mean()) / 3
    q = model(token_ids).logits
    assert (q - fp).norm() < 0.2 * fp.norm()
    if tie:  # the embedding lookup reads the quantized rows
        ids = token_ids[:1, :5]
        torch.testing.assert_close(model.model.embed_tokens(ids), head.dequantize()[ids], rtol=0, atol=0)


def test_head_bits_none_keeps_the_head_dense(llama, token_ids) -> None:
    quantize_(llama, GWQConfig(**CFG), calibration_data=token_ids[:1])
    assert not isinstance(llama.lm_head.weight, GWQTensor)


def test_head_bits_through_prepare_and_convert(token_ids) -> None:
    a, b = tiny_llama(3), tiny_llama(3)
    quantize_(a, _head_cfg(), calibration_data=token_ids[:1])
    quantize_(b, GWQConfig(step="prepare", head_bits=8))
    next_token_nll(b(token_ids[:1]).logits, token_ids[:1]).backward()
    quantize_(b, _head_cfg(step="convert"))
    assert b.lm_head.weight is b.model.embed_tokens.weight
    assert torch.equal(a.lm_head.weight.dequantize(), b.lm_head.weight.dequantize())


def test_head_bits_at_convert_only_is_an_error(llama, token_ids) -> None:
    quantize_(llama, GWQConfig(step="prepare"))
    next_token_nll(llama(token_ids[:1]).logits, token_ids[:1]).backward()
    with pytest.raises(ValueError, match="head_bits=8 at convert, but the output embedding was not prepared"):
        quantize_(llama, _head_cfg(step="convert"))


def test_head_bits_through_torchao_quantize_keeps_the_tie(llama, token_ids) -> None:
    prepare = GWQConfig(step="prepare", head_bits=8)
    torchao.quantization.quantize_(llama, prepare, filter_fn=gwq_filter(llama, prepare))
    next_token_nll(llama(token_ids[:1]).logits, token_ids[:1]).backward()
    convert = _head_cfg(step="convert")
    torchao.quantization.quantize_(llama, convert, filter_fn=gwq_filter(llama, convert))
    assert isinstance(llama.lm_head.weight, GWQTensor) and llama.lm_head.weight is llama.model.embed_tokens.weight


@pytest.mark.parametrize("field, value", [("head_bits", 5), ("head_bits", 4.0), ("head_group_size", 0), ("head_group_size", True)])
def test_head_config_is_validated(field, value) -> None:
    with pytest.raises(ValueError, match=f"GWQConfig.{field}"):
        GWQConfig(**{field: value})


@pytest.mark.parametrize("option", [dict(saliency="fisher"), dict(compensation="gptq"), dict(outlier_scope="row")])
def test_experimental_options_warn_with_the_reason(option) -> None:
    from gwq_compile.config import ExperimentalOptionWarning

    with pytest.warns(ExperimentalOptionWarning, match=f"{next(iter(option))}=.*experimental"):
        GWQConfig(**option)


# ----------------------------------------------------------------------------- HF Conv1D (GPT-2)


def _tiny_gpt2(seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=1)
    return tf.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("scope", ["layer", "model"])
def test_gpt2_conv1d_layers_go_through_eager_quantize(scope) -> None:
    """Eager quantize_ quantizes GPT-2's Conv1D layers: each gets a transposed GWQTensor in the
    module's own [in, out] shape, its outliers are the top |dL/dW| weights (gradients in that
    layout), and the model computes what its dequantized weights compute."""
    from transformers.pytorch_utils import Conv1D

    fp = _tiny_gpt2()
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3))
    batches = [ids[:1], ids[1:]]
    model = copy.deepcopy(fp)
    grads = {}
    for row in batches:
        model.zero_grad()
        next_token_nll(logits_of(model(row)), row).backward()
        for n, m in model.named_modules():
            if isinstance(m, Conv1D):
                grads[n] = grads.get(n, 0) + m.weight.grad.abs()
    model.zero_grad()
    quantize_(model, GWQConfig(**{**CFG, "saliency": "grad", "outlier_scope": scope}), calibration_data=batches)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, Conv1D)}
    assert len(convs) == 8 and quantization_report(model)["quantized_layers"] == 8
    chosen = torch.cat([m.weight.outlier_mask().flatten() for m in convs.values()])
    scores = torch.cat([grads[n].flatten() for n in convs])
    for name, mod in convs.items():
        w = mod.weight
        assert isinstance(w, GWQTensor) and w.transposed and w.shape == fp.get_submodule(name).weight.shape, name
        mask, sal = w.outlier_mask(), grads[name]
        if scope == "layer":  # the layer's top scores, in the [in, out] layout
            assert sal[mask].min() >= sal[~mask].max() * (1 - 1e-4), name
    if scope == "model":  # the model's top scores, Conv1D layers ranked together
        assert scores[chosen].min() >= scores[~chosen].max() * (1 - 1e-4)
    assert abs(int(chosen.sum()) - round(CFG["outlier_ratio"] * chosen.numel())) <= len(convs)
    dense = copy.deepcopy(model)
    for name, mod in dense.named_modules():
        if isinstance(mod, Conv1D):
            mod.weight = torch.nn.Parameter(mod.weight.dequantize())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=0.05, atol=0.05)  # bf16 compute on the fast path
        err = (model(ids).logits - fp(ids).logits).norm() / fp(ids).logits.norm()
    assert 0 < err < 0.2


# ----------------------------------------------------------------------------- skip_modules


class _NamedHead(torch.nn.Module):
    """An LM whose output embedding is not called lm_head (GPT-NeoX's embed_out, InternLM's output)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.mid, self.embed_out = torch.nn.Embedding(50, 32), torch.nn.Linear(32, 32), torch.nn.Linear(32, 50)
        self.lm_head = torch.nn.Linear(32, 32)  # a layer that is *not* the output embedding, despite its name

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.embed_out

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_out(self.lm_head(torch.relu(self.mid(self.emb(ids)))))


@pytest.mark.parametrize(
    "skip, dense",
    [(None, {"embed_out"}), ((), set()), (("mid",), {"mid"}), (("embed_*", "lm_*"), {"embed_out", "lm_head"})],
)
def test_skip_modules_is_the_one_skip_rule(skip, dense) -> None:
    model = _NamedHead()
    quantize_(model, GWQConfig(bits=4, group_size=32, progress=False, skip_modules=skip), calibration_data=torch.randint(0, 50, (1, 20)))
    left = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not isinstance(m.weight, GWQTensor)}
    assert left == dense


def test_skip_modules_default_without_output_embeddings_skips_lm_head_by_name() -> None:
    model = torch.nn.Sequential()
    model.add_module("emb", torch.nn.Embedding(50, 32))
    model.add_module("mid", torch.nn.Linear(32, 32))
    model.add_module("lm_head", torch.nn.Linear(32, 50))
    quantize_(model, GWQConfig(bits=4, group_size=32, progress=False), calibration_data=torch.randint(0, 50, (1, 20)))
    assert isinstance(model.mid.weight, GWQTensor) and not isinstance(model.lm_head.weight, GWQTensor)


@pytest.mark.parametrize(
    "recorded, skip",
    [
        ({"skip_modules": ["lm_head"], "skip_output_embeddings": True}, None),  # the old defaults
        ({"skip_modules": [], "skip_output_embeddings": True}, None),
        ({"skip_modules": [], "skip_output_embeddings": False}, ()),
        ({"skip_modules": ["mid"], "skip_output_embeddings": True}, ("lm_head", "mid")),
        ({"skip_modules": ["mid"], "skip_output_embeddings": False}, ("mid",)),
    ],
)
def test_checkpoint_configs_with_the_old_skip_pair_read_back(recorded, skip) -> None:
    config = GWQConfig.from_dict({**GWQConfig(progress=False).to_dict(), **recorded})
    assert config.skip_modules == skip
    assert GWQConfig.from_dict(config.to_dict()) == config


def test_bad_skip_modules() -> None:
    with pytest.raises(TypeError, match="single string"):
        GWQConfig(skip_modules="lm_head")
    with pytest.raises(TypeError, match="name patterns"):
        GWQConfig(skip_modules=(1,))
