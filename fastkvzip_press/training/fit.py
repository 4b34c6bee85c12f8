"""Fitting one sink gate per gated layer to KVzip targets (the paper's defaults; docs/method.md#the-fit).

Loss: BCE with soft targets, mean over tokens, summed over KV heads and layers. Optimiser: SGD with momentum 0.9,
learning rate 0.2 with a linear warm-up to half the rate over ``warmup_steps``, the full rate until half of the
steps, then 0.5× and, from three quarters on, 0.25×. Batches: ``batch_tokens`` positions drawn without replacement
per epoch, the same positions for every layer. Metric: agreement of ``pred >= 0.05`` with ``target >= 0.05``.

Layers share no parameter and the loss is a sum over layers, so fitting the layers one after another with the same
batches and schedule gives the gates of one joint fit (each gate's gradient and SGD update are its own). The fit
therefore reads one layer's features at a time (:class:`~fastkvzip_press.training.shards.ShardSet`) and runs on
any device: its memory is one layer's features, not the whole set's.

A checkpoint (gates, the layer in progress, its step and optimiser, per-layer curves) is written atomically every
``checkpoint_every`` steps and at the end of each layer; a resumed fit continues from it and, because batches are
derived from the step number, draws the same batches it would have.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache, partial
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fastkvzip_press.atomic import atomic_write
from fastkvzip_press.checks import require_int, require_real
from fastkvzip_press.gates.gate import DEFAULT_RANK, DEFAULT_SINKS, GateBank, SinkGate
from fastkvzip_press.layout import ModelLayout
from fastkvzip_press.training.shards import LayerFeatures, LayerSource

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "fit_checkpoint.pt"
CHECKPOINT_FORMAT = 2  # 2: one layer at a time (layer index, its step and optimiser); 1 (no key): all layers jointly
EVAL_TOKENS = 20_000  # validation tokens read per layer: a fixed, bounded sample (the first ones, in shard order)


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
    read_seconds: float = 0.0  # of ``seconds``: reading features
    device: str = "cpu"


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
    order = _epoch_order(n_tokens, config.seed, epoch)
    return order[slot * config.batch_tokens : (slot + 1) * config.batch_tokens].clone()


@lru_cache(maxsize=2)
def _epoch_order(n_tokens: int, seed: int, epoch: int) -> torch.Tensor:
    # One permutation per epoch, not per step: at a million tokens a permutation costs milliseconds, and every layer
    # walks through the same epochs.
    return torch.randperm(n_tokens, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def gate_loss(
    gate: SinkGate, hidden: torch.Tensor, scores: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One gate's loss (BCE, mean over tokens, sum over heads) and accuracy, each a scalar.

    Args:
        hidden: ``[N, D]`` gate inputs; scores: ``[H, N]`` targets in [0, 1].
    """
    pred = gate(hidden.float().unsqueeze(0))[0]  # [H, N]
    target = scores.float()
    bce = F.binary_cross_entropy(pred.clamp(1e-7, 1 - 1e-7), target, reduction="none")
    return bce.mean(-1).sum(), ((pred >= threshold) == (target >= threshold)).float().mean()


def layer_losses(
    bank: GateBank, hidden: torch.Tensor, scores: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer loss (BCE, mean over tokens, sum over heads) and accuracy, each ``[L_g]``.

    Args:
        hidden: ``[L_g, N, D]`` gate inputs; scores: ``[L_g, H, N]`` targets in [0, 1].
    """
    pairs = [gate_loss(bank.gate(i), hidden[k], scores[k], threshold) for k, i in enumerate(bank.layer_ids)]
    return torch.stack([loss for loss, _ in pairs]), torch.stack([accuracy for _, accuracy in pairs])


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


@dataclass
class _Progress:
    """Where a fit stands: layers before ``layer`` are done; ``layer`` has taken ``step`` steps (with ``optimizer``,
    its SGD state, when ``step > 0``). Per-layer curves and final validation figures of the layers done so far."""

    layer: int = 0
    step: int = 0
    optimizer: dict | None = None
    curves: dict[str, list[list[float]]] = field(
        default_factory=lambda: {"train_loss": [], "val_loss": [], "val_accuracy": []}
    )
    final: list[tuple[float, float]] = field(default_factory=list)


def fit_gates(
    layout: ModelLayout,
    train: LayerSource,
    val: LayerSource,
    config: FitConfig,
    directory: str | Path,
    resume: bool = True,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> tuple[GateBank, FitReport]:
    """Fit a gate bank for ``layout`` on ``train``, validating on ``val``; checkpoints go to ``directory``.

    Layers are fitted one after another, each reading only its own features (``train.layer(i)``, and the first
    :data:`EVAL_TOKENS` of ``val.layer(i)``) and dropping them before the next is read. ``device`` (default CPU) is
    where the gates and the layer's features sit during the fit; the returned bank is on the CPU.
    """
    if train.num_tokens < config.batch_tokens:
        raise ValueError(
            f"{train.num_tokens} training tokens are fewer than one batch of {config.batch_tokens}; "
            "extract more text (--max-tokens) or lower --batch-tokens"
        )
    if val.num_tokens == 0:
        raise ValueError("no validation tokens: the corpus needs at least two documents")
    start_time, read_seconds = time.perf_counter(), 0.0
    device = torch.device("cpu" if device is None else device)
    torch.manual_seed(config.seed)
    bank = initial_gates(layout, config)
    checkpoint = Path(directory) / CHECKPOINT_NAME
    state = _Progress()
    if resume and checkpoint.exists():
        state = _load_checkpoint(checkpoint, bank, config) or state
    bank.to(device)

    n_layers = len(bank.layer_ids)
    bar = tqdm(
        desc="fit",
        initial=state.layer * config.steps + state.step,
        total=n_layers * config.steps,
        disable=not progress,
    )
    for index in range(state.layer, n_layers):
        read_start = time.perf_counter()
        features = train.layer(index).to(device)
        val_features = val.layer(index, EVAL_TOKENS).to(device)
        read_seconds += time.perf_counter() - read_start
        _fit_layer(bank, index, features, val_features, train.num_tokens, state, config, checkpoint, bar)
        del features, val_features  # before the next layer is read: one layer's features at a time
    bar.close()
    bank.to("cpu")
    eval_steps = [s for s in range(1, config.steps + 1) if s % config.eval_every == 0 or s == config.steps]
    report = FitReport(
        layer_ids=list(bank.layer_ids),
        val_loss_per_layer=[loss for loss, _ in state.final],
        val_accuracy_per_layer=[accuracy for _, accuracy in state.final],
        history=_combined_history(eval_steps, state.curves),
        seconds=time.perf_counter() - start_time,
        read_seconds=read_seconds,
        device=str(device),
    )
    return bank, report


def _fit_layer(
    bank: GateBank,
    index: int,
    features: LayerFeatures,
    val_features: LayerFeatures,
    n_tokens: int,
    state: _Progress,
    config: FitConfig,
    checkpoint: Path,
    bar: tqdm,
) -> None:
    """Fit the ``index``-th gated layer's gate on its ``features`` (resuming at ``state.step`` when ``state.layer``
    is this layer), recording its curves and final validation figures in ``state`` and checkpointing as it goes."""
    layer_id, threshold = bank.layer_ids[index], config.metric_threshold
    gate = bank.gate(layer_id)
    device = features.hidden.device
    optimizer = torch.optim.SGD(gate.parameters(), lr=config.lr, momentum=config.momentum)
    first_step = state.step if index == state.layer else 0
    if first_step:
        optimizer.load_state_dict(state.optimizer)
    else:
        for values in state.curves.values():
            values.append([])
    for step in range(first_step, config.steps):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(step, config)
        idx = batch_positions(step, n_tokens, config).to(device)
        loss, _ = gate_loss(gate, features.hidden[idx], features.scores[:, idx], threshold)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done = step + 1
        if done % config.eval_every == 0 or done == config.steps:
            with torch.no_grad():
                val_loss, val_acc = gate_loss(gate, val_features.hidden, val_features.scores, threshold)
            state.curves["train_loss"][index].append(loss.item())
            state.curves["val_loss"][index].append(val_loss.item())
            state.curves["val_accuracy"][index].append(val_acc.item())
            bar.set_postfix(layer=layer_id, loss=f"{loss.item():.3f}", val=f"{val_loss.item():.3f}")
        bar.update(1)
        if done == config.steps:
            state.final.append((val_loss.item(), val_acc.item()))
            state.layer, state.step, state.optimizer = index + 1, 0, None
            if index + 1 < len(bank.layer_ids):  # a finished layer is never fitted again
                _save_checkpoint(checkpoint, bank, state, config)
        elif done % config.checkpoint_every == 0:
            state.layer, state.step, state.optimizer = index, done, optimizer.state_dict()
            _save_checkpoint(checkpoint, bank, state, config)


def _combined_history(steps: list[int], curves: dict[str, list[list[float]]]) -> FitHistory:
    """The whole bank's curves from per-layer ones: losses summed over layers, accuracy averaged."""
    columns = {name: torch.tensor(values, dtype=torch.float32) for name, values in curves.items()}  # [L_g, E]
    return FitHistory(
        step=steps,
        train_loss=columns["train_loss"].sum(0).tolist(),
        val_loss=columns["val_loss"].sum(0).tolist(),
        val_accuracy=columns["val_accuracy"].mean(0).tolist(),
    )


def _save_checkpoint(path: Path, bank: GateBank, state: _Progress, config: FitConfig) -> None:
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": asdict(config),
        "gates": {name: tensor.cpu() for name, tensor in bank.state_dict().items()},
        "layer": state.layer,
        "step": state.step,
        "optimizer": state.optimizer,
        "curves": state.curves,
        "final": [list(pair) for pair in state.final],
    }
    atomic_write(path, partial(torch.save, payload))


def _load_checkpoint(path: Path, bank: GateBank, config: FitConfig) -> _Progress | None:
    """Restore ``bank`` from a checkpoint and return where the fit stands; ``None`` for a checkpoint of the joint
    fit of earlier versions (the fit then starts over: same data, same gates)."""
    payload = torch.load(path, weights_only=True, map_location="cpu")
    if payload["config"] != asdict(config):
        raise ValueError(f"{path} was written with another configuration; remove it or pass the same options")
    if payload.get("format") != CHECKPOINT_FORMAT:
        logger.warning("%s holds a fit of all layers at once (an earlier version); fitting from the start", path)
        return None
    bank.load_state_dict(payload["gates"])
    logger.info("resuming the fit at layer %d, step %d", payload["layer"], payload["step"])
    return _Progress(
        layer=payload["layer"],
        step=payload["step"],
        optimizer=payload["optimizer"],
        curves=payload["curves"],
        final=[tuple(pair) for pair in payload["final"]],
    )
