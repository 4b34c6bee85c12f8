"""What a press cannot do is refused when it is entered, naming the cause: a press entered twice, two presses at once,
and what kvpress's wrappers cannot carry."""

import pytest
from helpers import CONTEXT, QUESTIONS, make_pipeline
from kvpress import ComposedPress, KnormPress, PrefillDecodingPress

from fastkvzip_press import FastKVzipDecodingPress, FastKVzipPress, FastKVzipScorerPress


def prompt(tokenizer):
    return tokenizer(CONTEXT, return_tensors="pt").input_ids


@pytest.mark.parametrize("make", [FastKVzipPress, FastKVzipScorerPress, FastKVzipDecodingPress])
def test_a_press_entered_twice(llama, random_gates, make):
    model, tokenizer = llama
    press = make(gates=random_gates(model)) if make is FastKVzipDecodingPress else make(0.5, gates=random_gates(model))
    with press(model):
        with pytest.raises(RuntimeError, match="entered twice"):
            with press(model):
                pass
    with press(model):  # leaving the first block released the model
        model.generate(prompt(tokenizer), max_new_tokens=2, do_sample=False)


def test_two_presses_at_once(llama, random_gates):
    model, tokenizer = llama
    gates = random_gates(model)
    prefill, decoding = FastKVzipPress(0.5, gates=gates, window_size=4), FastKVzipDecodingPress(gates=gates)
    with prefill(model):
        with pytest.raises(RuntimeError, match="FastKVzipPress is already active.*PrefillDecodingPress"):
            with decoding(model):
                pass
    # The combination the message points to works.
    combined = PrefillDecodingPress(prefilling_press=prefill, decoding_press=decoding)
    answer = make_pipeline(model, tokenizer)(CONTEXT, question=QUESTIONS[0], press=combined, max_new_tokens=2)
    assert isinstance(answer["answer"], str)


def test_composed_press_around_a_decoding_budget(llama, random_gates):
    model, tokenizer = llama
    composed = ComposedPress(
        [KnormPress(0.2), FastKVzipDecodingPress(gates=random_gates(model), target_size=64, window_size=8)]
    )
    with pytest.raises(ValueError, match="ComposedPress multiplies.*Give FastKVzipDecodingPress a compression_ratio"):
        make_pipeline(model, tokenizer)(CONTEXT, question=QUESTIONS[0], press=composed, max_new_tokens=2)


@pytest.mark.parametrize("wrapper", ["ComposedPress", "PrefillDecodingPress"])
def test_chunk_size_inside_a_wrapper_names_it(llama, random_gates, wrapper):
    model, tokenizer = llama
    chunked = FastKVzipPress(0.5, gates=random_gates(model), chunk_size=32, window_size=4)
    press = ComposedPress([chunked]) if wrapper == "ComposedPress" else PrefillDecodingPress(prefilling_press=chunked)
    with pytest.raises(ValueError, match=f"{wrapper} prefills the context in one pass"):
        make_pipeline(model, tokenizer)(CONTEXT, question=QUESTIONS[0], press=press, max_new_tokens=2)
