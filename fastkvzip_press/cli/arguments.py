"""What every subcommand's parser shares: value types checked at parsing, the parser class, the common flags.

Nothing here imports torch, transformers or kvpress (``--device`` imports torch only when it is given), so
``fastkvzip-press <command> --help`` answers at once.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from fastkvzip_press.checks import require_int, require_real, require_window

# accelerate's placement strategies for ``device_map``.
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")

# A check of a parsed subcommand's flags together: the problem to report (naming the flags), or None.
Check = Callable[[argparse.Namespace], "str | None"]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the line breaks of descriptions and of the example in each subcommand's epilog."""


class CommandParser(argparse.ArgumentParser):
    """A parser that reports its own mistakes with its own usage line.

    A subcommand's parser refuses flags it does not know (argparse would hand them back to the top-level parser,
    which prints the top-level usage) and runs ``check`` on its flags together once they are parsed.
    """

    def __init__(self, *args, check: Check | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.check = check

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)} (see {self.prog} --help)")
        if self.check is not None:
            problem = self.check(namespace)
            if problem:
                self.error(problem)
        return namespace, extras


def add_command(
    commands: argparse._SubParsersAction,
    name: str,
    *,
    summary: str,
    example: str,
    description: str | None = None,
    other_model: bool = False,
    check: Check | None = None,
) -> CommandParser:
    """A subcommand's parser: ``summary`` in the command list, ``example`` (one command line) in its ``--help``,
    ``-q`` / ``-v`` also after the subcommand, ``--allow-other-model`` where gates are read."""
    parents = [verbosity_flags(suppressed=True)]
    if other_model:
        parents.append(other_model_flag())
    return commands.add_parser(
        name,
        help=summary,
        description=description or summary[0].upper() + summary[1:] + ".",
        epilog=f"example:\n  {example}",
        formatter_class=HelpFormatter,
        parents=parents,
        check=check,
    )


def verbosity_flags(suppressed: bool = False) -> argparse.ArgumentParser:
    """``-q`` / ``-v``. After a subcommand (``suppressed``) they default to nothing, so a subcommand does not reset
    what was given before it."""
    flags = argparse.ArgumentParser(add_help=False)
    default = argparse.SUPPRESS if suppressed else False
    help_quiet = argparse.SUPPRESS if suppressed else "only print results, no progress or logs"
    help_verbose = argparse.SUPPRESS if suppressed else "also show other libraries' progress bars and logs"
    flags.add_argument("-q", "--quiet", action="store_true", default=default, help=help_quiet)
    flags.add_argument("-v", "--verbose", action="store_true", default=default, help=help_verbose)
    return flags


def check_verbosity(args: argparse.Namespace) -> str | None:
    if getattr(args, "quiet", False) and getattr(args, "verbose", False):
        return "-q/--quiet and -v/--verbose contradict each other: give one of them"
    return None


def other_model_flag() -> argparse.ArgumentParser:
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument(
        "--allow-other-model",
        action="store_true",
        help="use gates (or resume on features, or load a saved context) recorded for another model of the same "
        "shapes, e.g. a fine-tune",
    )
    return flags


def add_model_cache(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--model-cache",
        default=None,
        metavar="FOLDER",
        help="folder of the converted default model (default: $FASTKVZIP_PRESS_CACHE/smollm2-135m-instruct, else "
        "~/.cache/fastkvzip-press/smollm2-135m-instruct)",
    )


def add_dataset_flags(command: argparse.ArgumentParser, data_dir_meaning: str) -> None:
    """``--dataset`` and ``--data-dir``: which generated dataset, at which context lengths (``eval``,
    ``export-dataset``)."""
    from fastkvzip_press.evaluation.datasets import DATASETS

    command.add_argument(
        "--dataset", choices=DATASETS, default="ruler-local", help="which generated dataset (default: ruler-local)"
    )
    command.add_argument(
        "--data-dir",
        type=integer(64),
        nargs="+",
        default=[4096],
        metavar="TOKENS",
        help=f"context length(s) in tokens, >= 64 ({data_dir_meaning}default: 4096)",
    )


def integer(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``[minimum, maximum]`` (checked by
    :func:`~fastkvzip_press.checks.require_int`)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        try:
            return require_int("the value", value, minimum, maximum)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def fraction(low: float, high: float | None, low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number between ``low`` and ``high`` (checked by
    :func:`~fastkvzip_press.checks.require_real`)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        try:
            return require_real("the value", value, low, high, low_open=low_open, high_open=high_open)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def window(text: str) -> int | float:
    """--window-size: a fraction of the context in (0, 1), or a whole number of tokens >= 0 (checked by
    :func:`~fastkvzip_press.checks.require_window`)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1) or a token count, got {text!r}") from None
    try:
        return require_window("the value", int(value) if math.isfinite(value) and value == int(value) else value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a fraction in (0, 1) or a whole number of tokens >= 0, got {text}") from None


def text(value: str) -> str:
    """A text flag (a question): non-empty, and UTF-8 (argv bytes that are not arrive as lone surrogates, which a
    tokenizer refuses with a traceback)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        shown = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        raise argparse.ArgumentTypeError(
            f"{shown!r} is not valid UTF-8 text; give it in UTF-8 (check the terminal's or the script's encoding)"
        ) from None
    if not value.strip():
        raise argparse.ArgumentTypeError("expected some text, got an empty string")
    return value


def device(text: str) -> str:
    """--device: a torch device this machine has (``cpu``, ``cuda``, ``cuda:N``)."""
    import torch

    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a device such as cpu, cuda or cuda:1, got {text!r}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available here; leave --device out to use the CPU")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    return text
