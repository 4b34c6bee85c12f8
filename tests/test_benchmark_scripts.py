"""The kernel benchmark runs end to end on small shapes (the model benchmarks are run by hand: minutes each)."""

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
