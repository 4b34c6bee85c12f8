"""`fastkvzip-press eval`, `eval-report`, `export-dataset` and `kvpress-eval` wiring, on a saved tiny model."""

import subprocess
import sys

from fastkvzip_press.cli import main
from fastkvzip_press.evaluation.results import collect_runs


def test_the_command_runs_in_a_fresh_interpreter(saved_tiny, tmp_path):
    """As a user runs it: nothing imported kvpress beforehand (its pipeline registers on import)."""
    args = ["-q", "eval", "--model", str(saved_tiny / "model"), "--gates", str(saved_tiny / "gates")]
    args += ["--data-dir", "400", "--samples", "1", "--tasks", "niah_single_1", "--max-new-tokens", "1"]
    args += ["--presses", "fastkvzip_press", "--ratios", "0.5", "--out", str(tmp_path / "runs")]
    done = subprocess.run([sys.executable, "-m", "fastkvzip_press.cli", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert [run.press_name for run in collect_runs(tmp_path / "runs")] == ["fastkvzip_press"]


def test_eval_command_writes_runs_and_report_then_skips(saved_tiny, tmp_path, capsys):
    args = ["-q", "eval", "--model", str(saved_tiny / "model"), "--gates", str(saved_tiny / "gates")]
    args += ["--data-dir", "600", "--samples", "1", "--tasks", "niah_single_1", "--max-new-tokens", "2"]
    args += ["--presses", "no_press", "fastkvzip_press", "streaming_llm", "--ratios", "0.5"]
    args += ["--out", str(tmp_path / "runs"), "--report", str(tmp_path / "report")]
    assert main(args) == 0
    runs = collect_runs(tmp_path / "runs")
    assert sorted(run.press_name for run in runs) == ["fastkvzip_press", "no_press", "streaming_llm"]
    assert all(run.data_dir == "600" and run.n_rows == 1 for run in runs)
    table = (tmp_path / "report" / "ruler-local.md").read_text()
    assert "| **fastkvzip_press** |" in table and "Report command: `fastkvzip-press" in table
    assert (tmp_path / "report" / "ruler-local.png").stat().st_size > 10_000
    assert "fastkvzip_press__0.50" in capsys.readouterr().out

    mtimes = {run.folder: (run.folder / "metrics.json").stat().st_mtime_ns for run in runs}
    assert main(args) == 0  # everything finished: nothing is redone
    assert {f: (f / "metrics.json").stat().st_mtime_ns for f in mtimes} == mtimes

    readme = tmp_path / "README.md"
    readme.write_text("# Title\n<!-- ruler-local:start -->\nold table\n<!-- ruler-local:end -->\nTail.\n")
    report = ["-q", "eval-report", str(tmp_path / "runs"), "--out", str(tmp_path / "report2")]
    assert main([*report, "--readme", str(readme)]) == 0
    assert "| no_press |" in capsys.readouterr().out
    text = readme.read_text()
    assert "old table" not in text and "| **fastkvzip_press** |" in text and text.endswith("end -->\nTail.\n")
    assert "Per task" not in text  # the README gets the summary table only
    readme.write_text("no markers")
    assert main([*report, "--readme", str(readme)]) == 2


def test_eval_command_rejects_bad_input_before_loading(tmp_path, capsys):
    assert main(["-q", "eval", "--presses", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown press 'nope'" in capsys.readouterr().err
    assert main(["-q", "eval-report", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "no finished runs" in capsys.readouterr().err


def test_export_dataset_then_kvpress_eval(saved_tiny, tmp_path):
    data = tmp_path / "data"
    args = ["-q", "export-dataset", "--model", str(saved_tiny / "model"), "--data-dir", "600", "--samples", "1"]
    assert main([*args, "--tasks", "niah_single_1", "--out", str(data)]) == 0
    assert (data / "600" / "test-00000-of-00001.parquet").is_file()
    out = tmp_path / "results"
    kvpress_args = ["--model", str(saved_tiny / "model"), "--dataset", "ruler-local", "--data_dir", "600"]
    kvpress_args += ["--press_name", "fastkvzip_press", "--compression_ratio", "0.25", "--device", "cpu"]
    kvpress_args += ["--max_new_tokens", "2", "--output_dir", str(out)]
    command = ["-q", "kvpress-eval", "--gates", str(saved_tiny / "gates"), "--local-dataset", f"ruler-local={data}"]
    assert main([*command, "--", *kvpress_args]) == 0
    (run,) = collect_runs(out)
    assert run.press_name == "fastkvzip_press" and run.value == 0.25 and run.n_rows == 1
    assert main(["-q", "kvpress-eval", "--local-dataset", "x=/no/such/folder", "--", "--press_name", "knorm"]) == 2
