"""What the engine computes, done with transformers and the core alone: the reference the vLLM integration is
tested against, under either transformers version (no kvpress needed).

Prefill the prompt up to each compaction point of the engine's schedule, score the new tokens with the gates from each
layer's post-layernorm hidden states, store what :class:`~fastkvzip_press.vllm.selection.PromptCompaction` keeps
(every (layer, head) the same count, each head its own tokens), then decode greedily with logical RoPE positions over
the shortened cache. ``FastKVzipPress(uniform=True)`` (with the same ``chunk_size``) makes the same decisions in
kvpress.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from fastkvzip_press.gates import GateBank, decoder_layers
from fastkvzip_press.vllm.selection import PromptCompaction
from fastkvzip_press.vllm.settings import EngineSettings


@dataclass
class ReferenceRun:
    """Greedy ``tokens``, their ``logprobs``, and ``kept_indices`` ``[L, H, n]`` (``None`` when nothing was
    evicted)."""

    tokens: list[int]
    logprobs: list[float]
    kept_indices: torch.Tensor | None


@torch.no_grad()
def greedy_reference(
    model: PreTrainedModel,
    bank: GateBank,
    prompt: list[int],
    ratio: float,
    max_new_tokens: int,
    settings: EngineSettings | None = None,
) -> ReferenceRun:
    """Greedy decoding of ``prompt`` after the engine's uniform compaction at ``ratio`` (0: none), at the compaction
    points of ``settings`` (one after the prefill, or one every ``settings.chunk_size`` prompt tokens)."""
    settings = settings or EngineSettings()
    layers = decoder_layers(model)
    hidden: dict[int, torch.Tensor] = {}

    def capture(layer_id):
        return lambda module, args, kwargs: hidden.__setitem__(layer_id, kwargs["hidden_states"])

    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    schedule = settings.schedule(len(prompt), ratio)
    compaction = (
        None if schedule is None else PromptCompaction(schedule, ratio, settings.protection, settings.chunk_size)
    )
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
                _compact(cache, compaction, bank, hidden)
            begin = end
    finally:
        for hook in hooks:
            hook.remove()
    kept = None if compaction is None else compaction.kept_indices()
    n_prompt = len(prompt)
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
            position_ids=torch.tensor([[n_prompt + step]], device=device),  # logical position; the cache is shorter
            use_cache=True,
        )
        logits = output.logits[0, -1]
    return ReferenceRun(tokens, logprobs, kept)


def _compact(cache: DynamicCache, compaction: PromptCompaction, bank: GateBank, hidden: dict) -> None:
    """Hand the chunk just prefilled to ``compaction``; store what it writes from the cache row it names on."""
    layer_ids = bank.layer_ids
    scores = torch.stack([bank.score(layer_id, hidden[layer_id])[0] for layer_id in layer_ids])  # [L, H, m]
    chunk = scores.shape[-1]
    keys = torch.stack([cache.layers[i].keys[0, :, -chunk:].transpose(0, 1) for i in layer_ids])  # [L, m, H, D]
    values = torch.stack([cache.layers[i].values[0, :, -chunk:].transpose(0, 1) for i in layer_ids])
    write = compaction.add(scores, keys, values)
    if write is None:
        return
    for index, layer_id in enumerate(layer_ids):
        layer = cache.layers[layer_id]
        layer.keys = _stored(layer.keys, write.keys[index], write.first)
        layer.values = _stored(layer.values, write.values[index], write.first)


def _stored(old: torch.Tensor, new: torch.Tensor, first: int) -> torch.Tensor:
    """A cache row ``[1, H, S, D]``: its first ``first`` positions, then ``new`` ``[m, H, D]``."""
    return torch.cat([old[:, :, :first], new.transpose(0, 1)[None].to(old.dtype)], dim=2).contiguous()
