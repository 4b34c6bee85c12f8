"""The command line's generate command on the default model, and its errors."""

from pathlib import Path

from fastkvzip_press.cli import main

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "harbor_town.txt"
QUESTION = "What is the combination of the lock on the sea chest?"


def test_cli_generate_prints_answer_and_cache_sizes(default_model_dir, capsys):
    code = main(
        ["-q", "generate", "--context-file", str(EXAMPLE), "--question", QUESTION, "--ratio", "0.5"]
        + ["--model-cache", str(default_model_dir), "--max-new-tokens", "16"]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Answer (FastKVzipPress):" in out and "Answer (full cache):" in out
    assert "Gates: shipped trained gates" in out
    compressed = out.split("Answer (FastKVzipPress):")[1].split("\n")[0]
    full = out.split("Answer (full cache):")[1].split("\n")[0]
    assert "4172" in full and "4172" in compressed  # both find the needle with half the pairs evicted
    assert "full cache:" in out and "(100.0%)" in out
    assert "retained pairs:" in out and "(50.0%)" in out
    stored = float(out.split("stored now:")[1].split("(")[1].split("%")[0])
    assert 50.0 <= stored < 52.5  # evicted pairs are freed; 16 spare rows per head remain


def test_cli_bad_inputs(tmp_path, capsys):
    assert main(["-q", "generate", "--context-file", str(tmp_path / "missing.txt"), "--question", "q"]) == 2
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert main(["-q", "generate", "--context-file", str(empty), "--question", "q"]) == 2
    assert "empty" in capsys.readouterr().err


def test_compress_once_answer_later_as_right_after_compression(default_model_dir, tmp_path, capsys):
    saved = tmp_path / "doc.kvz"
    common = ["--model-cache", str(default_model_dir)]
    assert main(["-q", "compress", "--context-file", str(EXAMPLE), "--ratio", "0.5", "--out", str(saved), *common]) == 0
    printed = capsys.readouterr().out
    assert "Full cache:" in printed and f"file {saved}:" in printed
    questions = ["--question", QUESTION, "--question", "What is the name of the current librarian?"]
    assert main(["-q", "generate", "--cache", str(saved), *questions, "--max-new-tokens", "16", *common]) == 0
    later = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Answer:")]
    now = ["generate", "--context-file", str(EXAMPLE), *questions, "--max-new-tokens", "16", "--no-compare"]
    assert main(["-q", *now, *common]) == 0
    right_away = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Answer (FastKVzipPress):")]
    assert [a.removeprefix("Answer:").strip() for a in later] == [
        a.removeprefix("Answer (FastKVzipPress):").strip() for a in right_away
    ]
    assert "4172" in later[0]


def test_compress_refusals(tmp_path, capsys):
    assert main(["-q", "compress", "--context-file", str(EXAMPLE), "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["-q", "generate", "--question", "q"]) == 2
    assert "give --context-file" in capsys.readouterr().err
