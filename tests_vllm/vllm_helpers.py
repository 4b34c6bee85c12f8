"""Helpers of the vLLM integration's tests (run in .venv-vllm: `make test-vllm`).

Tiny random-weight models saved from a config (no download): head size 32 (vLLM's CPU attention supports no 16),
fp32 (vLLM's bf16 CPU path answers wrongly on AMX CPUs), initializer_range 0.1 so that random weights give
attention something to choose.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the tests fix the pool with num_gpu_blocks_override

VOCAB = 1024
BLOCK_SIZE = 32
POOL_BLOCKS = 25  # one of them is vLLM's null block


def tiny_tokenizer():
    """A word-level tokenizer of VOCAB tokens: ``w<i>`` is token ``i``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + [f"w{i}" for i in range(len(specials), VOCAB)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = "{% for message in messages %}{{ message['content'] }} {% endfor %}"
    return tokenizer


def build_tiny_model(arch: str, folder: Path):
    """Save a 2-layer random ``arch`` ("llama" or "qwen3") model and its tokenizer in ``folder``; return the model."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[
        arch
    ]
    config = config_class(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=2048,
        initializer_range=0.1,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = model_class(config).float().eval()
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return model


def distinct_prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    """Prompts of distinct tokens (no two tokens share hidden states, so no gate scores tie)."""
    rng = np.random.default_rng(seed)
    return [[int(token) for token in rng.permutation(np.arange(3, VOCAB))[:length]] for length in lengths]


def engine_options(**overrides) -> dict:
    """vllm.LLM options of the tests: fp32, eager, no prefix caching, 24 usable blocks of 32 tokens."""
    options = dict(
        dtype="float32",
        enforce_eager=True,
        max_model_len=512,
        block_size=BLOCK_SIZE,
        max_num_batched_tokens=128,
        max_num_seqs=8,
        enable_prefix_caching=False,
        num_gpu_blocks_override=POOL_BLOCKS,
        seed=0,
    )
    options.update(overrides)
    return options
