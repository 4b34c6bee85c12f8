"""Fitting gates: a planted gate is recovered, an interrupted fit resumes to the same gates, too little data fails."""

from dataclasses import replace

import pytest
import torch

from fastkvzip_press import GateBank, ModelLayout
from fastkvzip_press.training import FitConfig
from fastkvzip_press.training import fit as fit_module
from fastkvzip_press.training.features import FeatureSplit
from fastkvzip_press.training.fit import fit_gates, initial_gates, layer_losses

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


def test_interrupted_fit_resumes_to_the_same_gates(planted, tmp_path, monkeypatch):
    _, train_split, val_split = planted
    config = replace(CONFIG, steps=160)
    reference, _ = fit_gates(LAYOUT, train_split, val_split, config, tmp_path / "a", progress=False)

    original = fit_module.batch_positions

    def interrupt(step, n_tokens, cfg):
        if step == 130:
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
    with pytest.raises(ValueError, match="another configuration"):
        fit_gates(LAYOUT, train_split, val_split, replace(config, lr=0.1), tmp_path / "b", progress=False)


def test_fit_refuses_too_little_data(planted, tmp_path):
    _, train_split, val_split = planted
    tiny = FeatureSplit(train_split.hidden[:, :10], train_split.scores[:, :, :10], ["d"])
    with pytest.raises(ValueError, match="fewer than one batch"):
        fit_gates(LAYOUT, tiny, val_split, CONFIG, tmp_path, progress=False)
