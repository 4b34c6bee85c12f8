import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastkvzip_press.selection import evict_by_ratio, evict_by_threshold, protect


@settings(max_examples=60, deadline=None)
@given(
    layers=st.integers(1, 4),
    bsz=st.integers(1, 2),
    heads=st.integers(1, 3),
    tokens=st.integers(8, 40),
    ratio=st.floats(0, 0.95),
    n_sink=st.integers(0, 3),
    window=st.integers(0, 4),
    seed=st.integers(0, 1000),
)
def test_ratio_selection_evicts_lowest_unprotected(layers, bsz, heads, tokens, ratio, n_sink, window, seed):
    scores = torch.rand(layers, bsz, heads, tokens, generator=torch.Generator().manual_seed(seed))
    protected = protect(scores, n_sink, window)
    evicted = evict_by_ratio(protected, ratio)
    per_sample = layers * heads * tokens
    evictable = per_sample - layers * heads * min(tokens, n_sink + window) if n_sink + window else per_sample
    for b in range(bsz):
        mask = evicted[:, b]
        assert int(mask.sum()) == min(int(per_sample * ratio), evictable)
        assert not mask[..., :n_sink].any()
        if window:
            assert not mask[..., -window:].any()
        if mask.any() and (~mask).any():
            # every evicted score is <= every kept unprotected score
            kept = protected[:, b][~mask]
            assert protected[:, b][mask].max() <= kept.min()


def test_global_selection_is_uneven_across_layers_and_heads():
    scores = torch.zeros(2, 1, 2, 10)
    scores[0] = 1.0  # layer 0 is important everywhere
    scores[1, 0, 0] = 0.5  # head 0 of layer 1 more than head 1
    evicted = evict_by_ratio(scores, 0.25)  # 10 of 40
    assert not evicted[0].any()
    assert evicted[1, 0, 1].all() and not evicted[1, 0, 0].any()


def test_layerwise_selection_gives_each_layer_the_same_budget():
    scores = torch.rand(3, 1, 2, 20)
    scores[0] += 1
    evicted = evict_by_ratio(scores, 0.5, layerwise=True)
    assert [int(m.sum()) for m in evicted] == [20, 20, 20]


def test_ties_are_deterministic():
    scores = torch.full((1, 1, 1, 10), 0.5)
    first = evict_by_ratio(scores, 0.3)
    assert torch.equal(first, evict_by_ratio(scores, 0.3))
    assert first[0, 0, 0, :3].all() and int(first.sum()) == 3


def test_threshold_never_touches_protected():
    scores = protect(torch.rand(2, 1, 2, 16), 2, 3)
    evicted = evict_by_threshold(scores, 0.5)
    assert not evicted[..., :2].any() and not evicted[..., -3:].any()
    assert torch.equal(evicted, scores < 0.5)
