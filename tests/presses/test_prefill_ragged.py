"""FastKVzipPress with real (ragged) compaction: equivalence with the masked reference, pipeline, generate, chunks."""

import pytest
import torch
from helpers import CONTEXT, QUESTIONS, greedy_after_prefill, make_pipeline
from transformers import DynamicCache

from fastkvzip_press import FastKVzipPress, ModelLayout, RaggedLayer, kv_cache_bytes
from fastkvzip_press.cache import ragged_layer_ids

EQUIVALENCE_ARCHS = ["llama", "qwen3", "gemma3"]


@pytest.mark.parametrize("name", EQUIVALENCE_ARCHS)
@pytest.mark.parametrize("ratio", [0.5, 0.8])
def test_ragged_equals_masked(tiny_models, random_gates, name, ratio):
    model, tokenizer = tiny_models(name)
    gates = random_gates(model)
    runs = {}
    for compaction in ("masked", "ragged"):
        press = FastKVzipPress(ratio, gates=gates, window_size=4, compaction=compaction)
        runs[compaction] = greedy_after_prefill(model, tokenizer, press)
        runs[compaction + "_stats"] = press.last_stats
    assert runs["masked"][0] == runs["ragged"][0]
    torch.testing.assert_close(runs["masked"][1], runs["ragged"][1], atol=1e-4, rtol=1e-4)
    ragged_cache = runs["ragged"][2]
    layout = ModelLayout.from_model(model)
    assert ragged_layer_ids(ragged_cache) == list(layout.gated_layer_ids)  # Gemma3: sliding layers stay dense
    for layer_id, kept in runs["ragged_stats"].kept_per_head.items():
        assert ragged_cache.layers[layer_id].head_lengths[:] != []
        assert torch.equal(kept, runs["masked_stats"].kept_per_head[layer_id])


@pytest.mark.parametrize("ratio", [0.5, 0.9])
def test_retained_bytes_follow_the_ratio(llama, random_gates, ratio):
    model, tokenizer = llama
    full = greedy_after_prefill(model, tokenizer, None, steps=1)[2]
    press = FastKVzipPress(ratio, gates=random_gates(model), window_size=4)
    ids = tokenizer(CONTEXT, return_tensors="pt").input_ids
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model.model(input_ids=ids, past_key_values=cache)
    full_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in full.layers)
    used = sum(layer.used_bytes() for layer in cache.layers)
    spare = sum(layer.spare_bytes() for layer in cache.layers)
    assert used <= (1 - ratio) * full_bytes + 1e-9 * full_bytes + 64 * len(cache.layers)
    assert kv_cache_bytes(cache) <= used + spare + 1024
    assert kv_cache_bytes(cache) < kv_cache_bytes(full)


def test_pipeline_several_questions_twice(tiny_models, random_gates, arch):
    model, tokenizer = tiny_models(arch)
    pipe = make_pipeline(model, tokenizer)
    gates = random_gates(model)
    answers = {}
    for compaction in ("masked", "ragged", "ragged"):  # the second ragged call reuses the switched model
        press = FastKVzipPress(0.6, gates=gates, window_size=4, compaction=compaction)
        answers.setdefault(compaction, []).append(
            pipe(CONTEXT, questions=QUESTIONS, press=press, max_new_tokens=5)["answers"]
        )
    assert answers["ragged"][0] == answers["ragged"][1] == answers["masked"][0]
    assert pipe(CONTEXT, questions=QUESTIONS, max_new_tokens=5)["answers"] is not None  # no press: still fine


def test_generate_inside_the_press(tiny_models, random_gates):
    model, tokenizer = tiny_models("qwen3")
    ids = tokenizer(CONTEXT, return_tensors="pt").input_ids
    outputs = {}
    for compaction in ("masked", "ragged"):
        press = FastKVzipPress(0.7, gates=random_gates(model), window_size=4, compaction=compaction)
        with press(model):
            outputs[compaction] = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(outputs["masked"].sequences, outputs["ragged"].sequences)
    cache = outputs["ragged"].past_key_values
    assert all(isinstance(layer, RaggedLayer) for layer in cache.layers)
    assert cache.get_seq_length() == ids.shape[1] + 5  # logical length counts evicted tokens


def test_gemma3_generate_keeps_sliding_layers_dense(tiny_models, random_gates):
    model, tokenizer = tiny_models("gemma3")
    ids = tokenizer(CONTEXT, return_tensors="pt").input_ids
    press = FastKVzipPress(0.7, gates=random_gates(model), window_size=4)
    with press(model):
        out = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    layout = ModelLayout.from_model(model)
    assert ragged_layer_ids(out.past_key_values) == list(layout.gated_layer_ids)
