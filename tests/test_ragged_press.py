"""FastKVzipPress with real (ragged) compaction: equivalence with the masked reference, pipeline, generate, chunks."""

import pytest
import torch
from conftest import CONTEXT, QUESTIONS, greedy_after_prefill, make_pipeline
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


def test_batch_of_two_is_refused_with_advice(llama, random_gates):
    model, tokenizer = llama
    batch = tokenizer([CONTEXT, CONTEXT.replace("7 2 9", "4 4 1")], return_tensors="pt")
    press = FastKVzipPress(0.5, gates=random_gates(model), window_size=4)
    with pytest.raises(ValueError, match="compaction='masked'"), press(model):
        model.generate(**batch, max_new_tokens=2, do_sample=False)


# ---------------------------------------------------------------------------------------------- chunked prefill


@pytest.mark.parametrize("name", EQUIVALENCE_ARCHS)
def test_chunked_prefill_without_eviction_is_exact(tiny_models, random_gates, name):
    """Threshold 0 evicts nothing: chunk plumbing (positions, masks, ragged attention) must not change the logits."""
    model, tokenizer = tiny_models(name)
    full_tokens, full_logits, _ = greedy_after_prefill(model, tokenizer, None)
    press = FastKVzipPress(gates=random_gates(model), threshold=0.0, window_size=4, chunk_size=37)
    tokens, logits, cache = greedy_after_prefill(model, tokenizer, press)
    assert ragged_layer_ids(cache)
    assert tokens == full_tokens
    torch.testing.assert_close(logits, full_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("ratio", [0.5, 0.8])
def test_chunked_prefill_meets_the_budget_and_bounds_peak_memory(llama, random_gates, ratio):
    model, tokenizer = llama
    ids = tokenizer(CONTEXT, return_tensors="pt").input_ids
    n_tokens, chunk, window, n_sink = ids.shape[1], 40, 6, 4
    press = FastKVzipPress(ratio, gates=random_gates(model), n_sink=n_sink, window_size=window, chunk_size=chunk)
    cache = DynamicCache()
    peaks = []
    hook = model.model.layers[-1].register_forward_hook(lambda *_: peaks.append(kv_cache_bytes(cache)))
    try:
        with torch.no_grad(), press(model):
            model.model(input_ids=ids, past_key_values=cache)
    finally:
        hook.remove()
    layout = ModelLayout.from_model(model)
    assert len(peaks) == -(-n_tokens // chunk)  # one forward per chunk
    assert cache.get_seq_length() == n_tokens
    kept = torch.stack(list(press.last_stats.kept_per_head.values()))
    expected = (1 - ratio) * n_tokens * layout.num_kv_heads * layout.num_layers
    assert abs(int(kept.sum()) - expected) <= layout.num_layers * layout.num_kv_heads + 2
    row_bytes = 2 * layout.head_dim * 4
    bound = (expected + (chunk + window + 2 * 16) * layout.num_kv_heads * layout.num_layers) * row_bytes
    assert max(peaks) <= bound  # retained + one chunk (+ deferred window and spare rows)
    for layer in cache.layers:
        keys, _, mask = layer.to_padded()
        assert mask[..., :n_sink].all()  # every head keeps at least the sink


def test_chunked_prefill_through_pipeline_and_generate(tiny_models, random_gates):
    model, tokenizer = tiny_models("gemma3")
    gates = random_gates(model)
    pipe = make_pipeline(model, tokenizer)
    press = FastKVzipPress(0.5, gates=gates, window_size=4, chunk_size=50)
    answers = pipe(CONTEXT, questions=QUESTIONS, press=press, max_new_tokens=4)["answers"]
    assert len(answers) == len(QUESTIONS)
    assert abs(press.last_stats.compression_ratio - 0.5) < 0.02
    ids = tokenizer(CONTEXT, return_tensors="pt").input_ids
    with press(model):
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"chunk_size": 0}, "chunk_size"),
        ({"chunk_size": 64, "compaction": "masked"}, "ragged"),
    ],
)
def test_bad_chunk_configuration(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FastKVzipPress(0.5, **kwargs)


def test_chunked_layerwise_gives_each_layer_the_same_budget(llama, random_gates):
    model, tokenizer = llama
    press = FastKVzipPress(0.5, gates=random_gates(model), layerwise=True, window_size=4, chunk_size=40)
    make_pipeline(model, tokenizer)(CONTEXT, question=QUESTIONS[0], press=press, max_new_tokens=2)
    per_layer = {int(kept.sum()) for kept in press.last_stats.kept_per_head.values()}
    assert len(per_layer) == 1
    assert abs(press.last_stats.compression_ratio - 0.5) < 0.02
