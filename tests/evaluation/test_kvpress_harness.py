"""kvpress's own evaluation/evaluate.py with our presses registered, on a tiny model and a local dataset.

The harness comes from kvpress's source archive on PyPI (fetched once into the cache folder); no hub access.
"""

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from fastkvzip_press.evaluation.comparison import write_parquet_dataset
from fastkvzip_press.evaluation.kvpress_harness import (
    fetch_kvpress_harness,
    import_kvpress_harness,
    resolved_output_dir,
    run_kvpress_harness,
)
from fastkvzip_press.evaluation.results import RunConfig
from fastkvzip_press.evaluation.ruler import make_ruler_samples, ruler_metrics
from fastkvzip_press.gates import write_native
from fastkvzip_press.models import tiny_model


@pytest.fixture(scope="module")
def harness() -> Path:
    return fetch_kvpress_harness()


def test_fetch_is_cached_and_the_harness_imports_cleanly(harness):
    assert (harness / "evaluate.py").is_file() and (harness / "benchmarks" / "ruler" / "calculate_metrics.py").is_file()
    assert fetch_kvpress_harness() == harness  # second call: no download
    before = set(sys.modules)
    with import_kvpress_harness(harness) as (evaluate, registry):
        assert evaluate.PRESS_REGISTRY is registry.PRESS_REGISTRY  # updating one updates what evaluate.py reads
    assert "evaluate_registry" not in sys.modules and not ({"evaluate", "benchmarks"} & (set(sys.modules) - before))
    with pytest.raises(FileNotFoundError, match="no evaluate.py"):
        with import_kvpress_harness(harness.parent):
            pass


def test_output_dir_is_resolved_from_the_callers_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolved_output_dir(["--press_name", "knorm"])[-1] == str(tmp_path / "results")
    assert resolved_output_dir(["--output_dir", "out"]) == ["--output_dir", str(tmp_path / "out")]
    assert resolved_output_dir(["--output_dir=out"]) == [f"--output_dir={tmp_path / 'out'}"]


def test_kvpress_evaluate_writes_leaderboard_folders_with_our_presses(tmp_path, harness, random_gates):
    model, tokenizer = tiny_model("llama")
    model_dir = tmp_path / "tiny-random-llama"  # its own name: the gates record it
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    gates_dir = tmp_path / "gates"
    write_native(random_gates(model, seed=1), gates_dir)
    rows = make_ruler_samples(tokenizer, 600, 1, tasks=("niah_single_1", "vt"), seed=0)
    write_parquet_dataset(rows, tmp_path / "data", "600")
    out = tmp_path / "results"
    common = ["--model", str(model_dir), "--dataset", "ruler-local", "--data_dir", "600", "--device", "cpu"]
    common += ["--output_dir", str(out), "--max_new_tokens", "3"]
    runs = {
        "fastkvzip_press": ["--compression_ratio", "0.5"],
        "fastkvzip_press_threshold": ["--threshold", "0.3"],
        "fastkvzip_press_chunked": ["--compression_ratio", "0.75"],
        "no_press": [],
    }
    local = {"ruler-local": tmp_path / "data"}
    for name, extra in runs.items():
        run_kvpress_harness(harness, [*common, "--press_name", name, *extra], gates=gates_dir, local_datasets=local)

    model_name = str(model_dir)
    expected = {
        RunConfig("ruler-local", "600", model_name, "fastkvzip_press", compression_ratio=0.5).folder_name(),
        RunConfig("ruler-local", "600", model_name, "fastkvzip_press_threshold", threshold=0.3).folder_name(),
        RunConfig("ruler-local", "600", model_name, "fastkvzip_press_chunked", compression_ratio=0.75).folder_name(),
        RunConfig("ruler-local", "600", model_name, "no_press").folder_name(),
    }
    assert {folder.name for folder in out.iterdir()} == expected  # our eval names folders exactly as kvpress does
    for folder in out.iterdir():
        assert {p.name for p in folder.iterdir()} == {"predictions.csv", "metrics.json", "config.yaml"}
        predictions = pd.read_csv(folder / "predictions.csv", keep_default_na=False)
        records = [
            {"task": row.task, "answer": eval_list(row.answer), "prediction": row.predicted_answer}
            for row in predictions.itertuples()
        ]
        # kvpress's scorer and ours agree on its own predictions
        assert json.loads((folder / "metrics.json").read_text()) == ruler_metrics(records)

    threshold = yaml.safe_load((out / RunConfig("ruler-local", "600", model_name, "fastkvzip_press_threshold",
                                                threshold=0.3).folder_name() / "config.yaml").read_text())  # fmt: skip
    assert threshold["threshold"] == 0.3 and "threshold=0.3" in threshold["press_init_command"]
    ratios = pd.read_csv(out / sorted(expected)[1] / "predictions.csv")["compression_ratio"]
    assert ratios.between(0, 1).all()

    # a finished run is skipped by kvpress's own rule
    before = (out / sorted(expected)[0] / "metrics.json").stat().st_mtime_ns
    run_kvpress_harness(harness, [*common, "--press_name", "fastkvzip_press", "--compression_ratio", "0.5"],
                         gates=gates_dir, local_datasets={"ruler-local": tmp_path / "data"})  # fmt: skip
    assert (out / sorted(expected)[0] / "metrics.json").stat().st_mtime_ns == before


def test_threshold_entry_needs_a_threshold(tmp_path, harness):
    with pytest.raises(ValueError, match="pass --threshold"):
        model, tokenizer = tiny_model("llama")
        model.save_pretrained(tmp_path / "m")
        tokenizer.save_pretrained(tmp_path / "m")
        rows = make_ruler_samples(tokenizer, 600, 1, tasks=("niah_single_1",), seed=0)
        write_parquet_dataset(rows, tmp_path / "data", "600")
        args = ["--model", str(tmp_path / "m"), "--dataset", "ruler-local", "--data_dir", "600", "--device", "cpu"]
        args += ["--press_name", "fastkvzip_press_threshold", "--output_dir", str(tmp_path / "out")]
        run_kvpress_harness(harness, args, local_datasets={"ruler-local": tmp_path / "data"})


def eval_list(text: str) -> list[str]:
    """The answer column as kvpress writes it (a printed list or numpy array of strings)."""
    import re

    return re.findall(r"'([^']*)'", text)
