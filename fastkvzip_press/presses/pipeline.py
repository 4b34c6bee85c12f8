"""kvpress's question-answering pipeline for a loaded model."""

from __future__ import annotations

import kvpress  # noqa: F401  (importing kvpress registers the "kv-press-text-generation" pipeline)
from transformers import Pipeline, PreTrainedModel, PreTrainedTokenizerBase, pipeline

from fastkvzip_press.presses.cache_position import pass_cache_position


def kvpress_pipeline(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> Pipeline:
    """kvpress's ``kv-press-text-generation`` pipeline on ``model``'s device; call it with ``press=``. On
    transformers >= 5.3 the model is made to pass ``cache_position``, which kvpress's hooks read."""
    pass_cache_position(model)
    return pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device=model.device)
