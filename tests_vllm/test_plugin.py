"""The plugin's entry point, its version pin, and engine configurations refused before any engine process starts."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest
from vllm_helpers import engine_options

from fastkvzip_press.vllm import VLLM_VERSION, UnsupportedVLLMVersion, check_vllm_version, register


def test_vllm_finds_the_plugin_through_its_entry_point():
    plugins = {plugin.name: plugin.value for plugin in entry_points(group="vllm.general_plugins")}
    assert plugins["fastkvzip"] == "fastkvzip_press.vllm:register"


def test_the_installed_vllm_is_the_pinned_one():
    import vllm

    check_vllm_version(vllm.__version__)
    register()
    register()  # vLLM loads plugins in every process, some more than once


@pytest.mark.parametrize("version", ["0.31.0", "0.32.1", "0.33.0rc1"])
def test_another_vllm_version_is_refused(version):
    with pytest.raises(UnsupportedVLLMVersion, match=f"built on vLLM {VLLM_VERSION}.*has vLLM {version}"):
        check_vllm_version(version)


@pytest.mark.parametrize(
    ("overrides", "section", "message"),
    [
        ({"enable_prefix_caching": True}, {}, "--no-enable-prefix-caching"),
        ({"enforce_eager": False}, {}, "--enforce-eager"),
        ({"kv_cache_dtype": "fp8"}, {}, "kv_cache_dtype"),
        ({}, {"gates": "/no/such/gates"}, "gate path '/no/such/gates' does not exist"),
        ({}, {"ratio": 1.0}, r"fastkvzip.ratio must be in \[0, 1\)"),
        ({}, {"window": 8}, r"unknown fastkvzip setting\(s\) \['window'\]"),
        ({}, {"n_sink": -1}, "fastkvzip.n_sink must be >= 0"),
        ({}, {"chunk_size": 0}, r"fastkvzip.chunk_size \(prompt tokens per compaction.*must be >= 1"),
        ({}, {"budget": "layerwise"}, "fastkvzip.budget"),
        ({}, {"window_size": 600}, "protect every prompt of up to max_model_len=512"),
        (
            {},
            {"events": "/proc/no/such/events.jsonl"},
            "fastkvzip.events '/proc/no/such/events.jsonl' cannot be written",
        ),
    ],
)
def test_an_engine_fast_kvzip_cannot_serve_is_refused_before_it_starts(tiny_models, overrides, section, message):
    from vllm import LLM

    from fastkvzip_press.vllm.seam.config import EngineConfigError

    model_dir, gates, _, _ = tiny_models["llama"]
    section = {"gates": str(gates), **section}
    with pytest.raises(EngineConfigError, match=message):
        LLM(model=str(model_dir), additional_config={"fastkvzip": section}, **engine_options(**overrides))


@pytest.mark.parametrize("make_gates", ["empty folder", "text file"])
def test_gates_that_cannot_be_read_are_refused_before_the_engine_starts(tiny_models, tmp_path, make_gates):
    from vllm import LLM

    from fastkvzip_press.vllm.seam.config import EngineConfigError

    model_dir, _, _, _ = tiny_models["llama"]
    gates = tmp_path / "gates"
    if make_gates == "empty folder":
        gates.mkdir()
    else:
        gates.write_text("not gates")
    with pytest.raises(EngineConfigError, match=f"fastkvzip.gates '{gates}'"):
        LLM(model=str(model_dir), additional_config={"fastkvzip": {"gates": str(gates)}}, **engine_options())


def test_a_misspelt_section_is_refused_instead_of_serving_uncompressed(tiny_models):
    from vllm import LLM

    from fastkvzip_press.vllm.seam.config import EngineConfigError

    model_dir, gates, _, _ = tiny_models["llama"]
    with pytest.raises(EngineConfigError, match="additional_config has 'fastkvzp', not 'fastkvzip'"):
        LLM(model=str(model_dir), additional_config={"fastkvzp": {"gates": str(gates)}}, **engine_options())


def test_the_serve_command_ends_a_configuration_mistake_in_one_line(tiny_models):
    import json
    import subprocess
    import sys

    model_dir, gates, _, _ = tiny_models["llama"]
    section = json.dumps({"fastkvzip": {"gates": str(gates), "ratio": 2}})
    done = subprocess.run(
        [sys.executable, "-m", "fastkvzip_press.vllm", "serve", str(model_dir), "--additional-config", section],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: additional_config['fastkvzip']: fastkvzip.ratio")
    assert "Traceback" not in done.stderr


def test_another_models_gates_are_refused_naming_the_setting_that_accepts_them(tiny_models, tmp_path):
    from vllm import LLM

    from fastkvzip_press.gates import load_gates, save_gates
    from fastkvzip_press.vllm.seam.config import EngineConfigError

    model_dir, gates, _, _ = tiny_models["llama"]
    bank = load_gates(str(gates))
    bank.metadata.model_id = "someone/another-model"
    save_gates(bank, tmp_path / "other")
    section = {"gates": str(tmp_path / "other")}
    with pytest.raises(EngineConfigError, match="trained for model 'someone/another-model'") as error:
        LLM(model=str(model_dir), additional_config={"fastkvzip": section}, **engine_options())
    assert '"allow_other_model": true' in str(error.value) and "--allow-other-model" not in str(error.value)
