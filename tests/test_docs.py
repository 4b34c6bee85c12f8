"""README.md and docs/*.md against the repository, so that the docs cannot drift silently.

- every relative link points to a file of the repository, and every ``#anchor`` to a heading of its page;
- every repository path the pages name (in backticks, or a ``.md`` / ``.py`` / ``.sh`` path in the text) exists, but
  for the few that name what a run writes or another project's files, listed below with the reason;
- every ``fastkvzip-press ...`` command they show parses with the command line's own parser, and every ``make``
  target they name is in the Makefile;
- every docs page the package's docstrings cite exists, with its anchor.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import re
import shlex
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from fastkvzip_press.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# The lab notebook records each round as it was, module and script names included; later renames make its old names
# history, not drift. Its links and commands are still checked.
HISTORY = {ROOT / "docs" / "notes.md"}
SUFFIXES = (".py", ".md", ".sh", ".txt", ".toml", ".cfg", ".csv", ".png", ".json", ".yaml", ".yml", ".safetensors")

# Paths the pages name that are not in the repository on purpose, by prefix.
WRITTEN_BY_RUNS = {
    ".venv/": "made by `make install` (and every target that needs it)",
    ".venv-vllm/": "made by `make vllm-install`",
    ".venv-gpu-image/": "made by `make gpu-image-rehearsal`",
    "dist/gpu-carry": "built by `make gpu-carry`",
    "outputs/": "written by `make gpu-image-rehearsal`",
    "results/": "written by `fastkvzip-press eval` (`make results`)",
    "results_lb/": "written by `fastkvzip-press kvpress-eval`",
    "runs/": "written by `fastkvzip-press train`",
    "features/": "feature shards inside a `train --out` folder",
    "benchmarks/results/gpu.": "written by `make test-gpu` / `benchmarks/gpu_run.sh`, which no GPU has run yet",
}
OTHER_PROJECTS = {
    "evaluation/evaluate.py": "kvpress's leaderboard runner, in kvpress's source archive",
    "./evaluate_config.yaml": "read by kvpress's leaderboard runner from its own folder",
    "this_file.py": "the reader's own file holding an example (serving with vLLM)",
}
# Shell variables in the pages' commands, replaced before parsing.
VARIABLES = {"ratio": "0.5"}

FENCE = re.compile(r"^ {0,3}(```|~~~)")
CODE_SPAN = re.compile(r"`([^`]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
PROSE_PATH = re.compile(r"(?<![\w/.\-`])((?:[\w.\-]+/)+[\w.\-]+\.(?:md|py|sh)|[A-Z][A-Z_\-]+\.md)\b")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
MAKE = re.compile(r"(?:^|[\s;&|(])make\s+([A-Za-z][\w.\-]*)")


@dataclass(frozen=True)
class Page:
    path: Path
    prose: list[tuple[int, str]]  # (line, text) outside fenced code blocks
    blocks: list[tuple[int, str]]  # (first line, text) of each fenced code block

    @property
    def name(self) -> str:
        return self.path.name

    def paragraphs(self) -> list[tuple[int, str]]:
        """Runs of non-blank lines outside code blocks, with their first line (a code span may cross a line break)."""
        groups: list[tuple[int, list[str]]] = []
        last = -1
        for number, line in self.prose:
            if not line.strip():
                last = -1
                continue
            if number == last + 1:
                groups[-1][1].append(line)
            else:
                groups.append((number, [line]))
            last = number
        return [(start, "\n".join(lines)) for start, lines in groups]

    def spans(self) -> list[tuple[int, str]]:
        """Inline code spans outside code blocks, with their line."""
        return [
            (start + text.count("\n", 0, match.start()), match.group(1))
            for start, text in self.paragraphs()
            for match in CODE_SPAN.finditer(text)
        ]


@cache
def read_page(path: Path) -> Page:
    prose, blocks, block, first = [], [], None, 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            if block is None:
                block, first = [], number + 1
            else:
                blocks.append((first, "\n".join(block)))
                block = None
        elif block is None:
            prose.append((number, line))
        else:
            block.append(line)
    return Page(path, prose, blocks)


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    found = set()
    for _, line in read_page(path).prose:
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            found.add(base if base not in seen else f"{base}-{seen[base]}")
            seen[base] = seen.get(base, 0) + 1
    return frozenset(found)


def inside_repository(path: Path) -> bool:
    return path.resolve().is_relative_to(ROOT)


def expand_braces(text: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", text)
    if match is None:
        return [text]
    head, tail = text[: match.start()], text[match.end() :]
    return [path for option in match.group(1).split(",") for path in expand_braces(head + option.strip() + tail)]


@cache
def tracked_names() -> frozenset[str]:
    skip = {".git", ".venv", ".venv-vllm", ".venv-gpu-image", "dist", "outputs", "results"}
    return frozenset(p.name for p in ROOT.rglob("*") if not skip.intersection(p.relative_to(ROOT).parts))


def repository_path_exists(text: str) -> bool:
    """Whether ``text`` names something in the repository: from its root, or from the package's folder (the
    architecture page names modules as ``gates/gate.py``); ``<name>`` matches any name, a trailing ``.attribute``
    names a module's member."""
    pattern = re.sub(r"<[^<>/]*>", "*", text)
    candidates = [pattern]
    if not pattern.endswith(("/", *SUFFIXES)) and re.search(r"/\w+\.\w+$", pattern):
        candidates.append(re.sub(r"\.\w+$", ".py", pattern))
    for base in (ROOT, ROOT / "fastkvzip_press"):
        for candidate in candidates:
            if any(inside_repository(Path(hit)) for hit in glob.glob(str(base / candidate))):
                return True
    return False


def looks_like_path(word: str) -> bool:
    if not re.fullmatch(r"[\w.\-*/{},<>]+", word) or not re.search(r"[A-Za-z]", word) or word.startswith("-"):
        return False
    if "/" not in word:  # a bare name: a module or script, not an extension (".py") or a file a run writes
        return re.fullmatch(r"[\w\-*]+\.(py|sh)|[A-Z][A-Z_\-]+\.md", word) is not None
    first = word.split("/")[0]
    known_first = first in {p.name for p in ROOT.iterdir()} | {p.name for p in (ROOT / "fastkvzip_press").iterdir()}
    return word.endswith(SUFFIXES) or word.endswith("/") or known_first or first in ("", ".", "..")


def named_paths(page: Page) -> list[tuple[int, str]]:
    """Repository paths named in the page's code spans and in its text."""
    found = []
    for line, span in page.spans():
        for word in span.split():
            word = word.strip("\"'()[],;:")
            if ":" in word or word.startswith(("~", "/", "$", "http")) or not looks_like_path(word):
                continue
            found.append((line, word))
    for start, text in page.paragraphs():
        text = CODE_SPAN.sub(lambda m: " " * len(m.group(0)), LINK.sub(lambda m: " " * len(m.group(0)), text))
        text = re.sub(r"\S*://\S*", lambda m: " " * len(m.group(0)), text)  # URLs (lengths kept for line numbers)
        found.extend((start + text.count("\n", 0, m.start()), m.group(1)) for m in PROSE_PATH.finditer(text))
    return found


def allowed(page: Page, path: str) -> bool:
    return path in OTHER_PROJECTS or any(path.startswith(prefix) for prefix in WRITTEN_BY_RUNS)


def commands(page: Page) -> list[tuple[int, str]]:
    """Shell lines of the code blocks (continuations joined), and inline spans that are whole commands."""
    lines = []
    for first, block in page.blocks:
        joined, start = "", first
        for offset, line in enumerate(block.splitlines()):
            if not joined:
                start = first + offset
            if line.rstrip().endswith("\\"):
                joined += line.rstrip()[:-1] + " "
                continue
            lines.append((start, joined + line))
            joined = ""
    for line, span in page.spans():
        text = " ".join(span.split())
        if not re.search(r"\.\.\.|[\[<|]", text):  # a synopsis ("--ratio R | --threshold T", "...") is no command
            lines.append((line, text))
    return lines


def cli_invocations(page: Page) -> list[tuple[int, list[str]]]:
    found = []
    for line, text in commands(page):
        if "fastkvzip-press" not in text:
            continue
        lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        try:
            words = list(lexer)
        except ValueError:  # an unfinished quote: a line of a multi-line command that is not ours
            continue
        for index, word in enumerate(words):
            if word == "fastkvzip-press" or word.endswith("/fastkvzip-press"):
                argv = []
                for arg in words[index + 1 :]:
                    if arg in (";", "&&", "||", "|", "&", ">", ">>", "<", ")", "do", "done"):
                        break
                    argv.append(re.sub(r"^\$\{?(\w+)\}?$", lambda m: VARIABLES.get(m.group(1), m.group(0)), arg))
                if argv:
                    found.append((line, argv))
    return found


@cache
def make_targets() -> frozenset[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set()
    for match in re.finditer(r"^([\w.\- ]+?)\s*:(?!=)", text, flags=re.MULTILINE):
        targets.update(match.group(1).split())
    for match in re.finditer(r"^\.PHONY:(.*)$", text, flags=re.MULTILINE):
        targets.update(match.group(1).split())
    return frozenset(targets)


@cache
def subcommands() -> frozenset[str]:
    actions = [action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction)]
    return frozenset(name for action in actions for name in action.choices)


PAGE_IDS = [str(path.relative_to(ROOT)) for path in PAGES]


@pytest.mark.parametrize("path", PAGES, ids=PAGE_IDS)
def test_links_point_to_files_and_headings(path):
    page = read_page(path)
    broken = []
    for line, text in page.prose:
        for match in LINK.finditer(CODE_SPAN.sub(" ", text)):
            target = match.group(1)
            if re.match(r"[a-z][a-z+.\-]*:", target):  # http:, https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file) if file else path
            if not linked.exists() or not inside_repository(linked):
                broken.append(f"{page.name}:{line}: {target} (no such file in the repository)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{page.name}:{line}: {target} (no heading #{anchor} in {linked.name})")
    assert not broken, "\n".join(broken)


CURRENT = [path for path in PAGES if path not in HISTORY]


@pytest.mark.parametrize("path", CURRENT, ids=[str(path.relative_to(ROOT)) for path in CURRENT])
def test_named_paths_exist(path):
    page = read_page(path)
    missing = [
        f"{page.name}:{line}: {name}"
        for line, word in named_paths(page)
        for name in expand_braces(word)
        if not allowed(page, name) and not (repository_path_exists(name) if "/" in name else name in tracked_names())
    ]
    assert not missing, "paths named but not in the repository:\n" + "\n".join(missing)


@pytest.mark.parametrize("path", PAGES, ids=PAGE_IDS)
def test_commands_parse(path, monkeypatch):
    """Parsed as on a machine with CUDA (``--device cuda`` is checked against the machine while parsing); a code span
    that only names a subcommand must name one."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    page = read_page(path)
    refused = []
    for line, argv in cli_invocations(page):
        if len(argv) == 1 and not argv[0].startswith("-"):
            if argv[0] not in subcommands():
                refused.append(f"{page.name}:{line}: fastkvzip-press {argv[0]}: no such subcommand")
            continue
        errors = io.StringIO()
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(errors):
                build_parser().parse_args(argv)
        except SystemExit as stop:
            if stop.code:
                refused.append(
                    f"{page.name}:{line}: fastkvzip-press {shlex.join(argv)}\n    {errors.getvalue().strip()}"
                )
    assert not refused, "commands the command line refuses:\n" + "\n".join(refused)


@pytest.mark.parametrize("path", PAGES, ids=PAGE_IDS)
def test_make_targets_exist(path):
    page = read_page(path)
    unknown = [
        f"{page.name}:{line}: make {target}"
        for line, text in commands(page)
        for target in MAKE.findall(text)
        if target not in make_targets()
    ]
    assert not unknown, "make targets not in the Makefile:\n" + "\n".join(unknown)


def test_docs_cited_by_the_package_exist():
    cited = re.compile(r"\bdocs/([\w\-]+\.md)(?:#([\w\-]+))?")
    broken = []
    for source in sorted((ROOT / "fastkvzip_press").rglob("*.py")):
        for match in cited.finditer(source.read_text(encoding="utf-8")):
            page, anchor = ROOT / "docs" / match.group(1), match.group(2)
            if not page.exists() or (anchor and anchor not in anchors(page)):
                broken.append(f"{source.relative_to(ROOT)}: {match.group(0)}")
    assert not broken, "docs cited by the package but missing:\n" + "\n".join(broken)


def test_the_checks_find_what_they_look_for():
    """The extraction itself: a page with one of each finds each (so a silent parser cannot pass every page)."""
    readme = read_page(ROOT / "README.md")
    assert any(argv[0] == "generate" for _, argv in cli_invocations(read_page(ROOT / "docs" / "saved-contexts.md")))
    assert any(word == "tests/presses/test_default_model.py" for _, word in named_paths(readme))
    assert {"demo", "test"} <= {t for _, text in commands(readme) for t in MAKE.findall(text)}
    assert "the-gate" in anchors(ROOT / "docs" / "method.md")
    assert (
        slug("Eviction during generation (`FastKVzipDecodingPress`)")
        == "eviction-during-generation-fastkvzipdecodingpress"
    )
    assert slug("kvpress's leaderboard harness with our presses") == "kvpresss-leaderboard-harness-with-our-presses"
    with pytest.raises(SystemExit):
        with contextlib.redirect_stderr(io.StringIO()):
            build_parser().parse_args(["generate", "--no-such-flag"])
