"""benchmarks/vllm_serving.py runs end to end (a tiny model, a few short requests) and writes its three files."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_serving_benchmark_runs_on_a_tiny_model(tiny_models, tmp_path):
    model_dir, gates, _, _ = tiny_models["llama"]
    command = [
        sys.executable, "benchmarks/vllm_serving.py", "--model", str(model_dir), "--gates", str(gates),
        "--requests", "3", "--min-tokens", "100", "--max-tokens", "200", "--output-tokens", "4",
        "--pool-blocks", "12", "--block-size", "32", "--ratios", "0.5", "--chunk-size", "64",
        "--niah-contexts", "0", "--out", str(tmp_path), "-q",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "vllm_serving.csv") as handle:
        rows = list(csv.DictReader(handle))
    configs = [
        "plain vLLM", "ratio 0 (no compaction)", "global 0.5", "uniform 0.5", "global 0.5, chunks of 64",
        "uniform 0.5, chunks of 64",
    ]  # fmt: skip
    prefill, *rows = rows
    assert prefill["config"] == "plain vLLM, prefill only" and int(prefill["output_tokens"]) == 3
    assert [row["config"] for row in rows] == configs
    assert all(int(row["output_tokens"]) == 3 * 4 for row in rows)
    assert int(rows[2]["peak_blocks"]) < int(rows[1]["peak_blocks"]), "compaction frees blocks"
    assert int(rows[4]["peak_running"]) >= int(rows[2]["peak_running"]), "chunk by chunk, admission asks for less"
    for row in rows[2:]:  # after its compaction a request holds at most its kept pairs' share of blocks plus one
        assert float(row["blocks_after"]) <= float(row["kept_share"]) + 2
    assert "The prefill alone" in (tmp_path / "vllm_serving.md").read_text()
    assert (tmp_path / "vllm_serving.png").exists()
