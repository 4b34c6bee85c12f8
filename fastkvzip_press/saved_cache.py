"""Compress once, answer later: a compressed context saved to a file and loaded in another process, no prefill.

A cache file is safetensors (never pickle): the tensors of :mod:`fastkvzip_press.cache.stored` and a JSON header
under the metadata key :data:`HEADER_KEY`: format and version, the model's id and a digest of its architecture, the
dtype, the context's token count and a digest of its token ids, the press and the digest of its gates, and one
description per layer. Writes go through a temporary file and a rename, so a killed save leaves nothing partial.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers import DynamicCache, PretrainedConfig, PreTrainedModel

from fastkvzip_press.cache import RaggedLayer, enable_ragged_attention, kv_cache_bytes
from fastkvzip_press.cache.stored import LAYER_KINDS, cache_from_tensors, cache_tensors
from fastkvzip_press.gates.atomic import atomic_write
from fastkvzip_press.gates.gate import model_name
from fastkvzip_press.gates.layout import ModelLayout, decoder_layers

FORMAT = "fastkvzip-press cache"
FORMAT_VERSION = 1
HEADER_KEY = "fastkvzip_cache"
# Architecture fields a cache depends on (the digest leaves out names, paths and generation settings).
CONFIG_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rope_theta",
    "rope_parameters",
    "rope_scaling",
    "max_position_embeddings",
    "sliding_window",
    "layer_types",
    "rms_norm_eps",
)


class CacheFileError(ValueError):
    """A cache file that cannot be used: missing, not one, damaged, newer, or made for another model or dtype."""


@dataclass
class LoadedCache:
    """A cache read back from a file, ready for ``model.generate(past_key_values=cache)``, and its header."""

    cache: DynamicCache
    header: dict

    @property
    def context_tokens(self) -> int:
        return self.header["context_tokens"]


def config_digest(config: PretrainedConfig) -> str:
    """A short hash of the architecture fields a cache depends on."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    fields = {name: getattr(text, name, None) for name in CONFIG_FIELDS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def token_ids_digest(token_ids: torch.Tensor | list[int]) -> str:
    ids = torch.as_tensor(token_ids, dtype=torch.int64).cpu().contiguous()
    return hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]


def save_cache(
    cache: DynamicCache,
    path: str | Path,
    model: PreTrainedModel,
    *,
    context_ids: torch.Tensor | None = None,
    press: object | None = None,
) -> int:
    """Write ``cache`` (a context's, right after its prefill) to ``path``; returns the file's size in bytes.

    ``context_ids`` (``[B, T]`` or ``[T]``) are the context's tokens, recorded as a digest; ``press`` the press that
    compressed it (its settings and the digest of its gates go into the header).
    """
    path = Path(path)
    if path.is_dir():
        raise CacheFileError(f"{path} is a folder; give a file path for the cache (e.g. doc.kvz)")
    tensors, layers = cache_tensors(cache)
    _store_masks(model, tensors, layers)
    bank = getattr(press, "gate_bank", None)
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_id": ModelLayout.from_model(model).model_id,
        "config_digest": config_digest(model.config),
        "dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch."),
        "context_tokens": cache.get_seq_length(),
        "token_ids_digest": None if context_ids is None else token_ids_digest(context_ids),
        "press": None if press is None else str(press),
        "gates_digest": None if bank is None else bank.digest(),
        "stored_bytes": kv_cache_bytes(cache),
        "layers": layers,
    }
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={HEADER_KEY: json.dumps(header)}))
    return path.stat().st_size


def read_header(path: str | Path) -> dict:
    """The header of a cache file, after checking that it is one this version reads."""
    path = Path(path)
    if path.is_dir():
        raise CacheFileError(f"{path} is a folder, not a cache file")
    if not path.exists():
        raise CacheFileError(f"cache file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CacheFileError(f"{path} is not a readable cache file (truncated or not safetensors): {error}") from None
    if HEADER_KEY not in metadata:
        raise CacheFileError(f"{path} is a safetensors file but not a fastkvzip-press cache (no {HEADER_KEY} header)")
    try:
        header = json.loads(metadata[HEADER_KEY])
    except json.JSONDecodeError as error:
        raise CacheFileError(f"{path} has a damaged header: {error}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CacheFileError(
            f"{path} has a damaged header (format {header.get('format') if isinstance(header, dict) else header!r})"
        )
    version = header.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CacheFileError(
            f"{path} was written in cache format {version!r}; this version of fastkvzip-press reads format "
            f"{FORMAT_VERSION} and older: upgrade fastkvzip-press"
        )
    layers = header.get("layers")
    if not isinstance(layers, list) or not all(isinstance(x, dict) and x.get("kind") in LAYER_KINDS for x in layers):
        raise CacheFileError(f"{path} has a damaged header (layer descriptions)")
    return header


def load_cache(
    path: str | Path,
    model: PreTrainedModel,
    *,
    dtype: torch.dtype | None = None,
    allow_other_model: bool = False,
) -> LoadedCache:
    """Read a cache written by :func:`save_cache` for ``model``, on the model's device.

    Refused with :class:`CacheFileError`: another model (by id; ``allow_other_model`` for the same weights under
    another name) or architecture, a dtype other than the model's unless ``dtype`` asks for a conversion, a newer
    format, a damaged file.
    """
    header = read_header(path)
    layout = ModelLayout.from_model(model)
    theirs = header.get("model_id") or ""
    if theirs and layout.model_id and model_name(theirs) != model_name(layout.model_id) and not allow_other_model:
        raise CacheFileError(
            f"{path} holds a context of model {theirs!r}, not {layout.model_id!r}; load it with that model "
            "(allow_other_model=True if the two names are the same weights)"
        )
    if header.get("config_digest") != config_digest(model.config):
        raise CacheFileError(f"{path} was written for another architecture than {layout.model_id!r}'s configuration")
    stored = getattr(torch, str(header.get("dtype")), None)
    model_dtype = next(model.parameters()).dtype
    if dtype is None and stored != model_dtype:
        raise CacheFileError(
            f"{path} holds {header.get('dtype')} keys and values, the model runs in "
            f"{str(model_dtype).removeprefix('torch.')}: pass dtype={model_dtype} to convert them"
        )
    try:
        tensors = load_file(str(path))
        cache = cache_from_tensors(tensors, header["layers"], model.config, next(model.parameters()).device)
    except (SafetensorError, OSError, KeyError, IndexError, RuntimeError, ValueError, TypeError) as error:
        raise CacheFileError(f"{path} is damaged: its tensors do not match its header ({error})") from None
    _check_consistent(path, cache, header)
    _restore_masks(path, model, tensors, header["layers"], cache)
    if dtype is not None:
        _cast(cache, dtype)
    if any(isinstance(layer, RaggedLayer) for layer in cache.layers):
        enable_ragged_attention(model)
    return LoadedCache(cache, header)


def _store_masks(model: PreTrainedModel, tensors: dict[str, torch.Tensor], layers: list[dict]) -> None:
    """A masked press's eviction lives on the attention modules (kvpress's ``masked_key_indices``, set by the
    context's prefill): store it beside each dense layer as ``[3, K]`` (sequence, head, position) indices."""
    modules = decoder_layers(model)
    for index, description in enumerate(layers):
        indices = getattr(modules[index].self_attn, "masked_key_indices", None) if index < len(modules) else None
        if description["kind"] != "ragged" and indices is not None:
            tensors[f"layers.{index}.masked"] = torch.stack([t.to("cpu", torch.int64) for t in indices])
            description["masked"] = True


def _restore_masks(
    path: str | Path, model: PreTrainedModel, tensors: dict[str, torch.Tensor], layers: list[dict], cache
) -> None:
    """Put a masked context's indices back on the attention modules (kvpress's attention patch reads them until the
    next prefill); clear stale ones elsewhere."""
    modules = decoder_layers(model)
    masked = [index for index, description in enumerate(layers) if description.get("masked")]
    from fastkvzip_press.presses.compaction import restore_masked_keys  # imports kvpress, which patches attention

    for index, module in enumerate(modules):
        if index not in masked:
            if getattr(module.self_attn, "masked_key_indices", None) is not None:
                restore_masked_keys(module.self_attn, None)
            continue
        indices = tensors.get(f"layers.{index}.masked")
        shape = cache.layers[index].keys.shape[:3]
        valid = (
            indices is not None
            and indices.dtype == torch.int64
            and indices.dim() == 2
            and indices.shape[0] == 3
            and bool(((indices >= 0) & (indices < torch.tensor(shape)[:, None])).all())
        )
        if not valid:
            raise CacheFileError(f"{path} is damaged: layer {index}'s masked positions do not fit its keys")
        device = cache.layers[index].keys.device
        restore_masked_keys(module.self_attn, tuple(row.to(device) for row in indices))


def _check_consistent(path: str | Path, cache: DynamicCache, header: dict) -> None:
    """Every layer holds the header's context, and every ragged layer the same sequences' padding."""
    tokens = header.get("context_tokens")
    lengths = {layer.get_seq_length() for layer in cache.layers}
    if lengths != {tokens}:
        raise CacheFileError(f"{path} is damaged: its layers hold {sorted(lengths)} tokens, its header {tokens!r}")
    padding = {tuple(layer.pad_tokens) for layer in cache.layers if isinstance(layer, RaggedLayer)}
    if len(padding) > 1:
        raise CacheFileError(f"{path} is damaged: its layers disagree on each sequence's padding")


def _cast(cache: DynamicCache, dtype: torch.dtype) -> None:
    for layer in cache.layers:
        if isinstance(layer, RaggedLayer):
            layer.key_buffer, layer.value_buffer = layer.key_buffer.to(dtype), layer.value_buffer.to(dtype)
            layer.dtype = dtype
        else:
            layer.keys, layer.values = layer.keys.to(dtype), layer.values.to(dtype)
            layer.dtype = dtype


@torch.no_grad()
def answer_questions(
    model: PreTrainedModel, loaded: LoadedCache, question_ids: list[torch.Tensor], max_new_tokens: int = 64
) -> list[list[int]]:
    """Greedy answers (token ids) to each question ``[1, q]`` from the loaded context, kvpress's pipeline semantics:
    each question and its answer are dropped before the next, so the context never grows."""
    cache = loaded.cache
    context_length = cache.get_seq_length()
    sliding = {
        i: (layer.keys, layer.values, layer.cumulative_length)
        for i, layer in enumerate(cache.layers)
        if getattr(layer, "is_sliding", False)
    }
    eos = model.generation_config.eos_token_id
    stop = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    answers = []
    for question in question_ids:
        question = question.to(next(model.parameters()).device).view(1, -1)
        logits = model(input_ids=question, past_key_values=cache, use_cache=True).logits[:, -1]
        tokens: list[int] = []
        for _ in range(max_new_tokens):
            token = int(logits.argmax(-1))
            tokens.append(token)
            if token in stop or len(tokens) == max_new_tokens:
                break
            logits = model(input_ids=torch.tensor([[token]], device=question.device), past_key_values=cache).logits[
                :, -1
            ]
        answers.append(tokens)
        for index, layer in enumerate(cache.layers):  # back to the context alone
            if index in sliding:
                layer.keys, layer.values, layer.cumulative_length = sliding[index]
            else:
                layer.crop(context_length)
    return answers
