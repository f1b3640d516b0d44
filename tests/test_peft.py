"""peft LoRA on a GWQ model: adapters train, GWQ weights stay as they are, merge gives dense merged layers."""

from __future__ import annotations

import pytest
import torch

from gwq_compile import GWQConfig, GWQTensor, quantize_
from tests.conftest import tiny_llama

peft = pytest.importorskip("peft")

CFG = GWQConfig(bits=4, group_size=32, progress=False)
TARGETS = ["q_proj", "v_proj"]


def _gwq_fields(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{field}": getattr(p, field).clone()
        for name, p in model.named_parameters()
        if isinstance(p, GWQTensor)
        for field in p.__tensor_flatten__()[0]
    }


@pytest.fixture
def lora_model(token_ids):
    model = tiny_llama()
    quantize_(model, CFG, calibration_data=token_ids[:1])
    config = peft.LoraConfig(r=4, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=False)
    return peft.get_peft_model(model, config)


def test_lora_training_step_changes_adapters_not_gwq_weights(lora_model, token_ids) -> None:
    gwq_before = _gwq_fields(lora_model)
    assert len(gwq_before) == 7 * 14  # 14 quantized linears (2 layers x 7), 7 resident fields each (the CPU layout)
    trainable = {n: p.detach().clone() for n, p in lora_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    optimizer = torch.optim.SGD([p for p in lora_model.parameters() if p.requires_grad], lr=0.1)
    lora_model.train()
    loss = lora_model(token_ids, labels=token_ids).loss
    loss.backward()
    optimizer.step()
    changed = [n for n, p in lora_model.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])]
    assert sorted(changed) == sorted(trainable)  # every adapter matrix moved
    after = _gwq_fields(lora_model)
    assert all(torch.equal(after[k], gwq_before[k]) for k in gwq_before)
    with torch.no_grad():
        assert lora_model(token_ids, labels=token_ids).loss < loss


def test_merge_gives_dense_merged_layers_with_the_same_outputs(lora_model, token_ids, monkeypatch) -> None:
    monkeypatch.setenv("GWQ_KERNEL", "reference")  # exact outputs on both sides (the CPU fast path computes in bf16)
    lora_model.eval()
    with torch.no_grad():
        expected = lora_model(token_ids).logits
    with pytest.warns(UserWarning, match="keeps a dense weight"):
        merged = lora_model.merge_and_unload()
    attn = merged.model.layers[0].self_attn
    assert type(attn.q_proj.weight) is torch.nn.Parameter and isinstance(attn.k_proj.weight, GWQTensor)
    assert "model.layers.0.self_attn.q_proj.weight" in merged.state_dict()  # saved with the model
    with torch.no_grad():
        torch.testing.assert_close(merged(token_ids).logits, expected, rtol=1e-5, atol=1e-5)
    # the merged layers are quantized again by a second quantize_ (the others are left alone)
    quantize_(merged, CFG, calibration_data=token_ids[:1])
    assert isinstance(attn.q_proj.weight, GWQTensor)
