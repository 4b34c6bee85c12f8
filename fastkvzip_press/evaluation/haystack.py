"""Haystack text that is already on the machine: no download, deterministic.

The default source is the prose of the Python standard library's docstrings (modules, classes and functions of a
fixed list of modules). It is natural English on many topics, it ships with every Python, and it is disjoint from
the built-in training corpus (``pydoc_data.topics``, the language reference), so gates are not evaluated on their
training text. Its limits: technical register only, and docstrings change a little between Python versions, so
samples are reproducible per Python version, not across them.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

STDLIB_MODULES = (
    "argparse", "asyncio", "calendar", "collections", "concurrent.futures", "configparser", "contextlib", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum", "fractions", "ftplib", "functools",
    "gettext", "gzip", "heapq", "http.client", "http.cookiejar", "http.server", "imaplib", "inspect", "ipaddress",
    "itertools", "json", "locale", "logging", "logging.handlers", "mailbox", "multiprocessing", "optparse",
    "pathlib", "pickle", "pdb", "platform", "queue", "random", "sched", "selectors", "shelve", "shutil", "smtplib",
    "socket", "socketserver", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tkinter", "tokenize", "trace", "traceback", "turtle", "typing", "unittest",
    "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom", "zipfile",
)  # fmt: skip


def is_prose(paragraph: str, min_chars: int = 160) -> bool:
    """A paragraph of running text: long enough, no code prompts or tables, mostly letters."""
    if len(paragraph) < min_chars or ">>>" in paragraph or "::" in paragraph or "|" in paragraph:
        return False
    letters = sum(char.isalpha() or char.isspace() for char in paragraph)
    return letters / len(paragraph) > 0.85 and paragraph[0].isupper()


def split_paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs with their lines joined and whitespace collapsed."""
    return [re.sub(r"\s+", " ", block).strip() for block in re.split(r"\n\s*\n", text) if block.strip()]


def stdlib_paragraphs(modules: tuple[str, ...] = STDLIB_MODULES) -> list[str]:
    """Prose paragraphs of the docstrings of ``modules`` and their public members, in a fixed order, unique."""
    seen: set[str] = set()
    paragraphs = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:  # e.g. tkinter on a Python built without Tk
            continue
        objects = [module] + [
            member
            for member_name, member in sorted(vars(module).items())
            if not member_name.startswith("_") and (inspect.isclass(member) or inspect.isfunction(member))
        ]
        for obj in objects:
            for paragraph in split_paragraphs(inspect.getdoc(obj) or ""):
                if is_prose(paragraph) and paragraph not in seen:
                    seen.add(paragraph)
                    paragraphs.append(paragraph)
    return paragraphs


def text_paragraphs(path: str | Path) -> list[str]:
    """Prose paragraphs of a local text file (any long English text works as a haystack)."""
    paragraphs = [p for p in split_paragraphs(Path(path).read_text()) if is_prose(p, min_chars=80)]
    if not paragraphs:
        raise ValueError(f"{path} holds no prose paragraphs of at least 80 characters to build a haystack from")
    return paragraphs
