"""The presses on the GPU: tiny random Llama / Qwen3 / Gemma3 models in fp32, bf16 and fp16 with sdpa (and
flash-attention where it is installed).

Ragged compaction is compared with the masked reference (kvpress's fake keys) with the same tokens fed to both
(teacher forcing), so logits compare step by step however early a near-tie flips a greedy pick. Tolerance: fp32
``FP32_TOL``; half precision ``ULPS`` units in the last place at the logit scale (twice the CPU suite's 4: the
GPU's flash kernels round the attention weights to the half type before the value product, in blocks that differ
between a pass over every key and a pass over the kept keys). A wrong pair kept or a wrong position moves these
logits by 0.05 to 0.5, far outside it.
"""

import os
from functools import partial
from unittest import mock

import pytest
import torch
from helpers import (
    CONTEXT,
    assert_same_run,
    generate_left_padded,
    stored_pairs_per_head,
    teacher_forced_after_prefill,
    teacher_forced_decoding,
)

from fastkvzip_press import FastKVzipDecodingPress, FastKVzipPress, GateBank, ModelLayout, RaggedLayer
from fastkvzip_press.cache import attention_path_counts, ragged_attention_path, ragged_layer_ids, varlen
from fastkvzip_press.models import tiny_model
from fastkvzip_press.triton.dispatch import KERNELS_ENV

pytestmark = pytest.mark.cuda

ARCHS = ["llama", "qwen3", "gemma3"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HALF = DTYPES[1:]
FP32_TOL = 1e-3
ULPS = 8
STEPS = 8


@pytest.fixture(scope="module")
def models(device):
    """Tiny random models on the device, once per (architecture, dtype, attention), with random gates."""
    built: dict = {}

    def get(arch: str, dtype: torch.dtype, attention: str = "sdpa"):
        if (arch, dtype, attention) not in built:
            model, tokenizer = tiny_model(arch, attn_implementation=attention, dtype=dtype)
            gates = GateBank.random(ModelLayout.from_model(model), seed=0)
            built[arch, dtype, attention] = model.to(device), tokenizer, gates
        return built[arch, dtype, attention]

    return get


def tolerance(dtype: torch.dtype, logits: torch.Tensor) -> float:
    if dtype == torch.float32:
        return FP32_TOL
    return ULPS * torch.finfo(dtype).eps * float(logits.abs().max())


def assert_stored_on(device, dtype, cache, layer_ids):
    for layer_id in layer_ids:
        layer = cache.layers[layer_id]
        assert isinstance(layer, RaggedLayer)
        assert layer.key_buffer.device == layer.starts.device == device
        assert layer.key_buffer.dtype == layer.value_buffer.dtype == dtype


# ------------------------------------------------------------------------------------------------ prefill press


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arch", ARCHS)
def test_one_pass_ragged_equals_masked(models, device, arch, dtype):
    model, tokenizer, gates = models(arch, dtype)
    ragged = FastKVzipPress(0.5, gates=gates, window_size=4)
    tokens, logits, cache = teacher_forced_after_prefill(model, tokenizer, ragged)
    masked = FastKVzipPress(0.5, gates=gates, window_size=4, compaction="masked")
    _, masked_logits, _ = teacher_forced_after_prefill(model, tokenizer, masked, forced=tokens)
    assert_same_run(tolerance(dtype, masked_logits), tokens, logits, masked_logits)
    for layer_id, kept in ragged.last_stats.kept_per_head.items():  # the same decision, from the same prefill
        assert torch.equal(kept.cpu(), masked.last_stats.kept_per_head[layer_id].cpu())
    assert ragged_layer_ids(cache) == list(ragged.gate_bank.layer_ids)  # Gemma3: sliding layers stay dense
    assert_stored_on(device, dtype, cache, ragged.gate_bank.layer_ids)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_chunked_prefill_without_eviction_equals_the_full_cache(models, arch, dtype):
    """Threshold 0 keeps every pair: the chunked ragged run must give the full cache's logits (positions, masks and
    ragged attention across chunks)."""
    model, tokenizer, gates = models(arch, dtype)
    press = FastKVzipPress(gates=gates, threshold=0.0, window_size=4, chunk_size=37)
    tokens, logits, _ = teacher_forced_after_prefill(model, tokenizer, press)
    _, full_logits, _ = teacher_forced_after_prefill(model, tokenizer, FastKVzipPress(gates=gates), forced=tokens)
    assert_same_run(tolerance(dtype, full_logits), tokens, logits, full_logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_kernels_give_what_the_torch_references_give(models, arch, dtype):
    """The whole press with the compiled kernels and with their torch references: the same caches, so the same
    logits bit for bit."""
    model, tokenizer, gates = models(arch, dtype)
    runs = {}
    for backend in ("triton", "torch"):
        with mock.patch.dict(os.environ, {KERNELS_ENV: backend}):
            press = FastKVzipPress(0.6, gates=gates, window_size=4, chunk_size=50)
            runs[backend] = teacher_forced_after_prefill(model, tokenizer, press)
    assert runs["triton"][0] == runs["torch"][0]
    assert torch.equal(runs["triton"][1], runs["torch"][1])


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_the_press_decodes_through_varlen_as_through_per_segment_sdpa(models, device, dtype):
    model, tokenizer, gates = models("qwen3", dtype)
    path = ragged_attention_path(device, dtype, ModelLayout.from_model(model).head_dim)
    if path.name != varlen.VARLEN:
        pytest.skip(f"the varlen path does not run here: {path}")
    before = attention_path_counts().get(varlen.VARLEN, 0)
    tokens, logits, _ = teacher_forced_after_prefill(model, tokenizer, FastKVzipPress(0.5, gates=gates, window_size=4))
    assert attention_path_counts()[varlen.VARLEN] > before
    with mock.patch.dict(os.environ, {varlen.VARLEN_ENV: "0"}):
        press = FastKVzipPress(0.5, gates=gates, window_size=4)
        _, per_segment_logits, _ = teacher_forced_after_prefill(model, tokenizer, press, forced=tokens)
    assert_same_run(tolerance(dtype, per_segment_logits), tokens, logits, per_segment_logits)


# ------------------------------------------------------------------------------------------------ flash-attention


@pytest.mark.parametrize("implementation", ["flash_attention_2", "flash_attention_3"])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_ragged_compaction_with_flash_attention(models, device, arch, implementation):
    """With flash-attention the model's dense layers (Gemma3's sliding ones, and every layer of the prefill) keep
    calling flash-attention once the press switched the model to ragged attention."""
    pytest.importorskip("flash_attn" if implementation == "flash_attention_2" else "flash_attn_interface")
    model, tokenizer, gates = models(arch, torch.bfloat16, implementation)
    ragged = FastKVzipPress(0.5, gates=gates, window_size=4)
    tokens, logits, cache = teacher_forced_after_prefill(model, tokenizer, ragged)
    masked = FastKVzipPress(0.5, gates=gates, window_size=4, compaction="masked")
    _, masked_logits, _ = teacher_forced_after_prefill(model, tokenizer, masked, forced=tokens)
    assert_same_run(tolerance(torch.bfloat16, masked_logits), tokens, logits, masked_logits)
    assert ragged_layer_ids(cache) == list(ragged.gate_bank.layer_ids)
    ids = tokenizer(CONTEXT, return_tensors="pt").input_ids.to(device)
    with torch.no_grad(), FastKVzipPress(0.5, gates=gates, window_size=4)(model):
        out = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert out.sequences.shape[1] == ids.shape[1] + 6


# ---------------------------------------------------------------------------------------------- decoding press


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_decoding_press_ragged_equals_masked(models, device, arch, dtype):
    model, tokenizer, gates = models(arch, dtype)
    runs, forced = {}, None
    for compaction in ("ragged", "masked"):
        press = FastKVzipDecodingPress(
            gates=gates, compression_interval=16, target_size=40, window_size=8, compaction=compaction
        )
        runs[compaction] = teacher_forced_decoding(model, tokenizer, press, forced=forced, steps=60)
        forced = runs[compaction][0]
        assert press.last_stats.compressions > 3
    assert_same_run(tolerance(dtype, runs["masked"][1]), runs["ragged"][0], runs["ragged"][1], runs["masked"][1])
    assert_stored_on(device, dtype, runs["ragged"][2], gates.layer_ids)
    assert stored_pairs_per_head(runs["ragged"][2], gates.layer_ids) <= 40 + 16


# ------------------------------------------------------------------------------------------------------ batches

WORDS = CONTEXT.split()
PROMPTS = [CONTEXT, " ".join(WORDS[40:]), " ".join(WORDS[:90]) + " what is the code ?"]  # 3 lengths
BATCH_PRESSES = {
    "one_pass": lambda gates: FastKVzipPress(0.5, gates=gates, window_size=4),
    "chunked": lambda gates: FastKVzipPress(0.5, gates=gates, window_size=0.05, chunk_size=37),
    "decoding": lambda gates: FastKVzipDecodingPress(
        gates=gates, compression_interval=16, target_size=40, window_size=8
    ),
}


# Left-padded greedy generation under a press: (new tokens, fp32 logits, cache).
generate = partial(generate_left_padded, steps=20)


@pytest.mark.parametrize("mode", list(BATCH_PRESSES))
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_each_prompt_of_a_left_padded_batch_gets_what_it_gets_alone(models, arch, mode):
    """In fp32: in half precision the batch's padded matmuls round differently from the prompt's alone, and the
    gate scores near the budget's threshold may then flip (what one precision decides, the other need not)."""
    model, tokenizer, gates = models(arch, torch.float32)
    tokens, logits, cache = generate(model, tokenizer, BATCH_PRESSES[mode](gates), PROMPTS)
    assert any(isinstance(layer, RaggedLayer) and layer.batch_size == 3 for layer in cache.layers)
    for b, prompt in enumerate(PROMPTS):
        alone_tokens, alone_logits, _ = generate(model, tokenizer, BATCH_PRESSES[mode](gates), [prompt])
        assert torch.equal(tokens[b], alone_tokens[0]), b
        torch.testing.assert_close(logits[b], alone_logits[0], atol=FP32_TOL, rtol=FP32_TOL)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("mode", list(BATCH_PRESSES))
def test_a_half_precision_batch_is_stored_ragged_on_the_device(models, device, mode, dtype):
    model, tokenizer, gates = models("qwen3", dtype)
    _, logits, cache = generate(model, tokenizer, BATCH_PRESSES[mode](gates), PROMPTS)
    assert torch.isfinite(logits).all()
    assert_stored_on(device, dtype, cache, gates.layer_ids)
    assert all(cache.layers[i].batch_size == 3 for i in gates.layer_ids)
    if mode == "decoding":
        assert stored_pairs_per_head(cache, gates.layer_ids) <= 40 + 16
        return
    heads = ModelLayout.from_model(model).num_kv_heads
    for b, prompt in enumerate(PROMPTS):  # per head: half of the prompt's own tokens, then the 19 fed back
        held = [sum(cache.layers[i].head_lengths[b * heads : (b + 1) * heads]) / heads for i in gates.layer_ids]
        expected = len(tokenizer(prompt).input_ids) / 2 + 19
        assert abs(sum(held) / len(held) - expected) <= 2, (b, held, expected)


@pytest.mark.parametrize("beams", [2, 4])
def test_beam_search_equals_the_masked_reference(models, beams):
    model, tokenizer, gates = models("llama", torch.float32)
    outputs = {}
    for compaction in ("masked", "ragged"):
        press = FastKVzipPress(0.5, gates=gates, window_size=4, compaction=compaction)
        outputs[compaction] = generate(
            model, tokenizer, press, PROMPTS[:2], steps=12, num_beams=beams, num_return_sequences=beams
        )
    assert torch.equal(outputs["masked"][0], outputs["ragged"][0])
    torch.testing.assert_close(outputs["masked"][1], outputs["ragged"][1], atol=FP32_TOL, rtol=FP32_TOL)
