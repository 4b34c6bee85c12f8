"""kvpress's question-answering pipeline for a loaded model."""

from __future__ import annotations

import kvpress  # noqa: F401  (importing kvpress registers the "kv-press-text-generation" pipeline)
from transformers import Pipeline, PreTrainedModel, PreTrainedTokenizerBase, pipeline


def kvpress_pipeline(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> Pipeline:
    """kvpress's ``kv-press-text-generation`` pipeline on ``model``'s device; call it with ``press=``."""
    return pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device=model.device)
