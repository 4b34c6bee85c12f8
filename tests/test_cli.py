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
