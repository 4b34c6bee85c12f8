"""What the engine computes, done with transformers and the core alone: the reference the vLLM integration is
tested against, under either transformers version (no kvpress needed).

Prefill the prompt, score it with the gates from each layer's post-layernorm hidden states, keep every (layer, head)'s
pairs chosen by :func:`~fastkvzip_press.vllm.selection.kept_token_indices`, then decode greedily with logical RoPE
positions over the shortened cache. ``FastKVzipPress(uniform=True)`` makes the same decision in kvpress.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from fastkvzip_press.gates import GateBank, decoder_layers
from fastkvzip_press.vllm.selection import kept_token_indices
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
    """Greedy decoding of ``prompt`` after the engine's uniform compaction at ``ratio`` (0: none)."""
    settings = settings or EngineSettings()
    layers = decoder_layers(model)
    hidden: dict[int, torch.Tensor] = {}

    def capture(layer_id):
        return lambda module, args, kwargs: hidden.__setitem__(layer_id, kwargs["hidden_states"])

    hooks = [
        layers[layer_id].self_attn.register_forward_pre_hook(capture(layer_id), with_kwargs=True)
        for layer_id in bank.layer_ids
    ]
    device = next(model.parameters()).device
    try:
        cache = DynamicCache(config=model.config)
        output = model(input_ids=torch.tensor([prompt], device=device), past_key_values=cache, use_cache=True)
    finally:
        for hook in hooks:
            hook.remove()
    n_prompt = len(prompt)
    kept = None
    if settings.kept_tokens(n_prompt, ratio) < n_prompt:
        scores = torch.stack([bank.score(layer_id, hidden[layer_id])[0] for layer_id in bank.layer_ids])  # [L, H, T]
        kept = kept_token_indices(scores, ratio, settings.protection)
        for layer_id, layer_kept in zip(bank.layer_ids, kept):
            layer = cache.layers[layer_id]
            index = layer_kept.to(layer.keys.device)[None, :, :, None].expand(-1, -1, -1, layer.keys.shape[-1])
            layer.keys = layer.keys.gather(2, index).contiguous()
            layer.values = layer.values.gather(2, index).contiguous()
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
