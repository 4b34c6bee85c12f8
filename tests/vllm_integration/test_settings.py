"""The vLLM integration's settings, read without vLLM: engine section, per-request ratio, kept counts."""

import math

import pytest
import torch

from fastkvzip_press.eviction import RatioBudget, decide
from fastkvzip_press.presses import FastKVzipPress
from fastkvzip_press.vllm.settings import (
    DEFAULT_N_SINK,
    DEFAULT_WINDOW,
    EngineSettings,
    RequestSettingError,
    RequestSettings,
    check_request,
)


def test_the_engine_protects_what_fast_kvzip_press_protects_by_default():
    press = FastKVzipPress()
    assert (DEFAULT_N_SINK, DEFAULT_WINDOW) == (press.n_sink, press.window_size)


def test_no_section_means_the_engine_runs_without_fast_kvzip():
    assert EngineSettings.from_additional_config({}) is None
    assert EngineSettings.from_additional_config({"other": 1}) is None
    assert EngineSettings.from_additional_config({"fastkvzip": {}}) == EngineSettings()
    assert EngineSettings.from_additional_config({"fastkvzip": None}) == EngineSettings()


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"ratio": 1.0}, r"fastkvzip.ratio must be in \[0, 1\)"),
        ({"ratio": "0.5"}, "fastkvzip.ratio must be a number"),
        ({"n_sink": -2}, "fastkvzip.n_sink must be >= 0"),
        ({"window_size": 1.5}, "fastkvzip.window_size"),
        ({"gates": ""}, "fastkvzip.gates must be a gate file or folder path"),
        ({"record_kept": "yes"}, "fastkvzip.record_kept must be True or False"),
        ({"ratios": 0.5}, r"unknown fastkvzip setting\(s\) \['ratios'\]"),
    ],
)
def test_a_bad_engine_setting_is_refused_naming_it(section, message):
    with pytest.raises(ValueError, match=message):
        EngineSettings.from_additional_config({"fastkvzip": section})


def test_a_section_that_is_not_an_object_is_refused():
    with pytest.raises(ValueError, match="must be a JSON object"):
        EngineSettings.from_additional_config({"fastkvzip": 0.5})


def test_a_request_uses_its_own_ratio_and_budget_or_the_engine_defaults():
    settings = EngineSettings(ratio=0.5)
    assert settings.request(None) == RequestSettings(0.5, "global")
    assert settings.request({"other": 1}) == RequestSettings(0.5, "global")
    assert settings.request({"fastkvzip_ratio": 0}) == RequestSettings(0.0, "global")
    assert settings.request({"fastkvzip_ratio": 0.75, "fastkvzip_budget": "uniform"}) == RequestSettings(
        0.75, "uniform"
    )
    assert EngineSettings(budget="uniform").request({}).budget == "uniform"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (1.5, r"must be in \[0, 1\)"),
        (1, r"must be in \[0, 1\)"),
        (-0.1, r"must be in \[0, 1\)"),
        (math.nan, r"must be in \[0, 1\)"),
        ("0.5", "must be a number"),
        (True, "must be a number"),
        ([0.5], "must be a number"),
    ],
)
def test_a_bad_request_ratio_is_refused_naming_the_key(value, message):
    with pytest.raises(RequestSettingError, match=r"extra_args\['fastkvzip_ratio'\] " + message):
        EngineSettings().request({"fastkvzip_ratio": value})
    with pytest.raises(RequestSettingError, match="fastkvzip_ratio"):
        check_request({"fastkvzip_ratio": value}, EngineSettings())


def test_asking_an_engine_without_fast_kvzip_for_compression_is_refused():
    with pytest.raises(RequestSettingError, match="started without Fast KVzip"):
        check_request({"fastkvzip_ratio": 0.5}, None)
    check_request({"fastkvzip_ratio": 0.0}, None)  # asking for none is fine
    check_request(None, None)


@pytest.mark.parametrize(
    ("extra_args", "message"),
    [
        ({"fastkvzip_budget": "layerwise"}, r"extra_args\['fastkvzip_budget'\] must be one of \['global', 'uniform'\]"),
        ({"fastkvzip_budget": None}, "fastkvzip_budget"),
        ({"fastkvzip_ratoi": 0.5}, r"unknown Fast KVzip request setting\(s\) \['fastkvzip_ratoi'\]"),
        ({"fastkvzip_": 1, "fastkvzip_ratio": 0.5}, "unknown Fast KVzip request setting"),
    ],
)
def test_a_bad_budget_or_an_unknown_key_is_refused_naming_it(extra_args, message):
    with pytest.raises(RequestSettingError, match=message):
        EngineSettings().request(extra_args)
    with pytest.raises(RequestSettingError, match=message):
        check_request(extra_args, None)  # refused by an engine without Fast KVzip too


@pytest.mark.parametrize(
    ("section", "message"), [({"budget": "local"}, "fastkvzip.budget"), ({"attention": "sdpa"}, "fastkvzip.attention")]
)
def test_a_bad_engine_budget_or_attention_path_is_refused(section, message):
    with pytest.raises(ValueError, match=message):
        EngineSettings.from_additional_config({"fastkvzip": section})


@pytest.mark.parametrize("length", [3, 24, 100, 2049])
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75])
@pytest.mark.parametrize("budget", ["global", "uniform"])
def test_the_schedule_keeps_what_the_decision_keeps(length, ratio, budget):
    settings = EngineSettings(budget=budget)
    schedule = settings.schedule(length, settings.request({"fastkvzip_ratio": ratio}), heads=6, block_size=16)
    if ratio == 0 or length <= settings.n_sink + settings.protection.window_pairs(length):
        assert schedule is None
        return
    scores = torch.rand(2, 1, 3, length, generator=torch.Generator().manual_seed(length))
    decision = decide(scores, RatioBudget(ratio, per_head=budget == "uniform"), settings.protection)
    assert int(decision.kept.sum()) == schedule.kept_pairs


def test_an_events_file_that_can_no_longer_be_written_costs_the_records_not_the_engine(tmp_path, caplog):
    from fastkvzip_press.vllm.events import EventLog, read_events

    path = tmp_path / "gone" / "events.jsonl"
    path.parent.mkdir()
    log = EventLog(str(path))
    log.write("step", n=1)
    path.unlink()
    path.parent.rmdir()
    log.write("step", n=2)  # no exception
    log.write("step", n=3)
    assert "cannot be written" in caplog.text and caplog.text.count("cannot be written") == 1
    assert read_events(path) == []
