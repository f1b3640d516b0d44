"""Input Hessians ``H = sum x x^T`` of named linears for the GPTQ peer (tooling, not the library).

* :func:`record_input_grams`: forward pre-hooks adding each module's input gram into a dict;
  modules fed the same tensor (q/k/v, gate/up) share one product per forward;
* :func:`collect_hessians`: one pass over the calibration batches through the model as it is
  (not sequential; the sequential, layer-by-layer driver is :func:`gwq_tools.peers.gptq_quantize_model`).

The formula itself is :func:`gwq_compile.gptq.add_input_gram`, which GWQ's own calibration
hook (``compensation="gptq"``, ``saliency="hessian"``) uses as well.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from gwq_compile.gptq import add_input_gram

__all__ = ["collect_hessians", "record_input_grams"]


def record_input_grams(modules: dict[str, torch.nn.Module], grams: dict[str, torch.Tensor]) -> list:
    """Forward pre-hooks that add each named module's input gram into ``grams[name]``; returns
    their handles (the caller removes them).  Modules fed the same tensor (q/k/v, gate/up) share
    one product per forward."""
    last: list = [None, None]  # (input tensor, its gram)

    def make_hook(name: str):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            if args[0] is not last[0]:
                last[0], last[1] = args[0], add_input_gram(None, args[0])
            grams[name] = grams[name].add_(last[1]) if name in grams else last[1].clone()

        return hook

    return [module.register_forward_pre_hook(make_hook(name)) for name, module in modules.items()]


def collect_hessians(
    model: torch.nn.Module,
    module_names: Sequence[str],
    batches: torch.Tensor | Iterable[torch.Tensor],
) -> dict[str, torch.Tensor]:
    """``{name: sum_t x_t x_t^T}`` (fp32 ``[K, K]``) of the inputs of the named ``nn.Linear`` modules.

    One forward pass per batch through ``model`` as it is (hooks on the linears' inputs);
    ``batches`` is a LongTensor ``[n, seq]`` (one row per pass) or an iterable of
    ``[b, seq]`` token tensors.  Token positions are summed over all samples.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        ...                   num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
        >>> m = LlamaForCausalLM(cfg).eval()
        >>> hs = collect_hessians(m, ["model.layers.0.mlp.down_proj"], torch.randint(0, 256, (2, 16)))
        >>> hs["model.layers.0.mlp.down_proj"].shape
        torch.Size([128, 128])
    """
    modules = dict(model.named_modules())
    missing = [name for name in module_names if name not in modules]
    if missing:
        raise KeyError(f"no such modules in the model: {missing}")
    not_linear = [name for name in module_names if not isinstance(modules[name], torch.nn.Linear)]
    if not_linear:
        raise TypeError(f"collect_hessians needs nn.Linear modules, got other types for: {not_linear}")

    hessians: dict[str, torch.Tensor] = {}
    handles = record_input_grams({name: modules[name] for name in module_names}, hessians)
    device = next(model.parameters()).device
    if isinstance(batches, torch.Tensor):
        if batches.dim() != 2:
            raise ValueError(f"batches must be a [n, seq] LongTensor, got shape {tuple(batches.shape)}")
        batches = batches.split(1)
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return hessians
