"""KVzip targets: a naive recomputation, kvpress's KVzipPress, Gemma3, chunked prefill and input checks."""

from __future__ import annotations

import pytest
import torch
from helpers import CONTEXT
from kvpress import KVzipPress
from transformers import DynamicCache

from fastkvzip_press import ModelLayout
from fastkvzip_press.models import tiny_model
from fastkvzip_press.training.targets import KVzipTargets, kvzip_targets

CHUNK = 100  # CONTEXT is 248 tokens: chunks of 100, 100 and 48
# What the tiny chat template puts around a user message (written out, not derived, to keep the check independent).
TINY_PREFIX = "<|im_start|>user\n"
TINY_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
SYSTEM_TEMPLATE = "<|im_start|>system\nyou are a good cat . tell me the answer<|im_end|>\n"


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def prompt_ids(tokenizer, prefix: str = TINY_PREFIX) -> tuple[torch.Tensor, int]:
    """``[1, n]`` = prefix + CONTEXT, and the prefix length."""
    prefix_ids = encode(tokenizer, prefix)
    return torch.tensor([prefix_ids + encode(tokenizer, CONTEXT)]), len(prefix_ids)


def naive_replay(tokenizer, context: list[int], start: int, end: int) -> list[int]:
    if start == 0:
        prompt = encode(tokenizer, "\n\nRepeat the previous context exactly.")
    else:
        prompt = encode(tokenizer, "\n\nRepeat the part of the previous context exactly, starting with")
        prompt = prompt + context[start - 8 : start]
    return prompt + encode(tokenizer, TINY_SUFFIX) + context[start:end]


def layer_inputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Attention inputs ``[N, D]`` of every layer for one cache-free forward of ``ids [1, N]``."""
    seen: list[torch.Tensor] = []
    hooks = [
        layer.self_attn.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(kwargs["hidden_states"][0].clone()), with_kwargs=True
        )
        for layer in model.model.layers
    ]
    try:
        with torch.no_grad():
            model.model(input_ids=ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [N, heads, d]`` rotated with ``cos, sin [N, d]`` (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def naive_chunk_scores(model, hidden: torch.Tensor, layer: int, keys: list[int], total: int) -> torch.Tensor:
    """``[H_kv, len(keys)]``: per KV head, the max over its query heads and the replay queries of the softmax weight
    on each of ``keys``, the cached positions (prefix and chunk) every replay query sees besides the replay itself.

    ``hidden [total + n, D]``: the layer's inputs for ``[prefix | context | replay]``.
    """
    attn = model.model.layers[layer].self_attn
    config = model.config
    heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    n_all = hidden.shape[0]
    with torch.no_grad():
        cos, sin = model.model.rotary_emb(hidden[None], torch.arange(n_all)[None])
        q = attn.q_proj(hidden).view(n_all, heads, dim)
        k = attn.k_proj(hidden).view(n_all, kv_heads, dim)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = rope(q, cos[0], sin[0]).double(), rope(k, cos[0], sin[0]).double()
    group = heads // kv_heads
    best = torch.zeros(kv_heads, len(keys), dtype=torch.float64)
    for head in range(kv_heads):
        for g in range(group):
            for t in range(n_all - total):
                visible = keys + list(range(total, total + t + 1))
                weights = torch.softmax(k[visible, head] @ q[total + t, head * group + g] / dim**0.5, dim=0)
                best[head] = torch.maximum(best[head], weights[: len(keys)])
    return best


def sharpened(arch: str, factor: float):
    """A fresh tiny model whose query scale is multiplied by ``factor``: random weights attend almost uniformly, so
    the maximum would always sit on the first replay query and the check would not see the replay's content."""
    model, tokenizer = tiny_model(arch)
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            (attn.q_norm.weight if hasattr(attn, "q_norm") else attn.q_proj.weight).mul_(factor)
    return model, tokenizer


@pytest.mark.parametrize(("arch", "sharpness"), [("llama", 16.0), ("qwen3", 4.0)])
def test_scores_match_naive_recomputation(arch, sharpness):
    model, tokenizer = sharpened(arch, sharpness)
    ids, prefix = prompt_ids(tokenizer)
    total = ids.shape[1]
    context = ids[0, prefix:].tolist()
    targets = kvzip_targets(model, tokenizer, ids, prefix, chunk_size=CHUNK, hidden_layers=(0, 3), progress=False)
    assert isinstance(targets, KVzipTargets)
    assert targets.scores.shape == (4, 2, len(context)) and targets.scores.dtype == torch.float32

    # One layer per chunk (the last one shorter), every KV head and chunk token.
    for start, layer in [(0, 0), (100, 3), (200, 1)]:
        end = min(start + CHUNK, len(context))
        replay = naive_replay(tokenizer, context, start, end)
        hidden = layer_inputs(model, torch.tensor([ids[0].tolist() + replay]))
        if start == 0:  # the prefill part of the forward gives the gate inputs (sdpa rounding differs: 1e-4)
            for i in (0, 3):
                torch.testing.assert_close(targets.hidden[i], hidden[i][prefix:total], atol=1e-4, rtol=1e-4)
        keys = list(range(prefix)) + list(range(prefix + start, prefix + end))
        expected = naive_chunk_scores(model, hidden[layer], layer, keys, total)[:, prefix:]
        torch.testing.assert_close(targets.scores[layer, :, start:end].double(), expected, atol=1e-5, rtol=0)


def run_kvzip_press(model, tokenizer, ids: torch.Tensor, tmp_path, **press_kwargs) -> torch.Tensor:
    """kvpress's KVzipPress scores ``[L, H, n]`` (all positions), captured before its compression step."""
    tokenizer.save_pretrained(tmp_path)
    original_name = model.config.name_or_path
    model.config.name_or_path = str(tmp_path)  # KVzipPress reloads the tokenizer from here
    press = KVzipPress(compression_ratio=0.5, chunk_size=CHUNK, **press_kwargs)
    captured: list[torch.Tensor] = []
    # Replaces the fake eviction, which would leave masked_key_indices on the model.
    press.compress_post = lambda _model: captured.append(press.score_val[:, 0].clone())
    try:
        with torch.no_grad(), press(model):
            model.model(input_ids=ids, past_key_values=DynamicCache())
    finally:
        model.config.name_or_path = original_name
    return captured[0]


@pytest.mark.parametrize("normalization", ["kvzip", "kvzip+"])
def test_matches_kvpress_kvzip_press(tmp_path, normalization):
    # A fresh model: KVzipPress attaches rotary_emb to every attention module.
    model, tokenizer = tiny_model("llama")
    tokenizer.chat_template = SYSTEM_TEMPLATE + tokenizer.chat_template  # a prefix longer than kvpress's 4 sinks
    ids, prefix = prompt_ids(tokenizer, SYSTEM_TEMPLATE + TINY_PREFIX)
    assert prefix > 4
    ours = kvzip_targets(model, tokenizer, ids, prefix, chunk_size=CHUNK, normalization=normalization, progress=False)

    # Same sink convention (the whole prefix): identical up to the Gram evaluation of ||W_o v|| for kvzip+.
    reference = run_kvzip_press(
        model, tokenizer, ids, tmp_path, n_sink=prefix, kvzip_plus_normalization=normalization == "kvzip+"
    )
    assert torch.all(reference[..., :prefix] == 0)
    torch.testing.assert_close(ours.scores, reference[..., prefix:].float(), atol=1e-9, rtol=1e-6)

    # kvpress's default (first 4 tokens as sink) ranks the tokens nearly the same.
    default = run_kvzip_press(model, tokenizer, ids, tmp_path, kvzip_plus_normalization=normalization == "kvzip+")
    pair = torch.stack([ours.scores.flatten(), default[..., prefix:].flatten().float()]).double()
    assert torch.corrcoef(pair)[0, 1] > 0.99
    ranks = pair.argsort(dim=1).argsort(dim=1).double()
    assert torch.corrcoef(ranks)[0, 1] > 0.99


def test_gemma3_scores(tiny_models):
    model, tokenizer = tiny_models("gemma3")
    ids, prefix = prompt_ids(tokenizer)
    gated = ModelLayout.from_model(model).gated_layer_ids
    targets = kvzip_targets(model, tokenizer, ids, prefix, chunk_size=CHUNK, hidden_layers=gated, progress=False)
    n_ctx = ids.shape[1] - prefix
    assert targets.scores.shape == (6, 2, n_ctx) and targets.scores.dtype == torch.float32
    assert torch.isfinite(targets.scores).all()
    assert targets.scores.min() > 0 and targets.scores.max() <= 1
    assert sorted(targets.hidden) == list(gated) == [2, 5]
    assert all(h.shape == (n_ctx, 64) for h in targets.hidden.values())


def test_chunked_prefill_and_no_hidden(llama):
    model, tokenizer = llama
    ids, _ = prompt_ids(tokenizer)
    prefix = 12  # a prefill piece boundary (7) falls inside the prefix
    whole = kvzip_targets(model, tokenizer, ids, prefix, chunk_size=CHUNK, hidden_layers=(1,), progress=False)
    pieces = kvzip_targets(
        model, tokenizer, ids, prefix, chunk_size=CHUNK, hidden_layers=(1,), prefill_chunk=7, progress=False
    )
    torch.testing.assert_close(pieces.scores, whole.scores, atol=1e-6, rtol=1e-5)
    assert pieces.hidden[1].shape == (ids.shape[1] - prefix, 64)
    torch.testing.assert_close(pieces.hidden[1], whole.hidden[1], atol=1e-5, rtol=1e-5)
    assert kvzip_targets(model, tokenizer, ids, prefix, chunk_size=1000, progress=False).hidden is None


def test_bad_input(llama):
    model, tokenizer = llama
    ids, prefix = prompt_ids(tokenizer)
    with pytest.raises(ValueError, match="one sequence"):
        kvzip_targets(model, tokenizer, ids.repeat(2, 1), prefix, progress=False)
    with pytest.raises(ValueError, match="empty context"):
        kvzip_targets(model, tokenizer, ids, ids.shape[1], progress=False)
    with pytest.raises(ValueError, match="normalization"):
        kvzip_targets(model, tokenizer, ids, prefix, normalization="softmax", progress=False)
    with pytest.raises(ValueError, match="hidden_layers"):
        kvzip_targets(model, tokenizer, ids, prefix, hidden_layers=(4,), progress=False)
