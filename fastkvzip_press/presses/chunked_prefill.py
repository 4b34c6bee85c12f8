"""Splitting a long prefill into chunks with forward hooks on the base model, so eviction can run after every chunk.

kvpress's pipeline prefills with one ``model.model(input_ids=context)`` call and ``generate`` with one
``model(input_ids)`` call. A forward pre-hook on the base model runs every chunk but the last through the model itself
(its own calls pass through), then hands the last chunk to the original call, whose output therefore covers the last
chunk only. A forward hook that runs even when a chunk raises closes the plan. Nothing of the model is replaced.

The plan says where forwards end (:meth:`~fastkvzip_press.eviction.ChunkPlan.chunk_ends`): every sequence of a
left-padded batch is chunked in its own tokens, as it would be alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import DynamicCache, PreTrainedModel

from fastkvzip_press.eviction import ChunkPlan


class ChunkedPrefill:
    """Chunk the prefills of ``model``'s base model into ``chunk_size``-token forwards while attached.

    ``start(context_length, padding)`` returns the :class:`~fastkvzip_press.eviction.ChunkPlan` of a prefill
    (``padding [B, T]`` from the 2-D attention mask, all False without one); the plan's
    ``chunk_end`` is set before every chunk; ``finish()`` runs once the prefill ends, also on error. Inputs that are
    short, given as embeddings, or that extend a cache already holding tokens (questions, decoding) pass unchanged.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        chunk_size: int,
        start: Callable[[int, torch.Tensor | None], ChunkPlan],
        finish: Callable[[], None],
    ):
        self.model = model
        self.base: nn.Module = (
            model.model if isinstance(getattr(model, "model", None), nn.Module) else model.get_decoder()
        )
        self.chunk_size = chunk_size
        self.start, self.finish = start, finish
        self._handles: list[RemovableHandle] = []
        self._inside = False  # True while this object runs a chunk through the base model itself

    def attach(self) -> None:
        self._handles = [
            self.base.register_forward_pre_hook(self._split, with_kwargs=True),
            self.base.register_forward_hook(self._close, with_kwargs=True, always_call=True),
        ]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _split(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        if self._inside:
            return None
        if args:
            kwargs = {**kwargs, "input_ids": args[0]}
            args = args[1:]
        input_ids = kwargs.get("input_ids")
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None else 0
        if (
            input_ids is None
            or kwargs.get("inputs_embeds") is not None
            or past > 0
            or input_ids.shape[1] <= self.chunk_size
        ):
            return None
        kwargs = dict(kwargs)
        attention_mask = kwargs.pop("attention_mask", None)
        if attention_mask is not None and attention_mask.ndim != 2:
            raise ValueError("chunked prefill slices 2-D attention masks only; pass a [batch, tokens] mask or none")
        position_ids = kwargs.pop("position_ids", None)
        cache_position = kwargs.pop("cache_position", None)
        if cache is None:
            kwargs["past_key_values"] = DynamicCache(config=self.model.config)
        n_tokens = input_ids.shape[1]
        if attention_mask is None:
            padding = torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
        else:
            padding = attention_mask[:, -n_tokens:] == 0
        plan = self.start(n_tokens, padding)

        def chunk(begin: int, end: int) -> dict[str, Any]:
            plan.chunk_end = end
            return {
                **kwargs,
                "input_ids": input_ids[:, begin:end],
                "attention_mask": None if attention_mask is None else attention_mask[:, :end],
                "position_ids": None if position_ids is None else position_ids[:, begin:end],
                "cache_position": None if cache_position is None else cache_position[begin:end],
            }

        ends = plan.chunk_ends()
        self._inside = True
        try:
            for begin, end in zip([0, *ends[:-2]], ends[:-1]):
                module(*args, **chunk(begin, end))
        finally:
            self._inside = False
        return args, chunk(ends[-2] if len(ends) > 1 else 0, n_tokens)

    def _close(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        if not self._inside:
            self.finish()
