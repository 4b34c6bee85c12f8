"""Fitting gates: a planted gate is recovered; fitting layer by layer from streamed shards gives the gates of the
joint in-memory fit, on the device asked for, holding one layer's features at a time; an interrupted fit resumes to
the same gates; too little data fails."""

import weakref
from dataclasses import asdict, replace

import pytest
import torch
from helpers import CONTEXT

from fastkvzip_press import GateBank, ModelLayout
from fastkvzip_press.training import FitConfig
from fastkvzip_press.training import fit as fit_module
from fastkvzip_press.training.corpus import iter_documents
from fastkvzip_press.training.features import extract_features
from fastkvzip_press.training.fit import (
    EVAL_TOKENS,
    batch_positions,
    fit_gates,
    initial_gates,
    layer_losses,
    lr_factor,
)
from fastkvzip_press.training.shards import (
    FeatureSplit,
    LayerFeatures,
    LayerSource,
    ShardSet,
    load_split,
    split_by_document,
)

LAYOUT = ModelLayout(
    model_id="synthetic",
    num_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    num_kv_heads=2,
    head_dim=8,
    gated_layer_ids=(0, 1),
)


def planted_split(teacher: GateBank, n_tokens: int, seed: int) -> FeatureSplit:
    hidden = torch.randn(2, n_tokens, LAYOUT.hidden_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        scores = torch.stack([teacher.score(i, hidden[i][None])[0] for i in LAYOUT.gated_layer_ids])
    return FeatureSplit(hidden.to(torch.bfloat16).float(), scores, [f"doc{seed}"])


@pytest.fixture(scope="module")
def planted():
    teacher = GateBank.random(LAYOUT, rank=4, n_sink=4, seed=11)
    with torch.no_grad():
        for layer_id in teacher.layer_ids:
            teacher.gate(layer_id).q_proj.weight.mul_(3.0)  # sharper scores: a clear signal to recover
    return teacher, planted_split(teacher, 6000, seed=1), planted_split(teacher, 2000, seed=2)


CONFIG = FitConfig(steps=600, batch_tokens=500, rank=4, n_sink=4, eval_every=50, checkpoint_every=100, warmup_steps=20)


def test_fit_recovers_a_planted_gate(planted, tmp_path):
    teacher, train_split, val_split = planted
    untrained = initial_gates(LAYOUT, CONFIG)  # where the fit starts
    with torch.no_grad():
        initial, _ = layer_losses(untrained, val_split.hidden, val_split.scores, 0.05)
        floor, _ = layer_losses(teacher, val_split.hidden, val_split.scores, 0.05)  # entropy of soft targets
    bank, report = fit_gates(LAYOUT, train_split, val_split, CONFIG, tmp_path, progress=False)
    final = torch.tensor(report.val_loss_per_layer)
    assert (final - floor).sum() < 0.25 * (initial - floor).sum()
    with torch.no_grad():
        pred = torch.stack([bank.score(i, val_split.hidden[i][None])[0] for i in LAYOUT.gated_layer_ids])
    correlation = torch.corrcoef(torch.stack([pred.flatten(), val_split.scores.flatten()]))[0, 1]
    assert correlation > 0.9
    assert report.history.step[-1] == CONFIG.steps and len(report.history.val_loss) == 12


def joint_fit_reference(layout: ModelLayout, train: FeatureSplit, val: FeatureSplit, config: FitConfig):
    """The fit as it was before streaming: every layer in memory, one SGD over all gates, the loss summed over layers.

    Returns the gates, the final per-layer validation loss ``[L_g]`` and the summed training loss at each evaluation.
    """
    torch.manual_seed(config.seed)
    bank = initial_gates(layout, config)
    optimizer = torch.optim.SGD(bank.parameters(), lr=config.lr, momentum=config.momentum)
    train_curve = []
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(step, config)
        idx = batch_positions(step, train.num_tokens, config)
        losses, _ = layer_losses(bank, train.hidden[:, idx], train.scores[:, :, idx], config.metric_threshold)
        loss = losses.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            train_curve.append(loss.item())
    with torch.no_grad():
        val_losses, _ = layer_losses(
            bank, val.hidden[:, :EVAL_TOKENS], val.scores[:, :, :EVAL_TOKENS], config.metric_threshold
        )
    return bank, val_losses, train_curve


def assert_same_fit(bank: GateBank, report, reference) -> None:
    """``bank`` and ``report`` of :func:`fit_gates` against :func:`joint_fit_reference`'s result, within 1e-5."""
    expected, val_losses, train_curve = reference
    assert bank.layer_ids == expected.layer_ids
    for (name, ours), (_, theirs) in zip(bank.state_dict().items(), expected.state_dict().items()):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0, msg=name)
    torch.testing.assert_close(torch.tensor(report.val_loss_per_layer), val_losses, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(torch.tensor(report.history.train_loss), torch.tensor(train_curve), atol=1e-5, rtol=1e-6)


def test_fitting_layer_by_layer_gives_the_joint_fits_gates(planted, tmp_path):
    _, train_split, val_split = planted
    config = replace(CONFIG, steps=120)
    bank, report = fit_gates(LAYOUT, train_split, val_split, config, tmp_path, progress=False)
    assert_same_fit(bank, report, joint_fit_reference(LAYOUT, train_split, val_split, config))


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def tiny_shards(request, tiny_models, tmp_path_factory):
    """Feature shards of a tiny random model (gemma3: global layers only) over four documents, split by document."""
    model, tokenizer = tiny_models(request.param)
    folder = tmp_path_factory.mktemp(f"shards_{request.param}")
    for i, word in enumerate(["green", "blue", "grass", "sky"]):
        (folder / f"doc{i}.txt").write_text(" ".join([CONTEXT.replace("green", word)] * 3))
    documents = list(iter_documents(folder))
    paths = extract_features(model, tokenizer, documents, folder / "features", context_len=256, progress=False)
    return ModelLayout.from_model(model), *split_by_document(paths, 0.25)


def test_the_streamed_fit_equals_the_in_memory_joint_fit_on_tiny_models(tiny_shards, tmp_path):
    layout, train_paths, val_paths = tiny_shards
    config = FitConfig(steps=60, batch_tokens=200, rank=4, n_sink=4, eval_every=20, warmup_steps=5)
    bank, report = fit_gates(layout, ShardSet(train_paths), ShardSet(val_paths), config, tmp_path, progress=False)
    reference = joint_fit_reference(layout, load_split(train_paths), load_split(val_paths), config)
    assert_same_fit(bank, report, reference)
    assert report.device == "cpu" and report.read_seconds > 0


class Stop(Exception):
    """Ends a fit once what a test looks at has been seen."""


def test_the_fit_runs_on_the_device_it_is_given(planted, tmp_path, monkeypatch):
    """The gates and every batch sit on ``device`` (here ``meta``: no CUDA needed to see it threaded through)."""
    _, train_split, val_split = planted
    seen = []

    def spy(gate, hidden, scores, threshold):
        seen.append({next(gate.parameters()).device.type, hidden.device.type, scores.device.type})
        raise Stop

    monkeypatch.setattr(fit_module, "gate_loss", spy)
    with pytest.raises(Stop):
        fit_gates(LAYOUT, train_split, val_split, CONFIG, tmp_path, progress=False, device="meta")
    assert seen == [{"meta"}]
    monkeypatch.undo()
    bank, report = fit_gates(LAYOUT, train_split, val_split, replace(CONFIG, steps=2), tmp_path / "cpu", progress=False)
    assert report.device == "cpu" and next(bank.parameters()).device.type == "cpu"


class CountingSource:
    """A feature source that records, at each read, the layers whose features handed out earlier are still alive."""

    def __init__(self, inner: LayerSource, handed: list):
        self.inner, self.handed, self.alive_at_read = inner, handed, []

    @property
    def num_tokens(self) -> int:
        return self.inner.num_tokens

    @property
    def documents(self) -> list[str]:
        return self.inner.documents

    def layer(self, index: int, max_tokens: int | None = None) -> LayerFeatures:
        self.alive_at_read.append((index, {layer for layer, handle in self.handed if handle.alive}))
        features = self.inner.layer(index, max_tokens)
        for tensor in (features.hidden, features.scores):
            self.handed.append((index, weakref.finalize(tensor, lambda: None)))
        return features


def test_the_fit_holds_one_layers_features_at_a_time(tmp_path):
    layout = replace(LAYOUT, num_layers=4, gated_layer_ids=(0, 1, 2, 3))
    generator = torch.Generator().manual_seed(0)
    train_split = FeatureSplit(torch.randn(4, 1000, 32, generator=generator), torch.rand(4, 2, 1000), ["a"])
    val_split = FeatureSplit(torch.randn(4, 300, 32, generator=generator), torch.rand(4, 2, 300), ["b"])
    handed: list = []
    train_source, val_source = CountingSource(train_split, handed), CountingSource(val_split, handed)
    fit_gates(layout, train_source, val_source, replace(CONFIG, steps=3), tmp_path, progress=False)
    assert [index for index, _ in train_source.alive_at_read] == [0, 1, 2, 3]
    # When a layer is read, no other layer's features are alive; its own training features while its validation
    # features are read.
    assert [alive for _, alive in train_source.alive_at_read] == [set()] * 4
    assert val_source.alive_at_read == [(index, {index}) for index in range(4)]


def test_interrupted_fit_resumes_to_the_same_gates(planted, tmp_path, monkeypatch):
    """Interrupted in the second layer: the first comes back finished from the checkpoint, the second mid-fit."""
    _, train_split, val_split = planted
    config = replace(CONFIG, steps=160)
    reference, reference_report = fit_gates(LAYOUT, train_split, val_split, config, tmp_path / "a", progress=False)

    original = fit_module.batch_positions
    calls = []

    def interrupt(step, n_tokens, cfg):
        calls.append(step)
        if step == 130 and calls.count(130) == 2:  # layers run one after another: the second layer's step 130
            raise KeyboardInterrupt
        return original(step, n_tokens, cfg)

    monkeypatch.setattr(fit_module, "batch_positions", interrupt)
    with pytest.raises(KeyboardInterrupt):
        fit_gates(LAYOUT, train_split, val_split, config, tmp_path / "b", progress=False)
    monkeypatch.setattr(fit_module, "batch_positions", original)
    assert (tmp_path / "b" / fit_module.CHECKPOINT_NAME).exists()
    resumed, report = fit_gates(LAYOUT, train_split, val_split, config, tmp_path / "b", progress=False)
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    assert report.history.step[0] == 50  # the curves before the interruption came back with the checkpoint
    assert report.history == reference_report.history
    assert report.val_loss_per_layer == reference_report.val_loss_per_layer
    with pytest.raises(ValueError, match="another configuration"):
        fit_gates(LAYOUT, train_split, val_split, replace(config, lr=0.1), tmp_path / "b", progress=False)


def test_a_checkpoint_of_the_joint_fit_starts_the_fit_over(planted, tmp_path, caplog):
    """A checkpoint an earlier version wrote (every layer at one step) cannot resume one layer: the fit starts over,
    to the same gates."""
    _, train_split, val_split = planted
    config = replace(CONFIG, steps=30)
    reference, _ = fit_gates(LAYOUT, train_split, val_split, config, tmp_path / "a", progress=False)
    joint = initial_gates(LAYOUT, config)
    old = {"step": 20, "gates": joint.state_dict(), "optimizer": {}, "history": {}, "config": asdict(config)}
    (tmp_path / "b").mkdir()
    torch.save(old, tmp_path / "b" / fit_module.CHECKPOINT_NAME)
    with caplog.at_level("WARNING"):
        bank, _ = fit_gates(LAYOUT, train_split, val_split, config, tmp_path / "b", progress=False)
    assert "fitting from the start" in caplog.text
    for (name, a), (_, b) in zip(reference.state_dict().items(), bank.state_dict().items()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


def test_fit_refuses_too_little_data(planted, tmp_path):
    _, train_split, val_split = planted
    tiny = FeatureSplit(train_split.hidden[:, :10], train_split.scores[:, :, :10], ["d"])
    with pytest.raises(ValueError, match="fewer than one batch"):
        fit_gates(LAYOUT, tiny, val_split, CONFIG, tmp_path, progress=False)
