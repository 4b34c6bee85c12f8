"""Compress once, answer later: a compressed context saved to a file and loaded in another process, no prefill.

The file format is the core's (:mod:`fastkvzip_press.cache.cache_file`: safetensors + JSON header, every count and
tensor checked before a cache is built); a masked context's positions are saved and put back by
:mod:`fastkvzip_press.presses.compaction`. This module checks the arguments and ties the two together:
:func:`save_cache`, :func:`read_header`, :func:`load_cache`, :func:`answer_questions`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import Cache, DynamicCache, PreTrainedModel

from fastkvzip_press.atomic import target_problem
from fastkvzip_press.cache import RaggedLayer, enable_ragged_attention
from fastkvzip_press.cache.cache_file import (
    FORMAT_VERSION,
    HEADER_KEY,
    CacheFileError,
    config_digest,
    load_cache_file,
    make_header,
    model_mismatch,
    read_header,
    token_ids_digest,
    write_cache_file,
)
from fastkvzip_press.cache.compaction import Rollback
from fastkvzip_press.cache.stored import cache_batch_size, cache_tensors, cast_layers, check_layers
from fastkvzip_press.checks import KnobTypeError, require_bool, require_int
from fastkvzip_press.presses.compaction import masked_keys, restore_masked_keys

__all__ = [
    "FORMAT_VERSION",
    "HEADER_KEY",
    "CacheFileError",
    "LoadedCache",
    "answer_questions",
    "config_digest",
    "load_cache",
    "read_header",
    "save_cache",
    "token_ids_digest",
]

logger = logging.getLogger(__name__)


@dataclass
class LoadedCache:
    """A context's cache ready to continue (``cache``), its header, and whether it may run on a model of another id
    (``allow_other_model``, as given to :func:`load_cache`)."""

    cache: DynamicCache
    header: dict
    allow_other_model: bool = False

    @property
    def context_tokens(self) -> int:
        return self.header["context_tokens"]

    @classmethod
    def of(cls, cache: DynamicCache, model: PreTrainedModel, context_ids: torch.Tensor | None = None) -> LoadedCache:
        """A context prefilled in this process, answered like a loaded one (no file)."""
        dtype = next(model.parameters()).dtype
        return cls(cache, make_header(cache, model.config, [], dtype=dtype, context_ids=context_ids))

    def check_model(self, model: PreTrainedModel) -> None:
        """Refuse a model other than the one the context was loaded for (by id and architecture)."""
        _require_model(model)
        problem = model_mismatch(self.header, model.config, self.allow_other_model)
        if problem is not None:
            raise ValueError(f"the loaded cache {problem}")

    def check_continuation(self, input_ids: torch.Tensor) -> None:
        """Refuse ``input_ids [B, n]`` that do not continue this context: they must be the context's ids (checked
        against the saved digest where the file has one) followed by at least one new token per sequence."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            raise KnobTypeError("input_ids must be a [B, n] tensor of token ids (the context's, then the new ones)")
        held, batch = self.cache.get_seq_length(), cache_batch_size(self.cache)
        if input_ids.shape[0] != batch:
            raise ValueError(f"input_ids hold {input_ids.shape[0]} sequences, the loaded context {batch}")
        if input_ids.shape[1] <= held:
            raise ValueError(
                f"input_ids hold {input_ids.shape[1]} tokens, the loaded cache {held}: pass the context's ids followed "
                "by the new ones, e.g. torch.cat([context_ids, question_ids], dim=1)"
            )
        digest = self.header.get("token_ids_digest")
        if digest is not None and token_ids_digest(input_ids[:, : self.context_tokens]) != digest:
            raise ValueError(
                f"the first {self.context_tokens} input_ids are not the saved context's tokens (their digest differs): "
                "pass the ids the context was compressed from, then the new ones"
            )

    def generate(self, model: PreTrainedModel, input_ids: torch.Tensor, **generate_kwargs) -> torch.Tensor:
        """``model.generate`` continuing this context, after :meth:`check_model` and :meth:`check_continuation`
        (the cache then holds the new tokens too, as with ``model.generate``)."""
        self.check_model(model)
        self.check_continuation(input_ids)
        return model.generate(input_ids, past_key_values=self.cache, **generate_kwargs)


def _require_model(model) -> None:
    if not isinstance(model, PreTrainedModel):
        raise KnobTypeError(f"model must be the loaded transformers model of the context, got {type(model).__name__}")


def _check_save_arguments(cache, path, model) -> None:
    if not isinstance(cache, Cache):
        raise KnobTypeError(
            f"cache must be a transformers Cache (the DynamicCache of a context's prefill), got {type(cache).__name__}"
        )
    if not isinstance(path, str | os.PathLike) or not str(path):
        raise KnobTypeError(f"path must be a file path (str or Path), got {path!r}")
    _require_model(model)


def _check_context_ids(context_ids, cache: Cache) -> None:
    if context_ids is None:
        return
    ids = torch.as_tensor(context_ids) if isinstance(context_ids, list) else context_ids
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.dim() not in (1, 2):
        raise KnobTypeError("context_ids must be the context's token ids, [B, T] or [T] integers")
    if ids.shape[-1] != cache.get_seq_length():
        raise ValueError(f"context_ids hold {ids.shape[-1]} tokens, the cache {cache.get_seq_length()}")


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
    compressed it (its settings and the digest of its gates go into the header). The cache must fit ``model``
    (layers, KV heads, head size, positions, finite values) and the model must have a name, or nothing is written.
    """
    _check_save_arguments(cache, path, model)
    path = Path(path)
    problem = target_problem(path)
    if problem is not None:
        raise CacheFileError(f"{path} {problem}; give a file path for the cache (e.g. doc.kvz)")
    if not cache.layers or cache.get_seq_length() == 0:
        raise ValueError("cache holds no context yet: save it right after the context's prefill")
    _check_context_ids(context_ids, cache)
    if not (getattr(model.config, "name_or_path", "") or "").strip():
        raise ValueError("the model has no name (model.config.name_or_path), which a cache file records: set it")
    tensors, layers = cache_tensors(cache)
    for index, indices in masked_keys(model).items():
        if index < len(layers) and layers[index]["kind"] != "ragged":
            tensors[f"layers.{index}.masked"] = indices
            layers[index]["masked"] = True
    try:
        check_layers(tensors, layers, model.config)
    except ValueError as error:
        raise ValueError(f"this cache does not fit the model {model.config.name_or_path!r}: {error}") from None
    bank = getattr(press, "gate_bank", None)
    header = make_header(
        cache,
        model.config,
        layers,
        dtype=tensors["layers.0.keys"].dtype,
        context_ids=context_ids,
        press=None if press is None else str(press),
        gates_digest=None if bank is None else bank.digest(),
    )
    return write_cache_file(path, tensors, header)


def _load_dtype(dtype, model: PreTrainedModel) -> torch.dtype | None:
    """``dtype`` (a torch dtype or its name) when it is the model's: the only conversion that can run."""
    if dtype is None:
        return None
    model_dtype = next(model.parameters()).dtype
    named = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
    if not isinstance(named, torch.dtype):
        name = str(model_dtype).removeprefix("torch.")
        raise KnobTypeError(
            f"dtype must be a torch dtype (e.g. {model_dtype}) or its name (e.g. {name!r}), got {dtype!r}"
        )
    if named != model_dtype:
        raise ValueError(
            f"dtype={named} cannot run: keys and values must be in the model's dtype ({model_dtype}); pass "
            f"dtype={model_dtype} (or None when the file holds {model_dtype} already)"
        )
    return named


def load_cache(
    path: str | Path,
    model: PreTrainedModel,
    *,
    dtype: torch.dtype | str | None = None,
    allow_other_model: bool = False,
) -> LoadedCache:
    """Read a cache written by :func:`save_cache` for ``model``, on the model's device.

    Refused with :class:`CacheFileError` before anything is built: another model (by id; ``allow_other_model`` for
    the same weights under another name) or architecture, a dtype other than the model's unless ``dtype`` (the
    model's dtype, or its name) asks for a conversion, a newer format, a damaged file (any count or tensor that does
    not fit the others or the model, NaN or infinite values). Bad arguments raise ``ValueError``.
    """
    _require_model(model)
    require_bool("allow_other_model", allow_other_model)
    dtype = _load_dtype(dtype, model)
    header = read_header(path)
    problem = model_mismatch(header, model.config, allow_other_model)
    if problem is not None:
        raise CacheFileError(f"{path} {problem}")
    model_dtype = next(model.parameters()).dtype
    if dtype is None and header["dtype"] != str(model_dtype).removeprefix("torch."):
        raise CacheFileError(
            f"{path} holds {header['dtype']} keys and values, the model runs in "
            f"{str(model_dtype).removeprefix('torch.')}: pass dtype={model_dtype} to convert them"
        )
    device = next(model.parameters()).device
    cache, tensors = load_cache_file(path, header, model.config, device)
    masks = {i: tensors[f"layers.{i}.masked"] for i, layer in enumerate(header["layers"]) if layer.get("masked")}
    restore_masked_keys(model, masks, device)
    if dtype is not None:
        cast_layers(cache, dtype)
    if any(isinstance(layer, RaggedLayer) for layer in cache.layers):
        enable_ragged_attention(model)
    return LoadedCache(cache, header, allow_other_model)


def _question_tensors(question_ids, vocab_size: int, device: torch.device) -> list[torch.Tensor]:
    """Each question as ``[1, q]`` int64 on ``device``; a question is a ``[q]`` or ``[1, q]`` tensor of token ids or
    a list of ints. Anything else is refused naming the question."""
    if (
        isinstance(question_ids, torch.Tensor)
        or not isinstance(question_ids, Sequence)
        or isinstance(question_ids, str)
    ):
        raise KnobTypeError(
            "question_ids must be a list of questions (each a [1, q] or [q] tensor of token ids, or a list of ints), "
            f"got {type(question_ids).__name__}; pass [ids] for one question"
        )
    if question_ids and all(isinstance(q, int) and not isinstance(q, bool) for q in question_ids):
        raise KnobTypeError("question_ids is a list of questions, got a list of ints: pass [ids] for one question")
    questions = []
    for i, question in enumerate(question_ids):
        if isinstance(question, list | tuple):
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in question):
                raise KnobTypeError(f"question {i} must hold integer token ids, got {question!r}")
            question = torch.tensor(question, dtype=torch.int64)
        if not isinstance(question, torch.Tensor):
            raise KnobTypeError(f"question {i} must be a tensor of token ids or a list of ints, got {question!r}")
        if question.is_floating_point() or question.is_complex() or question.dtype == torch.bool:
            raise KnobTypeError(f"question {i} holds {question.dtype} values; token ids are integers")
        if question.dim() not in (1, 2) or (question.dim() == 2 and question.shape[0] != 1):
            raise ValueError(
                f"question {i} has shape {tuple(question.shape)}: each question is [1, q] or [q] (one sequence); "
                "pass several questions as a list"
            )
        if question.numel() == 0:
            raise ValueError(f"question {i} is empty: give at least one token")
        if int(question.min()) < 0 or int(question.max()) >= vocab_size:
            bad = int(question.min()) if int(question.min()) < 0 else int(question.max())
            raise ValueError(f"question {i} holds token id {bad}, outside the model's vocabulary [0, {vocab_size})")
        questions.append(question.to(device, torch.int64).view(1, -1))
    return questions


def _greedy_answer(model: PreTrainedModel, cache: DynamicCache, question: torch.Tensor, limit: int, stop) -> list[int]:
    logits = model(input_ids=question, past_key_values=cache, use_cache=True).logits[:, -1]
    tokens: list[int] = []
    for _ in range(limit):
        token = int(logits.argmax(-1))
        tokens.append(token)
        if token in stop or len(tokens) == limit:
            break
        step = torch.tensor([[token]], device=question.device)
        logits = model(input_ids=step, past_key_values=cache).logits[:, -1]
    return tokens


@torch.no_grad()
def answer_questions(
    model: PreTrainedModel,
    loaded: LoadedCache,
    question_ids: Sequence[torch.Tensor | list[int]],
    max_new_tokens: int = 64,
    *,
    progress: bool = False,
) -> list[list[int]]:
    """Greedy answers (token ids) to each question (``[1, q]`` or ``[q]`` token ids, or a list of ints) from the
    loaded context, with kvpress's pipeline semantics: each question and its answer are dropped before the next, so
    the context never grows. Whatever happens (an exception, Ctrl-C), the cache is left holding the context alone.

    ``progress`` shows a bar over the questions. The model must be the context's, the context one sequence.
    """
    if not isinstance(loaded, LoadedCache):
        raise KnobTypeError(f"loaded must be a LoadedCache (from load_cache), got {type(loaded).__name__}")
    loaded.check_model(model)
    max_new_tokens = require_int("max_new_tokens", max_new_tokens, minimum=1)
    if cache_batch_size(loaded.cache) != 1:
        raise ValueError(
            f"answer_questions answers from a context of one sequence, this one holds "
            f"{cache_batch_size(loaded.cache)}: use LoadedCache.generate for a batch"
        )
    device = next(model.parameters()).device
    questions = _question_tensors(question_ids, model.get_input_embeddings().num_embeddings, device)
    eos = model.generation_config.eos_token_id
    stop = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    rollback = Rollback(loaded.cache)
    answers = []
    try:
        for question in tqdm(questions, desc="questions", unit="question", disable=not progress, leave=False):
            answers.append(_greedy_answer(model, loaded.cache, question, max_new_tokens, stop))
            rollback()
    finally:
        rollback()
    return answers
