"""A model's identity and attention geometry (what gate and cache files are matched to), and where its decoder layers
live. At the bottom of the package: imports no other module of it."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel


@dataclass(frozen=True)
class ModelLayout:
    """Attention geometry of a decoder-only model, read from its config.

    ``gated_layer_ids`` are the decoder layers that carry a gate and may be evicted: every layer, except for
    hybrid models (Gemma3) whose sliding-window layers stay dense and are never gated.
    """

    model_id: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    gated_layer_ids: tuple[int, ...]

    @property
    def group_size(self) -> int:
        """G: query heads per KV head."""
        return self.num_attention_heads // self.num_kv_heads

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> ModelLayout:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        num_layers = text.num_hidden_layers
        num_heads = text.num_attention_heads
        num_kv_heads = getattr(text, "num_key_value_heads", None) or num_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
        layer_types = getattr(text, "layer_types", None)
        if layer_types:
            gated = tuple(i for i, kind in enumerate(layer_types) if kind != "sliding_attention")
        else:
            gated = tuple(range(num_layers))
        return cls(
            model_id=getattr(config, "name_or_path", "") or "",
            num_layers=num_layers,
            hidden_size=text.hidden_size,
            num_attention_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            gated_layer_ids=gated,
        )

    @classmethod
    def from_model(cls, model: PreTrainedModel) -> ModelLayout:
        return cls.from_config(model.config)


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The decoder layers of a causal LM, also for multimodal wrappers that nest a ``language_model``."""
    inner = model.model
    inner = getattr(inner, "language_model", inner)
    return inner.layers


def model_name(model_id: str) -> str:
    """The comparable part of a model id: the last path component, lowercased (a hub id or a local folder)."""
    return model_id.rstrip("/\\").replace("\\", "/").split("/")[-1].lower()
