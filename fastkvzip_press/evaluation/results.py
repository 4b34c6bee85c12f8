"""kvpress's evaluation results format: one folder per (dataset, data_dir, model, press, ratio).

``<out>/<dataset>__<data_dir>__<model with / as -->__<press>__<value:.2f>/`` holds ``predictions.csv`` (every
dataset column but ``context``, plus ``predicted_answer`` and ``compression_ratio``), ``metrics.json`` (the
dataset's scorer output) and ``config.yaml``. A run whose ``predictions.csv`` and ``metrics.json`` exist is
finished and skipped, as kvpress's ``evaluate.py`` does; ``metrics.json`` is written last, each file atomically,
so an interrupted run is redone rather than half-read.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from fastkvzip_press.atomic import atomic_write

# kvpress's dataset columns, the ones evaluate.py and its ruler scorer read.
DATASET_COLUMNS = ("context", "question", "answer_prefix", "answer", "task", "max_new_tokens")


@dataclass
class RunConfig:
    """The subset of kvpress's ``EvaluationConfig`` fields that a run here sets, same names and meanings.

    ``threshold`` replaces ``compression_ratio`` in the folder name and in ``config.yaml`` when set, as in kvpress.
    """

    dataset: str
    data_dir: str | None
    model: str
    press_name: str
    compression_ratio: float = 0.0
    threshold: float | None = None
    device: str | None = "cpu"
    fraction: float = 1.0
    max_new_tokens: int | None = None
    max_context_length: int | None = None
    query_aware: bool = False
    output_dir: str = "./results"
    log_level: str = "INFO"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    press_init_command: str | None = None
    seed: int = 42
    fp8: bool = False
    # Not in kvpress: a hash of the generated rows, so a rerun with other samples never reuses these results.
    dataset_fingerprint: str | None = None
    # Not in kvpress: the digest of the gates a gated press used (GateBank.digest), None for other presses.
    gates_digest: str | None = None

    def folder_name(self) -> str:
        value = self.threshold if self.threshold is not None else self.compression_ratio
        parts = [self.dataset, self.data_dir or "", self.model.replace("/", "--"), self.press_name, format_value(value)]
        if self.fraction < 1.0:
            parts.append(f"fraction{self.fraction:.3f}")
        if self.max_context_length is not None:
            parts.append(f"max_context{self.max_context_length}")
        if self.query_aware:
            parts.append("query_aware")
        return "__".join(part for part in parts if part)

    def to_yaml_dict(self) -> dict[str, Any]:
        config = asdict(self)
        if self.threshold is not None:
            config.pop("compression_ratio")
        else:
            config.pop("threshold")
        return config


def format_value(value: float) -> str:
    """kvpress's ``{value:.2f}``, unless that would merge distinct values (gate-score thresholds such as 0.001 and
    0.005 are both "0.00" there): then 3 significant digits."""
    two_decimals = f"{value:.2f}"
    return two_decimals if abs(float(two_decimals) - value) < 1e-9 else f"{value:.3g}"


def is_finished(folder: Path) -> bool:
    """kvpress's skip rule: both ``predictions.csv`` and ``metrics.json`` exist."""
    return (folder / "predictions.csv").is_file() and (folder / "metrics.json").is_file()


def dataset_fingerprint(rows: list[dict]) -> str:
    """A short hash of the rows' kvpress columns (same generated dataset, same fingerprint)."""
    payload = json.dumps([[row[c] for c in DATASET_COLUMNS] for row in rows], default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# What makes a finished run the same run: what it was asked (rows), of which model, with which press and gates.
IDENTITY_FIELDS = {
    "dataset_fingerprint": "a different generated dataset (--samples, --seed, --tasks, --max-new-tokens)",
    "model": "another model",
    "press_init_command": "another press configuration",
    "gates_digest": "other gates (--gates)",
}


def check_same_run(folder: Path, expected: dict[str, str | None]) -> None:
    """Raise if the finished run in ``folder`` differs from ``expected`` in one of :data:`IDENTITY_FIELDS` (the
    dataset's fingerprint, the model, the press configuration or the gates' digest). A field the folder does not
    record (older runs) is not compared."""
    config_path = folder / "config.yaml"
    stored = yaml.safe_load(config_path.read_text()) if config_path.exists() else None
    stored = stored if isinstance(stored, dict) else {}
    for key, meaning in IDENTITY_FIELDS.items():
        have, want = stored.get(key), expected.get(key)
        if key in expected and have is not None and have != want:
            raise ValueError(
                f"{folder} holds a finished run made with {meaning}: {key} is {have!r} there, {want!r} now. "
                "Use another --out, or delete that folder to redo the run."
            )


def write_run(folder: Path, records: list[dict], metrics: dict, config: RunConfig) -> None:
    """Write a finished run: ``config.yaml``, ``predictions.csv``, then ``metrics.json`` (the completion mark).

    Args:
        records: one dict per dataset row with the dataset columns plus ``predicted_answer`` and
            ``compression_ratio`` (extra columns such as ``kv_fraction`` are kept; ``context`` is dropped).
    """
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "config.yaml", lambda tmp: Path(tmp).write_text(yaml.safe_dump(config.to_yaml_dict())))
    table = pd.DataFrame([{k: v for k, v in record.items() if k != "context"} for record in records])
    atomic_write(folder / "predictions.csv", lambda tmp: table.to_csv(tmp, index=False))
    atomic_write(folder / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(metrics, indent=4)))


@dataclass(frozen=True)
class RunSummary:
    """One results folder read back: what the report plots.

    Attributes:
        score: mean over tasks of the per-task metric (kvpress's leaderboard average for ``ruler``).
        compression_ratio: mean of the ``compression_ratio`` column (the achieved ratio for threshold presses).
        kv_fraction: mean stored-KV bytes over full-cache bytes (NaN when the run did not measure it).
    """

    folder: Path
    dataset: str
    data_dir: str
    model: str
    press_name: str
    value: float
    score: float
    task_scores: dict[str, float]
    compression_ratio: float
    kv_fraction: float
    n_rows: int


def _metric_value(entry: Any) -> float:
    if isinstance(entry, dict):  # ruler: {"string_match": x}
        return float(next(iter(entry.values())))
    return float(entry)


def read_run(folder: Path) -> RunSummary:
    """Read a finished results folder (ours or one written by kvpress's ``evaluate.py``)."""
    config = yaml.safe_load((folder / "config.yaml").read_text()) if (folder / "config.yaml").exists() else {}
    dataset, data_dir, model, press, value = folder.name.split("__")[:5]
    metrics = json.loads((folder / "metrics.json").read_text())
    task_scores = {task: _metric_value(entry) for task, entry in metrics.items()}
    table = pd.read_csv(folder / "predictions.csv")
    ratio = float(table["compression_ratio"].mean()) if "compression_ratio" in table else float(value)
    kv_fraction = float(table["kv_fraction"].mean()) if "kv_fraction" in table else math.nan
    return RunSummary(
        folder=folder,
        dataset=config.get("dataset", dataset),
        data_dir=str(config.get("data_dir", data_dir)),
        model=config.get("model", model.replace("--", "/")),
        press_name=config.get("press_name", press),
        value=float(value),
        score=sum(task_scores.values()) / len(task_scores) if task_scores else math.nan,
        task_scores=task_scores,
        compression_ratio=ratio,
        kv_fraction=kv_fraction,
        n_rows=len(table),
    )


def _sort_key(run: RunSummary) -> tuple:
    return (run.dataset, int(run.data_dir) if run.data_dir.isdigit() else 0, run.press_name, run.value)


def collect_runs(root: Path) -> list[RunSummary]:
    """Every finished run directly under ``root``, sorted by dataset, data_dir, press and value."""
    runs = [read_run(folder) for folder in sorted(Path(root).iterdir()) if folder.is_dir() and is_finished(folder)]
    return sorted(runs, key=_sort_key)
