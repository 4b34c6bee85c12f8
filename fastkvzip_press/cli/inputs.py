"""Checks of what a command reads and writes, made before a model loads: the context file, an output file, and a
context's length against the model's positions. Each raises ``ValueError`` naming the flag and what to do."""

from __future__ import annotations

import os
from pathlib import Path


def read_context(path: Path) -> str:
    """The context file's text. Any readable file works, also a pipe such as ``/dev/stdin``; a folder, a missing
    file, bytes that are not UTF-8 and blank text are refused."""
    if path.is_dir():
        raise ValueError(f"context file {path} is a folder, not a text file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"context file {path} does not exist") from None
    except OSError as error:
        raise ValueError(f"context file {path} cannot be read: {error.strerror or error}") from None
    try:
        context = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"context file {path} is not UTF-8 text ({error})") from None
    if not context.strip():
        raise ValueError(f"context file {path} is empty")
    return context


def check_output_file(out: Path, flag: str, example: str, inputs: dict[str, Path]) -> None:
    """Refuse an output path that cannot be written or must not be replaced: a folder, a device or other
    non-regular file, one of the command's ``inputs`` (flag -> path), a folder where no file can be created."""
    from fastkvzip_press.atomic import target_problem  # the gates package imports torch

    problem = target_problem(out)
    if problem == "is a folder":
        raise ValueError(f"{flag} {out} is a folder; give a file path (e.g. {example})")
    if problem is not None:
        raise ValueError(f"{flag} {out} {problem}; give a new file path in a writable folder (e.g. {example})")
    for input_flag, path in inputs.items():
        if out.exists() and path.exists() and os.path.samefile(out, path):
            raise ValueError(f"{flag} {out} is the {input_flag} itself, which writing would replace; give another path")


def max_positions(model) -> int | None:
    """How many positions the model reads (its config's ``max_position_embeddings``), if it says."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def check_fits_model(model, context_tokens: int, more_tokens: int, flag: str) -> None:
    """Refuse a context of ``context_tokens`` that, with ``more_tokens`` of questions and answers, passes the
    model's positions: past them a model's answers are wrong without an error."""
    limit = max_positions(model)
    if limit is not None and context_tokens + more_tokens > limit:
        raise ValueError(
            f"the context ({flag}) holds {context_tokens} tokens; with the question and up to {more_tokens} more "
            f"tokens that passes the {limit} positions the model reads (max_position_embeddings): shorten the context"
        )
