"""The cache file format: safetensors (never pickle) holding the tensors of :mod:`fastkvzip_press.cache.stored` and a
JSON header under the metadata key :data:`HEADER_KEY`.

The header: format and version, the model's id and a digest of its architecture, the dtype, the context's token count
and a digest of its token ids, the press and the digest of its gates, the bytes the cache stored, and one description
per layer. Reading checks the header, then every count and tensor against each other and the model's geometry
(:func:`~fastkvzip_press.cache.stored.check_layers`) before a cache is built. Writing goes through a temporary file
and a rename, and first removes what killed writes of the same file left.

Core: this module imports neither kvpress nor the presses (a masked context's positions are put back on the
attention modules by :mod:`fastkvzip_press.presses.compaction`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers import DynamicCache, PretrainedConfig

from fastkvzip_press.atomic import atomic_write, remove_stale_temporaries_of
from fastkvzip_press.cache.accounting import kv_cache_bytes
from fastkvzip_press.cache.stored import LAYER_KINDS, cache_from_tensors
from fastkvzip_press.layout import model_name

logger = logging.getLogger(__name__)

FORMAT = "fastkvzip-press cache"
FORMAT_VERSION = 1
HEADER_KEY = "fastkvzip_cache"
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
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


def config_digest(config: PretrainedConfig) -> str:
    """A short hash of the architecture fields a cache depends on."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    fields = {name: getattr(text, name, None) for name in CONFIG_FIELDS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def token_ids_digest(token_ids: torch.Tensor | list[int]) -> str:
    """A short hash of token ids (``[B, T]`` and ``[T]`` of one sequence hash alike)."""
    ids = torch.as_tensor(token_ids, dtype=torch.int64).cpu().contiguous()
    return hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]


def make_header(
    cache: DynamicCache,
    config: PretrainedConfig,
    layers: list[dict],
    *,
    dtype: torch.dtype,
    context_ids: torch.Tensor | None = None,
    press: str | None = None,
    gates_digest: str | None = None,
) -> dict:
    """The header of ``cache`` (a context of a model of ``config``) described by ``layers``."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_id": getattr(config, "name_or_path", "") or "",
        "config_digest": config_digest(config),
        "dtype": str(dtype).removeprefix("torch."),
        "context_tokens": cache.get_seq_length(),
        "token_ids_digest": None if context_ids is None else token_ids_digest(context_ids),
        "press": press,
        "gates_digest": gates_digest,
        "stored_bytes": kv_cache_bytes(cache),
        "layers": layers,
    }


def write_cache_file(path: Path, tensors: dict[str, torch.Tensor], header: dict) -> int:
    """Write the file atomically (temporaries that killed writes of ``path`` left are removed first); returns its
    size in bytes."""
    remove_stale_temporaries_of(path)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={HEADER_KEY: json.dumps(header)}))
    return path.stat().st_size


def _damaged(path: Path, what: str) -> CacheFileError:
    return CacheFileError(f"{path} has a damaged header ({what})")


def _check_header(path: Path, header) -> dict:
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise _damaged(path, f"format {header.get('format') if isinstance(header, dict) else header!r}")
    version = header.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CacheFileError(
            f"{path} was written in cache format {version!r}; this version of fastkvzip-press reads format "
            f"{FORMAT_VERSION} and older: upgrade fastkvzip-press"
        )
    layers = header.get("layers")
    if not isinstance(layers, list) or not all(isinstance(x, dict) and x.get("kind") in LAYER_KINDS for x in layers):
        raise _damaged(path, "layer descriptions")
    model_id = header.get("model_id")
    if not isinstance(model_id, str) or not model_id.strip():
        raise CacheFileError(
            f"{path} names no model (model_id {model_id!r}), so it cannot be checked against one: save the context "
            "again from a model whose config.name_or_path is set"
        )
    if not isinstance(header.get("config_digest"), str):
        raise _damaged(path, "config_digest")
    if header.get("dtype") not in FLOAT_DTYPES:
        raise _damaged(path, f"dtype {header.get('dtype')!r}, not one of {FLOAT_DTYPES}")
    tokens = header.get("context_tokens")
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
        raise _damaged(path, f"context_tokens {tokens!r}")
    if not isinstance(header.get("token_ids_digest"), str | None):
        raise _damaged(path, "token_ids_digest")
    return header


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
    return _check_header(path, header)


def model_mismatch(header: dict, config: PretrainedConfig, allow_other_model: bool = False) -> str | None:
    """Why a context with ``header`` cannot run on a model of ``config`` (another model by id, unless
    ``allow_other_model``, or another architecture), or ``None``."""
    theirs, ours = header["model_id"], getattr(config, "name_or_path", "") or ""
    if ours and model_name(theirs) != model_name(ours) and not allow_other_model:
        return (
            f"holds a context of model {theirs!r}, not {ours!r}; load it with that model "
            "(allow_other_model=True if the two names are the same weights)"
        )
    if header["config_digest"] != config_digest(config):
        return f"was written for another architecture than {ours or 'the model'!r}'s configuration"
    return None


def load_cache_file(
    path: str | Path, header: dict, config: PretrainedConfig, device: torch.device | str
) -> tuple[DynamicCache, dict[str, torch.Tensor]]:
    """The cache the file holds, on ``device``, and the file's tensors; every count and tensor is checked against
    the header and ``config`` before the cache is built (:class:`CacheFileError` otherwise)."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CacheFileError(f"{path} is not a readable cache file (truncated or not safetensors): {error}") from None
    keys = [tensors.get(f"layers.{i}.keys") for i in range(len(header["layers"]))]
    dtypes = {str(k.dtype).removeprefix("torch.") for k in keys if k is not None}
    if dtypes and dtypes != {header["dtype"]}:
        raise CacheFileError(f"{path} is damaged: its header says {header['dtype']}, its tensors {sorted(dtypes)}")
    try:
        cache = cache_from_tensors(tensors, header["layers"], config, device)  # checks every layer first
    except (KeyError, IndexError, RuntimeError, ValueError, TypeError) as error:
        raise CacheFileError(f"{path} is damaged: its tensors do not match its header ({error})") from None
    if cache.get_seq_length() != header["context_tokens"]:
        raise CacheFileError(
            f"{path} is damaged: its layers hold {cache.get_seq_length()} tokens, its header {header['context_tokens']}"
        )
    return cache, tensors
