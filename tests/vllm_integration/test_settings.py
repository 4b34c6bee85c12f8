"""The vLLM integration's settings, read without vLLM: engine section, per-request ratio, kept counts."""

import math

import pytest
import torch

from fastkvzip_press.eviction import decide
from fastkvzip_press.presses import FastKVzipPress
from fastkvzip_press.vllm.settings import (
    DEFAULT_N_SINK,
    DEFAULT_WINDOW,
    EngineSettings,
    RequestSettingError,
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


def test_a_request_uses_its_own_ratio_or_the_engine_default():
    settings = EngineSettings(ratio=0.5)
    assert settings.request_ratio(None) == 0.5
    assert settings.request_ratio({"other": 1}) == 0.5
    assert settings.request_ratio({"fastkvzip_ratio": 0}) == 0.0
    assert settings.request_ratio({"fastkvzip_ratio": 0.75}) == 0.75


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
        EngineSettings().request_ratio({"fastkvzip_ratio": value})
    with pytest.raises(RequestSettingError, match="fastkvzip_ratio"):
        check_request({"fastkvzip_ratio": value}, EngineSettings())


def test_asking_an_engine_without_fast_kvzip_for_compression_is_refused():
    with pytest.raises(RequestSettingError, match="started without Fast KVzip"):
        check_request({"fastkvzip_ratio": 0.5}, None)
    check_request({"fastkvzip_ratio": 0.0}, None)  # asking for none is fine
    check_request(None, None)


@pytest.mark.parametrize("length", [3, 24, 100, 2049])
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75])
def test_kept_tokens_is_what_the_uniform_decision_keeps(length, ratio):
    settings = EngineSettings()
    kept = settings.kept_tokens(length, ratio)
    if ratio == 0 or length <= settings.n_sink + settings.protection.window_pairs(length):
        assert kept == length
        return
    from fastkvzip_press.eviction import RatioBudget

    scores = torch.rand(2, 1, 3, length, generator=torch.Generator().manual_seed(length))
    decision = decide(scores, RatioBudget(ratio, per_head=True), settings.protection)
    assert decision.kept.unique().tolist() == [kept]
