"""Gate training: corpus, feature shards, fitting (planted gate, resume), export and the train command."""

import json
from dataclasses import replace

import pytest
import torch
from conftest import CONTEXT, QUESTIONS, make_pipeline

from fastkvzip_press import FastKVzipPress, FastKVzipScorerPress, GateBank, ModelLayout, load_gates
from fastkvzip_press.cli import main
from fastkvzip_press.training import FitConfig, TrainConfig, iter_documents, train
from fastkvzip_press.training import fit as fit_module
from fastkvzip_press.training.features import FeatureSplit, extract_features, read_shard_metadata, split_by_document
from fastkvzip_press.training.fit import fit_gates, layer_losses

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
    untrained = GateBank.random(LAYOUT, rank=4, n_sink=4, seed=0)
    fit_module._init_for_training(untrained)
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


@pytest.fixture()
def corpus_dir(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, word in enumerate(["green", "blue", "grass", "sky"]):
        (folder / f"doc{i}.txt").write_text(" ".join([CONTEXT.replace("green", word)] * 3))
    return folder


def test_corpus_sources(corpus_dir, tmp_path):
    documents = list(iter_documents(corpus_dir))
    assert [d.name for d in documents] == ["doc0.txt", "doc1.txt", "doc2.txt", "doc3.txt"]
    builtin = list(iter_documents("builtin"))
    assert len(builtin) > 20 and sum(len(d.text) for d in builtin) > 300_000  # offline English text
    with pytest.raises(FileNotFoundError, match="builtin"):
        list(iter_documents(tmp_path / "missing"))


def test_feature_shards_resume_and_split(llama, corpus_dir, tmp_path):
    model, tokenizer = llama
    documents = list(iter_documents(corpus_dir))
    out = tmp_path / "features"
    paths = extract_features(model, tokenizer, documents, out, context_len=256, progress=False)
    assert len(paths) >= 4
    meta = read_shard_metadata(paths[0])
    assert meta["document"] == "doc0.txt" and meta["layer_ids"] == list(ModelLayout.from_model(model).gated_layer_ids)
    stamps = [p.stat().st_mtime_ns for p in paths]
    again = extract_features(model, tokenizer, documents, out, context_len=256, progress=False)
    assert again == paths and [p.stat().st_mtime_ns for p in paths] == stamps  # resumed: nothing recomputed
    train_paths, val_paths = split_by_document(paths, 0.25)
    train_docs = {read_shard_metadata(p)["document"] for p in train_paths}
    val_docs = {read_shard_metadata(p)["document"] for p in val_paths}
    assert val_docs and not train_docs & val_docs  # held out by document
    paths[0].write_bytes(b"not a shard")
    with pytest.raises(ValueError, match="unreadable"):
        extract_features(model, tokenizer, documents, out, context_len=256, progress=False)


def test_train_exports_gates_that_both_presses_load(llama, corpus_dir, tmp_path):
    model, tokenizer = llama
    config = TrainConfig(
        corpus=str(corpus_dir), context_len=256, max_tokens=None, val_fraction=0.25, fit=replace(CONFIG, steps=20)
    )
    config.fit.batch_tokens = 200
    bank, report = train(model, tokenizer, tmp_path / "run", config, progress=False)
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["layer_ids"] == list(bank.layer_ids) and set(saved["times"]) == {"features_s", "load_s", "fit_s"}
    gates = load_gates(tmp_path / "run" / "gates", model)
    assert gates.metadata.training["train_tokens"] == report["train_tokens"]
    pipe = make_pipeline(model, tokenizer)
    for press in (FastKVzipPress(0.5, gates=gates, window_size=4), FastKVzipScorerPress(0.5, gates=gates)):
        assert isinstance(pipe(CONTEXT, question=QUESTIONS[0], press=press, max_new_tokens=2)["answer"], str)


def test_train_command(llama, corpus_dir, tmp_path, capsys):
    model, tokenizer = llama
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    args = ["-q", "train", "--model", str(model_dir), "--corpus", str(corpus_dir), "--out", str(tmp_path / "run")]
    args += ["--context-len", "256", "--steps", "10", "--batch-tokens", "200", "--val-fraction", "0.25"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "val accuracy" in out and "mean" in out and "Gates:" in out
    assert main(args) == 2  # a second run into the same folder must say --resume
    assert "--resume" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0
