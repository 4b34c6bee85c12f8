"""Batches through model.generate: a left-padded batch gives every prompt what it gets alone, beams equal the masked
reference, and the batch stores what its sequences store alone."""

from functools import partial

import pytest
import torch
from helpers import CONTEXT, generate_left_padded

from fastkvzip_press import FastKVzipDecodingPress, FastKVzipPress, FastKVzipScorerPress, RaggedLayer, kv_cache_bytes

WORDS = CONTEXT.split()
PROMPTS = [CONTEXT, " ".join(WORDS[40:]), " ".join(WORDS[:90]) + " what is the code ?"]  # 3 lengths
STEPS = 30

PRESSES = {
    "one_pass": lambda gates: FastKVzipPress(0.5, gates=gates, window_size=4),
    "threshold": lambda gates: FastKVzipPress(threshold=0.06, gates=gates, window_size=4),
    "chunked": lambda gates: FastKVzipPress(0.5, gates=gates, window_size=0.05, chunk_size=37),
    # the shortest prompt fits one chunk: alone it is prefilled in one pass, in the batch it must decide the same
    "chunked_long": lambda gates: FastKVzipPress(0.5, gates=gates, window_size=4, chunk_size=100),
    "decoding": lambda gates: FastKVzipDecodingPress(
        gates=gates, compression_interval=16, target_size=40, window_size=8
    ),
    "decoding_masked": lambda gates: FastKVzipDecodingPress(
        gates=gates, compression_interval=16, target_size=40, window_size=8, compaction="masked"
    ),
    "scorer": lambda gates: FastKVzipScorerPress(0.5, gates=gates),
}


# Left-padded greedy generation under a press: (new tokens, fp32 logits, cache).
generate = partial(generate_left_padded, steps=STEPS)


@pytest.mark.parametrize("mode", list(PRESSES))
@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma3"])
def test_each_prompt_of_a_left_padded_batch_gets_what_it_gets_alone(tiny_models, random_gates, name, mode):
    model, tokenizer = tiny_models(name)
    gates = random_gates(model)
    tokens, logits, cache = generate(model, tokenizer, PRESSES[mode](gates), PROMPTS)
    if mode not in ("decoding_masked",):
        assert any(isinstance(layer, RaggedLayer) and layer.batch_size == 3 for layer in cache.layers)
    for b, prompt in enumerate(PROMPTS):
        alone_tokens, alone_logits, _ = generate(model, tokenizer, PRESSES[mode](gates), [prompt])
        assert torch.equal(tokens[b], alone_tokens[0]), (mode, b)
        torch.testing.assert_close(logits[b], alone_logits[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("beams", [2, 4])
@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_beam_search_equals_the_masked_reference(tiny_models, random_gates, name, beams):
    model, tokenizer = tiny_models(name)
    gates = random_gates(model)
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS[:2], return_tensors="pt", padding=True)
    outputs = {}
    for compaction in ("masked", "ragged"):
        press = FastKVzipPress(0.5, gates=gates, window_size=4, compaction=compaction)
        with torch.no_grad(), press(model):
            outputs[compaction] = model.generate(
                **batch,
                max_new_tokens=12,
                num_beams=beams,
                num_return_sequences=beams,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
            )
    assert torch.equal(outputs["masked"].sequences, outputs["ragged"].sequences)
    torch.testing.assert_close(outputs["masked"].sequences_scores, outputs["ragged"].sequences_scores)
    ragged = outputs["ragged"].past_key_values.layers[0]
    assert isinstance(ragged, RaggedLayer) and ragged.batch_size == 2 * beams


@pytest.mark.parametrize("mode", ["one_pass", "chunked"])
def test_a_batch_stores_what_its_sequences_store_alone(llama, random_gates, mode):
    model, tokenizer = llama
    gates = random_gates(model)
    _, _, cache = generate(model, tokenizer, PRESSES[mode](gates), PROMPTS)
    alone = sum(kv_cache_bytes(generate(model, tokenizer, PRESSES[mode](gates), [p])[2]) for p in PROMPTS)
    assert abs(kv_cache_bytes(cache) - alone) <= 0.02 * alone
    layer = cache.layers[0]
    assert layer.sequence_lengths == [len(tokenizer(p).input_ids) + STEPS - 1 for p in PROMPTS]


def test_a_batch_of_equal_lengths_needs_no_padding(llama, random_gates):
    model, tokenizer = llama
    gates = random_gates(model)
    prompts = [CONTEXT, CONTEXT.replace("7 2 9", "4 4 1").replace("green", "blue")]
    assert len({len(tokenizer(p).input_ids) for p in prompts}) == 1
    for mode in ("one_pass", "chunked", "decoding"):
        tokens, logits, _ = generate(model, tokenizer, PRESSES[mode](gates), prompts)
        for b, prompt in enumerate(prompts):
            alone_tokens, alone_logits, _ = generate(model, tokenizer, PRESSES[mode](gates), [prompt])
            assert torch.equal(tokens[b], alone_tokens[0]), (mode, b)
            torch.testing.assert_close(logits[b], alone_logits[0], atol=1e-4, rtol=1e-4)
