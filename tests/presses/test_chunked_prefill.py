"""Chunked prefill: eviction after every chunk through forward hooks, exact without eviction, budget and peak memory."""

import pytest
import torch
from helpers import CONTEXT, QUESTIONS, greedy_after_prefill, make_pipeline
from transformers import DynamicCache

from fastkvzip_press import FastKVzipPress, ModelLayout, kv_cache_bytes
from fastkvzip_press.cache import ragged_layer_ids

EQUIVALENCE_ARCHS = ["llama", "qwen3", "gemma3"]


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


def test_chunks_run_through_hooks_and_a_failed_chunk_leaves_no_plan(llama, random_gates):
    model, tokenizer = llama
    ids = tokenizer(CONTEXT, return_tensors="pt").input_ids
    gates = random_gates(model)
    press = FastKVzipPress(0.5, gates=gates, window_size=4, chunk_size=40)
    calls = []
    counter = model.model.layers[0].register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad(), press(model):
            assert "forward" not in vars(model.model)  # nothing of the model is replaced
            model.model(input_ids=ids, past_key_values=DynamicCache())
    finally:
        counter.remove()
    assert len(calls) == -(-ids.shape[1] // 40)

    def fail(*_):
        raise RuntimeError("chunk failed")

    short = ids[:, :36]  # shorter than a chunk: one pass
    breaker = model.model.layers[1].register_forward_hook(fail)
    with torch.no_grad(), press(model):
        try:
            with pytest.raises(RuntimeError, match="chunk failed"):
                model.model(input_ids=ids, past_key_values=DynamicCache())
        finally:
            breaker.remove()
        # Still inside the press: the failed prefill left no plan behind, so this one is decided in one pass.
        model.model(input_ids=short, past_key_values=DynamicCache())
    assert press.last_stats.context_length == 36
    assert abs(press.last_stats.compression_ratio - 0.5) < 1e-3
