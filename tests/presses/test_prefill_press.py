import pytest
import torch
from helpers import CONTEXT, QUESTIONS, make_pipeline
from transformers import DynamicCache

from fastkvzip_press import FastKVzipPress, GateBank, GateMismatchError, ModelLayout
from fastkvzip_press.layout import decoder_layers
from fastkvzip_press.models import tiny_model


def masked_layers(model):
    return {
        i: layer.self_attn.masked_key_indices
        for i, layer in enumerate(decoder_layers(model))
        if getattr(layer.self_attn, "masked_key_indices", None) is not None
    }


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.9])
def test_pipeline_every_architecture(arch, tiny_models, random_gates, ratio):
    model, tokenizer = tiny_models(arch)
    pipe = make_pipeline(model, tokenizer)
    press = FastKVzipPress(ratio, gates=random_gates(model), n_sink=4, window_size=8, compaction="masked")
    answers = pipe(CONTEXT, questions=QUESTIONS, press=press, max_new_tokens=4)["answers"]
    assert len(answers) == len(QUESTIONS) and all(isinstance(a, str) for a in answers)
    layout = ModelLayout.from_model(model)
    if ratio == 0:
        assert press.last_stats.compression_ratio == 0.0  # a run that evicts nothing reports it
        assert answers == pipe(CONTEXT, questions=QUESTIONS, max_new_tokens=4)["answers"]
        return
    stats = press.last_stats
    assert abs(stats.compression_ratio - ratio) < 1e-3
    masked = masked_layers(model)
    assert set(masked) == set(layout.gated_layer_ids)  # Gemma3: global layers only
    for indices in masked.values():
        seq = indices[2]
        assert seq.min() >= 4 and seq.max() < stats.context_length - 8  # sink and window are protected
    kept = torch.stack(list(stats.kept_per_head.values()))
    assert kept.min() < kept.max()  # one global budget: heads keep different amounts


def test_global_budget_depends_on_gates(llama, random_gates):
    model, tokenizer = llama
    pipe = make_pipeline(model, tokenizer)
    kept = []
    for seed in (0, 1):
        press = FastKVzipPress(0.5, gates=random_gates(model, seed=seed), window_size=4)
        pipe(CONTEXT, question=QUESTIONS[0], press=press, max_new_tokens=2)
        kept.append(torch.stack(list(press.last_stats.kept_per_head.values())))
    assert not torch.equal(kept[0], kept[1])


def test_layerwise_gives_each_layer_the_same_budget(llama, random_gates):
    model, tokenizer = llama
    press = FastKVzipPress(0.5, gates=random_gates(model), layerwise=True, window_size=4)
    make_pipeline(model, tokenizer)(CONTEXT, question=QUESTIONS[0], press=press, max_new_tokens=2)
    per_layer = {layer_id: int(k.sum()) for layer_id, k in press.last_stats.kept_per_head.items()}
    assert len(set(per_layer.values())) == 1


def test_threshold_mode_measures_the_achieved_ratio(llama, random_gates):
    model, tokenizer = llama
    gates = random_gates(model)
    press = FastKVzipPress(gates=gates, threshold=0.06, n_sink=2, window_size=4)
    ids = tokenizer(CONTEXT, return_tensors="pt").input_ids
    with torch.no_grad(), press(model):
        model.model(input_ids=ids, past_key_values=DynamicCache())
    n_tokens = press.last_stats.context_length
    hidden = {}
    hooks = [
        layer.self_attn.register_forward_hook(
            lambda m, a, kw, out: hidden.__setitem__(m.layer_idx, kw["hidden_states"]), with_kwargs=True
        )
        for layer in decoder_layers(model)
    ]
    try:
        with torch.no_grad():
            model.model(input_ids=ids)
    finally:
        for hook in hooks:
            hook.remove()
    evicted = sum(int((gates.score(i, hidden[i])[..., 2 : n_tokens - 4] < 0.06).sum()) for i in gates.layer_ids)
    total = len(gates.layer_ids) * 2 * n_tokens
    assert press.last_stats.compression_ratio == pytest.approx(evicted / total)
    assert press.compression_ratio == 0.0  # the fields stay as set
    assert 0 < press.last_stats.compression_ratio < 1


class HeadUniformBank(GateBank):
    """Gates whose every KV head scores like head 0, so layer-wise eviction removes the same tokens in each head."""

    def score(self, layer_id, hidden_states):
        scores = super().score(layer_id, hidden_states)
        # Repeated tokens have equal layer-0 scores; a tiny ramp makes every token's score distinct.
        ramp = torch.linspace(0, 1e-3, scores.shape[-1])
        return (scores[:, :1] + ramp).expand_as(scores).contiguous()


def head_uniform_gates(model) -> GateBank:
    bank = GateBank.random(ModelLayout.from_model(model), seed=7)
    bank.__class__ = HeadUniformBank
    return bank


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_masked_eviction_equals_physical_removal(tiny_models, name):
    """The masked path (the reference for real compaction) gives the logits of a cache without the evicted pairs."""
    model, tokenizer = tiny_models(name)
    ids = tokenizer(CONTEXT, return_tensors="pt").input_ids
    question = tokenizer(QUESTIONS[0], return_tensors="pt").input_ids
    n_tokens, q_len = ids.shape[1], question.shape[1]
    positions = torch.arange(n_tokens, n_tokens + q_len)[None]
    # Evict an even number of (head, token) pairs per layer, so tied head pairs are never split.
    ratio = (n_tokens // 2 + 0.25) / n_tokens
    press = FastKVzipPress(ratio, gates=head_uniform_gates(model), layerwise=True, window_size=4, compaction="masked")

    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model.model(input_ids=ids, past_key_values=cache)
    with torch.no_grad():
        masked_logits = model(question, past_key_values=cache, position_ids=positions).logits
    indices = [layer.self_attn.masked_key_indices for layer in decoder_layers(model)]

    reference = DynamicCache()
    with torch.no_grad():
        model.model(input_ids=ids, past_key_values=reference)
    for layer_id, (_, head_idx, seq_idx) in enumerate(indices):
        evicted = seq_idx[head_idx == 0]
        assert torch.equal(evicted.sort().values, seq_idx[head_idx == 1].sort().values)
        keep = torch.ones(n_tokens, dtype=torch.bool)
        keep[evicted] = False
        cache_layer = reference.layers[layer_id]
        cache_layer.keys = cache_layer.keys[:, :, keep].contiguous()
        cache_layer.values = cache_layer.values[:, :, keep].contiguous()
    assert reference.get_seq_length() < n_tokens
    with torch.no_grad():
        physical_logits = model(question, past_key_values=reference, position_ids=positions).logits
    torch.testing.assert_close(masked_logits, physical_logits, atol=1e-4, rtol=1e-4)


def test_eviction_happens_inside_generate(llama, random_gates):
    model, tokenizer = llama
    ids = tokenizer(CONTEXT, return_tensors="pt").input_ids
    press = FastKVzipPress(0.7, gates=random_gates(model), window_size=4, compaction="masked")
    with press(model):
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 3
    assert press.last_stats is not None and masked_layers(model)


def test_batch_of_two_through_generate(llama, random_gates):
    model, tokenizer = llama
    batch = tokenizer([CONTEXT, CONTEXT.replace("7 2 9", "4 4 1")], return_tensors="pt")
    press = FastKVzipPress(0.5, gates=random_gates(model), window_size=4, compaction="masked")
    with press(model):
        model.generate(**batch, max_new_tokens=2, do_sample=False)
    kept = press.last_stats.kept_per_head[0]
    assert kept.shape == (2, 2)
    assert abs(press.last_stats.compression_ratio - 0.5) < 1e-3


def test_second_call_on_same_model(llama, random_gates):
    model, tokenizer = llama
    pipe = make_pipeline(model, tokenizer)
    press = FastKVzipPress(0.5, gates=random_gates(model), window_size=4)
    first = pipe(CONTEXT, question=QUESTIONS[0], press=press, max_new_tokens=3)["answer"]
    second = pipe(CONTEXT, question=QUESTIONS[0], press=press, max_new_tokens=3)["answer"]
    assert first == second


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"compression_ratio": 1.0}, r"\[0, 1\)"),
        ({"compression_ratio": -0.1}, r"\[0, 1\)"),
        ({"threshold": 1.5}, "threshold"),
        ({"compression_ratio": 0.5, "threshold": 0.1}, "either"),
        ({"window_size": 1.5}, "fraction"),
        ({"window_size": -1}, "window_size"),
        ({"n_sink": -1}, "n_sink"),
        ({"compaction": "ragged-ish"}, "compaction"),
    ],
)
def test_bad_configuration(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FastKVzipPress(**kwargs)


@pytest.mark.parametrize("context", ["", "the sky"])
def test_empty_or_tiny_context(llama, random_gates, context):
    model, tokenizer = llama
    press = FastKVzipPress(0.5, gates=random_gates(model), n_sink=4, window_size=64)
    with pytest.raises(ValueError, match="not more than the protected"):
        make_pipeline(model, tokenizer)(context, question="what ?", press=press, max_new_tokens=2)


def test_unreachable_ratio_warns_and_keeps_protection(llama, random_gates, caplog):
    model, tokenizer = llama
    press = FastKVzipPress(0.9, gates=random_gates(model), n_sink=4, window_size=0.5)
    make_pipeline(model, tokenizer)(CONTEXT, question=QUESTIONS[0], press=press, max_new_tokens=2)
    assert "cannot be met" in caplog.text
    n_tokens = press.last_stats.context_length
    protected = 4 + n_tokens // 2
    assert press.last_stats.compression_ratio == pytest.approx(1 - protected / n_tokens)


def test_eager_attention_is_refused_with_advice(random_gates):
    model, tokenizer = tiny_model("llama", attn_implementation="eager")
    press = FastKVzipPress(0.5, gates=random_gates(model))
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        make_pipeline(model, tokenizer)(CONTEXT, question="what ?", press=press)


def test_gates_of_another_model_are_refused(tiny_models, random_gates):
    llama_model, tokenizer = tiny_models("llama")
    press = FastKVzipPress(0.5, gates=random_gates(tiny_models("gemma3")[0]))
    with pytest.raises(GateMismatchError, match="gated layers"):
        make_pipeline(llama_model, tokenizer)(CONTEXT, question="what ?", press=press)


@pytest.mark.parametrize("chunk_size", [None, 40])
def test_uniform_budget_keeps_the_same_count_in_every_layer_and_head(tiny_models, random_gates, chunk_size):
    """The budget vLLM can hold (one length per request): each (layer, KV head) keeps as many pairs, its own ones."""
    from helpers import greedy_after_prefill

    model, tokenizer = tiny_models("qwen3")
    gates = random_gates(model)
    runs = {}
    for compaction in ("ragged", "masked") if chunk_size is None else ("ragged",):
        press = FastKVzipPress(
            0.6, gates=gates, window_size=4, uniform=True, compaction=compaction, chunk_size=chunk_size
        )
        runs[compaction] = greedy_after_prefill(model, tokenizer, press)
        kept = torch.stack(list(press.last_stats.kept_per_head.values()))  # [L, B, H]
        n_tokens = press.last_stats.context_length
        assert len(set(kept.flatten().tolist())) == 1, kept
        target = n_tokens - int(0.6 * n_tokens)  # chunks round their spans' budgets: a pair or so each
        assert kept.flatten()[0] == target if chunk_size is None else abs(int(kept.flatten()[0]) - target) <= 7
        cache = runs[compaction][2]
        if compaction == "ragged":
            lengths = {length for layer_id in gates.layer_ids for length in cache.layers[layer_id].head_lengths}
            assert len(lengths) == 1  # with the question and answer appended alike
    if chunk_size is None:
        assert runs["ragged"][0] == runs["masked"][0]
        torch.testing.assert_close(runs["ragged"][1], runs["masked"][1], atol=1e-4, rtol=1e-4)
    global_press = FastKVzipPress(0.6, gates=gates, window_size=4)
    greedy_after_prefill(model, tokenizer, global_press)
    global_kept = torch.stack(list(global_press.last_stats.kept_per_head.values()))
    assert len(set(global_kept.flatten().tolist())) > 1  # one global budget spreads unevenly
