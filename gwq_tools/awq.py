"""AWQ (Lin et al., 2023, arXiv 2306.00978): activation-aware per-input-channel scaling.

Why our own: torchao 0.18's prototype ``AWQConfig`` rejects Intx weights on the CPU, so
it cannot produce 2/3-bit grouped weights here.  This file re-implements AWQ's scale
search onto the GWQ grid (round-to-nearest, no outliers, ``packing.quantize_weight``):

* :func:`search_scale` (pure): for ``alpha`` on a grid in ``[0, 1]``, ``s = mean|x|^alpha``
  (normalized by ``sqrt(max s * min s)``, as AWQ does), quantize ``W * diag(s)`` with RTN,
  and use ``Q(W s) / s`` as the effective weight; keep the ``alpha`` whose block output is
  closest (MSE) to the full-precision block output on the calibration activations.
  ``alpha = 0`` gives ``s = 1``, i.e. plain RTN, so on the calibration activations the
  chosen scales are never worse than RTN.
* :func:`apply_awq_to_llama_layer`: the search over the four places AWQ scales in a
  Llama decoder layer, with ``1/s`` folded into the op before the linears so the model
  stays a model of plain ``nn.Linear`` s:

  ==========================  ======================  ==============================
  scaled linears              ``1/s`` folded into      output compared (AWQ's inspect)
  ==========================  ======================  ==============================
  q_proj, k_proj, v_proj      input_layernorm.weight   self_attn output
  o_proj                      v_proj rows              o_proj output (only when
                                                       v_proj and o_proj are square
                                                       alike: with GQA AWQ skips it)
  gate_proj, up_proj          post_attention_layernorm mlp output
  down_proj                   up_proj rows             down_proj output
  ==========================  ======================  ==============================

What is left out of the reference AWQ: its weight-clipping search (``auto_clip``).  The
inputs of every layer are the full-precision model's (AWQ does not run sequentially
through quantized layers either; scaling alone does not change the fp function).

Example:
    >>> import torch
    >>> from gwq_tools.awq import search_scale
    >>> x = torch.randn(256, 64) * torch.linspace(0.1, 4, 64); w = torch.randn(32, 64)
    >>> res = search_scale(x, [w], bits=3, group_size=32)
    >>> res.mse <= res.rtn_mse
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from gwq_compile import grid, packing

__all__ = ["AWQSearchResult", "search_scale", "scales_for_alpha", "apply_awq_to_llama_layer"]

BlockForward = Callable[[Sequence[torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class AWQSearchResult:
    """Outcome of one scale search.

    Attributes:
        scales: fp32 ``[K]``: multiply the weights' input columns by it, divide the input by it.
        alpha: the chosen exponent.
        mse: block output MSE at ``alpha`` (calibration activations).
        rtn_mse: block output MSE of plain RTN (``alpha = 0``).
        losses: the MSE at every grid point, in grid order.
    """

    scales: torch.Tensor
    alpha: float
    mse: float
    rtn_mse: float
    losses: tuple[float, ...]


def scales_for_alpha(x_mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """AWQ's ``s = mean|x|^alpha / sqrt(max * min)`` (the normalization keeps s around 1).

    Example:
        >>> import torch
        >>> scales_for_alpha(torch.tensor([1.0, 4.0]), 0.5)
        tensor([0.7071, 1.4142])
    """
    s = x_mean_abs.float().pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def _linear_outputs(x: torch.Tensor) -> BlockForward:
    def forward(weights: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([x @ w.T for w in weights], dim=-1)

    return forward


@torch.no_grad()
def search_scale(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    bits: int,
    group_size: int,
    symmetric: bool = False,
    n_grid: int = 20,
    block_forward: BlockForward | None = None,
) -> AWQSearchResult:
    """Grid-search AWQ's per-input-channel scale for linears that share the input ``x``.

    Args:
        x: calibration inputs ``[..., K]`` of the linears (used for ``mean|x|`` and, by
            default, for the block output ``cat_i(x W_i^T)``).
        weights: full-precision ``[N_i, K]`` weights of the linears that read ``x``.
        bits, group_size, symmetric: the RTN grid.
        n_grid: alphas ``0, 1/n_grid, ..., (n_grid-1)/n_grid`` (AWQ's grid).
        block_forward: maps a list of effective weights (one per linear, same order) to
            the block output to compare, e.g. the attention output; default: the
            concatenated linear outputs.

    Returns:
        an :class:`AWQSearchResult`; ties keep the smaller alpha (RTN wins ties).
    """
    if not weights:
        raise ValueError("search_scale needs at least one weight")
    k = x.shape[-1]
    for w in weights:
        if w.dim() != 2 or w.shape[1] != k:
            raise ValueError(f"every weight must be [N, {k}] to read x [..., {k}], got {tuple(w.shape)}")
    if n_grid < 1:
        raise ValueError(f"n_grid must be >= 1, got {n_grid}")
    forward = block_forward or _linear_outputs(x.float())
    weights32 = [w.detach().float() for w in weights]
    reference = forward(weights32)
    x_mean_abs = x.detach().abs().reshape(-1, k).float().mean(0)

    losses: list[float] = []
    best = (float("inf"), 0.0, torch.ones(k))
    for step in range(n_grid):
        alpha = step / n_grid
        s = scales_for_alpha(x_mean_abs, alpha)
        effective = [grid.fake_quantize(w * s, bits, group_size, symmetric) / s for w in weights32]
        loss = (forward(effective) - reference).float().pow(2).mean().item()
        losses.append(loss)
        if loss < best[0]:
            best = (loss, alpha, s)
    return AWQSearchResult(scales=best[2], alpha=best[1], mse=best[0], rtn_mse=losses[0], losses=tuple(losses))


# ----------------------------------------------------------------------------- folding


def _fold_into_norm(norm: nn.Module, s: torch.Tensor) -> None:
    """``norm(x) / s``: divide the (RMS/Layer)Norm's affine weight (and bias) by ``s``."""
    weight = getattr(norm, "weight", None)
    if weight is None or weight.shape != s.shape:
        raise ValueError(f"cannot fold AWQ scales into {type(norm).__name__}: it needs an affine weight of shape {tuple(s.shape)}")
    weight.data.div_(s.to(weight.dtype))
    bias = getattr(norm, "bias", None)
    if bias is not None:
        bias.data.div_(s.to(bias.dtype))


def _fold_into_linear_rows(linear: nn.Linear, s: torch.Tensor) -> None:
    """``linear(x) / s``: divide the output rows (and bias) of the previous linear by ``s``."""
    linear.weight.data.div_(s.to(linear.weight.dtype).unsqueeze(1))
    if linear.bias is not None:
        linear.bias.data.div_(s.to(linear.bias.dtype))


def _scale_inputs(linears: Sequence[nn.Linear], s: torch.Tensor) -> None:
    for linear in linears:
        linear.weight.data.mul_(s.to(linear.weight.dtype).unsqueeze(0))


def _submodule_forward(module: nn.Module, names: Sequence[str], args: tuple, kwargs: dict) -> BlockForward:
    """A block_forward that runs ``module`` with the named weights replaced (no mutation)."""

    def forward(weights: Sequence[torch.Tensor]) -> torch.Tensor:
        params = {f"{name}.weight": w.to(module.get_submodule(name).weight.dtype) for name, w in zip(names, weights)}
        out = torch.func.functional_call(module, params, args, kwargs)
        return out[0] if isinstance(out, tuple) else out

    return forward


@torch.no_grad()
def apply_awq_to_llama_layer(
    layer: nn.Module,
    hidden_states: Sequence[torch.Tensor],
    layer_kwargs: Sequence[dict],
    bits: int,
    group_size: int,
    symmetric: bool = False,
    n_grid: int = 20,
) -> dict[str, AWQSearchResult]:
    """Search and fold AWQ scales into one Llama-style decoder layer (weights stay fp).

    ``hidden_states`` are the layer's inputs (one ``[1, seq, H]`` tensor per calibration
    sample) and ``layer_kwargs`` the keyword arguments the model passed to the layer with
    each (``position_embeddings``, ``attention_mask``, ...).  The layer computes the same
    function afterwards (up to fp rounding); its linears are then ready for RTN.

    Returns:
        ``{"qkv" | "o" | "gate_up" | "down": AWQSearchResult}`` for the scalings applied.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from gwq_tools.peers import capture_layer_inputs
        >>> cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        ...                   num_attention_heads=4, num_key_value_heads=4, vocab_size=256)
        >>> model = LlamaForCausalLM(cfg).eval()
        >>> xs, kws = capture_layer_inputs(model, torch.randint(0, 256, (1, 32)))
        >>> sorted(apply_awq_to_llama_layer(model.model.layers[0], xs, kws, bits=3, group_size=32, n_grid=4))
        ['down', 'gate_up', 'o', 'qkv']
    """
    attn, mlp = layer.self_attn, layer.mlp
    if len(hidden_states) != len(layer_kwargs) or not hidden_states:
        raise ValueError("need one kwargs dict per calibration sample, and at least one sample")
    captured: dict[str, list[torch.Tensor]] = {"q_proj": [], "o_proj": [], "gate_proj": [], "down_proj": []}
    attn_calls: list[tuple[tuple, dict]] = []
    handles = []
    for name, module in (("q_proj", attn.q_proj), ("o_proj", attn.o_proj), ("gate_proj", mlp.gate_proj), ("down_proj", mlp.down_proj)):
        handles.append(module.register_forward_pre_hook(lambda m, a, name=name: captured[name].append(a[0].detach())))
    # The attention block's own kwargs (position embeddings, mask) as the layer passes them.
    handles.append(attn.register_forward_pre_hook(lambda m, a, kw: attn_calls.append((a, dict(kw))), with_kwargs=True))
    try:
        for h, kw in zip(hidden_states, layer_kwargs):
            layer(h, **kw)
    finally:
        for handle in handles:
            handle.remove()
    cat = {name: torch.cat([t.reshape(-1, t.shape[-1]) for t in ts]) for name, ts in captured.items()}
    results: dict[str, AWQSearchResult] = {}

    # 1. q, k, v: compare the attention output, sample by sample (attention mixes tokens).
    qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
    names = ["q_proj", "k_proj", "v_proj"]

    def attn_forward(weights: Sequence[torch.Tensor]) -> torch.Tensor:
        outs = []
        for x, (args, kw) in zip(captured["q_proj"], attn_calls):
            # The normed input goes where the layer put it: first positional or hidden_states=.
            call = ((x,) + tuple(args[1:]), kw) if args else ((), {**kw, "hidden_states": x})
            outs.append(_submodule_forward(attn, names, *call)(weights))
        return torch.cat([o.reshape(-1, o.shape[-1]) for o in outs])

    res = search_scale(cat["q_proj"], [m.weight for m in qkv], bits, group_size, symmetric, n_grid, attn_forward)
    _fold_into_norm(layer.input_layernorm, res.scales)
    _scale_inputs(qkv, res.scales)
    results["qkv"] = res

    # 2. v -> o, only when v's outputs map one-to-one onto o's inputs (no GQA), as AWQ.
    if attn.v_proj.weight.shape == attn.o_proj.weight.shape:
        res = search_scale(cat["o_proj"], [attn.o_proj.weight], bits, group_size, symmetric, n_grid)
        _fold_into_linear_rows(attn.v_proj, res.scales)
        _scale_inputs([attn.o_proj], res.scales)
        results["o"] = res

    # 3. gate, up: compare the MLP output.
    x_mlp = cat["gate_proj"]
    gate_up = [mlp.gate_proj, mlp.up_proj]
    mlp_forward = _submodule_forward(mlp, ["gate_proj", "up_proj"], (x_mlp,), {})
    res = search_scale(x_mlp, [m.weight for m in gate_up], bits, group_size, symmetric, n_grid, mlp_forward)
    _fold_into_norm(layer.post_attention_layernorm, res.scales)
    _scale_inputs(gate_up, res.scales)
    results["gate_up"] = res

    # 4. up -> down.
    res = search_scale(cat["down_proj"], [mlp.down_proj.weight], bits, group_size, symmetric, n_grid)
    _fold_into_linear_rows(mlp.up_proj, res.scales)
    _scale_inputs([mlp.down_proj], res.scales)
    results["down"] = res
    return results
