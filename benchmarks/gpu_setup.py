"""What benchmarks/gpu.py measures with: shapes, budgets, timing, the models, gates and presses it builds."""

from __future__ import annotations

import contextlib
import gc
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30
MIB = 2**20

# Published configs (config.json on the hub), the values that shape the model; weights are random.
MODEL_CONFIGS: dict[str, tuple[str, dict]] = {
    "Llama-3.1-8B": (
        "llama",
        dict(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            hidden_act="silu",
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
            rope_scaling={
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
                "rope_type": "llama3",
            },
            attention_bias=False,
            mlp_bias=False,
            tie_word_embeddings=False,
            bos_token_id=128000,
            eos_token_id=128001,
        ),
    ),
    "Qwen3-8B": (
        "qwen3",
        dict(
            vocab_size=151936,
            hidden_size=4096,
            intermediate_size=12288,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            hidden_act="silu",
            max_position_embeddings=40960,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            attention_bias=False,
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=36,
            tie_word_embeddings=False,
            bos_token_id=151643,
            eos_token_id=151645,
        ),
    ),
}
TINY_OVERRIDES = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)

# Peak HBM bandwidth (GB/s, SXM parts) by device name; the longest matching name wins ("H200" before "H20").

# Seconds each section may spend (per model for the model sections): it stops starting new runs once spent.
SECTION_BUDGET_S = {"timed": 75.0, "longest": 70.0}

NO_PRESS, OURS, KVPRESS = "no press", "FastKVzipPress", "kvpress FastKVzipPress (masked)"
FULL_CACHE, OURS_CHUNKED = "full cache", "FastKVzipPress chunked"


@dataclass(frozen=True)
class Scale:
    """Sizes of every section: the GPU run's, or the CPU rehearsal's (``--tiny``)."""

    contexts: tuple[int, ...]
    decode_tokens: int
    rounds: int
    chunk_size: int
    search_start: int
    search_max: int
    refine_steps: int
    kv_budget_bytes: int
    compact_shape: tuple[int, int, int]  # KV heads, tokens, head_dim
    select_shape: tuple[int, int, int]  # layers, KV heads, tokens
    timed_s: float = SECTION_BUDGET_S["timed"]  # per model: prefill / decode rounds stop starting after this
    longest_s: float = SECTION_BUDGET_S["longest"]  # per model: both longest-context searches together


FULL = Scale(
    contexts=(8192, 32768),
    decode_tokens=32,
    rounds=3,
    chunk_size=8192,
    search_start=8192,
    search_max=2**20,
    refine_steps=2,
    kv_budget_bytes=8 * GIB,
    compact_shape=(8, 131072, 128),
    select_shape=(32, 8, 131072),
)
TINY = Scale(
    contexts=(192,),
    decode_tokens=4,
    rounds=2,
    chunk_size=64,
    search_start=64,
    search_max=4096,
    refine_steps=1,
    kv_budget_bytes=96 * 1024,
    compact_shape=(2, 1024, 16),
    select_shape=(32, 8, 256),
)


class Budget:
    """A section's time allowance: ``spent()`` once ``seconds`` have passed since it was made."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def spent(self) -> bool:
        return time.monotonic() >= self.end


class OverBudget(RuntimeError):
    """The CPU rehearsal's stand-in for an out-of-memory error: the KV cache outgrew the search's budget."""


# ------------------------------------------------------------------------------------------------- device helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_out_of_memory(error: BaseException) -> bool:
    """A real CUDA out-of-memory error (from the caching allocator or a library's own allocation) or the stand-in."""
    return isinstance(error, (torch.cuda.OutOfMemoryError, OverBudget)) or "out of memory" in str(error)


@contextlib.contextmanager
def kernels(choice: str) -> Iterator[None]:
    """``FASTKVZIP_PRESS_KERNELS=choice`` while inside (the dispatcher reads it at every call)."""
    from fastkvzip_press.triton.dispatch import KERNELS_ENV

    previous = os.environ.get(KERNELS_ENV)
    os.environ[KERNELS_ENV] = choice
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(KERNELS_ENV, None)
        else:
            os.environ[KERNELS_ENV] = previous


# ---------------------------------------------------------------------------------------------------- the models


def build_model(name: str, tiny: bool, device: torch.device, dtype: torch.dtype):
    """A random-weight model of ``name``'s shapes (``tiny``: the same architecture at test sizes) on ``device``."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    arch, values = MODEL_CONFIGS[name]
    config = (LlamaConfig if arch == "llama" else Qwen3Config)(**{**values, **(TINY_OVERRIDES if tiny else {})})
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.config.name_or_path = f"random-{name}"
    return model.eval()


def random_gates(model):
    """Untrained gates in the model's dtype, on its device (the first scoring call would move them)."""
    from fastkvzip_press import GateBank, ModelLayout

    param = next(model.parameters())
    return GateBank.random(ModelLayout.from_model(model), seed=0, dtype=param.dtype).to(param.device)


def make_press(config: str, model, bank, ratio: float, chunk_size: int | None = None):
    from fastkvzip_press import FastKVzipPress
    from fastkvzip_press.evaluation.kvpress_presses import kvpress_fastkvzip_with_gates

    if config in (NO_PRESS, FULL_CACHE):
        return None
    if config == KVPRESS:
        return kvpress_fastkvzip_with_gates(bank, model, ratio)
    return FastKVzipPress(ratio, gates=bank, chunk_size=chunk_size if config == OURS_CHUNKED else None)


def random_ids(model, n_tokens: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(model.config.vocab_size, (1, n_tokens), generator=generator)
    return ids.to(next(model.parameters()).device)


# ----------------------------------------------------------------------------------------------- one measured run


@contextlib.contextmanager
def kv_watch(model, cache, limit: int | None = None) -> Iterator[list[int]]:
    """Record the peak KV bytes of ``cache`` after every attention layer (before that layer's eviction: registered
    ahead of the press's hooks); with ``limit``, raise :class:`OverBudget` once it is passed."""
    from fastkvzip_press import kv_cache_bytes
    from fastkvzip_press.layout import decoder_layers

    peak = [0]

    def check(*_) -> None:
        peak[0] = max(peak[0], kv_cache_bytes(cache))
        if limit is not None and peak[0] > limit:
            raise OverBudget(f"KV cache of {peak[0]} bytes over the budget of {limit}")

    hooks = [layer.self_attn.register_forward_hook(check) for layer in decoder_layers(model)]
    try:
        yield peak
    finally:
        for hook in hooks:
            hook.remove()
