"""Saved contexts: a compressed cache written to a file and read back continues exactly as the one that was saved,
stores about what the cache holds, and bad files are refused early."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import CONTEXT
from safetensors.torch import load_file, save_file
from transformers import DynamicCache

from fastkvzip_press import FastKVzipPress
from fastkvzip_press.cache import kv_cache_bytes
from fastkvzip_press.saved_cache import (
    FORMAT_VERSION,
    HEADER_KEY,
    CacheFileError,
    answer_questions,
    load_cache,
    read_header,
    save_cache,
)

QUESTION = " what is the secret code ?"


def compressed_context(model, tokenizer, gates, ratio: float, batch: int = 1, compaction: str = "ragged"):
    """A context prefilled under FastKVzipPress (ratio 0: no press); ``batch`` sequences, left-padded."""
    texts = [CONTEXT, CONTEXT[: len(CONTEXT) // 2], CONTEXT[len(CONTEXT) // 3 :]][:batch]
    tokenizer.padding_side = "left"
    encoded = tokenizer(texts, return_tensors="pt", padding=True)
    cache = DynamicCache()
    press = FastKVzipPress(ratio, gates=gates, compaction=compaction) if ratio else None
    with torch.no_grad():
        if press is None:
            model(**encoded, past_key_values=cache)
        else:
            with press(model):
                model(**encoded, past_key_values=cache)
    return cache, encoded, press


def continuation_logits(model, cache, encoded, tokenizer, steps: int = 3) -> torch.Tensor:
    """Logits of the question and a few teacher-forced tokens after the context ``[B, q + steps, V]``."""
    question = tokenizer([QUESTION] * encoded["input_ids"].shape[0], return_tensors="pt")["input_ids"]
    forced = torch.arange(5, 5 + steps).repeat(question.shape[0], 1)
    ids = torch.cat([question, forced], dim=1)
    mask = torch.cat([encoded["attention_mask"], torch.ones_like(ids)], dim=1)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, past_key_values=cache).logits


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
@pytest.mark.parametrize(
    ("ratio", "batch", "compaction"),
    [(0.5, 1, "ragged"), (0.5, 3, "ragged"), (0.0, 1, "ragged"), (0.5, 1, "masked"), (0.5, 3, "masked")],
)
def test_a_loaded_cache_continues_as_the_saved_one(tiny_models, random_gates, tmp_path, arch, ratio, batch, compaction):
    model, tokenizer = tiny_models(arch)
    cache, encoded, press = compressed_context(model, tokenizer, random_gates(model), ratio, batch, compaction)
    path = tmp_path / "context.kvz"
    save_cache(cache, path, model, context_ids=encoded["input_ids"], press=press)
    masks = [layer.self_attn.masked_key_indices for layer in model.model.layers]
    if compaction == "masked":  # the masks live on the attention modules: a fresh process starts without them
        for layer in model.model.layers:
            layer.self_attn.masked_key_indices = None
    loaded = load_cache(path, model)
    restored = [layer.self_attn.masked_key_indices for layer in model.model.layers]
    assert [m is None for m in restored] == [m is None for m in masks]
    assert any(m is not None for m in restored) == (compaction == "masked" and ratio > 0)
    assert loaded.cache.get_seq_length() == cache.get_seq_length() == loaded.context_tokens
    assert kv_cache_bytes(loaded.cache) <= kv_cache_bytes(cache)  # no more than what was held (spare rows aside)
    for layer, mask in zip(model.model.layers, masks):  # the saved cache continues with its own masks
        layer.self_attn.masked_key_indices = mask
    expected = continuation_logits(model, cache, encoded, tokenizer)
    for layer, mask in zip(model.model.layers, restored):
        layer.self_attn.masked_key_indices = mask
    assert torch.equal(continuation_logits(model, loaded.cache, encoded, tokenizer), expected)


def test_the_file_holds_about_what_the_cache_holds(tiny_models, random_gates, tmp_path):
    model, tokenizer = tiny_models("llama")
    full, encoded, _ = compressed_context(model, tokenizer, random_gates(model), 0.0)
    compressed, _, press = compressed_context(model, tokenizer, random_gates(model), 0.75)
    full_size = save_cache(full, tmp_path / "full.kvz", model)
    size = save_cache(compressed, tmp_path / "compressed.kvz", model, press=press)
    # tiny heads (16 dims) make the per-pair side columns (scores) weigh more than on a real model
    assert size / full_size <= (1 - 0.75) + 0.02 + 4 / (2 * 16 * 4) * 0.25, size / full_size
    header = read_header(tmp_path / "compressed.kvz")
    assert header["press"] == str(press) and header["gates_digest"] == press.gate_bank.digest()


def test_another_process_continues_the_context(tiny_models, random_gates, tmp_path):
    model, tokenizer = tiny_models("llama")
    cache, encoded, press = compressed_context(model, tokenizer, random_gates(model), 0.5)
    save_cache(cache, tmp_path / "context.kvz", model, press=press)
    save_file({"logits": continuation_logits(model, cache, encoded, tokenizer)}, str(tmp_path / "expected.safetensors"))
    script = f"""
import torch
from safetensors.torch import load_file
from fastkvzip_press.models import tiny_model
from fastkvzip_press.saved_cache import load_cache
model, tokenizer = tiny_model("llama")
loaded = load_cache({str(tmp_path / "context.kvz")!r}, model)
question = tokenizer([{QUESTION!r}], return_tensors="pt")["input_ids"]
ids = torch.cat([question, torch.arange(5, 8)[None]], dim=1)
with torch.no_grad():
    logits = model(input_ids=ids, past_key_values=loaded.cache).logits
assert torch.equal(logits, load_file({str(tmp_path / "expected.safetensors")!r})["logits"]), "logits differ"
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_answers_leave_the_context_as_loaded(tiny_models, random_gates, tmp_path):
    model, tokenizer = tiny_models("llama")
    cache, encoded, press = compressed_context(model, tokenizer, random_gates(model), 0.5)
    save_cache(cache, tmp_path / "context.kvz", model, press=press)
    questions = [tokenizer(q, return_tensors="pt")["input_ids"] for q in (QUESTION, " what color is the sky ?")]
    loaded = load_cache(tmp_path / "context.kvz", model)
    first = answer_questions(model, loaded, questions, max_new_tokens=4)
    assert loaded.cache.get_seq_length() == loaded.context_tokens
    again = answer_questions(model, load_cache(tmp_path / "context.kvz", model), questions[::-1], max_new_tokens=4)
    assert first == again[::-1], "each answer is independent of the questions before it"


# --------------------------------------------------------------------------------------------------- refusals


@pytest.fixture()
def saved(tiny_models, random_gates, tmp_path):
    model, tokenizer = tiny_models("llama")
    cache, _, press = compressed_context(model, tokenizer, random_gates(model), 0.5)
    path = tmp_path / "context.kvz"
    save_cache(cache, path, model, press=press)
    return model, path


def rewrite_header(path, change):
    tensors = load_file(str(path))
    header = read_header(path)
    change(header)
    save_file(tensors, str(path), metadata={HEADER_KEY: json.dumps(header)})


def test_bad_files_are_refused_naming_the_problem(saved, tiny_models, tmp_path):
    model, path = saved
    cases = []
    cases.append((tmp_path, "is a folder, not a cache file"))
    cases.append((tmp_path / "missing.kvz", "does not exist"))
    truncated = tmp_path / "truncated.kvz"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    cases.append((truncated, "is not a readable cache file"))
    junk = tmp_path / "junk.kvz"
    junk.write_bytes(b"\x00" * 64)
    cases.append((junk, "is not a readable cache file"))
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    cases.append((other, "not a fastkvzip-press cache"))
    for bad, words in cases:
        with pytest.raises(CacheFileError, match=words):
            load_cache(bad, model)
    newer = tmp_path / "newer.kvz"
    newer.write_bytes(path.read_bytes())
    rewrite_header(newer, lambda header: header.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(CacheFileError, match="upgrade fastkvzip-press"):
        load_cache(newer, model)
    damaged = tmp_path / "damaged.kvz"
    damaged.write_bytes(path.read_bytes())
    rewrite_header(damaged, lambda header: header["layers"][0].update(logical_length="x", kind="ragged"))
    tensors = load_file(str(damaged))
    tensors["layers.0.lengths"] = tensors["layers.0.lengths"][:1]
    save_file(tensors, str(damaged), metadata={HEADER_KEY: json.dumps(read_header(damaged))})
    with pytest.raises(CacheFileError, match="is damaged"):
        load_cache(damaged, model)


def test_another_model_or_dtype_is_refused(saved, tiny_models):
    model, path = saved
    qwen3, _ = tiny_models("qwen3")
    with pytest.raises(CacheFileError, match="holds a context of model"):
        load_cache(path, qwen3)
    half = type(model)(model.config).to(torch.bfloat16)
    half.config.name_or_path = model.config.name_or_path
    with pytest.raises(CacheFileError, match="pass dtype=torch.bfloat16 to convert"):
        load_cache(path, half)
    converted = load_cache(path, half, dtype=torch.bfloat16)
    assert all(layer.key_buffer.dtype == torch.bfloat16 for layer in converted.cache.layers)


def test_a_save_into_a_folder_is_refused(saved, tmp_path, tiny_models):
    model, _ = saved
    with pytest.raises(CacheFileError, match="is a folder"):
        save_cache(DynamicCache(), tmp_path, model)
