"""The bad-input matrix: every public knob of the presses, the gate files' functions, the training configuration and
every command's flags, each with wrong types, ranges and combinations, and the words its error must contain.

Errors come from construction or argument parsing, before any model runs, and name the knob.
"""

import math
from pathlib import Path

import pytest
import torch

from fastkvzip_press import (
    FastKVzipDecodingPress,
    FastKVzipPress,
    FastKVzipScorerPress,
    GateBank,
    GateFileError,
    GateFileNotFoundError,
    ModelLayout,
    load_gates,
    save_gates,
)
from fastkvzip_press.cli import build_parser, main
from fastkvzip_press.training import FitConfig, TrainConfig

PRESS_CASES = [
    # FastKVzipPress
    (FastKVzipPress, {"compression_ratio": "0.5"}, "compression_ratio must be a number"),
    (FastKVzipPress, {"compression_ratio": True}, "compression_ratio must be a number"),
    (FastKVzipPress, {"compression_ratio": 1.0}, "compression_ratio must be in [0, 1)"),
    (FastKVzipPress, {"compression_ratio": -0.1}, "compression_ratio must be in [0, 1)"),
    (FastKVzipPress, {"compression_ratio": math.nan}, "compression_ratio must be in"),
    (FastKVzipPress, {"threshold": "0.1"}, "threshold must be a number"),
    (FastKVzipPress, {"threshold": 1.5}, "threshold must be in [0, 1]"),
    (FastKVzipPress, {"threshold": -0.5}, "threshold must be in [0, 1]"),
    (FastKVzipPress, {"threshold": 0.1, "compression_ratio": 0.5}, "either compression_ratio or threshold"),
    (FastKVzipPress, {"uniform": "yes"}, "uniform must be"),
    (FastKVzipPress, {"uniform": True, "threshold": 0.1}, "uniform=True keeps a count per (layer, head)"),
    (FastKVzipPress, {"uniform": True, "layerwise": True, "compression_ratio": 0.5}, "give layerwise=True"),
    (FastKVzipPress, {"n_sink": 2.5}, "n_sink must be an integer"),
    (FastKVzipPress, {"n_sink": "4"}, "n_sink must be an integer"),
    (FastKVzipPress, {"n_sink": True}, "n_sink must be an integer"),
    (FastKVzipPress, {"n_sink": -1}, "n_sink must be >= 0"),
    (FastKVzipPress, {"window_size": "8"}, "window_size (tokens) must be an integer"),
    (FastKVzipPress, {"window_size": None}, "window_size (tokens) must be an integer"),
    (FastKVzipPress, {"window_size": -1}, "window_size (tokens) must be >= 0"),
    (FastKVzipPress, {"window_size": 1.5}, "a float is a fraction of the context"),
    (FastKVzipPress, {"window_size": 0.0}, "a float is a fraction of the context"),
    (FastKVzipPress, {"layerwise": "no"}, "layerwise must be True or False"),
    (FastKVzipPress, {"layerwise": 1}, "layerwise must be True or False"),
    (FastKVzipPress, {"compaction": "fast"}, "compaction must be one of ('ragged', 'masked')"),
    (FastKVzipPress, {"compaction": None}, "compaction must be one of"),
    (FastKVzipPress, {"chunk_size": 2.5}, "chunk_size (a token count, or None for one pass) must be an integer"),
    (FastKVzipPress, {"chunk_size": "512"}, "chunk_size (a token count, or None for one pass) must be an integer"),
    (FastKVzipPress, {"chunk_size": 0}, "chunk_size (a token count, or None for one pass) must be >= 1"),
    (FastKVzipPress, {"chunk_size": 512, "compaction": "masked"}, "needs compaction='ragged'"),
    (FastKVzipPress, {"gates": 5}, "gates must be None"),
    (FastKVzipPress, {"gates": ""}, "gates is an empty string"),
    # FastKVzipDecodingPress
    (FastKVzipDecodingPress, {"window_size": 0.02}, "window_size of FastKVzipDecodingPress is a token count"),
    (FastKVzipDecodingPress, {"window_size": "8"}, "window_size of FastKVzipDecodingPress (tokens) must be an int"),
    (FastKVzipDecodingPress, {"window_size": -1}, "window_size of FastKVzipDecodingPress (tokens) must be >= 0"),
    (FastKVzipDecodingPress, {"n_sink": 2.5}, "n_sink must be an integer"),
    (FastKVzipDecodingPress, {"target_size": 0}, "target_size (pairs per head) must be >= 1"),
    (FastKVzipDecodingPress, {"target_size": 2.5}, "target_size (pairs per head) must be an integer"),
    (FastKVzipDecodingPress, {"target_size": "2048"}, "target_size (pairs per head) must be an integer"),
    (FastKVzipDecodingPress, {"compression_interval": 0}, "compression_interval (new tokens) must be >= 1"),
    (FastKVzipDecodingPress, {"compression_interval": 1.5}, "compression_interval (new tokens) must be an integer"),
    (FastKVzipDecodingPress, {"compression_ratio": 1.0}, "compression_ratio must be in [0, 1)"),
    (FastKVzipDecodingPress, {"compression_ratio": "0.5"}, "compression_ratio must be a number"),
    (FastKVzipDecodingPress, {"compaction": "dense"}, "compaction must be one of"),
    (FastKVzipDecodingPress, {"hidden_states_buffer_size": -1}, "hidden_states_buffer_size must be >= 0"),
    (FastKVzipDecodingPress, {"target_size": 100, "window_size": 100}, "protect at least target_size"),
    (FastKVzipDecodingPress, {"base_press": "knorm"}, "base_press must be a kvpress ScorerPress"),
    (FastKVzipDecodingPress, {"gates": 3}, "gates must be None"),
    # FastKVzipScorerPress
    (FastKVzipScorerPress, {"compression_ratio": "0.5"}, "compression_ratio must be a number"),
    (FastKVzipScorerPress, {"compression_ratio": 1.0}, "compression_ratio must be in [0, 1)"),
    (FastKVzipScorerPress, {"compression_ratio": -0.5}, "compression_ratio must be in [0, 1)"),
    (FastKVzipScorerPress, {"gates": ["a"]}, "gates must be None"),
]


@pytest.mark.parametrize(("press", "kwargs", "words"), PRESS_CASES, ids=lambda case: str(case)[:60])
def test_press_knobs(press, kwargs, words):
    with pytest.raises(ValueError) as error:  # type errors are ValueErrors too: one except catches every bad knob
        press(**kwargs)
    assert words in str(error.value)


TRAINING_CASES = [
    (FitConfig, {"steps": 0}, "steps must be >= 1"),
    (FitConfig, {"steps": 2.5}, "steps must be an integer"),
    (FitConfig, {"batch_tokens": 0}, "batch_tokens must be >= 1"),
    (FitConfig, {"lr": 0}, "lr must be in (0, inf]"),
    (FitConfig, {"lr": "0.2"}, "lr must be a number"),
    (FitConfig, {"momentum": 1.0}, "momentum must be in [0, 1)"),
    (FitConfig, {"rank": 0}, "rank must be >= 1"),
    (FitConfig, {"n_sink": 0}, "n_sink must be >= 1"),
    (FitConfig, {"eval_every": 0}, "eval_every must be >= 1"),
    (FitConfig, {"seed": -1}, "seed must be >= 0"),
    (TrainConfig, {"context_len": 100}, "context_len (tokens per training context) must be >= 256"),
    (TrainConfig, {"max_tokens": 10}, "max_tokens (context tokens to extract) must be >= 256"),
    (TrainConfig, {"val_fraction": 0}, "val_fraction must be in (0, 1)"),
    (TrainConfig, {"val_fraction": 1}, "val_fraction must be in (0, 1)"),
    (TrainConfig, {"corpus": 3}, "corpus must be a path"),
    (TrainConfig, {"fit": {"steps": 3}}, "fit must be a FitConfig"),
]


@pytest.mark.parametrize(("config", "kwargs", "words"), TRAINING_CASES, ids=lambda case: str(case)[:60])
def test_training_configuration(config, kwargs, words):
    with pytest.raises(ValueError) as error:
        config(**kwargs)
    assert words in str(error.value)


def test_gate_functions(llama, tmp_path):
    model, _ = llama
    bank = GateBank.random(ModelLayout.from_model(model))
    cases = [
        (lambda: load_gates(42), ValueError, "gates must be None, a path"),
        (lambda: load_gates(tmp_path / "missing"), GateFileNotFoundError, "does not exist"),
        (lambda: load_gates("./missing/gates"), GateFileNotFoundError, "does not exist"),
        (lambda: load_gates("gates.safetensors", model), GateFileNotFoundError, "does not exist"),
        (lambda: load_gates(bank, model, allow_other_model="yes"), ValueError, "allow_other_model must be True"),
        (lambda: load_gates(bank, "HuggingFaceTB/SmolLM2-135M-Instruct"), ValueError, "model must be a loaded"),
        (lambda: save_gates("bank", tmp_path), ValueError, "save_gates saves a GateBank"),
        (lambda: save_gates(bank, None), ValueError, "needs a folder path"),
    ]
    file = tmp_path / "a_file"
    file.write_text("x")
    cases.append((lambda: save_gates(bank, file), GateFileError, "is a file"))
    for call, kind, words in cases:
        with pytest.raises(kind) as error:
            call()
        assert words in str(error.value)


CUDA = torch.cuda.is_available()
CLI_CASES = [
    (["generate", "--context-file", "c.txt", "--question", "q", "--max-new-tokens", "0"], "--max-new-tokens", ">= 1"),
    (["generate", "--context-file", "c.txt", "--question", "q", "--ratio", "1.5"], "--ratio", "[0, 1)"),
    (["generate", "--context-file", "c.txt", "--question", "q", "--ratio", "half"], "--ratio", "expected a number"),
    (["generate", "--context-file", "c.txt", "--question", "q", "--threshold", "2"], "--threshold", "[0, 1]"),
    (["generate", "--context-file", "c.txt", "--question", "q", "--n-sink", "2.5"], "--n-sink", "an integer"),
    (["generate", "--context-file", "c.txt", "--question", "q", "--n-sink", "-1"], "--n-sink", ">= 0"),
    (["generate", "--context-file", "c.txt", "--question", "q", "--window-size", "-1"], "--window-size", "fraction"),
    (["generate", "--context-file", "c.txt", "--question", "q", "--window-size", "2.5"], "--window-size", "whole"),
    (["generate", "--context-file", "c.txt", "--question", "q", "--chunk-size", "0"], "--chunk-size", ">= 1"),
    (["generate", "--context-file", "c.txt", "--question", "q", "--compaction", "x"], "--compaction", "invalid"),
    (["train", "--out", "o", "--steps", "0"], "--steps", ">= 1"),
    (["train", "--out", "o", "--batch-tokens", "0"], "--batch-tokens", ">= 1"),
    (["train", "--out", "o", "--lr", "0"], "--lr", "(0, inf)"),
    (["train", "--out", "o", "--lr", "nan"], "--lr", "(0, inf)"),
    (["train", "--out", "o", "--context-len", "100"], "--context-len", ">= 256"),
    (["train", "--out", "o", "--max-tokens", "10"], "--max-tokens", ">= 256"),
    (["train", "--out", "o", "--val-fraction", "1"], "--val-fraction", "(0, 1)"),
    (["train", "--out", "o", "--seed", "-2"], "--seed", ">= 0"),
    (["train", "--steps", "5"], "--out", "required"),
    (["train", "--out", "o", "--device", "gpu7"], "--device", "expected a device"),
    *([(["train", "--out", "o", "--device", "cuda:0"], "--device", "CUDA is not available")] if not CUDA else []),
    (["train", "--out", "o", "--device-map", "everywhere"], "--device-map", "invalid choice"),
    (["train", "--out", "o", "--device", "cpu", "--device-map", "auto"], "--device-map", "not allowed with"),
    (["export-gates", "g", "--out", "o", "--dtype", "int8"], "--dtype", "invalid"),
    (["export-gates", "g"], "--out", "required"),
    (["eval", "--samples", "0"], "--samples", ">= 1"),
    (["eval", "--ratios", "1.0"], "--ratios", "(0, 1)"),
    (["eval", "--ratios", "0"], "--ratios", "(0, 1)"),
    (["eval", "--thresholds", "2"], "--thresholds", "[0, 1]"),
    (["eval", "--data-dir", "0"], "--data-dir", ">= 64"),
    (["eval", "--max-new-tokens", "0"], "--max-new-tokens", ">= 1"),
    (["eval", "--dataset", "ruler"], "--dataset", "invalid"),
    (["eval", "--tasks", "nope"], "--tasks", "invalid"),
    (["eval", "--seed", "x"], "--seed", "an integer"),
    (["eval-report"], "results", "required"),
    (["export-dataset", "--out", "o", "--samples", "0"], "--samples", ">= 1"),
    (["export-dataset", "--out", "o", "--data-dir", "10"], "--data-dir", ">= 64"),
    (["nope"], "invalid choice", "nope"),
    # flags together (each refused by the subcommand's parser, before a model loads)
    (["compress", "--context-file", "c", "--out", "o", "--ratio", "0.9", "--threshold", "0.01"], "--ratio 0.9",
     "--threshold 0.01 are two budgets"),
    (["generate", "--context-file", "c", "--question", "q", "--ratio", "0.9", "--threshold", "0.01"], "--ratio",
     "not both"),
    (["generate", "--context-file", "c", "--question", "q", "--chunk-size", "8", "--compaction", "masked"],
     "--chunk-size", "--compaction ragged"),
    (["generate", "--cache", "c.kvz", "--question", "q", "--ratio", "0.3"], "--ratio", "cannot apply to --cache"),
    (["generate", "--cache", "c.kvz", "--question", "q", "--gates", "random"], "--gates", "cannot apply to --cache"),
    (["generate", "--cache", "c.kvz", "--question", "q", "--compaction", "masked"], "--compaction", "to --cache"),
    (["generate", "--cache", "c.kvz", "--question", "q", "--no-compare"], "--no-compare", "cannot apply to --cache"),
    (["-q", "-v", "eval-report", "r", "--out", "o"], "-q/--quiet and -v/--verbose", "give one of them"),
    (["eval-report", "r", "--out", "o", "-q", "-v"], "-q/--quiet and -v/--verbose", "give one of them"),
    (["-q", "eval-report", "r", "--out", "o", "-v"], "-q/--quiet and -v/--verbose", "give one of them"),
    (["generate", "--cache", "c.kvz", "--question", "a\udcffb"], "--question", "is not valid UTF-8 text"),
    (["generate", "--cache", "c.kvz", "--question", " "], "--question", "expected some text"),
    # an unknown flag is reported with the subcommand's usage, not the top-level one
    (["generate", "--cache", "c.kvz", "--question", "q", "--bogus"], "usage: fastkvzip-press generate",
     "unrecognized arguments: --bogus"),
    (["compress", "--context-file", "c", "--out", "o", "--ratios", "0.5"], "usage: fastkvzip-press compress",
     "--ratios"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "flag", "words"), CLI_CASES, ids=lambda case: " ".join(case)[:60])
def test_command_flags(argv, flag, words, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and words in err


def test_command_errors_before_loading_a_model(tmp_path, capsys):
    """Errors the package raises (not argparse) still exit 2 with a one-line message and no traceback."""
    undecodable = tmp_path / "latin1.txt"
    undecodable.write_bytes("caf\xe9 ".encode("latin-1") * 10)
    cases = [
        (["generate", "--context-file", str(undecodable), "--question", "q"], ["latin1.txt", "not UTF-8"]),
        (["generate", "--context-file", str(tmp_path), "--question", "q"], ["is a folder, not a text file"]),
        (["generate", "--question", "q"], ["give --context-file (compress now) or --cache"]),
        (["generate", "--cache", str(tmp_path), "--question", "q"], ["is a folder, not a cache file"]),
        (["compress", "--context-file", str(undecodable), "--out", str(tmp_path / "x.kvz")], ["not UTF-8"]),
        (["train", "--out", str(undecodable)], [f"--out {undecodable} is a file"]),
        (["eval", "--presses", "nope", "--out", str(tmp_path)], ["unknown press 'nope'"]),
        (["eval", "--presses", "fastkvzip_press_threshold", "--out", str(tmp_path)], ["--thresholds"]),
        (["eval", "--presses", "decoding_fastkvzip_press", "--out", str(tmp_path)], ["kvpress-eval"]),
        (["eval", "--out", str(undecodable)], ["is a file"]),
        (["export-gates", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], ["does not exist"]),
        (["train", "--corpus", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")], ["not found"]),
        (["kvpress-eval", "--kvpress-evaluation", str(tmp_path), "--local-dataset", "x"], ["NAME=FOLDER"]),
    ]
    for argv, words in cases:
        assert main(["-q", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err, err
        assert all(word in err for word in words), (argv, err)


def test_quiet_after_the_subcommand():
    assert build_parser().parse_args(["eval-report", "r", "--out", "o", "-q"]).quiet is True
    assert build_parser().parse_args(["-q", "eval-report", "r", "--out", "o"]).quiet is True
    assert build_parser().parse_args(["eval-report", "r", "--out", "o"]).quiet is False


def test_non_finite_gates_are_refused(llama, tmp_path):
    model, _ = llama
    bank = GateBank.random(ModelLayout.from_model(model))
    with torch.no_grad():
        bank.gates[1].q_proj.weight[0, 0] = math.nan
    with pytest.raises(GateFileError, match="NaN or infinite"):
        load_gates(bank, model)
    save_gates(bank, tmp_path)
    for path in (tmp_path, next(Path(tmp_path).glob("*.pt"))):
        with pytest.raises(GateFileError, match="NaN or infinite values .*layer 1 q_proj.weight"):
            load_gates(path, model)
