"""The one registry of compared presses: names, one configuration each, shared by eval, kvpress-eval and the help."""

import subprocess
import sys

import pytest
import torch

from fastkvzip_press import FastKVzipPress
from fastkvzip_press.cli import main
from fastkvzip_press.evaluation.comparison import check_plan
from fastkvzip_press.evaluation.kvpress_presses import kvpress_fastkvzip_with_gates
from fastkvzip_press.evaluation.registry import PRESS_SPECS, PressResources, our_entries, press_spec

OURS = {
    "fastkvzip_press",
    "fastkvzip_press_threshold",
    "fastkvzip_press_chunked",
    "fastkvzip_press_uniform",
    "adakv_fastkvzip_scorer",
    "decoding_fastkvzip_press",
}


def test_registry_covers_the_comparison():
    assert {name for name, spec in PRESS_SPECS.items() if spec.ours} == OURS
    kvpress = {"no_press", "knorm", "streaming_llm", "snapkv", "expected_attention", "tova", "kvzip", "fastkvzip"}
    assert kvpress | OURS == set(PRESS_SPECS)
    with pytest.raises(ValueError, match="unknown press 'nope'"):
        press_spec("nope")


def test_each_name_is_one_configuration_in_eval_and_in_kvpress_eval(llama, random_gates):
    model, _ = llama
    gates = random_gates(model)
    entries = our_entries(gates)
    assert set(entries) == OURS
    for name, entry in entries.items():
        spec = PRESS_SPECS[name]
        built = spec.build(spec.default, PressResources(model, gates))
        assert type(built) is type(entry)
        fields = ("chunk_size", "n_sink", "window_size", "layerwise", "uniform", "compaction", "target_size")
        fields += ("threshold",)
        for field in fields:
            assert getattr(built, field, None) == getattr(entry, field, None), (name, field)
    assert entries["fastkvzip_press_chunked"].chunk_size == 512
    assert entries["fastkvzip_press_uniform"].uniform
    assert entries["fastkvzip_press_threshold"].threshold is not None
    assert entries["decoding_fastkvzip_press"].target_size == 2048


def test_eval_builds_ratio_and_threshold_presses(llama, random_gates):
    model, _ = llama
    resources = PressResources(model, random_gates(model))
    press = press_spec("fastkvzip_press").build(0.25, resources)
    assert isinstance(press, FastKVzipPress) and press.compression_ratio == 0.25
    assert press_spec("fastkvzip_press_threshold").build(0.01, resources).threshold == 0.01
    assert press_spec("no_press").build(0.0, resources) is None
    assert press_spec("knorm").build(0.5, resources).compression_ratio == 0.5


def test_eval_refuses_what_it_cannot_run_before_loading_a_model():
    with pytest.raises(ValueError, match="kvpress-eval"):
        check_plan(["decoding_fastkvzip_press"], [0.5], [])
    with pytest.raises(ValueError, match="--thresholds"):
        check_plan(["fastkvzip_press_threshold"], [0.5], [])
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        check_plan(["fastkvzip_press"], [1.5], [])
    assert [spec.name for spec in check_plan(["no_press", "knorm"], [0.5], [])] == ["no_press", "knorm"]


def test_kvpress_fastkvzip_gets_our_gates_and_scores_alike(llama, random_gates):
    model, _ = llama
    bank = random_gates(model, seed=3)
    press = kvpress_fastkvzip_with_gates(bank, model, 0.5)
    hidden = torch.randn(1, 9, model.config.hidden_size)
    for layer_id in bank.layer_ids:
        torch.testing.assert_close(press.gates[layer_id](hidden), bank.score(layer_id, hidden), atol=1e-5, rtol=1e-4)


def command_help(capsys, command: str) -> str:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return capsys.readouterr().out.replace("\n", " ")


def test_help_lists_every_press_from_the_registry(capsys):
    assert all(name in command_help(capsys, "eval") for name in PRESS_SPECS)
    assert all(name in command_help(capsys, "kvpress-eval") for name in OURS)


def test_reading_the_registry_and_writing_reports_load_no_kvpress():
    code = (
        "import sys; import fastkvzip_press.evaluation.registry, fastkvzip_press.evaluation.report; "
        "sys.exit(int('kvpress' in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
