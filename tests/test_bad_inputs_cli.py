"""Bad inputs to the command line that need a run (files, folders, pipes, environment): one `error:` line naming the
flag, exit status 2, and the mistake caught before a model loads; and `--help` fast, with help for every flag."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fastkvzip_press.cli import build_parser, eval_report, main
from fastkvzip_press.models import load_default_model

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "harbor_town.txt"
COMMANDS = ("generate", "compress", "train", "export-gates", "eval", "eval-report", "export-dataset", "kvpress-eval")


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(["-q", *argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err


@pytest.fixture()
def unusable_model_cache(tmp_path) -> str:
    """A --model-cache no model can be converted into: a command that reached the model load says so, not --out."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    return str(blocker / "model")


def test_compress_out_is_checked_before_the_model_loads(tmp_path, capsys, unusable_model_cache):
    context = tmp_path / "context.txt"
    context.write_text(EXAMPLE.read_text())
    fifo = tmp_path / "pipe.kvz"
    os.mkfifo(fifo)
    common = ["--context-file", str(context), "--model-cache", unusable_model_cache]
    cases = [
        (fifo, "exists and is not a regular file"),
        (context, "is the --context-file itself"),
        (tmp_path / "." / "context.txt", "is the --context-file itself"),
        (Path("/proc/fastkvzip-test/doc.kvz"), "cannot be written"),
        (Path("/proc/doc.kvz"), "cannot be written"),
        (tmp_path / "context.txt" / "doc.kvz", "is a file, not a folder"),
    ]
    for out, words in cases:
        code, err = run_cli(["compress", *common, "--out", str(out)], capsys)
        assert code == 2 and err.startswith(f"error: --out {out}") and words in err, err
    assert fifo.is_fifo() and context.read_text() == EXAMPLE.read_text()  # nothing replaced


def test_the_context_file_may_be_a_pipe(tmp_path):
    """`--context-file /dev/stdin` reads a pipe (the run then stops at --out naming a folder, before any model)."""
    done = subprocess.run(
        [sys.executable, "-m", "fastkvzip_press.cli", "-q", "compress", "--context-file", "/dev/stdin"]
        + ["--out", str(tmp_path)],
        input="The harbor town keeps its secrets.",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "--out" in done.stderr and "is a folder" in done.stderr, done.stderr


@pytest.mark.parametrize("where", ["file", "proc"])
def test_an_unusable_model_cache_is_refused_before_the_conversion(tmp_path, monkeypatch, capsys, where):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    folder = str(blocker) if where == "file" else "/proc/fastkvzip-test"
    monkeypatch.setenv("FASTKVZIP_PRESS_CACHE", folder)
    with pytest.raises(ValueError, match=f"FASTKVZIP_PRESS_CACHE={re.escape(folder)} must name a writable folder"):
        load_default_model()
    argv = ["generate", "--context-file", str(EXAMPLE), "--question", "q"]
    code, err = run_cli(argv, capsys)
    assert code == 2 and "FASTKVZIP_PRESS_CACHE" in err
    code, err = run_cli([*argv, "--model-cache", folder], capsys)
    assert code == 2 and "(--model-cache) must name a writable folder" in err


def test_a_context_longer_than_the_models_positions_is_refused(default_model_dir, tmp_path, capsys):
    limit = json.loads((default_model_dir / "config.json").read_text())["max_position_embeddings"]
    context = tmp_path / "long.txt"
    context.write_text("The harbor town keeps a lighthouse by the sea. " * (limit // 4))
    out = tmp_path / "long.kvz"
    common = ["--context-file", str(context), "--model-cache", str(default_model_dir)]
    code, err = run_cli(["compress", *common, "--out", str(out)], capsys)
    assert code == 2 and f"passes the {limit} positions the model reads" in err and not out.exists(), err
    code, err = run_cli(["generate", *common, "--question", "Where is the lighthouse?", "--no-compare"], capsys)
    assert code == 2 and "max_position_embeddings" in err, err


def test_help_imports_no_model_library():
    code = (
        "import sys\n"
        "from fastkvzip_press.cli import main\n"
        "try:\n"
        "    main(['generate', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "loaded = sorted({'torch', 'transformers', 'kvpress'} & set(sys.modules))\n"
        "sys.exit(f'imported {loaded}' if loaded else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def help_entries(text: str) -> dict[str, str]:
    """Each option or positional of a --help text and the help written after it."""
    entries, current, listed = {}, None, False
    for line in text.splitlines():
        if line and not line.startswith(" "):  # a section: only the argument lists are read
            listed, current = line in ("options:", "positional arguments:"), None
        elif listed and re.match(r"^  \S", line):
            name, _, rest = line.strip().partition("  ")
            current = name.split(",")[-1].split()[0]
            entries[current] = rest.strip()
        elif listed and current is not None and line.startswith("    "):
            entries[current] += " " + line.strip()
    return entries


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_has_help_and_every_command_an_example(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = capsys.readouterr().out
    assert f"example:\n  fastkvzip-press {command} " in text
    entries = help_entries(text)
    assert len(entries) > 2 and all(entries.values()), {name: words for name, words in entries.items() if not words}


def test_range_in_the_help_of_the_budget_flags(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compress", "--help"])
    entries = help_entries(capsys.readouterr().out)
    assert "in [0, 1)" in entries["--ratio"] and "in [0, 1]" in entries["--threshold"]
    assert ">= 1" in entries["--chunk-size"] and "(0, 1)" in entries["--window-size"]


def test_ctrl_c_is_one_line_not_a_traceback(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(eval_report, "run", interrupted)
    assert main(["eval-report", "results", "--out", "report"]) == 130
    assert capsys.readouterr().err == "interrupted\n"
