"""One training run: corpus → feature shards → gate fit → exported gates, report and curves.

Under ``torchrun`` the ranks split the feature extraction (each extracts every ``world_size``-th window of the same
planned order, see :mod:`fastkvzip_press.training.distributed`); rank 0 then fits and exports once. The fit streams
the shards one gated layer at a time (:class:`~fastkvzip_press.training.shards.ShardSet`) on the model's device.

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

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fastkvzip_press.atomic import atomic_write, remove_stale_temporaries
from fastkvzip_press.checks import KnobTypeError, require_int, require_real
from fastkvzip_press.gates import GateBank, save_gates
from fastkvzip_press.layout import ModelLayout
from fastkvzip_press.training.corpus import BUILTIN, check_source, iter_documents
from fastkvzip_press.training.distributed import Ranks, barrier, process_group
from fastkvzip_press.training.features import MIN_WINDOW, Window, plan_windows, write_shards
from fastkvzip_press.training.fit import FitConfig, FitReport, fit_gates
from fastkvzip_press.training.shards import ShardSet, split_windows

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """What to extract (corpus, lengths) and how to fit (``fit``)."""

    corpus: str | None = None
    text_column: str = "text"
    context_len: int = 2048
    max_tokens: int | None = 200_000
    replay_chunk: int = 2048
    val_fraction: float = 0.1
    fit: FitConfig = None  # type: ignore[assignment]

    def __post_init__(self):
        if self.fit is None:
            self.fit = FitConfig()
        elif not isinstance(self.fit, FitConfig):
            raise KnobTypeError(f"fit must be a FitConfig, got {type(self.fit).__name__}")
        if self.corpus is not None and not isinstance(self.corpus, str | Path):
            raise KnobTypeError(f"corpus must be a path, 'hf:<dataset>' or 'builtin', got {type(self.corpus).__name__}")
        check_source(self.corpus)  # before a model loads, not after
        if not isinstance(self.text_column, str) or not self.text_column:
            raise KnobTypeError(f"text_column must be a column name, got {self.text_column!r}")
        require_int("context_len (tokens per training context)", self.context_len, MIN_WINDOW)
        if self.max_tokens is not None:
            require_int("max_tokens (context tokens to extract)", self.max_tokens, MIN_WINDOW)
        require_int("replay_chunk", self.replay_chunk, 1)
        require_real("val_fraction", self.val_fraction, 0, 1, low_open=True, high_open=True)


def train(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out: str | Path,
    config: TrainConfig,
    resume: bool = True,
    progress: bool = True,
    allow_other_model: bool = False,
    ranks: Ranks | None = None,
    device: torch.device | str | None = None,
) -> tuple[GateBank, dict] | None:
    """Run every phase into ``out``; returns the fitted gates and the report written to ``report.json``.

    Temporary files a killed run left in ``out`` are removed first. ``allow_other_model`` resumes on feature shards
    that another model id wrote (the same weights under another name); otherwise they are refused.

    ``ranks`` (default: from torchrun's environment) splits the extraction between processes; every rank calls
    ``train`` with the same arguments. Rank 0 fits and exports once all shards are on disk and returns the result;
    the other ranks return ``None`` when their shards are written.

    ``device`` is where the gates are fitted (default: the device of the model's first parameters, so ``--device
    cuda`` fits on that GPU; the CPU for a model offloaded to disk). The fit holds one layer's features at a time.
    """
    out = Path(out)
    ranks = ranks or Ranks.from_environment()
    layout = ModelLayout.from_model(model)
    times: dict[str, float] = {}

    # Everything that can be known from the text alone is checked before the (long) extraction.
    documents = iter_documents(config.corpus, config.text_column)
    windows = plan_windows(tokenizer, documents, config.context_len, config.max_tokens)
    train_positions, val_positions = check_windows(windows, config)

    start = time.perf_counter()
    with process_group(ranks, next(model.parameters()).device):
        if ranks.is_main:
            remove_stale_temporaries(out)
        barrier(ranks)  # no rank writes before what dead writers left is gone
        paths = write_shards(
            model,
            tokenizer,
            windows,
            out / "features",
            chunk_size=config.replay_chunk,
            progress=progress,
            allow_other_model=allow_other_model,
            ranks=ranks,
            extraction=extraction_arguments(config, model),
        )
        barrier(ranks)  # every shard is on disk
    times["features_s"] = time.perf_counter() - start
    if not ranks.is_main:
        return None

    train_split = ShardSet([paths[i] for i in train_positions])  # headers only: layers are read during the fit
    val_split = ShardSet([paths[i] for i in val_positions])
    fit_device = fit_device_of(model) if device is None else torch.device(device)
    bank, fit_report = fit_gates(
        layout, train_split, val_split, config.fit, out, resume=resume, progress=progress, device=fit_device
    )
    times["load_s"] = fit_report.read_seconds
    times["fit_s"] = fit_report.seconds - fit_report.read_seconds

    report = training_report(layout, config, train_split, val_split, fit_report, times)
    bank.metadata.training = {
        "source": "fastkvzip-press train",
        **{key: report[key] for key in ("config", "train_tokens", "val_loss_per_layer", "val_accuracy_per_layer")},
    }
    save_gates(bank, out / "gates")
    atomic_write(out / "report.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2) + "\n"))
    plot_curves(fit_report, out / "curves.png")
    return bank, report


def training_report(
    layout: ModelLayout, config: TrainConfig, train_split: ShardSet, val_split: ShardSet, fit_report, times: dict
) -> dict:
    """What ``report.json`` holds: the run's configuration, its data, the fit's per-layer results and times."""
    return {
        "model_id": layout.model_id,
        "config": {**asdict(config), "fit": asdict(config.fit)},
        "train_tokens": train_split.num_tokens,
        "val_tokens": val_split.num_tokens,
        "val_documents": val_split.documents,
        "fit_device": fit_report.device,
        "layer_ids": fit_report.layer_ids,
        "val_loss_per_layer": fit_report.val_loss_per_layer,
        "val_accuracy_per_layer": fit_report.val_accuracy_per_layer,
        "history": asdict(fit_report.history),
        "times": times,
    }


def extraction_arguments(config: TrainConfig, model: PreTrainedModel) -> dict:
    """What decides the features (a resumed run must ask for the same): corpus, text column, context length, replay
    chunk and dtype. A local corpus is compared by its absolute path."""
    corpus = str(config.corpus if config.corpus is not None else BUILTIN)
    if corpus != BUILTIN and not corpus.startswith("hf:"):
        corpus = str(Path(corpus).expanduser().resolve())
    return {
        "corpus": corpus,
        "text_column": config.text_column,
        "context_len": config.context_len,
        "replay_chunk": config.replay_chunk,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


def fit_device_of(model: PreTrainedModel) -> torch.device:
    """Where the gates of ``model`` are fitted by default: its first parameters' device (the CPU if that is
    ``meta``, as for weights accelerate offloaded to disk)."""
    device = next(model.parameters()).device
    return torch.device("cpu") if device.type == "meta" else device


def check_windows(windows: list[Window], config: TrainConfig) -> tuple[list[int], list[int]]:
    """The positions of the training and validation windows (:func:`split_windows`); refuses a corpus that cannot
    give both sides, or one training batch."""
    source = config.corpus or "builtin"
    if not windows:
        raise ValueError(f"the corpus gave no context window of at least {MIN_WINDOW} tokens: {source}")
    if len(windows) < 2:
        raise ValueError(
            f"the corpus {source} gives one context window of {len(windows[0].ids)} tokens; training needs at "
            f"least two (one is held out for validation): add text, raise --max-tokens or lower --context-len"
        )
    positions = split_windows([window.document for window in windows], config.val_fraction, config.fit.seed)
    train_positions = positions[0]
    train_tokens = sum(len(windows[i].ids) for i in train_positions)
    if train_tokens < config.fit.batch_tokens:
        raise ValueError(
            f"{train_tokens} training tokens are fewer than one batch of {config.fit.batch_tokens}; "
            "extract more text (--max-tokens) or lower --batch-tokens"
        )
    return positions


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
