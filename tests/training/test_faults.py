"""Training refuses what it cannot use before the long extraction, trains on one document, refuses another model's
shards, and a run killed at any phase resumes to bit-identical gates with no temporary file left."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import CONTEXT
from safetensors import safe_open

from fastkvzip_press.atomic import remove_stale_temporaries
from fastkvzip_press.models import tiny_model
from fastkvzip_press.training import FitConfig, TrainConfig, train
from fastkvzip_press.training.corpus import iter_documents
from fastkvzip_press.training.features import extract_features

FIT = FitConfig(steps=20, batch_tokens=200, rank=4, n_sink=4, eval_every=10, checkpoint_every=100, warmup_steps=5)


def one_document(tmp_path: Path, repeats: int = 10) -> Path:
    path = tmp_path / "book.txt"
    path.write_text(" ".join([CONTEXT] * repeats))
    return path


def test_one_text_file_trains_holding_out_its_last_windows(llama, tmp_path):
    model, tokenizer = llama
    config = TrainConfig(corpus=str(one_document(tmp_path)), context_len=256, max_tokens=None, fit=FIT)
    bank, report = train(model, tokenizer, tmp_path / "run", config, progress=False)
    assert report["val_documents"] == ["book.txt"] and report["val_tokens"] > 0 and report["train_tokens"] > 0
    assert len(bank.layer_ids) == len(model.model.layers)


@pytest.mark.parametrize(
    ("repeats", "fit", "words"),
    [(2, FIT, "gives one context window"), (3, FitConfig(batch_tokens=5000), "fewer than one batch of 5000")],
)
def test_a_corpus_too_small_fails_before_extracting(llama, tmp_path, repeats, fit, words):
    model, tokenizer = llama
    config = TrainConfig(corpus=str(one_document(tmp_path, repeats)), context_len=256, max_tokens=None, fit=fit)
    with pytest.raises(ValueError, match=words):
        train(model, tokenizer, tmp_path / "run", config, progress=False)
    assert not list((tmp_path / "run").rglob("shard_*"))


def test_shards_of_another_model_are_refused(llama, tmp_path):
    model, tokenizer = llama
    documents = list(iter_documents(one_document(tmp_path)))
    extract_features(model, tokenizer, documents, tmp_path / "features", context_len=256, progress=False)
    sibling, _ = tiny_model("llama")  # same shapes and weights, another name
    sibling.config.name_or_path = "org/another-model"
    with pytest.raises(ValueError, match="was extracted from model 'tiny-random-llama'.*--allow-other-model"):
        extract_features(sibling, tokenizer, documents, tmp_path / "features", context_len=256, progress=False)
    extract_features(
        sibling, tokenizer, documents, tmp_path / "features", context_len=256, progress=False, allow_other_model=True
    )


def test_stale_temporaries_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / "features" / f".shard_000001.safetensors.{dead.pid}.abcd1234.tmp"
    live = tmp_path / f".report.json.{os.getpid()}.abcd1234.tmp"
    old_style = tmp_path / "gates" / ".gates.json.k2j4h5g6.tmp"
    unrelated = tmp_path / ".editor-swap.tmp"
    for path in (stale, live, old_style, unrelated):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("partial")
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted([stale, old_style])
    assert live.exists() and unrelated.exists()


def gate_tensors(folder: Path) -> dict:
    with safe_open(str(folder / "gates" / "gates.safetensors"), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def test_training_killed_in_every_phase_resumes_to_the_same_gates(llama, tmp_path):
    model, tokenizer = llama
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, word in enumerate(["green", "blue", "grass", "sky"]):
        (corpus / f"doc{i}.txt").write_text(" ".join([CONTEXT.replace("green", word)] * 4))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def command(out: Path, resume: bool) -> list[str]:
        args = ["-q", "train", "--model", str(model_dir), "--corpus", str(corpus), "--out", str(out)]
        args += ["--context-len", "256", "--steps", "400", "--batch-tokens", "200", "--val-fraction", "0.25"]
        return [sys.executable, "-m", "fastkvzip_press.cli", *args, *(["--resume"] if resume else [])]

    reference = subprocess.run(command(tmp_path / "reference", False), env=env, capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr

    out, rng = tmp_path / "killed", random.Random(0)
    # Kill once the run is inside each phase: extracting (a shard is written), fitting (a checkpoint is written),
    # exporting (the gates are written, the report and curves not yet), each after a random delay.
    marks = [out / "features" / "shard_000000.safetensors", out / "fit_checkpoint.pt", out / "gates"]
    for kill_number, mark in enumerate(marks):
        process = subprocess.Popen(
            command(out, kill_number > 0), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 120
        while not mark.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.05))
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait()
    resumed = subprocess.run(command(out, True), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr

    ours, theirs = gate_tensors(out), gate_tensors(tmp_path / "reference")
    assert ours.keys() == theirs.keys() and all((ours[k] == theirs[k]).all() for k in ours)
    assert not list(out.rglob("*.tmp"))
