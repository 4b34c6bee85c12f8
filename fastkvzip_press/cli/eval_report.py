"""``fastkvzip-press eval-report``: a Markdown table and a PNG plot from a results folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from fastkvzip_press.cli.arguments import add_command

EXAMPLE = "fastkvzip-press eval-report results --out report"


def add_parser(commands: argparse._SubParsersAction) -> None:
    command = add_command(
        commands, "eval-report", summary="Markdown table and PNG plot from a results folder", example=EXAMPLE
    )
    command.add_argument("results", help="folder of results sub-folders (ours or kvpress's evaluate.py's)")
    command.add_argument("--out", required=True, metavar="FOLDER", help="where to write <dataset>.md and .png")
    command.add_argument(
        "--readme", default=None, metavar="FILE", help="also fill the <!-- <dataset>:start/end --> block of this file"
    )
    command.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from fastkvzip_press.evaluation.report import write_report

    readme = Path(args.readme) if args.readme else None
    print(write_report(Path(args.results), Path(args.out), args.command_line, readme).read_text())
    return 0
