"""Forward-only extraction of gate inputs and KVzip targets into on-disk shards.

Each context window of ``context_len`` tokens becomes one shard ``shard_<k>.safetensors``:

- ``hidden`` ``[L_g, n, D]`` bfloat16: post-input-layernorm hidden states of the gated layers (the gate input);
- ``scores`` ``[L_g, H, n]`` float32: KVzip scores of the same tokens (the targets);
- header metadata: document name, window index, token count, layer ids, model id.

Shards are written atomically and named by their position in the deterministic window order, so an interrupted
extraction resumes by skipping the shards already on disk (after checking that the same window of the same model
wrote them). RAM holds one window at a time. The fit reads them back one gated layer at a time
(:class:`~fastkvzip_press.training.shards.ShardSet`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fastkvzip_press.atomic import atomic_write
from fastkvzip_press.layout import ModelLayout
from fastkvzip_press.training.corpus import Document
from fastkvzip_press.training.distributed import Ranks

logger = logging.getLogger(__name__)

SHARD_GLOB = "shard_*.safetensors"
MIN_WINDOW = 256  # tokens: shorter windows (a document's last piece) are dropped
_PLACEHOLDER = "\u2063CONTEXT\u2063"


@dataclass(frozen=True)
class Window:
    """One training context: ``ids [n]`` taken from document ``document`` (its ``index``-th window)."""

    document: str
    index: int
    ids: torch.Tensor


def chat_prefix_ids(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """Token ids the chat template puts before a user message (the never-scored sink), ``[p]``."""
    if not tokenizer.chat_template:
        return torch.zeros(0, dtype=torch.long)
    text = tokenizer.apply_chat_template([{"role": "user", "content": _PLACEHOLDER}], tokenize=False)
    prefix = text.split(_PLACEHOLDER)[0]
    return torch.tensor(tokenizer.encode(prefix, add_special_tokens=False), dtype=torch.long)


def iter_windows(
    tokenizer: PreTrainedTokenizerBase, documents: Iterable[Document], context_len: int, min_len: int = MIN_WINDOW
) -> Iterator[Window]:
    """Consecutive ``context_len``-token windows of every document; a last piece shorter than ``min_len`` is dropped."""
    for document in documents:
        ids = torch.tensor(tokenizer.encode(document.text, add_special_tokens=False), dtype=torch.long)
        for index, start in enumerate(range(0, len(ids), context_len)):
            piece = ids[start : start + context_len]
            if len(piece) >= min_len:
                yield Window(document.name, index, piece)


def shard_path(directory: Path, position: int) -> Path:
    return directory / f"shard_{position:06d}.safetensors"


def _save_shard(tensors: dict[str, torch.Tensor], header: dict[str, str], path: str) -> None:
    save_file(tensors, path, metadata=header)


UNREADABLE = (SafetensorError, KeyError, json.JSONDecodeError, OSError)


def unreadable_shard(path: Path, error: Exception) -> ValueError:
    return ValueError(f"feature shard {path} is unreadable ({error}); delete it and run again to redo it")


def read_shard_metadata(path: Path) -> dict:
    """The JSON metadata of a shard; raises ``ValueError`` naming the file when it is unreadable."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return json.loads(handle.metadata()["fastkvzip_press"])
    except UNREADABLE as error:
        raise unreadable_shard(path, error) from error


def plan_windows(
    tokenizer: PreTrainedTokenizerBase,
    documents: Iterable[Document],
    context_len: int = 2048,
    max_tokens: int | None = None,
) -> list[Window]:
    """The context windows an extraction takes, in order, until ``max_tokens`` context tokens (tokenizing only)."""
    windows, total = [], 0
    for window in iter_windows(tokenizer, documents, context_len):
        windows.append(window)
        total += len(window.ids)
        if max_tokens is not None and total >= max_tokens:
            break  # before asking for more: a streamed corpus is read no further than needed
    return windows


def extract_features(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    documents: Iterable[Document],
    directory: str | Path,
    context_len: int = 2048,
    max_tokens: int | None = None,
    chunk_size: int = 2048,
    progress: bool = True,
    allow_other_model: bool = False,
) -> list[Path]:
    """Write one shard per context window until ``max_tokens`` context tokens; skip shards already written.

    Returns the shard paths in window order.
    """
    windows = plan_windows(tokenizer, documents, context_len, max_tokens)
    return write_shards(model, tokenizer, windows, directory, chunk_size, progress, allow_other_model)


# How each extraction argument is named on the command line (a resumed run is compared with them).
EXTRACTION_FLAGS = {
    "corpus": "--corpus",
    "text_column": "--text-column",
    "context_len": "--context-len",
    "replay_chunk": "replay_chunk",
    "dtype": "the model's dtype",
}


def check_extraction(path: Path, meta: dict, extraction: dict | None) -> None:
    """Refuse a shard written with other extraction arguments, naming each that changed."""
    written = meta.get("extraction")
    if not written or not extraction:
        return
    changed = [key for key in extraction if key in written and written[key] != extraction[key]]
    if changed:
        then = ", ".join(f"{EXTRACTION_FLAGS.get(key, key)} {written[key]!r}" for key in changed)
        now = ", ".join(f"{EXTRACTION_FLAGS.get(key, key)} {extraction[key]!r}" for key in changed)
        raise ValueError(
            f"{path} was extracted with {then}; this run asks for {now}. Resume with the arguments of the first run, "
            "or use a fresh output folder"
        )


def _check_shard(
    path: Path, meta: dict, window: Window, layout: ModelLayout, allow_other_model: bool, extraction: dict | None
) -> None:
    """Refuse a shard on disk that another corpus, context length, model or dtype wrote."""
    check_extraction(path, meta, extraction)
    if meta["document"] != window.document or meta["window"] != window.index:
        raise ValueError(
            f"{path} holds {meta['document']}#{meta['window']}, expected {window.document}#{window.index}: "
            "the corpus or context length changed since it was written; use a fresh output folder"
        )
    if list(meta.get("layer_ids", [])) != list(layout.gated_layer_ids):
        raise ValueError(
            f"{path} holds features of layers {meta.get('layer_ids')}, but model {layout.model_id!r} gates layers "
            f"{list(layout.gated_layer_ids)}: it was extracted from another model; use a fresh output folder"
        )
    if meta.get("tokens", len(window.ids)) != len(window.ids):
        raise ValueError(
            f"{path} holds {meta['document']}#{meta['window']} as {meta['tokens']} tokens, this run plans "
            f"{len(window.ids)}: the context length (--context-len) or the corpus changed since it was written; resume "
            "with the arguments of the first run, or use a fresh output folder"
        )
    written_by = meta.get("model_id", "")
    if written_by and layout.model_id and written_by != layout.model_id and not allow_other_model:
        raise ValueError(
            f"{path} was extracted from model {written_by!r}, but this run uses {layout.model_id!r}: gates fitted on "
            "a mix would fit neither. Use a fresh output folder, or pass --allow-other-model (allow_other_model=True) "
            "if the two names are the same weights."
        )


def write_shards(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    windows: list[Window],
    directory: str | Path,
    chunk_size: int = 2048,
    progress: bool = True,
    allow_other_model: bool = False,
    ranks: Ranks | None = None,
    extraction: dict | None = None,
) -> list[Path]:
    """One shard per window (``shard_<position>``), skipping shards already on disk after checking that the same
    window of the same model wrote them with the same ``extraction`` arguments (recorded in each shard; keys of
    :data:`EXTRACTION_FLAGS`). Returns the shard paths in window order.

    With ``ranks`` of several processes, this one extracts only the windows it owns (``ranks.owns(position)``); the
    paths of the others are returned all the same (their shards exist once every rank is done).
    """
    from fastkvzip_press.training.targets import kvzip_targets

    ranks = ranks or Ranks()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layout = ModelLayout.from_model(model)
    prefix = chat_prefix_ids(tokenizer)
    paths: list[Path] = []
    total = 0
    owned = [position for position in range(len(windows)) if ranks.owns(position)]
    desc = f"features (rank {ranks.rank}/{ranks.world_size})" if ranks.distributed else "features"
    bar = tqdm(total=sum(len(windows[p].ids) for p in owned), unit="tok", desc=desc, disable=not progress)
    for position, window in enumerate(windows):
        path = shard_path(directory, position)
        if not ranks.owns(position):
            paths.append(path)
            continue
        if path.exists():
            meta = read_shard_metadata(path)
            _check_shard(path, meta, window, layout, allow_other_model, extraction)
        else:
            input_ids = torch.cat([prefix, window.ids])[None].to(model.device)
            targets = kvzip_targets(
                model,
                tokenizer,
                input_ids,
                prefix_length=len(prefix),
                chunk_size=chunk_size,
                hidden_layers=layout.gated_layer_ids,
                progress=False,
            )
            gated = list(layout.gated_layer_ids)
            # With a device map the gated layers may sit on different devices: gather each on the CPU.
            tensors = {
                "hidden": torch.stack([targets.hidden[i].cpu() for i in gated]).to(torch.bfloat16).contiguous(),
                "scores": targets.scores[gated].float().cpu().contiguous(),
            }
            meta = {
                "document": window.document,
                "window": window.index,
                "tokens": len(window.ids),
                "layer_ids": gated,
                "model_id": layout.model_id,
                "extraction": extraction or {},
            }
            header = {"fastkvzip_press": json.dumps(meta)}
            atomic_write(path, partial(_save_shard, tensors, header))
        paths.append(path)
        total += meta["tokens"]
        bar.update(meta["tokens"])
    bar.close()
    logger.info("%d feature shards (%d context tokens) written or checked in %s", len(owned), total, directory)
    return paths
