"""What the engine computes, done with transformers and the core alone: the reference the vLLM integration is
tested against, under either transformers version (no kvpress needed).

Prefill the prompt up to each compaction point of the request's schedule, score the new tokens with the gates from
each layer's post-layernorm hidden states, let :class:`~fastkvzip_press.vllm.compaction.PromptCompaction` decide
(over all layers and KV heads, or the same count in each), drop what it evicts from head-wise ragged layers
(:func:`~fastkvzip_press.cache.evict_from_tail`, each head its own length), then decode greedily with logical RoPE
positions. ``FastKVzipPress()`` (``uniform=True`` for the uniform budget, with the same ``chunk_size``) makes the
same decisions in kvpress.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from fastkvzip_press.cache import enable_ragged_attention, evict_from_tail
from fastkvzip_press.gates import GateBank
from fastkvzip_press.layout import decoder_layers
from fastkvzip_press.vllm.compaction import PointDecision, PromptCompaction
from fastkvzip_press.vllm.settings import EngineSettings, RequestSettings

REFERENCE_BLOCK = 16  # the reference stores no blocks; any block size gives the same decisions


@dataclass
class ReferenceRun:
    """Greedy ``tokens``, their ``logprobs``, and ``kept_indices`` ``[L][H]`` (``None`` when nothing was
    evicted)."""

    tokens: list[int]
    logprobs: list[float]
    kept_indices: list[list[list[int]]] | None


@torch.no_grad()
def greedy_reference(
    model: PreTrainedModel,
    bank: GateBank,
    prompt: list[int],
    ratio: float,
    max_new_tokens: int,
    settings: EngineSettings | None = None,
    budget: str | None = None,
) -> ReferenceRun:
    """Greedy decoding of ``prompt`` after the engine's compaction at ``ratio`` (0: none) under ``budget`` (the
    settings' default when ``None``), at the compaction points of ``settings`` (one after the prefill, or one every
    ``settings.chunk_size`` prompt tokens)."""
    settings = settings or EngineSettings()
    request = RequestSettings(ratio, budget or settings.budget)
    layers = decoder_layers(model)
    heads = len(bank.layer_ids) * bank.num_kv_heads
    schedule = settings.schedule(len(prompt), request, heads, REFERENCE_BLOCK)
    hidden: dict[int, torch.Tensor] = {}

    def capture(layer_id):
        return lambda module, args, kwargs: hidden.__setitem__(layer_id, kwargs["hidden_states"])

    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    compaction = None if schedule is None else PromptCompaction(schedule)
    if compaction is not None:
        enable_ragged_attention(model)
    ends = (len(prompt),) if schedule is None else schedule.ends
    hooks = [
        layers[layer_id].self_attn.register_forward_pre_hook(capture(layer_id), with_kwargs=True)
        for layer_id in bank.layer_ids
    ]
    try:
        begin = 0
        for end in ends:
            output = model(
                input_ids=torch.tensor([prompt[begin:end]], device=device),
                past_key_values=cache,
                position_ids=torch.arange(begin, end, device=device)[None],  # logical positions
                use_cache=True,
            )
            if compaction is not None:
                scores = torch.stack([bank.score(layer_id, hidden[layer_id])[0] for layer_id in bank.layer_ids])
                decided = compaction.add(scores)  # scores [L, H, m]
                if decided is not None:
                    _evict(cache, bank, decided[0])
            begin = end
    finally:
        for hook in hooks:
            hook.remove()
    logits = output.logits[0, -1]
    tokens, logprobs = [], []
    for step in range(max_new_tokens):
        token = int(logits.argmax())
        tokens.append(token)
        logprobs.append(float(logits.float().log_softmax(-1)[token]))
        if step == max_new_tokens - 1:
            break
        output = model(
            input_ids=torch.tensor([[token]], device=device),
            past_key_values=cache,
            position_ids=torch.tensor([[len(prompt) + step]], device=device),  # logical; the cache is shorter
            use_cache=True,
        )
        logits = output.logits[0, -1]
    return ReferenceRun(tokens, logprobs, None if compaction is None else compaction.kept_indices())


def _evict(cache: DynamicCache, bank: GateBank, decision: PointDecision) -> None:
    """Drop from every gated layer what ``decision`` evicts of the undecided tokens each head holds last."""
    point = decision.point
    held = point.end - point.decided  # undecided tokens before this point: the span, then the window
    window = torch.zeros(*decision.kept.shape[:2], held - point.span, dtype=torch.bool, device=decision.kept.device)
    evicted = torch.cat([~decision.kept, window], dim=-1)  # [L, H, held]
    for index, layer_id in enumerate(bank.layer_ids):
        evict_from_tail(cache, layer_id, evicted[index][None], held)
