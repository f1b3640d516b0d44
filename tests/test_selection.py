"""Saliency and selection (gwq_compile/selection.py) on tiny random models: which weights become
outliers (per layer, per row, ranked over the model, grad_error scores), and GWQConfig.bits_budget's
per-layer code widths chosen by the same saliency."""

from __future__ import annotations

import copy

import pytest
import torch

from gwq_compile import GWQConfig, GWQTensor, calibration, load_quantized, packing, quantization_report, quantize_, save_quantized
from gwq_compile.calibration import logits_of, next_token_nll
from gwq_compile.config import mixed_bits_choices
from gwq_compile.selection import allocate_layer_bits, layer_saliency, ranking_entries, rounding_error, select_outliers
from tests.conftest import tiny_llama

CFG = dict(bits=4, group_size=32, outlier_ratio=0.01, progress=False)
SELECT_CFG = dict(bits=3, group_size=64, outlier_ratio=0.02, progress=False)


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _grads(model, batches, kind="grad"):
    """Reference saliency computed by hand: per-sample gradients of the next-token loss."""
    model = copy.deepcopy(model)
    sal = {}
    for ids in batches:
        model.zero_grad()
        next_token_nll(logits_of(model(ids)), ids).backward()
        for n, m in _linears(model).items():
            g = m.weight.grad.float()
            term = {"grad": g.abs(), "fisher": g.square(), "grad_weight": (g * m.weight.detach()).abs()}[kind]
            sal[n] = sal.get(n, 0) + term
    return sal


def _widths(model) -> dict[str, int]:
    return {n: m.weight.bits for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and isinstance(m.weight, GWQTensor)}


def _mean_width(model) -> float:
    layers = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear) and isinstance(m.weight, GWQTensor)]
    return sum(w.bits * w.shape.numel() for w in layers) / sum(w.shape.numel() for w in layers)


# ----------------------------------------------------------------------------- outlier masks


@pytest.mark.parametrize("scope", ["layer", "row"])
def test_outlier_fraction_equals_ratio(llama, token_ids, scope) -> None:
    ratio = 0.03
    quantize_(llama, GWQConfig(**{**SELECT_CFG, "outlier_ratio": ratio, "outlier_scope": scope}), calibration_data=token_ids[:1])
    for name, mod in _linears(llama).items():
        if name == "lm_head":
            continue
        w = mod.weight
        n, k = w.shape
        if scope == "layer":
            assert w.num_outliers == round(ratio * n * k), name
        else:
            per_row = w.outlier_row_ptr.diff()
            assert (per_row == round(ratio * k)).all(), name


@pytest.mark.parametrize("kind", ["grad", "fisher", "grad_weight"])
def test_masks_are_the_top_saliency_weights(llama, token_ids, kind) -> None:
    batches = [token_ids[:1], token_ids[1:]]
    expected = _grads(llama, batches, kind)
    quantize_(llama, GWQConfig(**{**SELECT_CFG, "saliency": kind, "outlier_scope": "layer"}), calibration_data=batches)
    for name, mod in _linears(llama).items():
        if name == "lm_head":
            continue
        mask = mod.weight.outlier_mask()
        sal = expected[name]
        # every chosen weight is at least as salient as every weight left out (ties aside)
        assert sal[mask].min() >= sal[~mask].max() * (1 - 1e-4), name


def test_model_scope_ranks_all_layers_together(llama, token_ids) -> None:
    ratio = 0.02
    expected = _grads(llama, [token_ids[:1]], "grad")
    quantize_(llama, GWQConfig(**{**SELECT_CFG, "outlier_ratio": ratio, "saliency": "grad", "outlier_scope": "model"}), calibration_data=token_ids[:1])
    layers = {n: m.weight for n, m in _linears(llama).items() if n != "lm_head"}
    counts = [w.num_outliers for w in layers.values()]
    assert sum(counts) == round(ratio * sum(w.numel() for w in layers.values()))
    assert len(set(counts)) > 1  # not the same share everywhere: sensitive layers get more
    chosen = torch.cat([expected[n][w.outlier_mask()] for n, w in layers.items()])
    left_out = torch.cat([expected[n][~w.outlier_mask()] for n, w in layers.items()])
    assert chosen.min() >= left_out.max() * (1 - 1e-4)


def test_grad_error_scores_gradient_times_squared_rounding_error(llama, token_ids) -> None:
    dense = {n: m.weight.detach().clone() for n, m in _linears(llama).items()}
    grads = _grads(llama, [token_ids[:1]], "grad")
    cfg = GWQConfig(**{**SELECT_CFG, "saliency": "grad_error", "outlier_scope": "layer", "clip_search": False})
    quantize_(llama, cfg, calibration_data=token_ids[:1])
    for name, mod in _linears(llama).items():
        if name == "lm_head":
            continue
        rtn = packing.dequantize_weight(packing.quantize_weight(dense[name], None, cfg.bits, cfg.group_size))
        score = grads[name] * (dense[name] - rtn).square()
        mask = mod.weight.outlier_mask()
        assert mask.sum() == round(cfg.outlier_ratio * mask.numel()), name
        assert score[mask].min() >= score[~mask].max() * (1 - 1e-4), name


def test_grad_error_spends_no_outlier_on_a_weight_already_on_the_grid() -> None:
    weight = torch.arange(16.0).repeat(2, 2) / 16  # every weight sits on its group's 4-bit grid (scale 1/16, exact in fp16) ...
    weight[1, 5] += 0.02  # ... but one
    grad = torch.ones_like(weight)
    grad[0, 3] = 1e6  # the most sensitive weight rounds exactly: keeping it in fp16 gains nothing
    state = calibration.LayerCalibration(name="toy", saliency_kind="grad_error", saliency_sum=grad, n_backward=1)
    cfg = GWQConfig(bits=4, group_size=16, saliency="grad_error", outlier_scope="layer", clip_search=False)
    mask = select_outliers(layer_saliency(weight, state, cfg), 1 / 64, "layer")
    assert mask.nonzero().tolist() == [[1, 5]]


# ----------------------------------------------------------------------------- bits_budget: per-layer widths


@pytest.mark.parametrize("budget", [3.0, 3.3, 3.6, 4.5])
def test_mean_code_width_within_budget_and_mixed(llama, token_ids, budget) -> None:
    quantize_(llama, GWQConfig(**CFG, bits_budget=budget), calibration_data=token_ids)
    widths = _widths(llama)
    assert len(widths) == 14
    assert _mean_width(llama) <= budget + 1e-9
    if budget == 3.0:
        assert set(widths.values()) == {3}
    else:
        assert len(set(widths.values())) >= 2 and set(widths.values()) <= {3, 4, 8}
        assert _mean_width(llama) > budget - (0.5 if budget > 4 else 0.15)  # spent, up to one layer's step


def test_each_layer_is_quantized_on_its_own_width(llama, token_ids) -> None:
    """A mixed model's layers equal the same layers quantized at that width: the width reaches
    the grid, the rounding error of grad_error's scores and the packing."""
    quantize_(llama, GWQConfig(**CFG, bits_budget=3.5), calibration_data=token_ids)
    report = quantization_report(llama)
    for name, width in _widths(llama).items():
        assert report["layers"][name]["bits"] == width


def _prepared(model, token_ids, config):
    quantize_(model, config.replace(step="prepare"))
    from gwq_compile.calibration import logits_of, next_token_nll

    for row in token_ids:
        next_token_nll(logits_of(model(row[None])), row[None]).backward()
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear) and calibration.layer_state(m.weight) is not None]


def test_allocation_spends_bits_where_the_saliency_cost_drops_most(token_ids) -> None:
    """The greedy choice against a brute-force check: with room for exactly one layer at 4 bits,
    it is the layer with the largest drop of sum |g| (W - RTN(W))^2 per weight."""
    model = tiny_llama()
    config = GWQConfig(**CFG, bits_budget=3.0)
    mods = _prepared(model, token_ids, config)
    entries = ranking_entries(mods)
    sizes = [m.weight.numel() for m in mods]
    drops = []
    for m, (w, state, _) in zip(mods, entries):
        c3, c4 = (float((state.saliency_sum * rounding_error(w, config.replace(bits=b, bits_budget=None), state.input_sq).square()).sum()) for b in (3, 4))
        drops.append((c3 - c4) / m.weight.numel())
    # the best layer by drop per weight, and a budget that lets exactly that one layer go up
    best = max(range(len(mods)), key=lambda i: drops[i])
    budget = 3.0 + sizes[best] / sum(sizes) + 1e-9
    widths = allocate_layer_bits(entries, config.replace(bits_budget=min(budget, 4.0)))
    up = [name for name, b in widths.items() if b == 4]
    assert calibration.layer_state(mods[best].weight).name in up
    total = sum(b * s for b, s in zip(widths.values(), sizes))
    assert total <= budget * sum(sizes) + 1e-6
    for m in mods:
        calibration.release_weight(m.weight)


def test_a_sensitive_layer_gets_the_bits() -> None:
    """Scale one layer's saliency up by 1e6: with room for about one layer, that layer is at 4 bits."""
    model = tiny_llama()
    ids = torch.randint(0, 300, (1, 32), generator=torch.Generator().manual_seed(3))
    config = GWQConfig(**CFG, bits_budget=3.0)
    mods = _prepared(model, ids, config)
    target = mods[5]
    calibration.layer_state(target.weight).saliency_sum.mul_(1e6)
    sizes = [m.weight.numel() for m in mods]
    budget = 3.0 + target.weight.numel() / sum(sizes)
    widths = allocate_layer_bits(ranking_entries(mods), config.replace(bits_budget=budget))
    assert widths[calibration.layer_state(target.weight).name] == 4
    for m in mods:
        calibration.release_weight(m.weight)


def test_mixed_model_saves_and_reloads_bit_exactly(llama, token_ids, tmp_path) -> None:
    skeleton = copy.deepcopy(llama)
    quantize_(llama, GWQConfig(**CFG, bits_budget=3.5), calibration_data=token_ids)
    save_quantized(llama, tmp_path / "m")
    load_quantized(skeleton, tmp_path / "m")
    assert _widths(skeleton) == _widths(llama)
    with torch.no_grad():
        assert torch.equal(skeleton(token_ids).logits, llama(token_ids).logits)


def test_bits_budget_validation() -> None:
    assert mixed_bits_choices(4) == (3, 4, 8) and mixed_bits_choices(3) == (2, 3, 4) and mixed_bits_choices(2) == (2, 3)
    with pytest.raises(ValueError, match=r"bits_budget must be None or a mean code width in \[3, 8\]"):
        GWQConfig(bits=4, bits_budget=8.5)
    with pytest.raises(ValueError, match=r"in \[2, 4\]"):
        GWQConfig(bits=3, bits_budget=4.5)
    with pytest.raises(ValueError, match="bits_budget must be"):
        GWQConfig(bits=4, bits_budget=True)
    with pytest.raises(ValueError, match="saliency='hessian' has none"):
        GWQConfig(bits=4, bits_budget=3.5, saliency="hessian")
    assert GWQConfig(bits=4, bits_budget=3.5).bits_budget == 3.5
