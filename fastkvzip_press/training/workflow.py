"""One training run: corpus → feature shards → gate fit → exported gates, report and curves.

Output folder layout::

    features/shard_*.safetensors   gate inputs and KVzip targets (resumable)
    fit_checkpoint.pt              fitting state (resumable)
    gates/                         gates.safetensors + gates.json + q{G}_dim{r}_sink{S}.pt (both gate formats)
    report.json                    configuration, per-layer validation loss/accuracy, curves, time per phase
    curves.png                     training and validation curves
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fastkvzip_press.gates import GateBank, save_gates
from fastkvzip_press.gates.atomic import atomic_write
from fastkvzip_press.gates.layout import ModelLayout
from fastkvzip_press.training.corpus import iter_documents
from fastkvzip_press.training.features import extract_features, load_split, split_by_document
from fastkvzip_press.training.fit import FitConfig, FitReport, fit_gates

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """What to extract (corpus, lengths) and how to fit (``fit``)."""

    corpus: str | None = None
    context_len: int = 2048
    max_tokens: int | None = 200_000
    replay_chunk: int = 2048
    val_fraction: float = 0.1
    fit: FitConfig = None  # type: ignore[assignment]

    def __post_init__(self):
        if self.fit is None:
            self.fit = FitConfig()
        if self.context_len < 256:
            raise ValueError(f"context_len must be >= 256 tokens, got {self.context_len}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")


def train(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out: str | Path,
    config: TrainConfig,
    resume: bool = True,
    progress: bool = True,
) -> tuple[GateBank, dict]:
    """Run every phase into ``out``; returns the fitted gates and the report written to ``report.json``."""
    out = Path(out)
    layout = ModelLayout.from_model(model)
    times: dict[str, float] = {}

    start = time.perf_counter()
    paths = extract_features(
        model,
        tokenizer,
        iter_documents(config.corpus),
        out / "features",
        context_len=config.context_len,
        max_tokens=config.max_tokens,
        chunk_size=config.replay_chunk,
        progress=progress,
    )
    times["features_s"] = time.perf_counter() - start
    if not paths:
        raise ValueError(f"the corpus gave no context window of at least 256 tokens: {config.corpus or 'builtin'}")

    start = time.perf_counter()
    train_paths, val_paths = split_by_document(paths, config.val_fraction, config.fit.seed)
    train_split, val_split = load_split(train_paths), load_split(val_paths) if val_paths else None
    times["load_s"] = time.perf_counter() - start
    if val_split is None:
        raise ValueError("validation is held out by document: the corpus needs at least two documents")

    bank, fit_report = fit_gates(layout, train_split, val_split, config.fit, out, resume=resume, progress=progress)
    times["fit_s"] = fit_report.seconds

    report = {
        "model_id": layout.model_id,
        "config": {**asdict(config), "fit": asdict(config.fit)},
        "train_tokens": train_split.num_tokens,
        "val_tokens": val_split.num_tokens,
        "val_documents": val_split.documents,
        "layer_ids": fit_report.layer_ids,
        "val_loss_per_layer": fit_report.val_loss_per_layer,
        "val_accuracy_per_layer": fit_report.val_accuracy_per_layer,
        "history": asdict(fit_report.history),
        "times": times,
    }
    bank.metadata.training = {
        "source": "fastkvzip-press train",
        "config": report["config"],
        "train_tokens": report["train_tokens"],
        "val_loss_per_layer": report["val_loss_per_layer"],
        "val_accuracy_per_layer": report["val_accuracy_per_layer"],
    }
    save_gates(bank, out / "gates")
    atomic_write(out / "report.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2) + "\n"))
    plot_curves(fit_report, out / "curves.png")
    return bank, report


def plot_curves(report: FitReport, path: Path) -> None:
    """Training/validation loss and validation accuracy against steps, plus final per-layer accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = report.history
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(history.step, history.train_loss, label="train")
    axes[0].plot(history.step, history.val_loss, label="validation")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("BCE (sum over layers and heads)")
    axes[0].legend()
    axes[1].plot(history.step, history.val_accuracy)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("validation accuracy (score >= 0.05)")
    axes[2].bar([str(i) for i in report.layer_ids], report.val_accuracy_per_layer)
    axes[2].set_xlabel("layer")
    axes[2].set_ylabel("final validation accuracy")
    axes[2].tick_params(axis="x", labelsize=6)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
