"""Training over several processes: torchrun ranks split the extraction into the shards one process writes, rank 0
fits the same gates, a killed rank resumes, and a device-mapped model extracts the same features."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from helpers import CONTEXT
from safetensors import safe_open

from fastkvzip_press.cli import main
from fastkvzip_press.training import Ranks
from fastkvzip_press.training.corpus import iter_documents
from fastkvzip_press.training.features import plan_windows, write_shards

# The console scripts beside this interpreter (the virtual environment's bin/).
BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TRAIN_ARGS = ["--context-len", "256", "--steps", "60", "--batch-tokens", "200", "--val-fraction", "0.25"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_models):
    """A tiny model saved to a folder, a corpus of four documents, and the single-process run to compare with."""
    root = tmp_path_factory.mktemp("distributed")
    model, tokenizer = tiny_models("llama")
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    corpus = root / "corpus"
    corpus.mkdir()
    for i, word in enumerate(["green", "blue", "grass", "sky"]):
        (corpus / f"doc{i}.txt").write_text(" ".join([CONTEXT.replace("green", word)] * 4))
    reference = root / "reference"
    # One process, the model placed by accelerate's device map: the features must not depend on it.
    run = subprocess.run(
        command(root, reference, ["--device-map", "auto"]), env=ENV, capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stderr
    return root, reference


def command(root: Path, out: Path, extra: list[str] = (), ranks: int = 1) -> list[str]:
    """The README's commands: ``fastkvzip-press train ...``, under ``torchrun --standalone`` for several ranks."""
    args = ["-q", "train", "--model", str(root / "model"), "--corpus", str(root / "corpus"), "--out", str(out)]
    train = [str(BIN / "fastkvzip-press"), *args, *TRAIN_ARGS, *extra]
    if ranks == 1:
        return train
    return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(ranks), *train]


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted((out / "features").glob("shard_*.safetensors"))}


def gate_tensors(out: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(out / "gates" / "gates.safetensors"), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def assert_same_run(out: Path, reference: Path) -> None:
    ours, theirs = shard_bytes(out), shard_bytes(reference)
    assert len(theirs) >= 4 and ours.keys() == theirs.keys()
    assert all(ours[name] == theirs[name] for name in ours), "shards differ from the single-process run"
    gates, expected = gate_tensors(out), gate_tensors(reference)
    assert gates.keys() == expected.keys()
    for name in gates:
        torch.testing.assert_close(gates[name].float(), expected[name].float(), atol=1e-5, rtol=0)
    assert not list(out.rglob("*.tmp"))


def test_ranks_come_from_torchruns_environment(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert Ranks.from_environment() == Ranks(0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    ranks = Ranks.from_environment()
    assert ranks == Ranks(3, 4, 1) and ranks.distributed and not ranks.is_main
    assert [p for p in range(10) if ranks.owns(p)] == [3, 7]
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="outside WORLD_SIZE=4"):
        Ranks.from_environment()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="must be integers"):
        Ranks.from_environment()


def test_each_rank_runs_on_its_own_device():
    assert Ranks(1, 2, 1).device("cuda") == torch.device("cuda", 1)  # "cuda": this rank's GPU
    assert Ranks(1, 2, 1).device("cuda:0") == torch.device("cuda", 0)  # an explicit index is kept
    assert Ranks(1, 2, 1).device("cpu") == torch.device("cpu")
    expected = torch.device("cuda", 1) if torch.cuda.is_available() else torch.device("cpu")
    assert Ranks(1, 2, 1).device() == expected


def test_ranks_write_the_shards_of_one_process(llama, tmp_path):
    """Each rank extracts every other window of the same plan; together they write the same files as one process."""
    model, tokenizer = llama
    (tmp_path / "book.txt").write_text(" ".join([CONTEXT] * 8))
    windows = plan_windows(tokenizer, iter_documents(tmp_path / "book.txt"), 256)
    alone = write_shards(model, tokenizer, windows, tmp_path / "alone", progress=False)
    for rank in (1, 0):
        paths = write_shards(model, tokenizer, windows, tmp_path / "ranks", progress=False, ranks=Ranks(rank, 2))
        assert [p.name for p in paths] == [p.name for p in alone]
        written = sorted(p.name for p in (tmp_path / "ranks").glob("shard_*"))
        assert (rank == 0) == (len(written) == len(alone))  # after rank 1 alone: only its half
    assert all(a.read_bytes() == (tmp_path / "ranks" / a.name).read_bytes() for a in alone)


def test_two_gloo_ranks_train_the_gates_of_one_process(setup):
    root, reference = setup
    out = root / "two_ranks"
    run = subprocess.run(command(root, out, ranks=2), env=ENV, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("Model: ") == 1  # rank 0 reports, once
    assert_same_run(out, reference)


@pytest.mark.parametrize("victim", ["0", "1"])
def test_a_killed_rank_resumes_to_the_same_shards_and_gates(setup, victim):
    root, reference = setup
    out = root / f"killed_{victim}"
    launcher = subprocess.Popen(
        command(root, out, ranks=2), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    # Kill one rank once the ranks are extracting (a shard is on disk); torchrun then stops the other.
    deadline = time.monotonic() + 180
    while not list((out / "features").glob("shard_*")) and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    workers = [child for child in psutil.Process(launcher.pid).children(recursive=True) if _rank_of(child) == victim]
    for worker in workers:
        worker.send_signal(signal.SIGKILL)
    launcher.wait(timeout=300)
    assert workers and launcher.returncode != 0
    resumed = subprocess.run(
        command(root, out, ["--resume"], ranks=2), env=ENV, capture_output=True, text=True, check=False
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(out, reference)


def _rank_of(process: psutil.Process) -> str | None:
    try:
        return process.environ().get("RANK")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def test_a_device_map_is_refused_under_torchrun(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["train", "--out", str(tmp_path / "run"), "--device-map", "auto"]) == 2
    assert "--device-map shards one model" in capsys.readouterr().err
