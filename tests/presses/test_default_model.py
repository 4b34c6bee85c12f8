from pathlib import Path

import pytest
import torch
from helpers import greedy_after_prefill, greedy_decode, make_pipeline, stored_pairs_per_head

from fastkvzip_press import FastKVzipDecodingPress, FastKVzipPress, GateBank, ModelLayout
from fastkvzip_press.models import load_default_model

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "harbor_town.txt"
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
    shipped = FastKVzipPress(0.5)  # gates=None: the trained gates shipped for this model
    assert "4172" in pipe(context, question=QUESTION, press=shipped, max_new_tokens=24)["answer"]
    assert shipped.gate_bank.metadata.training["source"] == "fastkvzip-press train"


@pytest.mark.parametrize("chunk_size", [None, 256])
def test_ragged_equals_masked_on_the_default_model(default_model, chunk_size):
    model, tokenizer = default_model
    gates = GateBank.random(ModelLayout.from_model(model), seed=1)
    context = EXAMPLE.read_text()
    if chunk_size is None:
        presses = {c: FastKVzipPress(0.6, gates=gates, compaction=c) for c in ("masked", "ragged")}
    else:  # threshold 0 evicts nothing: chunked prefill must reproduce the full cache
        presses = {"masked": None, "ragged": FastKVzipPress(gates=gates, threshold=0.0, chunk_size=chunk_size)}
    runs = {name: greedy_after_prefill(model, tokenizer, press, context, QUESTION) for name, press in presses.items()}
    assert runs["masked"][0] == runs["ragged"][0]
    torch.testing.assert_close(runs["masked"][1], runs["ragged"][1], atol=1e-4, rtol=1e-4)


def test_decoding_press_bounds_the_cache_on_the_default_model(default_model):
    model, tokenizer = default_model
    press = FastKVzipDecodingPress(compression_interval=32, target_size=128, window_size=16)  # shipped gates
    prompt = tokenizer.decode(tokenizer(EXAMPLE.read_text()).input_ids[:200]) + "\n\nRetell this story in detail."
    rows = []

    def observe(cache, step):
        rows.append(stored_pairs_per_head(cache, range(30)))

    tokens, _, cache = greedy_decode(model, tokenizer, press, 300, prompt=prompt, observe=observe)
    assert press.last_stats.compressions >= 300 // 32
    assert max(rows) <= 128 + 32 and rows[-1] <= 128 + 32
    assert cache.get_seq_length() > 500 and len(set(tokens)) > 20  # it kept writing varied text
