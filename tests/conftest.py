"""Shared fixtures: tiny random transformers models (no downloads)."""

from __future__ import annotations

import pytest
import torch


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, tie: bool = True, hidden: int = 96, inter: int = 200):
    """A 2-layer random Llama; hidden=96/inter=200 make in_features not multiples of 64."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=300, max_position_embeddings=256, tie_word_embeddings=tie,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).to(dtype).eval()


def byte_tokenizer():
    """A byte-level tokenizer with exactly 256 ids (no merges), built offline."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[0])


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def token_ids():
    return torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(1))
