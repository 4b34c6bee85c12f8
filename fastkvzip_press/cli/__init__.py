"""`fastkvzip-press` command line: parse, call the package, print.

One module per subcommand (``add_parser`` and ``run``); the flags that build a press and read gates are in
:mod:`~fastkvzip_press.cli.press_flags`, value types and the parser class in :mod:`~fastkvzip_press.cli.arguments`.
Parsing imports neither torch, transformers nor kvpress: each command imports what it runs when it runs, so
``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import sys

from fastkvzip_press.cli import (
    compress,
    eval_report,
    evaluate,
    export_dataset,
    export_gates,
    generate,
    kvpress_eval,
    train,
)
from fastkvzip_press.cli.arguments import CommandParser, HelpFormatter, check_verbosity, verbosity_flags

__all__ = ["build_parser", "main", "quiet_other_libraries"]

COMMANDS = (generate, compress, train, export_gates, evaluate, eval_report, export_dataset, kvpress_eval)
EXAMPLES = """examples:
  fastkvzip-press generate --context-file examples/harbor_town.txt --question "Who is the librarian?"
  fastkvzip-press compress --context-file examples/harbor_town.txt --ratio 0.5 --out harbor.kvz
  fastkvzip-press <command> --help"""


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="fastkvzip-press",
        description="Fast KVzip gated KV-cache eviction: answer, compress, train gates, evaluate.",
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
        parents=[verbosity_flags()],
        check=check_verbosity,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=CommandParser)
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def quiet_other_libraries() -> None:
    """Other libraries' progress bars and info logs off (transformers' weight loading writes hundreds of updates to a
    file or pipe); this package's own progress bars and logs stay unless -q."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    disable_progress_bars()
    for name in ("datasets", "huggingface_hub", "accelerate", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Run one command; a mistake in the input is one ``error:`` line and exit status 2, never a traceback."""
    args = build_parser().parse_args(argv)
    args.command_line = " ".join(["fastkvzip-press", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    if args.quiet or not args.verbose:
        quiet_other_libraries()
    try:
        return args.run(args)
    except (ValueError, RuntimeError, OSError) as error:  # OSError: files, folders, the network
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
