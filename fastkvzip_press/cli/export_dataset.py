"""``fastkvzip-press export-dataset``: a generated dataset as parquet, for kvpress's own evaluate.py."""

from __future__ import annotations

import argparse

from fastkvzip_press.cli.arguments import add_command, add_dataset_flags, add_model_cache, integer
from fastkvzip_press.evaluation.ruler import RULER_TASKS

EXAMPLE = "fastkvzip-press export-dataset --dataset ruler-local --data-dir 4096 --samples 10 --out data/ruler-local"


def add_parser(commands: argparse._SubParsersAction) -> None:
    command = add_command(
        commands,
        "export-dataset",
        summary="write a generated dataset as parquet for kvpress's evaluate.py",
        example=EXAMPLE,
    )
    add_dataset_flags(command, "")
    command.add_argument("--model", default="default", help="whose tokenizer fits the lengths: 'default' or a folder")
    command.add_argument(
        "--samples", type=integer(1), default=10, help="samples per task (ruler-local) or contexts (niah-local), >= 1"
    )
    command.add_argument(
        "--tasks", nargs="+", default=list(RULER_TASKS), choices=RULER_TASKS, help="ruler-local tasks (default: all)"
    )
    command.add_argument("--haystack", default=None, help="niah-local: a local text file to hide needles in")
    command.add_argument("--seed", type=integer(0), default=0, help="seed of the generated samples, >= 0")
    command.add_argument(
        "--out", required=True, metavar="FOLDER", help="dataset folder: <out>/<data_dir>/test-00000-of-00001.parquet"
    )
    add_model_cache(command)
    command.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from fastkvzip_press.evaluation.comparison import make_dataset, write_parquet_dataset
    from fastkvzip_press.models import load_model

    _, tokenizer = load_model(args.model, args.model_cache)
    for context_length in args.data_dir:
        rows = make_dataset(
            args.dataset, tokenizer, context_length, args.samples, args.seed, tuple(args.tasks), args.haystack
        )
        path = write_parquet_dataset(rows, args.out, str(context_length))
        print(f"{path}: {len(rows)} rows")
    return 0
