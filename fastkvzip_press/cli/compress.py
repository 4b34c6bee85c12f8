"""``fastkvzip-press compress``: compress a context once and save it to a file, for ``generate --cache``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from fastkvzip_press.cli.arguments import add_command, add_model_cache
from fastkvzip_press.cli.inputs import check_fits_model, check_output_file, read_context
from fastkvzip_press.cli.press_flags import add_press_arguments, check_press_flags, gate_bank_for, press_from_arguments

EXAMPLE = "fastkvzip-press compress --context-file examples/harbor_town.txt --ratio 0.5 --out harbor.kvz"


def add_parser(commands: argparse._SubParsersAction) -> None:
    command = add_command(
        commands,
        "compress",
        summary="compress a context once and save it to a file, for later questions (generate --cache)",
        example=EXAMPLE,
        other_model=True,
        check=check_press_flags,
    )
    command.add_argument(
        "--context-file", required=True, metavar="FILE", help="UTF-8 text file (or pipe) holding the context"
    )
    command.add_argument("--out", required=True, metavar="FILE", help="cache file to write (e.g. doc.kvz)")
    add_press_arguments(command)
    add_model_cache(command)
    command.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    context_file, out = Path(args.context_file), Path(args.out)
    context = read_context(context_file)
    check_output_file(out, "--out", "doc.kvz", {"--context-file": context_file})

    import torch
    from transformers import DynamicCache

    from fastkvzip_press.cache.accounting import format_bytes, full_cache_bytes
    from fastkvzip_press.models import load_default_model
    from fastkvzip_press.presses.pipeline import kvpress_pipeline
    from fastkvzip_press.saved_cache import save_cache

    model, tokenizer = load_default_model(cache_dir=args.model_cache)
    press = press_from_arguments(args, gate_bank_for(args, model))
    context_ids = kvpress_pipeline(model, tokenizer).preprocess(context, [], "", 10**9)["context_ids"]
    check_fits_model(model, context_ids.shape[1], 0, "--context-file")
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
