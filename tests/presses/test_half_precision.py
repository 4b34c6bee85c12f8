"""bf16 and fp16 end to end on CPU: every press on tiny Llama, Qwen3 and Gemma3 models in half precision.

Ragged compaction is compared with the masked reference (kvpress's fake keys) with the same tokens fed to both
(teacher forcing): the ragged run decodes greedily and the masked run is fed the ragged run's tokens, so their logits
are compared step by step however early a near-tie flips a greedy pick.

Tolerance: ``EPSILONS * eps * max |logit|`` with ``EPSILONS = 4`` (``eps``: the dtype's machine epsilon, 2^-7 in bf16
and 2^-10 in fp16; 4 to 8 ulps of the largest logit). These random models give logits up to 0.46-0.69, so about
0.015-0.02 in bf16 and 0.002-0.0027 in fp16. Both runs attend over the same pairs (checked: the same positions per
head, and for the one-pass press the same key and value bits); they differ only in the order of the attention
reductions (per-head SDPA over the kept rows against SDPA over every row, evicted keys replaced by keys whose weight
underflows to 0), after which bf16/fp16 round every layer's output. Measured over every comparison here: at most
1.54 eps at the logit scale (bf16 0.0059, fp16 0.00067), so 4 leave a margin of 2.6. A greedy pick may differ only
where the top-2 logit gap is within the tolerance (bf16 gives exact ties: 4 of the 14 bf16 comparisons flip a pick,
all at a gap of 0). The kept pairs themselves are compared exactly, since on logits this small a pair or two per
head more or less moves them by only 0.002-0.05.
"""

import pytest
import torch
from helpers import (
    CONTEXT,
    QUESTIONS,
    assert_same_run,
    stored_pairs_per_head,
    teacher_forced_after_prefill,
    teacher_forced_decoding,
)
from kvpress import AdaKVPress
from transformers import DynamicCache

from fastkvzip_press import (
    FastKVzipDecodingPress,
    FastKVzipPress,
    FastKVzipScorerPress,
    GateBank,
    ModelLayout,
    RaggedLayer,
    kv_cache_bytes,
)
from fastkvzip_press.cache import ragged_layer_ids
from fastkvzip_press.models import tiny_model

HALF = [torch.bfloat16, torch.float16]
ARCHS = ["llama", "qwen3", "gemma3"]
EPSILONS = 4
STEPS = 8


@pytest.fixture(scope="module")
def half_models():
    """Tiny random models in half precision, built once per (architecture, dtype), with their random gates."""
    cache: dict = {}

    def get(arch: str, dtype: torch.dtype):
        if (arch, dtype) not in cache:
            model, tokenizer = tiny_model(arch, dtype=dtype)
            cache[arch, dtype] = model, tokenizer, GateBank.random(ModelLayout.from_model(model), seed=0)
        return cache[arch, dtype]

    return get


def tolerance(dtype: torch.dtype, logits: torch.Tensor) -> float:
    """``EPSILONS`` roundings of ``dtype`` at the scale of ``logits``: ``EPSILONS * eps * max |logit|``."""
    return EPSILONS * torch.finfo(dtype).eps * float(logits.abs().max())


def assert_same_pairs(model, ragged_cache, masked_cache, layer_ids, n_context: int) -> None:
    """The ragged cache stores, bit for bit and in order, the context pairs the masked run still attends (those
    outside kvpress's ``masked_key_indices``), before what decoding appended."""
    for layer_id in layer_ids:
        dense = masked_cache.layers[layer_id]
        evicted = torch.zeros(dense.keys.shape[:3], dtype=torch.bool)[..., :n_context]
        evicted[model.model.layers[layer_id].self_attn.masked_key_indices] = True
        layer = ragged_cache.layers[layer_id]
        for head in range(layer.num_heads):
            kept = ~evicted[0, head]
            n_kept = int(kept.sum())
            assert torch.equal(layer.head_keys(head)[:n_kept], dense.keys[0, head, :n_context][kept])
            assert torch.equal(layer.head_values(head)[:n_kept], dense.values[0, head, :n_context][kept])


def assert_stored_in(dtype, cache, layer_ids):
    for layer_id in layer_ids:
        layer = cache.layers[layer_id]
        assert isinstance(layer, RaggedLayer)
        assert layer.key_buffer.dtype == layer.value_buffer.dtype == layer.dtype == dtype


# ------------------------------------------------------------------------------------------------ prefill press


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("budget", [{"compression_ratio": 0.5}, {"threshold": 0.5}], ids=["ratio", "threshold"])
def test_one_pass_ragged_equals_masked(half_models, arch, dtype, budget):
    model, tokenizer, gates = half_models(arch, dtype)
    ragged = FastKVzipPress(gates=gates, window_size=4, **budget)
    tokens, ragged_logits, cache = teacher_forced_after_prefill(model, tokenizer, ragged)
    masked = FastKVzipPress(gates=gates, window_size=4, compaction="masked", **budget)
    _, masked_logits, masked_cache = teacher_forced_after_prefill(model, tokenizer, masked, forced=tokens)
    assert_same_run(tolerance(dtype, masked_logits), tokens, ragged_logits, masked_logits)
    n_context = len(tokenizer(CONTEXT).input_ids)
    assert_same_pairs(model, cache, masked_cache, ragged.gate_bank.layer_ids, n_context)
    assert 0 < ragged.last_stats.compression_ratio < 1
    assert_stored_in(dtype, cache, ragged.gate_bank.layer_ids)
    assert ragged_layer_ids(cache) == list(ragged.gate_bank.layer_ids)  # Gemma3: sliding layers stay dense


def prefilled(model, tokenizer, press) -> DynamicCache:
    """The cache right after prefilling ``CONTEXT`` under ``press``."""
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model.model(input_ids=tokenizer(CONTEXT, return_tensors="pt").input_ids, past_key_values=cache)
    return cache


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_kv_bytes_shrink_as_in_fp32(half_models, dtype):
    """The same ratio keeps the same number of pairs in every precision; each weighs half as much as in fp32."""
    model, tokenizer, gates = half_models("llama", dtype)
    fp32_model, _ = tiny_model("llama")  # the same weights in fp32 (the seed fixes them)
    shrink, used = {}, {}
    for name, m in (("half", model), ("fp32", fp32_model)):
        full = prefilled(m, tokenizer, FastKVzipPress(gates=gates))  # ratio 0: nothing evicted, stays dense
        cache = prefilled(m, tokenizer, FastKVzipPress(0.75, gates=gates, window_size=4))
        used[name] = sum(layer.used_bytes() for layer in cache.layers)
        assert used[name] <= 0.25 * kv_cache_bytes(full) + 1e-9
        shrink[name] = kv_cache_bytes(cache) / kv_cache_bytes(full)
    assert 2 * used["half"] == used["fp32"]
    # Spare rows scale with the dtype; the segment index (int64) does not, so half precision shrinks a little less
    # (measured: 0.3160 of the full cache against 0.3153 in fp32).
    assert shrink["fp32"] <= shrink["half"] <= shrink["fp32"] + 0.02


# ---------------------------------------------------------------------------------------------- chunked prefill


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill_without_eviction_equals_the_full_cache(half_models, arch, dtype):
    """There is no masked chunked prefill; threshold 0 keeps every pair, so the chunked ragged run must give the
    full cache's logits (positions, masks and ragged attention across chunks, in half precision)."""
    model, tokenizer, gates = half_models(arch, dtype)
    press = FastKVzipPress(gates=gates, threshold=0.0, window_size=4, chunk_size=37)
    tokens, logits, cache = teacher_forced_after_prefill(model, tokenizer, press, steps=4)
    _, full_logits, _ = teacher_forced_after_prefill(
        model, tokenizer, FastKVzipPress(gates=gates), forced=tokens, steps=4
    )
    assert_same_run(tolerance(dtype, full_logits), tokens, logits, full_logits)
    assert_stored_in(dtype, cache, gates.layer_ids)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_chunked_prefill_meets_the_budget(half_models, dtype):
    model, tokenizer, gates = half_models("qwen3", dtype)
    press = FastKVzipPress(0.5, gates=gates, window_size=4, chunk_size=40)
    _, logits, cache = teacher_forced_after_prefill(model, tokenizer, press, steps=2)
    assert abs(press.last_stats.compression_ratio - 0.5) < 0.02
    assert torch.isfinite(logits).all()
    assert_stored_in(dtype, cache, gates.layer_ids)


# ---------------------------------------------------------------------------------------------- decoding press


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("arch", ARCHS)
def test_decoding_press_ragged_equals_masked(half_models, arch, dtype):
    model, tokenizer, gates = half_models(arch, dtype)
    runs = {}
    forced = None
    for compaction in ("ragged", "masked"):
        press = FastKVzipDecodingPress(
            gates=gates, compression_interval=8, target_size=40, window_size=8, compaction=compaction
        )
        runs[compaction] = teacher_forced_decoding(model, tokenizer, press, forced=forced, steps=40)
        assert compaction == "ragged" or all(runs[compaction][3][i] is not None for i in gates.layer_ids)
        forced = runs[compaction][0]
        assert press.last_stats.compressions == 1 + 40 // 8  # the prompt, then every interval
    assert_same_run(tolerance(dtype, runs["masked"][1]), runs["ragged"][0], runs["ragged"][1], runs["masked"][1])
    ragged_cache, masked_cache, masked_indices = runs["ragged"][2], *runs["masked"][2:]
    for layer_id in gates.layer_ids:  # the same decisions: each head holds the positions the masked run attends
        n_tokens = masked_cache.layers[layer_id].keys.shape[2]
        attended = torch.ones(masked_cache.layers[layer_id].keys.shape[:3], dtype=torch.bool)
        attended[masked_indices[layer_id]] = False
        layer = ragged_cache.layers[layer_id]
        for head in range(layer.num_heads):
            assert layer.head_positions(head).tolist() == torch.arange(n_tokens)[attended[0, head]].tolist()
    assert_stored_in(dtype, ragged_cache, gates.layer_ids)
    assert stored_pairs_per_head(runs["ragged"][2], gates.layer_ids) <= 40 + 8


# ------------------------------------------------------------------------------------------------ scorer press


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_scorer_press_equals_the_masked_reference(half_models, arch, dtype):
    """Alone, the scorer gathers each head's top-k pairs into a smaller dense cache. kvpress's AdaKVPress with
    ``alpha_safeguard=1`` keeps the same top-k per head and masks the rest (Gemma3 is left out: AdaKV also masks
    its ungated sliding layers, which the scorer alone leaves intact)."""
    model, tokenizer, gates = half_models(arch, dtype)
    scorer = FastKVzipScorerPress(0.5, gates=gates)
    tokens, logits, cache = teacher_forced_after_prefill(model, tokenizer, scorer)
    masked = AdaKVPress(FastKVzipScorerPress(0.5, gates=gates), alpha_safeguard=1.0)
    _, masked_logits, _ = teacher_forced_after_prefill(model, tokenizer, masked, forced=tokens)
    assert_same_run(tolerance(dtype, masked_logits), tokens, logits, masked_logits)
    n_context, n_question = (len(tokenizer(text).input_ids) for text in (CONTEXT, QUESTIONS[0]))
    for layer in cache.layers:  # half the context, then the question and the answer
        assert layer.keys.dtype == layer.values.dtype == dtype
        assert layer.keys.shape[2] == n_context // 2 + n_question + STEPS - 1


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_scorer_press_generates_on_gemma3(half_models, dtype):
    model, tokenizer, gates = half_models("gemma3", dtype)
    ids = tokenizer(CONTEXT, return_tensors="pt").input_ids
    press = FastKVzipScorerPress(0.5, gates=gates)
    with torch.no_grad(), press(model):
        out = model.generate(
            ids, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True
        )
    layout = ModelLayout.from_model(model)
    for layer_id, layer in enumerate(out.past_key_values.layers):
        assert layer.keys.dtype == dtype
        if layer_id in layout.gated_layer_ids:
            assert layer.keys.shape[2] == ids.shape[1] // 2 + STEPS - 1
