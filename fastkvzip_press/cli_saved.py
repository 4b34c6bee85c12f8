"""The command line's saved contexts: ``compress`` writes a compressed context to a file, ``generate --cache`` answers
from one without a prefill (wired into :mod:`fastkvzip_press.cli`)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def read_context(path: Path) -> str | None:
    """The context file's text, or ``None`` after printing why it cannot be used."""
    if not path.is_file():
        what = "is a folder, not a text file" if path.is_dir() else "does not exist"
        print(f"error: context file {path} {what}", file=sys.stderr)
        return None
    try:
        context = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        print(f"error: context file {path} is not UTF-8 text ({error})", file=sys.stderr)
        return None
    if not context.strip():
        print(f"error: context file {path} is empty", file=sys.stderr)
        return None
    return context


def add_compress_parser(
    commands, parents: list[argparse.ArgumentParser], press_arguments, make_press, gate_bank
) -> None:
    """``compress``: the press's flags (``press_arguments`` adds them, ``make_press(args, gates)`` builds the press
    from them, ``gate_bank(args, model)`` loads ``--gates``), ``--context-file`` and ``--out``."""
    com = commands.add_parser(
        "compress",
        help="compress a context once and save it to a file, for later questions (generate --cache)",
        parents=parents,
    )
    com.add_argument("--context-file", required=True, help="text file holding the context")
    com.add_argument("--out", required=True, help="cache file to write (e.g. doc.kvz)")
    press_arguments(com)
    com.add_argument("--model-cache", default=None, help="folder of the converted default model")
    com.set_defaults(run=compress_command, make_press=make_press, gate_bank=gate_bank)


def compress_command(args: argparse.Namespace) -> int:
    import torch
    from transformers import DynamicCache

    from fastkvzip_press.cache.accounting import format_bytes, full_cache_bytes
    from fastkvzip_press.models import load_default_model
    from fastkvzip_press.presses.pipeline import kvpress_pipeline
    from fastkvzip_press.saved_cache import save_cache

    context = read_context(Path(args.context_file))
    if context is None:
        return 2
    out = Path(args.out)
    if out.is_dir():
        print(f"error: --out {out} is a folder; give a file path for the cache (e.g. doc.kvz)", file=sys.stderr)
        return 2
    model, tokenizer = load_default_model(cache_dir=args.model_cache)
    press = args.make_press(args, args.gate_bank(args, model))
    context_ids = kvpress_pipeline(model, tokenizer).preprocess(context, [], "", 10**9)["context_ids"]
    start = time.perf_counter()
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model.model(input_ids=context_ids, past_key_values=cache)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    size = save_cache(cache, out, model, context_ids=context_ids, press=press)
    saved = time.perf_counter() - start
    full = full_cache_bytes(model, context_ids.shape[1])
    print(f"Context: {context_ids.shape[1]} tokens; compressed in {prefill:.1f}s, saved in {saved:.2f}s")
    print(f"Full cache: {format_bytes(full)}; file {out}: {format_bytes(size)} ({100 * size / full:.1f}%)")
    return 0


def generate_from_cache(args: argparse.Namespace) -> int:
    """``generate --cache FILE``: answer every question from the saved context, no prefill."""
    from fastkvzip_press.models import load_default_model
    from fastkvzip_press.presses.pipeline import kvpress_pipeline
    from fastkvzip_press.saved_cache import answer_questions, load_cache, read_header

    read_header(args.cache)  # a missing or damaged file is refused before a model loads
    model, tokenizer = load_default_model(cache_dir=args.model_cache)
    start = time.perf_counter()
    loaded = load_cache(args.cache, model, allow_other_model=args.allow_other_model)
    logger.info("context of %d tokens loaded in %.2fs", loaded.context_tokens, time.perf_counter() - start)
    pipe = kvpress_pipeline(model, tokenizer)
    question_ids = pipe.preprocess("x", args.question, "", 10**9)["questions_ids"]
    answers = answer_questions(model, loaded, question_ids, max_new_tokens=args.max_new_tokens)
    print(f"Context: {loaded.context_tokens} tokens from {args.cache} (press: {loaded.header.get('press')})")
    for question, answer in zip(args.question, answers):
        print(f"\nQuestion: {question}")
        print(f"Answer: {tokenizer.decode(answer, skip_special_tokens=True).strip()}")
    return 0
