"""What the benchmark scripts share: one configuration per fresh process (its peak RSS is its own), and CSV output."""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

# glibc keeps freed blocks below an mmap threshold that it raises during a run, so the peak RSS of two identical runs
# differed by 7-25 % (8k-token prefill of the default model); with fixed thresholds freed blocks go back to the
# system and peak RSS follows the live tensors (identical runs within 0.2 %).
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def run_isolated(script: str, config: dict, steady_malloc: bool = False) -> dict:
    """Run ``script --worker <config as JSON>`` in a fresh interpreter; its last stdout line is the result (JSON).
    ``steady_malloc``: run it with :data:`STEADY_MALLOC`, for peak-memory measurements."""
    env = {**os.environ, **STEADY_MALLOC} if steady_malloc else None
    completed = subprocess.run(
        [sys.executable, script, "--worker", json.dumps(config)], capture_output=True, text=True, check=False, env=env
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


def add_shared_arguments(parser: argparse.ArgumentParser, out: Path) -> None:
    """The flags every isolated benchmark takes: gates, model cache, output folder, and the hidden worker flag."""
    parser.add_argument("--gates", default=None, help="gate file or folder (default: random gates, seed 0)")
    parser.add_argument("--model-cache", default=None)
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--worker", help=argparse.SUPPRESS)


def ran_as_worker(args: argparse.Namespace, worker: Callable[[dict], dict]) -> bool:
    """When this process is a worker (``--worker``), run its configuration, print the result and say so."""
    if not args.worker:
        return False
    print(json.dumps(worker(json.loads(args.worker))))
    return True


def write_results(rows: list[dict], out: Path, name: str, table: str, plot: Callable[[list[dict], Path], None]) -> None:
    """``<out>/<name>.csv``, ``.md`` (``table``) and ``.png`` (drawn by ``plot``); prints the table."""
    write_csv(rows, out / f"{name}.csv")
    (out / f"{name}.md").write_text(table)
    plot(rows, out / f"{name}.png")
    print(table)
    print(f"written: {out}/{name}.{{csv,md,png}}")
