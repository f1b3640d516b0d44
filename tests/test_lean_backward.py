"""Bounded-memory calibration (gwq_compile.lean_backward) against the plain backward pass."""

from __future__ import annotations

import pytest
import torch

from gwq_compile import GWQConfig, calibration, lean_backward, quantize
from gwq_compile.targets import mark_target, target_modules
from tests.conftest import tiny_llama

# Checkpointing recomputes each layer with the same ops and the chunked loss gives each token
# the same logit gradient, so the decoder layers' saliencies are bit-identical on CPU.  The
# LM head's gradient is summed chunk by chunk: it differs in the last bits (3e-8 of 0.16 here).
HEAD_RTOL, HEAD_ATOL = 1e-5, 1e-6


def calibrated_states(model: torch.nn.Module, config: GWQConfig, ids: torch.Tensor, bounded: bool) -> dict[str, calibration.LayerCalibration]:
    targets = target_modules(model, config)
    snapshot = calibration.snapshot_and_freeze(model)
    for name, mod in targets:
        mark_target(model, name, mod, config)
        quantize.prepare_linear(mod, config)
    calibration.run_calibration(model, ids, backward=True, progress=False, bounded=bounded)
    states = {name: calibration.release_weight(mod.weight) for name, mod in targets}
    calibration.restore(model, snapshot)
    return states


@pytest.fixture
def one_thread():
    """Bit-identity holds on one thread: with two, the chunked loss's smaller matmuls split
    their reductions differently from the full-sequence ones (last-bit differences, seen on a
    2-core machine with the default thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("head_bits", [None, 8])
def test_checkpointed_chunked_calibration_gives_the_plain_saliency(head_bits, monkeypatch, one_thread) -> None:
    monkeypatch.setattr(lean_backward, "CHUNK_LOGIT_ELEMENTS", 300 * 10)  # 10 tokens per chunk: 5 chunks of 47 targets
    config = GWQConfig(group_size=32, head_bits=head_bits, progress=False)
    ids = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(1))
    plain = calibrated_states(tiny_llama(seed=3), config, ids, bounded=False)
    model = tiny_llama(seed=3)
    calls = {"chunks": 0, "layers": 0}
    chunk_nll, forward = lean_backward._chunk_nll, lean_backward._checkpointed_forward

    def counting_chunk(*args):
        calls["chunks"] += 1
        return chunk_nll(*args)

    def counting_layer(f):
        calls["layers"] += 1
        return forward(f)

    monkeypatch.setattr(lean_backward, "_chunk_nll", counting_chunk)
    monkeypatch.setattr(lean_backward, "_checkpointed_forward", counting_layer)
    bounded = calibrated_states(model, config, ids, bounded=True)
    # 2 samples x 5 chunks; a quantized head's chunks are recomputed in the backward pass
    assert calls["layers"] == 2 and calls["chunks"] == 2 * 5 * (2 if head_bits else 1)
    assert ("lm_head" in bounded) == (head_bits is not None)
    assert sorted(plain) == sorted(bounded)
    for name, state in bounded.items():
        assert state.n_backward == plain[name].n_backward == 2, name
        if name == "lm_head":
            torch.testing.assert_close(state.saliency_sum, plain[name].saliency_sum, rtol=HEAD_RTOL, atol=HEAD_ATOL, msg=name)
        else:
            assert torch.equal(state.saliency_sum, plain[name].saliency_sum), name
        assert torch.equal(state.input_sq, plain[name].input_sq), name  # a recomputation is not recorded twice


def test_model_is_restored_after_bounded_calibration() -> None:
    model = tiny_llama(seed=0)
    model.config._attn_implementation = "sdpa"
    forwards = [layer.forward for layer in model.model.layers]
    head_forward = model.lm_head.forward
    calibrated_states(model, GWQConfig(group_size=32, progress=False), torch.randint(0, 300, (1, 16)), bounded=True)
    assert [layer.forward for layer in model.model.layers] == forwards and "forward" not in model.model.layers[0].__dict__
    assert model.lm_head.forward == head_forward and "forward" not in model.lm_head.__dict__
    assert not lean_backward.hooks_paused()


def test_eager_attention_is_switched_to_sdpa_and_back() -> None:
    model = tiny_llama(seed=0)
    model.set_attn_implementation("eager")
    seen = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(model.config._attn_implementation)
        return original(*args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        calibrated_states(model, GWQConfig(group_size=32, progress=False), torch.randint(0, 300, (1, 16)), bounded=True)
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
    assert seen and set(seen) == {"sdpa"}
    assert model.config._attn_implementation == "eager"
