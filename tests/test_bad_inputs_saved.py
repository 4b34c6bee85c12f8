"""Bad inputs to saved contexts (save_cache, load_cache, answer_questions, LoadedCache.generate): each refused early
with an error naming the argument or the file, nothing lost, nothing allocated from an unchecked count, and the
loaded context left as it was whatever happens."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_saved_cache import QUESTION, compressed_context
from transformers import DynamicCache

from fastkvzip_press.saved_cache import (
    HEADER_KEY,
    CacheFileError,
    LoadedCache,
    answer_questions,
    load_cache,
    read_header,
    save_cache,
)


@pytest.fixture()
def saved(tiny_models, random_gates, tmp_path):
    """A tiny Llama's context compressed at 0.5 and saved (ids recorded), and the context's ids and cache."""
    model, tokenizer = tiny_models("llama")
    cache, encoded, press = compressed_context(model, tokenizer, random_gates(model), 0.5)
    path = tmp_path / "context.kvz"
    save_cache(cache, path, model, context_ids=encoded["input_ids"], press=press)
    return model, tokenizer, path, encoded["input_ids"], cache


def rewritten(path, tmp_path, change_header=None, change_tensors=None):
    """A copy of the file at ``path`` with its header and/or tensors changed in place by the given functions."""
    tensors, header = load_file(str(path)), read_header(path)
    if change_header:
        change_header(header)
    if change_tensors:
        change_tensors(tensors)
    copy = tmp_path / "changed.kvz"
    save_file(tensors, str(copy), metadata={HEADER_KEY: json.dumps(header)})
    return copy


def question_ids(tokenizer, text=QUESTION):
    return tokenizer(text, return_tensors="pt")["input_ids"]


# ------------------------------------------------------------------------------------------- save_cache


def test_save_refuses_what_is_not_a_cache_model_or_path(saved, tmp_path):
    model, _, _, _, cache = saved
    cases = [
        (lambda: save_cache({"a": 1}, tmp_path / "x.kvz", model), TypeError, "cache must be a transformers Cache"),
        (lambda: save_cache(cache, tmp_path / "x.kvz", None), TypeError, "model must be the loaded transformers"),
        (lambda: save_cache(cache, None, model), TypeError, "path must be a file path"),
        (lambda: save_cache(DynamicCache(), tmp_path / "x.kvz", model), ValueError, "cache holds no context yet"),
        (lambda: save_cache(cache, tmp_path / "x.kvz", model, context_ids=[0.5]), TypeError, "context_ids must"),
        (lambda: save_cache(cache, tmp_path / "x.kvz", model, context_ids=torch.zeros(1, 3, dtype=torch.long)),
         ValueError, "context_ids hold 3 tokens"),
    ]  # fmt: skip
    for call, kind, words in cases:
        with pytest.raises(kind, match=words):
            call()
    assert not (tmp_path / "x.kvz").exists()


def test_save_refuses_another_models_cache(saved, tiny_models, random_gates, tmp_path):
    _, _, _, _, llama_cache = saved
    gemma, gemma_tokenizer = tiny_models("gemma3")
    with pytest.raises(ValueError, match="does not fit the model 'tiny-random-gemma3'.*6 layers, the cache 4"):
        save_cache(llama_cache, tmp_path / "x.kvz", gemma)
    gemma_cache, _, _ = compressed_context(gemma, gemma_tokenizer, random_gates(gemma), 0.5)
    llama, _ = tiny_models("llama")
    with pytest.raises(ValueError, match="does not fit the model 'tiny-random-llama'"):
        save_cache(gemma_cache, tmp_path / "x.kvz", llama)
    assert not (tmp_path / "x.kvz").exists()


def test_save_refuses_a_device_or_pipe_and_never_replaces_it(saved, tmp_path):
    model, _, _, _, cache = saved
    fifo = tmp_path / "pipe.kvz"
    os.mkfifo(fifo)
    with pytest.raises(CacheFileError, match="not a regular file"):
        save_cache(cache, fifo, model)
    assert fifo.is_fifo()


def test_a_save_removes_the_temporaries_killed_saves_of_that_file_left(saved, tmp_path):
    model, _, path, _, cache = saved
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()  # its pid no longer runs: a save killed mid-write
    dead = path.parent / f".{path.name}.{finished.pid}.abcdefgh.tmp"
    dead.write_bytes(b"x" * 100)
    live = path.parent / f".{path.name}.{os.getpid()}.abcdefgh.tmp"  # this process: a save under way
    live.write_bytes(b"x")
    other = path.parent / f".other.kvz.{finished.pid}.abcdefgh.tmp"  # another file's
    other.write_bytes(b"x")
    save_cache(cache, path, model)
    assert not dead.exists() and live.exists() and other.exists()


# ------------------------------------------------------------------------------------------- load_cache


def test_header_counts_are_bounded_before_anything_is_allocated(saved, tmp_path):
    model, _, path, _, _ = saved
    layers = read_header(path)["layers"]

    def every_layer(**fields):
        def change(header):
            for layer in header["layers"]:
                layer.update(fields)

        return change

    cases = [
        (every_layer(logical_length=10**6), "logical_length in \\[1, 4096\\]"),
        (every_layer(logical_length=10**12), "logical_length"),
        (every_layer(logical_length=2**63), "logical_length"),
        (every_layer(spare_tokens=3 * 10**6), "spare_tokens in \\[0, "),
        (every_layer(pad_tokens=[10**6]), "pad_tokens"),
        (lambda header: header.update(context_tokens=10**6), "layers hold \\d+ tokens, its header 1000000"),
        (lambda header: header.update(context_tokens=0), "context_tokens 0"),
        (lambda header: header.update(model_id=""), "names no model"),
        (lambda header: header.update(dtype="float16"), "pass dtype=torch.float32"),
    ]
    assert all(layer["kind"] == "ragged" for layer in layers)
    for change, words in cases:
        with pytest.raises(CacheFileError, match=words):
            load_cache(rewritten(path, tmp_path, change_header=change), model)


def test_a_header_dtype_other_than_the_stored_tensors_is_refused(saved, tmp_path):
    model, _, path, _, _ = saved
    half = {name: t.half() if t.is_floating_point() else t for name, t in load_file(str(path)).items()}
    copy = tmp_path / "half.kvz"
    save_file(half, str(copy), metadata={HEADER_KEY: json.dumps(read_header(path))})  # header still says float32
    with pytest.raises(CacheFileError, match="header says float32, its tensors \\['float16'\\]"):
        load_cache(copy, model)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("part", ["keys", "values"])
def test_non_finite_keys_or_values_are_refused(saved, tmp_path, value, part):
    model, _, path, _, _ = saved

    def poison(tensors):
        tensors[f"layers.2.{part}"][3, 1] = value

    with pytest.raises(CacheFileError, match="layer 2: keys or values hold NaN or infinite values"):
        load_cache(rewritten(path, tmp_path, change_tensors=poison), model)


def test_load_dtype_is_checked_before_reading(saved, tiny_models):
    model, _, path, _, _ = saved
    cases = [
        (torch.bfloat16, ValueError, "keys and values must be in the model's dtype \\(torch.float32\\)"),
        (torch.int64, ValueError, "must be in the model's dtype"),
        ("float16", ValueError, "dtype=torch.float16 cannot run"),
        ("half-precision", TypeError, "dtype must be a torch dtype"),
        (3, TypeError, "dtype must be a torch dtype"),
    ]
    for dtype, kind, words in cases:
        with pytest.raises(kind, match=words):
            load_cache(path, model, dtype=dtype)
    with pytest.raises(TypeError, match="allow_other_model must be True or False"):
        load_cache(path, model, allow_other_model="yes")
    assert load_cache(path, model, dtype="float32").context_tokens > 0  # the model's dtype, by name


# ------------------------------------------------------------------------------------------- answering


def test_answer_questions_checks_its_arguments(saved, tiny_models):
    model, tokenizer, path, _, _ = saved
    loaded = load_cache(path, model)
    question = question_ids(tokenizer)
    vocab = model.get_input_embeddings().num_embeddings
    cases = [
        (dict(question_ids=[question], max_new_tokens=0), ValueError, "max_new_tokens must be >= 1"),
        (dict(question_ids=[question], max_new_tokens=-3), ValueError, "max_new_tokens must be >= 1"),
        (dict(question_ids=[question], max_new_tokens="4"), TypeError, "max_new_tokens must be an integer"),
        (dict(question_ids=[question], max_new_tokens=2.5), TypeError, "max_new_tokens must be an integer"),
        (dict(question_ids=[question.repeat(2, 1)]), ValueError, "question 0 has shape \\(2, "),
        (dict(question_ids=question), TypeError, "question_ids must be a list of questions"),
        (dict(question_ids=[5, 6, 7]), TypeError, "got a list of ints: pass \\[ids\\]"),
        (dict(question_ids=[torch.zeros(1, 0, dtype=torch.long)]), ValueError, "question 0 is empty"),
        (dict(question_ids=[[]]), ValueError, "question 0 is empty"),
        (dict(question_ids=[question.float()]), TypeError, "question 0 holds torch.float32 values"),
        (dict(question_ids=[[5, 6.5]]), TypeError, "question 0 must hold integer token ids"),
        (dict(question_ids=[[5, vocab]]), ValueError, f"token id {vocab}, outside the model's vocabulary"),
        (dict(question_ids=[question, [-1]]), ValueError, "question 1 holds token id -1"),
    ]
    for kwargs, kind, words in cases:
        with pytest.raises(kind, match=words):
            answer_questions(model, loaded, **kwargs)
        assert loaded.cache.get_seq_length() == loaded.context_tokens
    ids = question[0].tolist()
    assert answer_questions(model, loaded, [ids], max_new_tokens=3) == answer_questions(
        model, loaded, [question], max_new_tokens=3
    )  # a list of ints is a question too


def test_answer_questions_refuses_another_model(saved, tiny_models):
    model, tokenizer, path, _, _ = saved
    loaded = load_cache(path, model)
    qwen3, _ = tiny_models("qwen3")
    with pytest.raises(ValueError, match="holds a context of model 'tiny-random-llama', not 'tiny-random-qwen3'"):
        answer_questions(qwen3, loaded, [question_ids(tokenizer)])


@pytest.mark.parametrize("failure", [KeyboardInterrupt, RuntimeError])
def test_the_context_is_left_as_loaded_whatever_happens_mid_answer(saved, failure):
    model, tokenizer, path, _, _ = saved
    loaded = load_cache(path, model)
    questions = [question_ids(tokenizer), question_ids(tokenizer, " what color is the sky ?")]
    expected = answer_questions(model, load_cache(path, model), questions, max_new_tokens=4)
    calls = []

    def interrupt(module, args, output):
        calls.append(1)
        if len(calls) == 3:  # the question's forward and two answer tokens went into the cache
            raise failure("stop")

    handle = model.model.layers[-1].register_forward_hook(interrupt)
    try:
        with pytest.raises(failure):
            answer_questions(model, loaded, questions, max_new_tokens=4)
    finally:
        handle.remove()
    assert loaded.cache.get_seq_length() == loaded.context_tokens
    assert answer_questions(model, loaded, questions, max_new_tokens=4) == expected


def test_answer_questions_shows_progress_when_asked(saved, capsys):
    model, tokenizer, path, _, _ = saved
    loaded = load_cache(path, model)
    answer_questions(model, loaded, [question_ids(tokenizer)] * 2, max_new_tokens=2)
    assert "questions" not in capsys.readouterr().err
    answer_questions(model, loaded, [question_ids(tokenizer)] * 2, max_new_tokens=2, progress=True)
    assert "questions" in capsys.readouterr().err


def test_generate_continues_only_the_saved_context(saved):
    model, tokenizer, path, context_ids, _ = saved
    loaded = load_cache(path, model)
    question = question_ids(tokenizer)
    with pytest.raises(ValueError, match="input_ids hold .* tokens, the loaded cache"):
        loaded.generate(model, context_ids[:, :-5], max_new_tokens=2)
    other = torch.cat([context_ids.flip(1), question], dim=1)
    with pytest.raises(ValueError, match="not the saved context's tokens"):
        loaded.generate(model, other, max_new_tokens=2)
    with pytest.raises(ValueError, match="2 sequences, the loaded context 1"):
        loaded.generate(model, torch.cat([context_ids, question], 1).repeat(2, 1), max_new_tokens=2)
    with pytest.raises(TypeError, match="input_ids must be a \\[B, n\\] tensor"):
        loaded.generate(model, torch.cat([context_ids, question], 1).float(), max_new_tokens=2)
    assert loaded.cache.get_seq_length() == loaded.context_tokens
    ids = torch.cat([context_ids, question], dim=1)
    out = loaded.generate(model, ids, max_new_tokens=2, do_sample=False)
    assert torch.equal(out[:, : ids.shape[1]], ids) and out.shape[1] == ids.shape[1] + 2


def test_a_context_prefilled_in_memory_answers_like_its_file(saved):
    model, tokenizer, path, context_ids, cache = saved
    questions = [question_ids(tokenizer)]
    in_memory = answer_questions(model, LoadedCache.of(cache, model, context_ids), questions, max_new_tokens=4)
    assert in_memory == answer_questions(model, load_cache(path, model), questions, max_new_tokens=4)
