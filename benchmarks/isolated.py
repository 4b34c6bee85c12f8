"""What the benchmark scripts share: one configuration per fresh process (its peak RSS is its own), and CSV output."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path


def run_isolated(script: str, config: dict) -> dict:
    """Run ``script --worker <config as JSON>`` in a fresh interpreter; its last stdout line is the result (JSON)."""
    completed = subprocess.run(
        [sys.executable, script, "--worker", json.dumps(config)], capture_output=True, text=True, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(f"configuration {config} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def write_csv(rows: list[dict], path: Path) -> None:
    """``rows`` as a CSV file with the first row's keys as columns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
