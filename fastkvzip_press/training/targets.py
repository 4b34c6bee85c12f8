"""KVzip importance scores (the gate training targets) by context reconstruction.

Algorithm (KVzip, arXiv 2505.23416; docs/method.md#training-targets-kvzip-scores):

1. Prefill ``[prefix | context]`` into a fresh dense ``DynamicCache`` (optionally in chunks, never evicting). Forward
   hooks on the attention modules keep the post-input-layernorm hidden states of the context positions for the
   requested layers: exactly the gate input.
2. Cut the context into chunks of ``chunk_size`` tokens. Chunk ``i`` is replayed as
   ``prompt_i + suffix + chunk_i``: ``prompt_1 = "\\n\\nRepeat the previous context exactly."``, later prompts
   ``"\\n\\nRepeat the part of the previous context exactly, starting with"`` followed by the last 8 token ids of
   chunk ``i-1``; ``suffix`` is the chat template's assistant header (``"\\n"`` without a template).
3. Each replay runs teacher-forced through the base model over the full prefilled cache. At every layer a hook
   rebuilds the post-RoPE queries of the ``n`` replay tokens and computes, for scoring only, the restricted attention
   ``softmax(Q K_sub^T * scaling + causal mask on the last n x n block)`` in fp32 with
   ``K_sub = [prefix keys (the sink) | keys of chunk i | the n replay keys]``. The score of chunk token ``j`` for KV
   head ``h`` is the maximum weight on key ``sink + j`` over the G query heads of ``h`` and all ``n`` replay queries.
   The cache is rolled back to the prefilled length after every replay.

``normalization="kvzip+"`` is kvpress's ``KVzipPress(kvzip_plus_normalization=True)``: before the maximum, the
weight of replay query ``t`` (query head ``(h, g)``) on key ``k`` is multiplied by ``||W_o[h, g] v_k|| / ||x_t||``,
where ``x_t`` is the replay token's attention input (post-input-layernorm hidden state), ``v_k`` the cached value and
``W_o[h, g]`` the ``[D, head_dim]`` slice of ``o_proj.weight`` that reads query head ``h * G + g`` (no bias). The
result is a contribution estimate, not a probability: it is not bounded by 1.

Known differences from kvpress's ``KVzipPress`` (0.5.5), which the tests compare against:

- Sink: here the whole prefix (``prefix_length`` tokens, as upstream KVzip's ``sink = len(sys_prompt)``). kvpress
  takes the first ``min(n_sink, chunk start)`` cached tokens (``n_sink=4``): the first 4 tokens of the sequence for
  every chunk after the first, context tokens included when the prefix is shorter. With
  ``KVzipPress(n_sink=prefix_length)`` both are identical (bit-exact for ``"kvzip"`` on fp32 models).
- Precision: logits and softmax in fp32 here; kvpress (and upstream KVzip) in the model dtype (bf16 on GPU).
  ``||W_o v||`` is evaluated as ``sqrt(v^T W_o^T W_o v)`` (same value up to rounding, about 1e-7 relative).
- Scaling: ``module.scaling`` here (Gemma3: ``query_pre_attn_scalar ** -0.5``); kvpress divides by
  ``sqrt(head_dim)`` and refuses Gemma3.
- Prefix: given by the caller here; kvpress derives it from the chat template. Prefix positions are never scored.
- Replay prompts and chunking follow kvpress (``"starting with"`` without the trailing space of upstream KVzip,
  chunks of 2048 by default where upstream uses 2000).

Gemma3 sliding-window layers are scored with the same restricted attention over the whole chunk (the replay forward
itself keeps its sliding window); those layers are never gated.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from kvpress.utils import get_prerope_query_states
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.llama.modeling_llama import rotate_half

from fastkvzip_press.cache.compaction import keep_first_tokens
from fastkvzip_press.layout import ModelLayout, decoder_layers

logger = logging.getLogger(__name__)

FIRST_PROMPT = "\n\nRepeat the previous context exactly."
NEXT_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"
PREVIOUS_TAIL = 8
NORMALIZATIONS = ("kvzip", "kvzip+")


@dataclass
class KVzipTargets:
    """KVzip scores of one context and, optionally, the gate inputs of some layers.

    Attributes:
        scores: ``[L, H, n_ctx]`` float32, every decoder layer and KV head; in [0, 1] for ``"kvzip"``.
        hidden: ``{layer_id: [n_ctx, D]}`` post-input-layernorm hidden states (model dtype), context positions only;
            ``None`` when no layer was requested.
    """

    scores: torch.Tensor
    hidden: dict[int, torch.Tensor] | None


def assistant_suffix_ids(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """Token ids the chat template puts between a user message and the answer, ``[s]``.

    Derived as kvpress's ``KVzipPress`` does (a dummy user turn with ``add_generation_prompt=True`` and
    ``enable_thinking=False``, so Qwen3 gets its empty think block); ``"\\n"`` without a chat template.
    """
    suffix = "\n"
    if tokenizer.chat_template:
        dummy = "dummy context"
        separator = "\n" + "#" * len(dummy)
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": dummy + separator}],
            add_generation_prompt=True,
            tokenize=False,
            enable_thinking=False,
        )
        parts = text.split(separator)
        if len(parts) == 2:
            suffix = parts[1]
        else:
            logger.warning("could not locate the user message in the chat template output; using '\\n' as suffix")
    return torch.tensor(tokenizer.encode(suffix, add_special_tokens=False), dtype=torch.long)


def replay_inputs(
    tokenizer: PreTrainedTokenizerBase, context_ids: torch.Tensor, chunk_size: int, suffix_ids: torch.Tensor
) -> list[tuple[int, int, torch.Tensor]]:
    """The reconstruction inputs of a context ``[n_ctx]``: ``(start, end, ids [m])`` per chunk, start/end in context
    coordinates, ``ids = prompt_i + suffix_ids + context_ids[start:end]``."""
    first = torch.tensor(tokenizer.encode(FIRST_PROMPT, add_special_tokens=False), dtype=torch.long)
    following = torch.tensor(tokenizer.encode(NEXT_PROMPT, add_special_tokens=False), dtype=torch.long)
    context_ids = context_ids.cpu()
    suffix_ids = suffix_ids.cpu()
    replays = []
    for start in range(0, len(context_ids), chunk_size):
        end = min(start + chunk_size, len(context_ids))
        if start == 0:
            prompt = first
        else:
            previous = context_ids[max(start - chunk_size, 0) : start]
            prompt = torch.cat([following, previous[-PREVIOUS_TAIL:]])
        replays.append((start, end, torch.cat([prompt, suffix_ids, context_ids[start:end]])))
    return replays


def _restricted_scores(
    module: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    keys: torch.Tensor,
    values: torch.Tensor,
    sink: int,
    start: int,
    end: int,
    normalization: str,
) -> torch.Tensor:
    """KVzip scores of one layer for cached positions ``[start, end)``: ``[H_kv, end - start]`` float32.

    Args:
        hidden_states: ``[1, n, D]`` attention input of the replay tokens.
        position_embeddings: ``(cos, sin)`` of the replay tokens, ``[1, n, head_dim]`` each.
        keys, values: ``[1, H_kv, n_total + n, head_dim]`` the layer's cache after the replay update.
        sink: number of leading cached positions every replay query also sees (the prefix).
    """
    n = hidden_states.shape[1]
    num_kv = keys.shape[1]
    head_dim = keys.shape[-1]
    queries = get_prerope_query_states(module, hidden_states)  # [1, H, n, d], q_norm included
    cos, sin = position_embeddings
    queries = queries * cos.unsqueeze(1) + rotate_half(queries) * sin.unsqueeze(1)
    group = queries.shape[1] // num_kv
    queries = queries[0].view(num_kv, group, n, head_dim).float()
    k_sub = torch.cat([keys[0, :, :sink], keys[0, :, start:end], keys[0, :, -n:]], dim=1).float()  # [H_kv, T, d]
    width = end - start
    total = k_sub.shape[1]
    # Every cached key is visible; the replay keys (last n columns) causally.
    future = torch.ones(n, n, dtype=torch.bool, device=keys.device).triu(1)
    future = torch.cat([torch.zeros(n, total - n, dtype=torch.bool, device=keys.device), future], dim=1)
    if normalization == "kvzip+":
        inverse_norm = 1.0 / hidden_states[0].float().norm(dim=-1)  # [n]
        w_o = module.o_proj.weight.float().view(-1, num_kv, group, head_dim)  # [D, H_kv, G, d]
        # ||W v||^2 = v^T (W^T W) v: a [G, d, d] Gram matrix per KV head instead of [G, chunk, D] products.
        gram = torch.einsum("jhgi,jhgk->hgik", w_o, w_o)
        chunk_values = values[0, :, start:end].float()  # [H_kv, width, d]
        wov = torch.einsum("hti,hgik,htk->hgt", chunk_values, gram, chunk_values).clamp_min(0).sqrt()
    scores = torch.empty(num_kv, width, dtype=torch.float32, device=keys.device)
    # One KV head at a time bounds the fp32 weights to [G, n, T].
    for head in range(num_kv):
        logits = queries[head] @ k_sub[head].T * module.scaling
        weights = logits.masked_fill_(future, float("-inf")).softmax(dim=-1)[..., sink : sink + width]
        if normalization == "kvzip+":
            weights = weights * inverse_norm[None, :, None] * wov[head][:, None, :]
        scores[head] = weights.amax(dim=(0, 1))
    return scores


def kvzip_targets(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    input_ids: torch.Tensor,
    prefix_length: int,
    chunk_size: int = 2048,
    normalization: Literal["kvzip", "kvzip+"] = "kvzip",
    hidden_layers: Sequence[int] = (),
    prefill_chunk: int | None = None,
    progress: bool = True,
) -> KVzipTargets:
    """KVzip scores of every context token for every decoder layer and KV head.

    Args:
        model: a causal LM with Llama-style attention modules (``q_proj``, ``o_proj``, ``scaling``, standard RoPE).
        tokenizer: its tokenizer (replay prompts and the chat template's assistant header).
        input_ids: ``[1, n]`` = ``[prefix | context]``.
        prefix_length: prefix tokens: never scored, the attention sink of every replay.
        chunk_size: context tokens reconstructed per replay.
        normalization: ``"kvzip"`` (attention weights) or ``"kvzip+"`` (weights x ``||W_o v|| / ||x||``).
        hidden_layers: layer ids whose gate inputs are returned (``hidden=None`` when empty).
        prefill_chunk: prefill in pieces of this many tokens (no eviction), bounding activation memory.
        progress: show a progress bar over the replays.

    Returns:
        :class:`KVzipTargets` with ``scores [L, H, n - prefix_length]`` float32 on the model's device.
    """
    _check_arguments(model, input_ids, prefix_length, chunk_size, prefill_chunk, normalization, hidden_layers)
    base = getattr(model.model, "language_model", model.model)
    input_ids = input_ids.to(next(model.parameters()).device)
    # No config: every layer is a plain DynamicLayer, so sliding layers keep the whole context and roll back by slicing.
    cache = DynamicCache()
    wanted = sorted({int(i) for i in hidden_layers})
    hidden = _prefill(model, base, cache, input_ids, prefix_length, wanted, prefill_chunk)
    replays = replay_inputs(tokenizer, input_ids[0, prefix_length:], chunk_size, assistant_suffix_ids(tokenizer))
    scores = _replay_scores(model, base, cache, input_ids, replays, prefix_length, normalization, progress)
    return KVzipTargets(scores=scores, hidden=hidden)


def _check_arguments(model, input_ids, prefix_length, chunk_size, prefill_chunk, normalization, hidden_layers) -> None:
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"kvzip_targets takes one sequence, input_ids [1, n]; got shape {tuple(input_ids.shape)}")
    total = input_ids.shape[1]
    if not 0 <= prefix_length < total:
        raise ValueError(f"empty context: prefix_length={prefix_length} leaves no token of the {total} to score")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if prefill_chunk is not None and prefill_chunk <= 0:
        raise ValueError(f"prefill_chunk must be positive, got {prefill_chunk}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    n_layers = len(decoder_layers(model))
    wanted = sorted(set(int(i) for i in hidden_layers))
    if any(not 0 <= i < n_layers for i in wanted):
        raise ValueError(f"hidden_layers {wanted} out of range for a model with {n_layers} layers")
    if model.training:
        logger.warning("the model is in training mode (dropout active); call model.eval() for deterministic targets")


def _prefill(
    model: PreTrainedModel,
    base: nn.Module,
    cache: DynamicCache,
    input_ids: torch.Tensor,
    prefix_length: int,
    wanted: list[int],
    prefill_chunk: int | None,
) -> dict[int, torch.Tensor] | None:
    """Prefill ``input_ids [1, n]`` into ``cache`` (in pieces of ``prefill_chunk``); the context's gate inputs
    ``{layer: [n - prefix_length, hidden]}`` of the ``wanted`` layers (``None`` when none is wanted)."""
    layers = decoder_layers(model)
    pieces: dict[int, list[torch.Tensor]] = {i: [] for i in wanted}
    offset = [0]  # absolute position of the first token of the current prefill piece

    def keep_hidden(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        skip = max(prefix_length - offset[0], 0)
        if skip < hidden.shape[1]:
            pieces[module.layer_idx].append(hidden[0, skip:].clone())

    total = input_ids.shape[1]
    step = prefill_chunk or total
    handles = [layers[i].self_attn.register_forward_hook(keep_hidden, with_kwargs=True) for i in wanted]
    try:
        with torch.inference_mode():
            for offset[0] in range(0, total, step):
                base(input_ids=input_ids[:, offset[0] : offset[0] + step], past_key_values=cache, use_cache=True)
    finally:
        for handle in handles:
            handle.remove()
    return {i: torch.cat(pieces[i]) for i in wanted} or None


def _replay_scores(
    model: PreTrainedModel,
    base: nn.Module,
    cache: DynamicCache,
    input_ids: torch.Tensor,
    replays: list,
    prefix_length: int,
    normalization: str,
    progress: bool,
) -> torch.Tensor:
    """Replay each chunk of the context after the prefilled cache and score every context token by the attention the
    replay pays it: ``[L, H, n - prefix_length]`` float32."""
    layers = decoder_layers(model)
    total = input_ids.shape[1]
    layout = ModelLayout.from_model(model)
    scores = torch.zeros(len(layers), layout.num_kv_heads, total - prefix_length, dtype=torch.float32,
                         device=input_ids.device)  # fmt: skip
    span = [0, 0]  # current chunk, context coordinates

    def score(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        layer = cache.layers[module.layer_idx]
        start, end = span
        # .to(): with a device map each layer computes on its own device.
        scores[module.layer_idx, :, start:end] = _restricted_scores(
            module,
            hidden_states,
            kwargs["position_embeddings"],
            layer.keys,
            layer.values,
            prefix_length,
            prefix_length + start,
            prefix_length + end,
            normalization,
        ).to(scores.device)

    handles = [layer.self_attn.register_forward_hook(score, with_kwargs=True) for layer in layers]
    try:
        with torch.inference_mode():
            for start, end, ids in tqdm(replays, desc="KVzip replay", unit="chunk", disable=not progress):
                span[:] = [start, end]
                try:
                    base(input_ids=ids[None].to(input_ids.device), past_key_values=cache, use_cache=True)
                finally:
                    keep_first_tokens(cache, total)  # the next replay sees the prefix and context only
    finally:
        for handle in handles:
            handle.remove()
    return scores
