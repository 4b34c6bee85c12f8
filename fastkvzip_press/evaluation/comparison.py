"""Press comparisons on a locally generated dataset: the datasets, the planned runs, and running them into kvpress's
results folders (``fastkvzip-press eval``)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm
from transformers import Pipeline, PreTrainedTokenizerBase

from fastkvzip_press.atomic import atomic_write
from fastkvzip_press.evaluation.answers import answer_rows
from fastkvzip_press.evaluation.datasets import DATASETS
from fastkvzip_press.evaluation.haystack import stdlib_paragraphs, text_paragraphs
from fastkvzip_press.evaluation.niah import NeedleConfig, make_niah_samples
from fastkvzip_press.evaluation.registry import PressResources, PressSpec, press_spec
from fastkvzip_press.evaluation.results import (
    DATASET_COLUMNS,
    IDENTITY_FIELDS,
    RunConfig,
    check_same_run,
    dataset_fingerprint,
    is_finished,
    write_run,
)
from fastkvzip_press.evaluation.ruler import RULER_TASKS, make_ruler_samples, ruler_metrics

logger = logging.getLogger(__name__)


def make_dataset(
    name: str,
    tokenizer: PreTrainedTokenizerBase,
    context_length: int,
    n_samples: int,
    seed: int = 0,
    tasks: tuple[str, ...] = RULER_TASKS,
    haystack: str | Path | None = None,
) -> list[dict]:
    """Rows of ``name`` at ``context_length`` tokens in kvpress's columns.

    ``ruler-local``: ``n_samples`` per RULER task (:func:`~fastkvzip_press.evaluation.ruler.make_ruler_samples`).
    ``niah-local``: ``n_samples`` needle contexts over ``haystack`` (any local text file; default the standard
    library's docstring prose), 3 needles each, one asked.
    """
    if name == "ruler-local":
        return make_ruler_samples(tokenizer, context_length, n_samples, tasks, seed)
    if name == "niah-local":
        paragraphs = text_paragraphs(haystack) if haystack is not None else stdlib_paragraphs()
        return make_niah_samples(tokenizer, paragraphs, n_samples, NeedleConfig(context_tokens=context_length), seed)
    raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")


def write_parquet_dataset(rows: list[dict], root: str | Path, data_dir: str) -> Path:
    """Write rows as ``<root>/<data_dir>/test-00000-of-00001.parquet``, the layout ``datasets.load_dataset(root,
    data_dir=data_dir, split="test")`` reads, i.e. what kvpress's ``evaluate.py`` loads for a dataset name."""
    import pandas as pd

    path = Path(root) / data_dir / "test-00000-of-00001.parquet"
    table = pd.DataFrame([{column: row[column] for column in DATASET_COLUMNS} for row in rows])
    atomic_write(path, lambda tmp: table.to_parquet(tmp, index=False))
    return path


@dataclass(frozen=True)
class PlannedRun:
    spec: PressSpec
    value: float
    config: RunConfig
    folder: Path


def check_plan(press_names: list[str], ratios: list[float], thresholds: list[float]) -> list[PressSpec]:
    """The specs of ``press_names``, after checking names, values and that every press gets a value to run with."""
    for ratio in ratios:
        if not 0 < ratio < 1:
            raise ValueError(f"compression ratios are fractions removed, in (0, 1); got {ratio}")
    for threshold in thresholds:
        if not 0 <= threshold <= 1:
            raise ValueError(f"thresholds compare with gate scores in (0, 1); got {threshold}")
    specs = [press_spec(name) for name in press_names]
    for spec in specs:
        if spec.knob == "target_size":
            raise ValueError(
                f"{spec.name} evicts while generating and is driven by a decoding budget (target_size); compare it "
                "with kvpress's harness: fastkvzip-press kvpress-eval -- --press_name ... --target_size N"
            )
        if spec.knob == "threshold" and not thresholds:
            raise ValueError(f"{spec.name} is driven by a gate-score threshold: give --thresholds (e.g. 0.05 0.2)")
    return specs


def plan_runs(
    press_names: list[str],
    ratios: list[float],
    thresholds: list[float],
    base: RunConfig,
    out: Path,
) -> list[PlannedRun]:
    """One run per (press, ratio) or (threshold press, threshold); ``no_press`` once at ratio 0."""
    runs = []
    for spec in check_plan(press_names, ratios, thresholds):
        values = {"none": [0.0], "ratio": ratios, "threshold": thresholds}[spec.knob]
        for value in values:
            fields = {**vars(base), "press_name": spec.name, "output_dir": str(out)}
            if spec.knob == "threshold":
                fields.update(threshold=value, compression_ratio=0.0)
            else:
                fields.update(threshold=None, compression_ratio=value)
            config = RunConfig(**fields)
            runs.append(PlannedRun(spec, value, config, out / config.folder_name()))
    return runs


def execute_runs(
    pipe: Pipeline,
    rows: list[dict],
    runs: list[PlannedRun],
    resources: PressResources,
    progress: bool = True,
) -> list[Path]:
    """Answer ``rows`` under each planned run not already finished; returns the folders written now."""
    written = []
    fingerprint = dataset_fingerprint(rows)
    digest = resources.gate_bank().digest() if any(run.spec.uses_gates for run in runs) else None
    todo = []
    for run in runs:
        run.config.dataset_fingerprint = fingerprint
        run.config.gates_digest = digest if run.spec.uses_gates else None
        press = run.spec.build(run.value, resources)
        run.config.press_init_command = str(press)  # before running: a threshold press overwrites its ratio
        if is_finished(run.folder):
            check_same_run(run.folder, {key: getattr(run.config, key) for key in IDENTITY_FIELDS})
            logger.info("%s: finished earlier, skipped", run.folder.name)
        else:
            todo.append((run, press))
    for run, press in tqdm(todo, desc="runs", disable=not progress):
        start = time.perf_counter()
        answered = answer_rows(pipe, rows, press, progress=progress, desc=f"{run.config.press_name} {run.value:.2f}")
        metrics = ruler_metrics(answered)
        # kvpress's predictions.csv names the answer predicted_answer; the per-row score lives in metrics.json
        records = [
            {k: v for k, v in r.items() if k not in ("prediction", "score")} | {"predicted_answer": r["prediction"]}
            for r in answered
        ]
        write_run(run.folder, records, metrics, run.config)
        mean = sum(m["string_match"] for m in metrics.values()) / len(metrics)
        failed = sum(1 for row in answered if row.get("error"))
        logger.info("%s: mean score %.1f in %.0fs", run.folder.name, mean, time.perf_counter() - start)
        if failed:
            logger.warning("%s: %d of %d rows failed (see the error column)", run.folder.name, failed, len(answered))
        written.append(run.folder)
    return written
