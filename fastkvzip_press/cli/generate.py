"""``fastkvzip-press generate``: answer questions about a context on the default model with eviction, from a text
file (compressed now, compared with the full cache) or from a context saved by ``compress`` (no prefill)."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from fastkvzip_press.cli.arguments import add_command, add_model_cache, integer, text
from fastkvzip_press.cli.inputs import check_fits_model, read_context
from fastkvzip_press.cli.press_flags import (
    add_press_arguments,
    check_press_flags,
    gate_bank_for,
    gate_label,
    given_press_flags,
    press_from_arguments,
)

logger = logging.getLogger("fastkvzip_press")

EXAMPLE = (
    'fastkvzip-press generate --context-file examples/harbor_town.txt --ratio 0.5 --question "Who is the '
    'librarian?"\n  fastkvzip-press generate --cache harbor.kvz --question "Who is the librarian?"'
)


def add_parser(commands: argparse._SubParsersAction) -> None:
    command = add_command(
        commands,
        "generate",
        summary="answer questions about a context on the default model, with eviction",
        example=EXAMPLE,
        other_model=True,
        check=check_generate_flags,
    )
    command.add_argument("--context-file", metavar="FILE", help="UTF-8 text file (or pipe) holding the context")
    command.add_argument(
        "--cache", metavar="FILE", help="a context saved by `compress`, instead of --context-file (no prefill)"
    )
    command.add_argument(
        "--question", action="append", required=True, type=text, help="a question (repeat for several)"
    )
    add_press_arguments(command)
    command.add_argument(
        "--max-new-tokens", type=integer(1), default=32, metavar="N", help="answer length limit, >= 1 (default: 32)"
    )
    add_model_cache(command)
    command.add_argument(
        "--no-compare", action="store_true", help="skip the full-cache answer (with --context-file only)"
    )
    command.set_defaults(run=run)


def check_generate_flags(args: argparse.Namespace) -> str | None:
    """``--cache`` answers with the press the file was compressed with: press flags there would be ignored."""
    if args.cache is not None:
        ignored = given_press_flags(args) + (["--no-compare"] if args.no_compare else [])
        if ignored:
            return (
                f"{', '.join(ignored)} cannot apply to --cache: the saved context was compressed by `compress` with "
                "its own press and is answered without a full cache to compare; drop them (or give them to compress)"
            )
    return check_press_flags(args)


def run(args: argparse.Namespace) -> int:
    if (args.cache is None) == (args.context_file is None):
        raise ValueError("give --context-file (compress now) or --cache (a context saved by `compress`), one of them")
    if args.cache is not None:
        return run_from_cache(args)
    context = read_context(Path(args.context_file))

    import torch
    from transformers import DynamicCache

    from fastkvzip_press.layout import ModelLayout
    from fastkvzip_press.models import load_default_model
    from fastkvzip_press.presses.pipeline import kvpress_pipeline

    torch.manual_seed(0)
    step = time.perf_counter()
    logger.info("loading the default model (SmolLM2-135M-Instruct)")
    model, tokenizer = load_default_model(cache_dir=args.model_cache)
    logger.info("model ready in %.1fs", time.perf_counter() - step)
    pipe = kvpress_pipeline(model, tokenizer)
    inputs = pipe.preprocess(context, args.question, "", 10**9)
    longest = max(ids.shape[-1] for ids in inputs["questions_ids"])
    check_fits_model(model, inputs["context_ids"].shape[1], longest + args.max_new_tokens, "--context-file")

    gates = gate_bank_for(args, model)
    press = press_from_arguments(args, gates)
    answers_full = None
    if not args.no_compare:
        step = time.perf_counter()
        answers_full = pipe(context, questions=args.question, max_new_tokens=args.max_new_tokens)["answers"]
        logger.info("full-cache answers in %.1fs", time.perf_counter() - step)
    step = time.perf_counter()
    cache = DynamicCache()
    answers = pipe(context, questions=args.question, press=press, cache=cache, max_new_tokens=args.max_new_tokens)
    logger.info("compressed answers in %.1fs", time.perf_counter() - step)

    layout = ModelLayout.from_model(model)
    print(f"Gates: {gate_label(args, gates, layout.model_id)}")
    print(f"Context: {_context_tokens(press, cache)} tokens, {layout.num_layers} layers")
    for i, question in enumerate(args.question):
        print(f"\nQuestion: {question}")
        print(f"Answer (FastKVzipPress): {answers['answers'][i]}")
        if answers_full is not None:
            print(f"Answer (full cache):     {answers_full[i]}")
    print_cache_report(model, press, cache)
    return 0


def _context_tokens(press, cache) -> int:
    stats = press.last_stats
    return stats.context_length if stats else cache.get_seq_length()


def print_cache_report(model, press, cache) -> None:
    """The context's full cache, the pairs the press kept and what the cache stores now."""
    from fastkvzip_press.cache.accounting import format_bytes, full_cache_bytes, kv_cache_bytes

    stats = press.last_stats
    stored_bytes = kv_cache_bytes(cache)
    full_bytes = full_cache_bytes(model, _context_tokens(press, cache))
    print("\nKV cache of the context")
    print(f"  full cache:       {format_bytes(full_bytes)} (100.0%)")
    if stats is None:
        print("  no eviction (ratio 0)")
        return
    kept_fraction = stats.kept_fraction
    print(
        f"  retained pairs:   {format_bytes(full_bytes * kept_fraction)} ({100 * kept_fraction:.1f}%), "
        f"compression ratio {stats.compression_ratio:.3f} over gated layers"
    )
    share = stats.head_retention()
    print(f"  per-head retained fraction: min {share.min():.2f}, median {share.median():.2f}, max {share.max():.2f}")
    if press.compaction == "ragged":
        note = "ragged: evicted pairs are freed; includes spare rows for question and answer tokens"
    else:
        note = "masked: evicted keys are masked, their memory is still held"
    print(f"  stored now:       {format_bytes(stored_bytes)} ({100 * stored_bytes / full_bytes:.1f}%; {note})")


def run_from_cache(args: argparse.Namespace) -> int:
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
    longest = max(ids.shape[-1] for ids in question_ids)
    check_fits_model(model, loaded.context_tokens, longest + args.max_new_tokens, "--cache")
    answers = answer_questions(model, loaded, question_ids, max_new_tokens=args.max_new_tokens, progress=not args.quiet)
    print(f"Context: {loaded.context_tokens} tokens from {args.cache} (press: {loaded.header.get('press')})")
    for question, answer in zip(args.question, answers):
        print(f"\nQuestion: {question}")
        print(f"Answer: {tokenizer.decode(answer, skip_special_tokens=True).strip()}")
    return 0
