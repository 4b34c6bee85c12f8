"""The training workflow: corpus sources, feature shards (resumable, split by document), export, the train command."""

import json
from dataclasses import replace

import pytest
import torch
from helpers import CONTEXT, QUESTIONS, make_pipeline

from fastkvzip_press import FastKVzipPress, FastKVzipScorerPress, ModelLayout, load_gates
from fastkvzip_press.cli import main
from fastkvzip_press.training import FitConfig, TrainConfig, iter_documents, train, workflow
from fastkvzip_press.training.features import extract_features, read_shard_metadata
from fastkvzip_press.training.shards import split_by_document

CONFIG = FitConfig(steps=20, batch_tokens=200, rank=4, n_sink=4, eval_every=10, checkpoint_every=100, warmup_steps=5)


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
        corpus=str(corpus_dir), context_len=256, max_tokens=None, val_fraction=0.25, fit=replace(CONFIG)
    )
    config.fit.batch_tokens = 200
    bank, report = train(model, tokenizer, tmp_path / "run", config, progress=False)
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["layer_ids"] == list(bank.layer_ids) and set(saved["times"]) == {"features_s", "load_s", "fit_s"}
    assert saved["fit_device"] == "cpu"  # the model's device
    gates = load_gates(tmp_path / "run" / "gates", model)
    assert gates.metadata.training["train_tokens"] == report["train_tokens"]
    pipe = make_pipeline(model, tokenizer)
    for press in (FastKVzipPress(0.5, gates=gates, window_size=4), FastKVzipScorerPress(0.5, gates=gates)):
        assert isinstance(pipe(CONTEXT, question=QUESTIONS[0], press=press, max_new_tokens=2)["answer"], str)


class Stop(Exception):
    """Ends a run once the fit's arguments have been seen."""


def test_train_fits_on_the_device_asked_for_or_the_models(llama, corpus_dir, tmp_path, monkeypatch):
    """``device`` reaches the fit (``meta`` stands in for a GPU); by default the fit runs where the model runs, which
    is where ``train --device`` puts it."""
    model, tokenizer = llama
    seen = []

    def spy(*args, device=None, **kwargs):
        seen.append(device)
        raise Stop

    monkeypatch.setattr(workflow, "fit_gates", spy)
    config = TrainConfig(corpus=str(corpus_dir), context_len=256, max_tokens=None, val_fraction=0.25, fit=CONFIG)
    for device in (None, "meta"):
        with pytest.raises(Stop):
            train(model, tokenizer, tmp_path / "run", config, progress=False, device=device)
    assert seen == [torch.device("cpu"), torch.device("meta")]
    assert workflow.fit_device_of(torch.nn.Linear(2, 2, device="meta")) == torch.device("cpu")  # offloaded weights


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
