"""Fitting one sink gate per gated layer to KVzip targets (research/fastkvzip.md §2.5 defaults).

Loss: BCE with soft targets, mean over tokens, summed over KV heads and layers. Optimiser: SGD with momentum 0.9,
learning rate 0.2 with a linear warm-up to half the rate over ``warmup_steps``, the full rate until half of the
steps, then 0.5× and, from three quarters on, 0.25×. Batches: ``batch_tokens`` positions drawn without replacement
per epoch, the same positions for every layer. Metric: agreement of ``pred >= 0.05`` with ``target >= 0.05``.

A checkpoint (gates, optimiser, history) is written atomically every ``checkpoint_every`` steps; a resumed fit
continues from it and, because batches are derived from the step number, draws the same batches it would have.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fastkvzip_press.checks import require_int, require_real
from fastkvzip_press.gates.atomic import atomic_write
from fastkvzip_press.gates.gate import DEFAULT_RANK, DEFAULT_SINKS, GateBank
from fastkvzip_press.gates.layout import ModelLayout
from fastkvzip_press.training.features import FeatureSplit

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "fit_checkpoint.pt"


@dataclass
class FitConfig:
    """Gate-fitting hyperparameters (defaults: the paper's)."""

    steps: int = 5000
    lr: float = 0.2
    momentum: float = 0.9
    batch_tokens: int = 1000
    warmup_steps: int = 50
    rank: int = DEFAULT_RANK
    n_sink: int = DEFAULT_SINKS
    eval_every: int = 50
    checkpoint_every: int = 250
    metric_threshold: float = 0.05
    seed: int = 0

    def __post_init__(self):
        require_int("steps", self.steps, 1)
        require_real("lr", self.lr, 0, low_open=True)
        require_real("momentum", self.momentum, 0, 1, high_open=True)
        require_int("batch_tokens", self.batch_tokens, 1)
        require_int("warmup_steps", self.warmup_steps, 0)
        require_int("rank", self.rank, 1)
        require_int("n_sink", self.n_sink, 1)
        require_int("eval_every", self.eval_every, 1)
        require_int("checkpoint_every", self.checkpoint_every, 1)
        require_real("metric_threshold", self.metric_threshold, 0, 1, low_open=True, high_open=True)
        require_int("seed", self.seed, 0)


@dataclass
class FitHistory:
    """Curves: ``step``, training loss (summed over layers and heads), validation loss and accuracy."""

    step: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)


@dataclass
class FitReport:
    """Result of a fit: per-layer validation loss/accuracy at the end, curves and wall time."""

    layer_ids: list[int]
    val_loss_per_layer: list[float]
    val_accuracy_per_layer: list[float]
    history: FitHistory
    seconds: float


def lr_factor(step: int, config: FitConfig) -> float:
    """The schedule's multiplier of ``config.lr`` at ``step`` (0-based)."""
    if step < config.warmup_steps:
        return 0.5 * step / config.warmup_steps
    if step < config.steps // 2:
        return 1.0
    if step < 3 * config.steps // 4:
        return 0.5
    return 0.25


def batch_positions(step: int, n_tokens: int, config: FitConfig) -> torch.Tensor:
    """Token positions of ``step``'s batch: consecutive slices of one permutation per epoch (seeded by epoch)."""
    per_epoch = max(1, n_tokens // config.batch_tokens)
    epoch, slot = divmod(step, per_epoch)
    order = torch.randperm(n_tokens, generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch))
    return order[slot * config.batch_tokens : (slot + 1) * config.batch_tokens]


def layer_losses(
    bank: GateBank, hidden: torch.Tensor, scores: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer loss (BCE, mean over tokens, sum over heads) and accuracy, each ``[L_g]``.

    Args:
        hidden: ``[L_g, N, D]`` gate inputs; scores: ``[L_g, H, N]`` targets in [0, 1].
    """
    losses, accuracies = [], []
    for index, layer_id in enumerate(bank.layer_ids):
        pred = bank.gate(layer_id)(hidden[index].float().unsqueeze(0))[0]  # [H, N]
        target = scores[index].float()
        bce = F.binary_cross_entropy(pred.clamp(1e-7, 1 - 1e-7), target, reduction="none")
        losses.append(bce.mean(-1).sum())
        accuracies.append(((pred >= threshold) == (target >= threshold)).float().mean())
    return torch.stack(losses), torch.stack(accuracies)


def _evaluate(bank: GateBank, split: FeatureSplit, config: FitConfig, max_tokens: int = 20_000):
    idx = torch.arange(split.num_tokens)[:max_tokens]  # a fixed, bounded validation sample
    with torch.no_grad():
        return layer_losses(bank, split.hidden[:, idx], split.scores[:, :, idx], config.metric_threshold)


def initial_gates(layout: ModelLayout, config: FitConfig) -> GateBank:
    """The gates a fit starts from: random projections (seeded by ``config.seed``), zero bias and small sink keys, so
    that initial scores sit near 1 / (1 + S) for every token."""
    bank = GateBank.random(layout, rank=config.rank, n_sink=config.n_sink, seed=config.seed)
    with torch.no_grad():
        for layer_id in bank.layer_ids:
            gate = bank.gate(layer_id)
            gate.b.zero_()
            gate.k_base.mul_(0.1)
    return bank


def fit_gates(
    layout: ModelLayout,
    train: FeatureSplit,
    val: FeatureSplit,
    config: FitConfig,
    directory: str | Path,
    resume: bool = True,
    progress: bool = True,
) -> tuple[GateBank, FitReport]:
    """Fit a gate bank for ``layout`` on ``train``, validating on ``val``; checkpoints go to ``directory``."""
    if train.num_tokens < config.batch_tokens:
        raise ValueError(
            f"{train.num_tokens} training tokens are fewer than one batch of {config.batch_tokens}; "
            "extract more text (--max-tokens) or lower --batch-tokens"
        )
    if val.num_tokens == 0:
        raise ValueError("no validation tokens: the corpus needs at least two documents")
    start_time = time.perf_counter()
    directory = Path(directory)
    torch.manual_seed(config.seed)
    bank = initial_gates(layout, config)
    optimizer = torch.optim.SGD(bank.parameters(), lr=config.lr, momentum=config.momentum)
    history, first_step = FitHistory(), 0
    checkpoint = directory / CHECKPOINT_NAME
    if resume and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        if state["config"] != asdict(config):
            raise ValueError(f"{checkpoint} was written with another configuration; remove it or pass the same options")
        bank.load_state_dict(state["gates"])
        optimizer.load_state_dict(state["optimizer"])
        history, first_step = FitHistory(**state["history"]), state["step"]
        logger.info("resuming the fit at step %d", first_step)

    bar = tqdm(
        range(first_step, config.steps), desc="fit", initial=first_step, total=config.steps, disable=not progress
    )
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(step, config)
        idx = batch_positions(step, train.num_tokens, config)
        losses, _ = layer_losses(bank, train.hidden[:, idx], train.scores[:, :, idx], config.metric_threshold)
        loss = losses.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done = step + 1
        if done % config.eval_every == 0 or done == config.steps:
            val_losses, val_acc = _evaluate(bank, val, config)
            history.step.append(done)
            history.train_loss.append(loss.item())
            history.val_loss.append(float(val_losses.sum()))
            history.val_accuracy.append(float(val_acc.mean()))
            bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{history.val_loss[-1]:.3f}")
        if done % config.checkpoint_every == 0 and done < config.steps:
            state = {
                "step": done,
                "gates": bank.state_dict(),
                "optimizer": optimizer.state_dict(),
                "history": asdict(history),
                "config": asdict(config),
            }
            atomic_write(checkpoint, partial(torch.save, state))
    bar.close()
    val_losses, val_acc = _evaluate(bank, val, config)
    report = FitReport(
        layer_ids=list(bank.layer_ids),
        val_loss_per_layer=val_losses.tolist(),
        val_accuracy_per_layer=val_acc.tolist(),
        history=history,
        seconds=time.perf_counter() - start_time,
    )
    return bank, report
