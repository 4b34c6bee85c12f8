from pathlib import Path

import pytest
from conftest import make_pipeline

from fastkvzip_press import FastKVzipPress, GateBank, ModelLayout
from fastkvzip_press.cli import main
from fastkvzip_press.models import load_default_model

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "harbor_town.txt"
QUESTION = "What is the combination of the lock on the sea chest?"


@pytest.fixture(scope="module")
def default_model(default_model_dir):
    return load_default_model(cache_dir=default_model_dir)


def test_default_model_layout_and_needle(default_model):
    model, tokenizer = default_model
    layout = ModelLayout.from_model(model)
    assert (layout.num_layers, layout.num_attention_heads, layout.num_kv_heads, layout.head_dim) == (30, 9, 3, 64)
    assert layout.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    pipe = make_pipeline(model, tokenizer)
    context = EXAMPLE.read_text()
    assert "4172" in pipe(context, question=QUESTION, max_new_tokens=24)["answer"]
    press = FastKVzipPress(0.5, gates=GateBank.random(layout))
    answer = pipe(context, question=QUESTION, press=press, max_new_tokens=8)["answer"]
    assert isinstance(answer, str)
    assert abs(press.last_stats.compression_ratio - 0.5) < 1e-3


def test_cli_generate_prints_answer_and_cache_sizes(default_model_dir, capsys):
    code = main(
        ["-q", "generate", "--context-file", str(EXAMPLE), "--question", QUESTION, "--ratio", "0.5"]
        + ["--model-cache", str(default_model_dir), "--max-new-tokens", "16"]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Answer (FastKVzipPress):" in out and "Answer (full cache):" in out
    assert "4172" in out  # the full-cache answer finds the needle
    assert "before eviction:" in out and "(100.0%)" in out
    assert "after eviction:" in out and "(50.0%)" in out
    assert "RANDOM untrained gates" in out


def test_cli_bad_inputs(tmp_path, capsys):
    assert main(["-q", "generate", "--context-file", str(tmp_path / "missing.txt"), "--question", "q"]) == 2
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert main(["-q", "generate", "--context-file", str(empty), "--question", "q"]) == 2
    assert "empty" in capsys.readouterr().err
