"""``fastkvzip-press kvpress-eval``: kvpress's own evaluation/evaluate.py with our presses registered."""

from __future__ import annotations

import argparse
from pathlib import Path

from fastkvzip_press.cli.arguments import add_command
from fastkvzip_press.evaluation.registry import PRESS_SPECS

EXAMPLE = (
    "fastkvzip-press kvpress-eval -- --model Qwen/Qwen3-8B --dataset ruler --data_dir 4096 "
    "--press_name fastkvzip_press --compression_ratio 0.5 --output_dir results_lb"
)


def add_parser(commands: argparse._SubParsersAction) -> None:
    ours = ", ".join(name for name, spec in PRESS_SPECS.items() if spec.ours)
    command = add_command(
        commands,
        "kvpress-eval",
        summary="run kvpress's own evaluation/evaluate.py with our presses registered (leaderboard folders)",
        description="Run kvpress's own evaluation/evaluate.py with our presses registered. Everything after the "
        f"options goes to kvpress's evaluate.py. Our entries: {ours} (the threshold entry takes --threshold, the "
        "decoding one --target_size).",
        example=EXAMPLE,
    )
    command.add_argument(
        "--kvpress-evaluation",
        default=None,
        metavar="FOLDER",
        help="kvpress's evaluation/ folder (default: fetch it from kvpress's source archive on PyPI)",
    )
    command.add_argument(
        "--gates",
        default="default",
        help="'default' (the trained gates shipped for the model, else the released ones) or a gate file or folder",
    )
    command.add_argument(
        "--local-dataset",
        action="append",
        default=[],
        metavar="NAME=FOLDER",
        help="a dataset written by export-dataset, under the name evaluate.py's --dataset gives (repeatable)",
    )
    command.add_argument("arguments", nargs=argparse.REMAINDER, help="kvpress evaluate.py flags, after --")
    command.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from fastkvzip_press.evaluation.kvpress_harness import fetch_kvpress_harness, run_kvpress_harness

    evaluation = Path(args.kvpress_evaluation) if args.kvpress_evaluation else fetch_kvpress_harness()
    local = {}
    for item in args.local_dataset:
        name, sep, folder = item.partition("=")
        if not sep or not Path(folder).is_dir():
            raise ValueError(f"--local-dataset takes NAME=FOLDER with an existing folder, got {item!r}")
        local[name] = Path(folder)
    arguments = args.arguments[1:] if args.arguments[:1] == ["--"] else args.arguments
    gates = None if args.gates == "default" else args.gates
    run_kvpress_harness(evaluation, arguments, gates=gates, local_datasets=local)
    return 0
