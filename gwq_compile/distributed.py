"""GWQ over N processes with FSDP2: each rank holds, scores and packs its rows of every layer.

Launch (the same CLI as one process)::

    torchrun --nproc-per-node 2 -m gwq_compile quantize MODEL_DIR --out OUT

How it goes, on every rank (``gloo`` on CPU, ``nccl`` on GPUs):

1. :func:`load_sharded`: the model is built on the meta device, each decoder layer and
   the root are ``fully_shard``-ed (dim 0: the output rows), and only this rank's rows of
   each tensor are read from the safetensors files.  No rank ever holds the full model.
2. Calibration (:func:`gwq_compile.calibration.run_calibration`, checkpointed and chunked
   as in one process): every rank runs every sample, and FSDP2 all-gathers one layer's
   weights at a time.  Only rank 0's loss counts (the others back-propagate it times 0, and
   the gradient divide factor is 1), so each reduce-scattered shard is the one-process
   gradient bit for bit; the saliency hooks fold it into this rank's rows.
3. The model-wide ranking agrees on one threshold and hands out its ties with collectives
   (:mod:`gwq_compile.ranking`); each rank packs its rows (groups run along the input
   features, so rows are self-contained).
4. Rank 0 gathers the packed rows, builds the model with them (dense tensors read from
   the files) and saves one checkpoint, identical to one process's on the same data.

GPTQ compensation, ``outlier_scope="layer"`` and a quantized LM head are not distributed:
they raise a clear error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gwq_compile import calibration, packing, quantize, selection
from gwq_compile.config import GWQConfig
from gwq_compile.targets import is_conv1d, mark_target, target_modules
from gwq_compile.tensor import GWQTensor


def launched_distributed() -> bool:
    """True under ``torchrun`` (or any launcher) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_process_group() -> None:
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


def check_config(config: GWQConfig) -> None:
    if config.compensation != "none":
        raise ValueError(f"distributed GWQ packs rows with round-to-nearest only; compensation={config.compensation!r} needs one process")
    if config.outlier_scope == "layer":
        raise ValueError("distributed GWQ ranks outliers model-wide or per row; outlier_scope='layer' needs one process (a layer's top-k spans ranks)")
    if config.head_bits is not None:
        raise ValueError("distributed GWQ keeps the LM head dense: head_bits must be None (or quantize in one process)")


# ----------------------------------------------------------------------------- loading shards


def _weight_index(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return {k: model_dir / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{str(model_dir)!r} has no model.safetensors (distributed GWQ reads a HF safetensors folder)")
    from safetensors import safe_open

    with safe_open(single, "pt") as f:
        return {k: single for k in f.keys()}


def _aliases(model: torch.nn.Module) -> dict[int, list[str]]:
    """id(tensor) -> every name it has (tied weights have several; a file holds one)."""
    names: dict[int, list[str]] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        names.setdefault(id(t), []).append(name)
    return names


def row_block(rows: int, rank: int, world: int) -> tuple[int, int]:
    """FSDP2's dim-0 shard of ``rows`` for ``rank``: ``torch.chunk`` blocks of ceil(rows / world)."""
    step = -(-rows // world)
    return min(rank * step, rows), min((rank + 1) * step, rows)


def read_rows(index: dict[str, Path], names: list[str], rows: tuple[int, int] | None) -> torch.Tensor:
    """Rows ``[start, end)`` (all for None) of the first of ``names`` found in the files."""
    from safetensors import safe_open

    name = next((n for n in names if n in index), None)
    if name is None:
        raise KeyError(f"none of {names} is in the checkpoint's safetensors files")
    with safe_open(index[name], "pt") as f:
        piece = f.get_slice(name)
        return piece[:] if rows is None or not piece.get_shape() else piece[rows[0] : rows[1]]


def _materialize_buffers(model: torch.nn.Module) -> None:
    """Non-persistent buffers (rotary frequencies) are not in the files: transformers'
    own initialization computes them, on the modules that hold them only."""
    for module in model.modules():
        if any(n in module._non_persistent_buffers_set for n, _ in module.named_buffers(recurse=False)):
            model._init_weights(module)


def skeleton(model_dir: Path, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def shard(model: torch.nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    from gwq_compile.lean_backward import decoder_layers

    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)


def load_sharded(model_dir: str | os.PathLike, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The model of a HF folder, FSDP2-sharded over the process group; this rank reads only its rows."""
    model_dir = Path(model_dir)
    model = skeleton(model_dir, dtype)
    shard(model)
    model.to_empty(device="cpu")
    _materialize_buffers(model)
    index, names = _weight_index(model_dir), _aliases(model)
    rank, world = dist.get_rank(), dist.get_world_size()
    with torch.no_grad():
        for _, param in model.named_parameters():
            local = calibration.local_tensor(param)
            rows = row_block(param.shape[0], rank, world) if param.dim() else None
            local.copy_(read_rows(index, names[id(param)], rows).to(local.dtype))
    return model.eval()


# ----------------------------------------------------------------------------- calibration and packing


def _fsdp_modules(model: torch.nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def calibrate(model: torch.nn.Module, config: GWQConfig, calibration_data: Any, targets: list) -> None:
    """Prepare the targets and run the calibration; every rank on every sample, rank 0's loss only."""
    for module in _fsdp_modules(model):
        module.set_gradient_divide_factor(1.0)  # a sum: rank 0's gradient plus zeros, exactly
        module.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
    for name, mod in targets:
        mark_target(model, name, mod, config)
        quantize.prepare_linear(mod, config)
    loss_scale = 1.0 if dist.get_rank() == 0 else 0.0
    calibration.run_calibration(model, calibration_data, backward=config.needs_gradients, progress=config.progress and dist.get_rank() == 0, loss_scale=loss_scale)


def pack_local_rows(targets: list, config: GWQConfig) -> dict[str, tuple]:
    """Each target's packed rows (``GWQTensor.packed()`` fields) of this rank."""
    from tqdm.auto import tqdm

    if config.outlier_scope == "model":
        selection.rank_model_outliers(selection.ranking_entries([m for _, m in targets]), config, distributed=True)
    packed = {}
    for name, mod in tqdm(targets, desc="GWQ quantize (rows)", disable=not (config.progress and dist.get_rank() == 0), unit="layer"):
        state = calibration.layer_state(mod.weight)
        local = calibration.local_tensor(mod.weight.detach())
        mask = selection.layer_outlier_mask(mod.weight, state, config)
        qweight = quantize.quantize_weight(local, mask, config, state.hessian, state.input_sq)
        packed[name] = tuple(qweight.packed())
        state.scores = state.saliency_sum = None
        calibration.release_weight(mod.weight)
    return packed


def merge_rows(pieces: list[tuple]) -> packing.PackedWeight:
    """One packed weight from its ranks' row blocks, in rank order (CSR row pointers shifted)."""
    fields = [packing.PackedWeight(*p) for p in pieces if p[0].shape[0] > 0]
    row_ptr, offset = [fields[0].outlier_row_ptr[:1]], 0
    for f in fields:
        row_ptr.append(f.outlier_row_ptr[1:] + offset)
        offset += int(f.outlier_row_ptr[-1])
    first = fields[0]
    return packing.PackedWeight(
        torch.cat([f.packed_codes for f in fields]), torch.cat([f.group_scales for f in fields]), torch.cat([f.group_zeros for f in fields]),
        torch.cat(row_ptr).to(first.outlier_row_ptr.dtype), torch.cat([f.outlier_col_idx for f in fields]),
        torch.cat([f.outlier_values for f in fields]), first.bits, first.group_size, first.in_features, first.double_quant,
    )  # fmt: skip


# ----------------------------------------------------------------------------- rank 0's model


def assemble(model_dir: Path, dtype: torch.dtype, packed: dict[str, packing.PackedWeight], config: GWQConfig) -> torch.nn.Module:
    """The full quantized model on rank 0: GWQ weights from the gathered rows, the rest from the files."""
    from gwq_compile import hf_registration

    model = skeleton(model_dir, dtype)
    model.to_empty(device="cpu")  # untouched pages: the quantized layers' dense weights are never filled
    model.tie_weights()  # to_empty made a new tensor per module: tie the embedding again
    _materialize_buffers(model)
    for name, fields in packed.items():
        module = model.get_submodule(name)
        module.weight = torch.nn.Parameter(GWQTensor.from_packed(fields, dtype), requires_grad=False)
    index, names = _weight_index(model_dir), _aliases(model)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if not isinstance(param, GWQTensor):
                param.copy_(read_rows(index, names[id(param)], None).to(param.dtype))
    model._gwq_config = config.replace(step=None)
    hf_registration.mark_transformers_model(model)
    return model.eval()


def quantize_pretrained(model_dir: str | os.PathLike, config: GWQConfig, calibration_data: Any, dtype: torch.dtype = torch.float32) -> torch.nn.Module | None:
    """Distributed one-shot GWQ of a HF folder; every rank calls it with the same data.

    Returns the quantized model on rank 0 (save it with :func:`gwq_compile.save_quantized`),
    None on the other ranks.
    """
    check_config(config)
    init_process_group()
    model_dir = Path(model_dir)
    model = load_sharded(model_dir, dtype)
    targets = target_modules(model, config)
    convs = [name for name, mod in targets if is_conv1d(mod)]
    if convs:  # FSDP2 shards dim 0: a Conv1D's [in, out] weight would split its inputs, not its output rows
        raise ValueError(f"distributed GWQ shards output rows, and layer {convs[0]!r} is an HF Conv1D ([in, out] weight): quantize with one process")
    snapshot = calibration.snapshot_and_freeze(model)
    try:
        calibrate(model, config, calibration_data, targets)
        local = pack_local_rows(targets, config)
    finally:
        calibration.restore(model, snapshot)
    del model, targets, snapshot
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local, gathered, dst=0)
    del local
    if dist.get_rank() != 0:
        return None
    merged = {name: merge_rows([g[name] for g in gathered]) for name in gathered[0]}
    del gathered
    return assemble(model_dir, dtype, merged, config)
