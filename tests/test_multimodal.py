"""GWQ on a vision-language model: a tiny random Qwen2-VL, image + text calibration.

The paper's multimodal claim is that one next-token loss on image+text inputs calibrates
both the vision tower and the language model.  These tests check that with eager
``quantize_`` (dict batches holding ``input_ids``, ``pixel_values``, ``image_grid_thw``) and
with the ``gwq`` torch.compile backend, which must give the same masks and output despite
the many graph breaks the vision tower causes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from gwq_compile import GWQConfig, GWQTensor, quantize_
from gwq_compile.calibration import logits_of, next_token_nll

CFG = dict(bits=4, group_size=32, outlier_ratio=0.02, progress=False)
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 250, 251, 252, 253
PATCH, MERGE, TEMPORAL = 14, 2, 2


def tiny_qwen2_vl(seed: int = 0) -> torch.nn.Module:
    """A one-layer-each random Qwen2-VL: vision tower (embed 32) + language model (hidden 64)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, bos_token_id=0, eos_token_id=1,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(
            depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=PATCH,
            spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL,
        ),
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )  # fmt: skip
    return Qwen2VLForConditionalGeneration(config).eval()


def image_text_batch(seed: int, grid_hw: tuple[int, int] = (4, 4)) -> dict[str, torch.Tensor]:
    """One image (``grid_hw`` patches) between two text spans, as the Qwen2-VL processor lays it out."""
    gen = torch.Generator().manual_seed(seed)
    h, w = grid_hw
    patches = h * w
    pixel_values = torch.randn(patches, 3 * TEMPORAL * PATCH * PATCH, generator=gen)
    n_image_tokens = patches // (MERGE * MERGE)
    ids = torch.cat(
        [
            torch.randint(2, 240, (1, 5), generator=gen),
            torch.tensor([[VISION_START] + [IMAGE_TOKEN] * n_image_tokens + [VISION_END]]),
            torch.randint(2, 240, (1, 7), generator=gen),
        ],
        dim=1,
    )
    return {
        "input_ids": ids,
        "pixel_values": pixel_values,
        "image_grid_thw": torch.tensor([[1, h, w]]),
        "mm_token_type_ids": (ids == IMAGE_TOKEN).long(),
    }


def logits(model, batch):
    with torch.no_grad():
        return model(**batch, use_cache=False).logits


def linear_names(model) -> dict[str, str]:
    """name -> "vision" / "language" / "head" for every nn.Linear."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            out[name] = "vision" if ".visual." in f".{name}" else "head" if name == "lm_head" else "language"
    return out


def gwq_masks(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.outlier_mask() for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), GWQTensor)}


@pytest.fixture(scope="module")
def fp_model():
    return tiny_qwen2_vl()


@pytest.fixture(scope="module")
def eager(fp_model):
    model = copy.deepcopy(fp_model)
    quantize_(model, GWQConfig(**CFG), calibration_data=[image_text_batch(0)])
    return model


def test_vision_and_language_linears_are_quantized(eager) -> None:
    kinds = linear_names(eager)
    assert {"vision", "language"} <= set(kinds.values())
    quantized = []
    for name, kind in kinds.items():
        weight = eager.get_submodule(name).weight
        # every layer but the output head got a gradient from the text loss and was quantized
        assert isinstance(weight, GWQTensor) == (kind != "head"), name
        if kind != "head":
            quantized.append(weight)
    # the default outlier_scope="model" ranks vision and language layers together
    outliers = {k: sum(eager.get_submodule(n).weight.num_outliers for n in kinds if kinds[n] == k) for k in ("vision", "language")}
    assert sum(outliers.values()) == round(CFG["outlier_ratio"] * sum(w.numel() for w in quantized))
    assert min(outliers.values()) > 0


def test_vision_masks_follow_the_image(fp_model, eager) -> None:
    """The same text with another image changes the vision tower's outliers: its saliency
    comes from the next-token loss back-propagated through the image features."""
    batch = image_text_batch(0)
    other = dict(batch, pixel_values=torch.randn(batch["pixel_values"].shape, generator=torch.Generator().manual_seed(99)))
    second = copy.deepcopy(fp_model)
    quantize_(second, GWQConfig(**CFG), calibration_data=[other])
    vision = [n for n, k in linear_names(eager).items() if k == "vision"]
    a, b = gwq_masks(eager), gwq_masks(second)
    assert any(not torch.equal(a[n], b[n]) for n in vision)


def test_quantized_vl_model_stays_close_to_fp(fp_model, eager) -> None:
    """The logits, not the NLL: a random model's NLL sits near log(vocab) whatever its weights
    (zeroing every quantized weight moves it by 0.25 %).  The logits' relative error is 0.064
    here and 0.65 with every quantized weight zeroed."""
    batch = image_text_batch(1)  # not the calibration sample
    fp_out, gwq_out = logits(fp_model, batch), logits(eager, batch)
    rel = ((gwq_out - fp_out).norm() / fp_out.norm()).item()
    assert rel < 0.15
    ids = batch["input_ids"]
    nll_fp = next_token_nll(logits_of(fp_out), ids).item()
    assert abs(next_token_nll(logits_of(gwq_out), ids).item() - nll_fp) < 0.002 * nll_fp


def test_gwq_backend_on_vl_model(fp_model, eager) -> None:
    """torch.compile(backend="gwq") with image+text calibration: same masks and output as eager."""
    model = copy.deepcopy(fp_model)
    batch = image_text_batch(0)
    graphs_before, calibrations_before = counters["stats"]["unique_graphs"], counters["gwq"]["calibrations"]
    compiled = torch.compile(model, backend="gwq", options={**CFG, "calibration_data": [batch]})
    out = logits(compiled, batch)
    assert counters["stats"]["unique_graphs"] - graphs_before > 1  # the vision tower breaks the graph
    assert counters["gwq"]["calibrations"] - calibrations_before == 1  # ...but calibration ran once
    masks, expected = gwq_masks(model), gwq_masks(eager)
    assert sorted(masks) == sorted(expected)
    assert all(torch.equal(masks[n], expected[n]) for n in masks)
    eager_out, fp_out = logits(eager, batch), logits(fp_model, batch)
    assert (out - eager_out).abs().max() <= 0.1 * (eager_out - fp_out).abs().max()
