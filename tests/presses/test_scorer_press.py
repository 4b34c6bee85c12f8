import pytest
import torch
from helpers import CONTEXT, QUESTIONS, make_pipeline
from kvpress import (
    AdaKVPress,
    ChunkPress,
    ComposedPress,
    DecodingPress,
    DMSPress,
    KeyRerotationPress,
    KnormPress,
    PerLayerCompressionPress,
    PrefillDecodingPress,
)
from transformers import DynamicCache

from fastkvzip_press import FastKVzipScorerPress


@pytest.fixture
def setup(llama, random_gates):
    model, tokenizer = llama
    return model, tokenizer, random_gates(model)


def context_ids(tokenizer):
    return tokenizer(CONTEXT, return_tensors="pt").input_ids


def test_standalone_scorer_shrinks_every_head_physically(setup):
    model, tokenizer, gates = setup
    ids = context_ids(tokenizer)
    press = FastKVzipScorerPress(0.5, gates=gates)
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model.model(input_ids=ids, past_key_values=cache)
    for layer in cache.layers:
        assert layer.keys.shape[2] == int(ids.shape[1] * 0.5)
    answers = make_pipeline(model, tokenizer)(CONTEXT, questions=QUESTIONS, press=press, max_new_tokens=3)
    assert len(answers["answers"]) == 3


def bound_scorer(model, gates) -> FastKVzipScorerPress:
    press = FastKVzipScorerPress(0.0, gates=gates)
    press.post_init_from_model(model)
    return press


def test_scores_are_the_gate_scores(setup):
    model, tokenizer, gates = setup
    press = bound_scorer(model, gates)
    module = model.model.layers[1].self_attn
    hidden = torch.randn(1, 10, 64)
    keys = torch.randn(1, 2, 10, 16)
    torch.testing.assert_close(press.score(module, hidden, keys, keys, None, {}), gates.score(1, hidden))


def test_buffer_shorter_than_keys_reuses_cached_scores(setup):
    """kvpress's DecodingPress passes only recent hidden states while keys hold the whole cache."""
    model, _, gates = setup
    press = bound_scorer(model, gates)
    module = model.model.layers[0].self_attn
    hidden = torch.randn(1, 30, 64)
    full = press.score(module, hidden[:, :20], torch.zeros(1, 2, 20, 16), None, None, {})
    later = press.score(module, hidden[:, 20:], torch.zeros(1, 2, 30, 16), None, None, {})
    assert later.shape == (1, 2, 30)
    torch.testing.assert_close(later[..., :20], full)
    torch.testing.assert_close(later[..., 20:], gates.score(0, hidden[:, 20:]))


def test_unseen_pairs_get_top_score_and_a_warning(setup, caplog):
    model, _, gates = setup
    press = bound_scorer(model, gates)
    module = model.model.layers[0].self_attn
    scores = press.score(module, torch.randn(1, 4, 64), torch.zeros(1, 2, 12, 16), None, None, {})
    assert torch.all(scores[..., :8] == 1.0)
    assert "have no gate score" in caplog.text


def run_pipeline(model, tokenizer, press, questions=QUESTIONS, **kwargs):
    out = make_pipeline(model, tokenizer)(CONTEXT, questions=questions, press=press, max_new_tokens=4, **kwargs)
    assert all(isinstance(answer, str) for answer in out["answers"])
    return out["answers"]


def test_inside_adakv_evicts_headwise(setup):
    model, tokenizer, gates = setup
    press = AdaKVPress(FastKVzipScorerPress(0.5, gates=gates))
    run_pipeline(model, tokenizer, press)
    indices = model.model.layers[0].self_attn.masked_key_indices
    per_head = torch.bincount(indices[1], minlength=2)
    n_tokens = context_ids(tokenizer).shape[1] + 0  # pipeline adds the chat template around the context
    assert per_head.sum() > 0 and per_head.sum() <= n_tokens * 2


def test_inside_dms_threshold(setup):
    model, tokenizer, gates = setup
    press = DMSPress(FastKVzipScorerPress(gates=gates), threshold=0.06, sliding_window_size=8)
    run_pipeline(model, tokenizer, press)
    assert 0 < press.compression_ratio < 1


@pytest.mark.parametrize(
    "wrapper",
    [
        lambda s: ChunkPress(s, chunk_length=32),
        lambda s: KeyRerotationPress(s),
        lambda s: ComposedPress([s, KnormPress(0.2)]),
    ],
    ids=["chunk", "key-rerotation", "composed"],
)
def test_physical_wrappers_shrink_the_cache(setup, wrapper):
    model, tokenizer, gates = setup
    press = wrapper(FastKVzipScorerPress(0.5, gates=gates))
    cache = DynamicCache()
    run_pipeline(model, tokenizer, press, cache=cache)
    n_context = cache.get_seq_length()
    full = DynamicCache()
    run_pipeline(model, tokenizer, None, cache=full)
    assert n_context <= full.get_seq_length() * 0.55


def test_per_layer_ratios(setup):
    model, tokenizer, gates = setup
    press = PerLayerCompressionPress(FastKVzipScorerPress(gates=gates), compression_ratios=[0.0, 0.25, 0.5, 0.75])
    ids = context_ids(tokenizer)
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model.model(input_ids=ids, past_key_values=cache)
    lengths = [layer.keys.shape[2] for layer in cache.layers]
    assert lengths == [int(ids.shape[1] * (1 - r)) for r in (0.0, 0.25, 0.5, 0.75)]


def test_inside_kvpress_decoding_press_bounds_the_cache(setup):
    model, tokenizer, gates = setup
    press = DecodingPress(
        FastKVzipScorerPress(gates=gates), compression_interval=8, target_size=48, hidden_states_buffer_size=8
    )
    ids = context_ids(tokenizer)
    cache = DynamicCache()
    with press(model):
        model.generate(ids, past_key_values=cache, max_new_tokens=40, do_sample=False, min_new_tokens=40)
    for layer in cache.layers:
        assert 48 <= layer.keys.shape[2] < 48 + 8


def test_prefill_decoding_shares_scores(setup):
    model, tokenizer, gates = setup
    scorer = FastKVzipScorerPress(0.5, gates=gates)
    press = PrefillDecodingPress(
        prefilling_press=scorer,
        decoding_press=DecodingPress(scorer, compression_interval=4, target_size=64, hidden_states_buffer_size=4),
    )
    answers = run_pipeline(model, tokenizer, press, questions=[QUESTIONS[0]])
    assert len(answers) == 1
    assert scorer.compression_ratio == 0.5  # DecodingPress restores the ratio it overrides


def test_sliding_layers_are_left_intact(tiny_models, random_gates, caplog):
    model, _ = tiny_models("gemma3")
    press = FastKVzipScorerPress(0.5, gates=random_gates(model))
    press.post_init_from_model(model)
    keys = torch.randn(1, 2, 20, 16)
    sliding, global_layer = model.model.layers[0].self_attn, model.model.layers[2].self_attn
    kept_keys, _ = press.compress(sliding, torch.randn(1, 20, 64), keys, keys, None, {})
    assert kept_keys is keys
    assert press.compress(global_layer, torch.randn(1, 20, 64), keys, keys, None, {})[0].shape[2] == 10
    for _ in range(2):
        assert torch.all(press.score(sliding, torch.randn(1, 20, 64), keys, keys, None, {}) == 1)
    assert caplog.text.count("has no gate") == 1


def test_exact_ties_keep_the_later_pairs_alone_and_in_a_batch(setup, monkeypatch):
    """Equal scores at the boundary: the lower index goes first, as in FastKVzipPress, whatever the other rows hold
    (``topk`` broke such ties by unrelated entries, differently on AVX-512 and AVX2 CPUs)."""
    model, _, gates = setup
    press = FastKVzipScorerPress(0.5, gates=gates)
    press.post_init_from_model(model)
    module = model.model.layers[1].self_attn
    tied = (torch.arange(16) % 3).float() / 3  # three values, each five or six times
    # The rule spelled out: the 8 largest, among equal scores the later positions.
    expected = sorted(sorted(range(16), key=lambda i: (float(tied[i]), i))[8:])
    keys = torch.arange(16.0).view(1, 1, 16, 1).expand(2, 2, 16, 16)  # each key holds its position

    def kept_positions(scores: torch.Tensor) -> torch.Tensor:
        monkeypatch.setattr(press, "score", lambda *args, **kwargs: scores)
        bsz = scores.shape[0]
        kept_keys, _ = press.compress(module, torch.zeros(bsz, 16, 64), keys[:bsz], keys[:bsz], None, {})
        return kept_keys[..., 0].long()

    alone = kept_positions(tied.expand(1, 2, 16))
    batch = kept_positions(torch.stack([tied.expand(2, 16), torch.rand(2, 16)]))
    assert alone.tolist() == [[expected] * 2]
    assert torch.equal(batch[:1], alone)
