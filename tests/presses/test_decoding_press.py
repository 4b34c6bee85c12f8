import logging

import pytest
import torch
from helpers import CONTEXT, QUESTIONS, greedy_decode, make_pipeline, stored_pairs_per_head
from kvpress import PrefillDecodingPress
from transformers import DynamicCache

from fastkvzip_press import FastKVzipDecodingPress, FastKVzipPress, RaggedLayer, kv_cache_bytes
from fastkvzip_press.models import tiny_model


def test_memory_stays_within_target_plus_one_interval_over_1000_tokens(llama, random_gates):
    model, tokenizer = llama
    gates = random_gates(model)
    press = FastKVzipDecodingPress(gates=gates, compression_interval=32, target_size=96, window_size=16)
    peaks = []

    def observe(cache, step):
        peaks.append(stored_pairs_per_head(cache, gates.layer_ids))

    _, _, cache = greedy_decode(model, tokenizer, press, 1000, observe=observe)
    assert press.last_stats.compressions >= 1000 // 32
    assert max(peaks) <= 96 + 32  # between compressions the cache grows by at most one interval per head
    assert stored_pairs_per_head(cache, gates.layer_ids) <= 96 + 32
    assert all(isinstance(cache.layers[i], RaggedLayer) for i in gates.layer_ids)
    assert cache.get_seq_length() == tokenizer(CONTEXT, return_tensors="pt").input_ids.shape[1] + 1000
    # Bytes stay bounded too: budget + interval + spare rows, whatever the length.
    layer = cache.layers[0]
    row_bytes = 2 * layer.head_dim * layer.key_buffer.element_size()
    bound = len(gates.layer_ids) * layer.num_heads * (96 + 32 + layer.spare_tokens + 48) * (row_bytes + 4)
    assert kv_cache_bytes(cache) <= bound
    heads = [h for i in gates.layer_ids for h in cache.layers[i].head_lengths]
    assert min(heads) < max(heads)  # one selection over layers x heads: budgets differ per head


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_ragged_equals_masked_reference(tiny_models, random_gates, arch):
    model, tokenizer = tiny_models(arch)
    gates = random_gates(model, seed=2)
    runs = {}
    for compaction in ("ragged", "masked"):
        press = FastKVzipDecodingPress(
            gates=gates, compression_interval=16, target_size=40, window_size=8, compaction=compaction
        )
        runs[compaction] = greedy_decode(model, tokenizer, press, 150)
        assert press.last_stats.compressions > 5
    assert runs["ragged"][0] == runs["masked"][0]
    torch.testing.assert_close(runs["ragged"][1], runs["masked"][1], atol=1e-4, rtol=1e-4)


def test_generate_inside_the_press_scores_the_prompt(llama, random_gates, caplog):
    model, tokenizer = llama
    gates = random_gates(model)
    ids = tokenizer(CONTEXT, return_tensors="pt").input_ids
    press = FastKVzipDecodingPress(gates=gates, compression_interval=8, target_size=48, window_size=8)
    with caplog.at_level(logging.WARNING), press(model):
        out = model.generate(ids, max_new_tokens=40, min_new_tokens=40, do_sample=False, return_dict_in_generate=True)
    assert out.sequences.shape[1] == ids.shape[1] + 40
    assert press.last_stats.compressions >= 5
    assert "no gate score" not in caplog.text  # the prompt went through the press's hooks
    assert stored_pairs_per_head(out.past_key_values, gates.layer_ids) < 48 + 8 + 1


def test_pipeline_alone_and_after_a_prefill_press(llama, random_gates, caplog):
    model, tokenizer = llama
    gates = random_gates(model)
    pipe = make_pipeline(model, tokenizer)
    n_context = pipe.preprocess(CONTEXT, [QUESTIONS[0]], "", 10_000)["context_ids"].shape[1]

    alone = FastKVzipDecodingPress(gates=gates, compression_interval=8, target_size=40, window_size=4)
    cache = DynamicCache()
    with caplog.at_level(logging.WARNING):
        answer = pipe(CONTEXT, question=QUESTIONS[0], press=alone, cache=cache, max_new_tokens=48)["answer"]
    assert isinstance(answer, str) and alone.last_stats.compressions >= 1
    assert "no gate score" in caplog.text  # the pipeline prefills without a decoding press
    # kvpress rolls the answer back: exact even though eviction mixed answer and context pairs.
    assert cache.get_seq_length() == n_context
    for layer_id in gates.layer_ids:
        layer = cache.layers[layer_id]
        assert all(bool((layer.head_positions(h) < n_context).all()) for h in range(layer.num_heads))

    caplog.clear()
    prefill = FastKVzipPress(0.5, gates=gates)
    decoding = FastKVzipDecodingPress(gates=gates, compression_interval=8, target_size=40, window_size=4)
    combined = PrefillDecodingPress(prefilling_press=prefill, decoding_press=decoding)
    cache = DynamicCache()
    with caplog.at_level(logging.WARNING):
        pipe(CONTEXT, question=QUESTIONS[0], press=combined, cache=cache, max_new_tokens=48)
    assert abs(prefill.last_stats.compression_ratio - 0.5) < 1e-3
    assert decoding.last_stats.compressions >= 1
    assert "no gate score" not in caplog.text  # the prefill press handed its scores over
    assert cache.get_seq_length() == n_context


def test_budget_larger_than_the_sequence_changes_nothing(llama, random_gates):
    model, tokenizer = llama
    gates = random_gates(model)
    press = FastKVzipDecodingPress(gates=gates, compression_interval=4, target_size=10_000)
    tokens, logits, cache = greedy_decode(model, tokenizer, press, 12)
    reference = greedy_decode(model, tokenizer, FastKVzipDecodingPress(gates=gates, target_size=10_000), 12)
    assert press.last_stats.compressions == 0 and tokens == reference[0]
    assert not any(isinstance(layer, RaggedLayer) for layer in cache.layers)


def test_interval_one_and_ratio_mode(llama, random_gates):
    model, tokenizer = llama
    gates = random_gates(model)
    every_token = FastKVzipDecodingPress(gates=gates, compression_interval=1, target_size=30, window_size=2)
    _, _, cache = greedy_decode(model, tokenizer, every_token, 20)
    assert every_token.last_stats.compressions == 21  # the prefill, then every token
    assert stored_pairs_per_head(cache, gates.layer_ids) == 30

    ratio = FastKVzipDecodingPress(gates=gates, compression_interval=8, compression_ratio=0.75, window_size=4)
    _, _, cache = greedy_decode(model, tokenizer, ratio, 40)
    logical = cache.get_seq_length()
    assert stored_pairs_per_head(cache, gates.layer_ids) <= int(0.25 * logical) + 8


def test_clear_errors():
    with pytest.raises(ValueError, match="protect at least target_size"):
        FastKVzipDecodingPress(target_size=100, n_sink=4, window_size=128)
    with pytest.raises(ValueError, match="compression_interval"):
        FastKVzipDecodingPress(compression_interval=0)
    with pytest.raises(ValueError, match="compression_ratio"):
        FastKVzipDecodingPress(compression_ratio=1.0)
    with pytest.raises(ValueError, match="compaction"):
        FastKVzipDecodingPress(compaction="dense")


def test_eager_attention_is_refused(random_gates):
    model, tokenizer = tiny_model("llama", attn_implementation="eager")
    with pytest.raises(ValueError, match="eager"):
        with FastKVzipDecodingPress(gates=random_gates(model))(model):
            pass
