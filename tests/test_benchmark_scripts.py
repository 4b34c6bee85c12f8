"""The kernel and saved-context benchmarks run end to end on small inputs (other model benchmarks: by hand)."""

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_kernel_benchmark_times_every_kernel(tmp_path):
    command = [sys.executable, "benchmarks/kernel_timings.py", "--shapes", "small", "--contexts", "256"]
    command += ["--repeats", "2"]
    subprocess.run([*command, "--out", str(tmp_path)], cwd=ROOT, check=True, capture_output=True, text=True)
    with open(tmp_path / "kernels.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["kernel"] for row in rows] == [
        "select (all layers)",
        "compact keys+values",
        "append 1 token",
        "ragged attention, 1 query",
        "  alt: whole buffer, masked",
        "  alt: padded copy, one SDPA",
        "  dense, full cache (reference)",
    ]
    assert all(float(row["ms"]) > 0 for row in rows)


def test_saved_context_benchmark_answers_alike_from_the_file(default_model_dir, tmp_path):
    command = [sys.executable, "benchmarks/saved_context.py", "--lengths", "300", "--repeats", "1", "-q"]
    command += ["--model-cache", str(default_model_dir), "--out", str(tmp_path)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True)
    with open(tmp_path / "saved_context.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["config"] for row in rows] == ["0.5", "0.75", "0.5 chunked"]
    assert all(row["same_answer"] == "True" for row in rows)
    assert all(float(row["file_fraction"]) <= 1 - float(row["config"].split()[0]) + 0.02 for row in rows)
    assert (tmp_path / "saved_context.md").exists() and (tmp_path / "saved_context.png").exists()
