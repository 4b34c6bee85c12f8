"""The GPU benchmark rehearsed on CPU (``--device cpu --tiny``): every section runs and reports numbers, and nothing
is written into the committed results."""

import csv
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = (
    "Prefill overhead",
    "Decode",
    "Peak memory",
    "Longest context",
    "Compaction bandwidth",
    "Selection",
)


def section_rows(markdown: str, title: str) -> list[list[str]]:
    """The body rows of the table under ``## title``, as lists of cells."""
    block = markdown.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in block.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def numbers(cells: list[str]) -> list[float]:
    return [float(cell) for cell in cells if re.fullmatch(r"-?\d+(\.\d+)?", cell)]


def test_cpu_rehearsal_reports_every_section(tmp_path):
    committed = ROOT / "benchmarks" / "results" / "gpu.md"
    before = committed.stat().st_mtime_ns if committed.exists() else None
    command = [sys.executable, "benchmarks/gpu.py", "--device", "cpu", "--tiny", "--quiet", "--hbm-peak", "50"]
    subprocess.run([*command, "--out", str(tmp_path)], cwd=ROOT, check=True, capture_output=True, text=True)
    assert (committed.stat().st_mtime_ns if committed.exists() else None) == before

    markdown = (tmp_path / "gpu.md").read_text()
    for title in SECTIONS:
        rows = section_rows(markdown, title)
        assert rows, title
        assert all(numbers(row) for row in rows), title
    by_model = {}
    for row in section_rows(markdown, "Longest context"):
        by_model.setdefault(row[0], {})[row[1]] = int(row[3])
    assert set(by_model) == {"Llama-3.1-8B", "Qwen3-8B"}
    for found in by_model.values():  # 30 % kept: the press holds a longer context in the same KV budget
        assert found["FastKVzipPress chunked"] > found["full cache"] > 0

    with open(tmp_path / "gpu.csv") as handle:
        rows = list(csv.DictReader(handle))
    sections = {row["section"] for row in rows}
    assert sections == {"prefill", "decode", "memory", "longest", "compaction", "selection"}
    for row in rows:
        if row["metric"] in ("prefill_ms", "decode_ms_per_token", "ms", "gb_per_s", "of_peak"):
            assert math.isfinite(float(row["value"])) and float(row["value"]) > 0, row


def load_benchmark(monkeypatch):
    """benchmarks/gpu.py as a module (its helpers import from benchmarks/)."""
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("gpu_benchmark", ROOT / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_benchmark", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a_total_budget_is_shared_by_the_models_sections(monkeypatch):
    import argparse

    gpu = load_benchmark(monkeypatch)
    args = argparse.Namespace(
        tiny=False, contexts=None, rounds=None, kv_budget_gib=None, budget_s=29.0, models=["a", "b"]
    )
    scale = gpu.scale_of(args)
    assert (scale.timed_s, scale.longest_s) == pytest.approx((7.5, 7.0))  # 75 : 70 as by default
    args.budget_s = None
    assert (gpu.scale_of(args).timed_s, gpu.scale_of(args).longest_s) == (75.0, 70.0)


def test_the_report_is_written_after_every_model(monkeypatch, tmp_path):
    """A run stopped from outside (the GPU command's time limit) leaves the sections measured so far."""
    import torch

    gpu = load_benchmark(monkeypatch)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # main sets one thread for the whole process
    saved, run = [], gpu.run

    def recording_run(args, save):
        def recording(results, missing):
            save(results, missing)
            saved.append((missing, (tmp_path / "gpu.md").read_text()))

        return run(args, recording)

    monkeypatch.setattr(gpu, "run", recording_run)
    argv = ["--device", "cpu", "--tiny", "--quiet", "--models", "Qwen3-8B", "--budget-s", "1", "--out", str(tmp_path)]
    assert gpu.main(argv) == 0
    assert [missing for missing, _ in saved] == ["the kernels", ""]
    partial, final = saved[0][1], saved[1][1]
    assert "**Partial report**: not measured yet: the kernels." in partial
    assert section_rows(partial, "Decode") and not section_rows(partial, "Selection")
    assert "Partial" not in final and section_rows(final, "Selection")
