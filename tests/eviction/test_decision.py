"""The eviction decision: each budget kind, protection, ties, shortfall, missing pairs, per-sequence budgets."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastkvzip_press.eviction import HeadTargetBudget, Protection, RatioBudget, SpanBudget, ThresholdBudget, decide


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


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
def test_ratio_evicts_the_lowest_unprotected_pairs(layers, bsz, heads, tokens, ratio, n_sink, window, seed):
    scores = rand(layers, bsz, heads, tokens, seed=seed)
    decision = decide(scores, RatioBudget(ratio), Protection(n_sink, window))
    per_sample = layers * heads * tokens
    evictable = per_sample - layers * heads * min(tokens, n_sink + window) if n_sink + window else per_sample
    for b in range(bsz):
        mask = decision.evicted[:, b]
        wanted = int(per_sample * ratio)
        assert int(mask.sum()) == min(wanted, evictable) == decision.evicted_per_sequence[b]
        assert decision.shortfall[b] == max(0, wanted - evictable)
        assert not mask[..., :n_sink].any()
        if window:
            assert not mask[..., -window:].any()
        unprotected = torch.ones(tokens, dtype=torch.bool)
        unprotected[:n_sink] = False
        if window:
            unprotected[-window:] = False
        kept = scores[:, b][~mask & unprotected]
        if mask.any() and kept.numel():
            assert scores[:, b][mask].max() <= kept.min()  # every evicted score <= every kept unprotected one
    assert torch.equal(decision.kept, tokens - decision.evicted.sum(-1))


def test_one_budget_over_layers_and_heads_is_uneven():
    scores = torch.zeros(2, 1, 2, 10)
    scores[0] = 1.0  # layer 0 is important everywhere
    scores[1, 0, 0] = 0.5  # head 0 of layer 1 more than head 1
    evicted = decide(scores, RatioBudget(0.25)).evicted  # 10 of 40
    assert not evicted[0].any()
    assert evicted[1, 0, 1].all() and not evicted[1, 0, 0].any()


def test_layerwise_gives_each_layer_the_same_budget():
    scores = rand(3, 1, 2, 20)
    scores[0] += 1
    decision = decide(scores, RatioBudget(0.5, layerwise=True))
    assert [int(m.sum()) for m in decision.evicted] == [20, 20, 20]


def test_ties_go_to_the_lower_index_in_layer_head_pair_order():
    scores = torch.full((2, 1, 2, 10), 0.5)
    first = decide(scores, RatioBudget(0.3)).evicted  # 12 of 40
    assert torch.equal(first, decide(scores, RatioBudget(0.3)).evicted)
    assert first[0, 0, 0].all() and first[0, 0, 1, :2].all() and int(first.sum()) == 12


def test_threshold_evicts_below_it_and_never_protected_pairs():
    scores = rand(2, 1, 2, 16, seed=3)
    decision = decide(scores, ThresholdBudget(0.5), Protection(2, 3))
    expected = scores < 0.5
    expected[..., :2] = False
    expected[..., -3:] = False
    assert torch.equal(decision.evicted, expected) and decision.met


def test_float_window_is_a_fraction_of_each_rows_length():
    protected = Protection(0, 0.1).mask(torch.ones(1, 1, 1, 25, dtype=torch.bool))
    assert protected[..., -2:].all() and int(protected.sum()) == 2  # int(0.1 * 25) = 2
    assert int(Protection(0, 0.01).mask(torch.ones(1, 30, dtype=torch.bool)).sum()) == 1  # at least one pair
    assert Protection(4, 0.02).window_pairs(1000) == 20


def test_offset_moves_the_sink_out_of_later_spans():
    valid = torch.ones(1, 1, 1, 6, dtype=torch.bool)
    protected = Protection(4, 0, offset=2).mask(valid)
    assert protected[..., :2].all() and int(protected.sum()) == 2
    assert not Protection(4, 0, offset=10).mask(valid).any()


def test_protection_needs_room_on_a_tiny_context():
    with pytest.raises(ValueError, match="not more than the protected n_sink=4 \\+ window=8"):
        Protection(4, 8).require_room(12)
    assert Protection(4, 8).require_room(13) == 8


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: RatioBudget(1.0), r"\[0, 1\)"),
        (lambda: ThresholdBudget(1.5), "threshold"),
        (lambda: SpanBudget(-0.1), "keep_fraction"),
        (lambda: HeadTargetBudget(-1), "pairs_per_head"),
        (lambda: Protection(-1), "n_sink"),
        (lambda: Protection(0, 1.5), "fraction"),
    ],
)
def test_bad_budgets_and_protection_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_unreachable_ratio_reports_its_shortfall():
    scores = rand(1, 1, 1, 10)
    decision = decide(scores, RatioBudget(0.9), Protection(2, 4))
    assert decision.evicted_per_sequence == [4] and decision.shortfall == [5] and not decision.met
    assert not decision.evicted[..., :2].any() and not decision.evicted[..., -4:].any()


def test_span_budget_keeps_a_fraction_of_the_unprotected_pairs():
    scores = rand(2, 1, 3, 20, seed=5)
    decision = decide(scores, SpanBudget(0.25), Protection(2, 0))
    evictable = 2 * 3 * 18
    assert decision.evicted_per_sequence == [evictable - round(evictable * 0.25)] and decision.met
    per_layer = decide(scores, SpanBudget(0.25, layerwise=True), Protection(2, 0)).evicted
    assert [int(m.sum()) for m in per_layer] == [54 - round(54 * 0.25)] * 2


def test_head_target_evicts_down_to_the_target_per_head_on_average():
    lengths = torch.tensor([[5, 12], [9, 3]])  # held pairs per (layer, head): 29 in all
    valid = torch.arange(12).view(1, 1, 1, 12) < lengths.view(2, 1, 2, 1)
    scores = rand(2, 1, 2, 12, seed=2).masked_fill(~valid, -1.0)  # missing pairs must never count nor go
    decision = decide(scores, HeadTargetBudget(6), Protection(1, 1), valid)
    assert decision.evicted_per_sequence == [29 - 6 * 4] and decision.met
    assert not (decision.evicted & ~valid).any()
    assert torch.equal(decision.kept.view(-1), (lengths.view(-1) - decision.evicted.sum(-1).view(-1)))
    for layer in range(2):
        for head in range(2):
            n = int(lengths[layer, head])
            assert not decision.evicted[layer, 0, head, 0] and not decision.evicted[layer, 0, head, n - 1]
    nothing = decide(scores, HeadTargetBudget(20), Protection(1, 1), valid)
    assert nothing.evicted_per_sequence == [0] and nothing.met
    short = decide(scores, HeadTargetBudget(3), Protection(2, 2), valid)
    assert short.shortfall == [3]  # 29 - 4 * 3 = 17 to evict, but 15 protected pairs leave only 14


def test_padding_is_never_stored_in_a_budget_and_a_sequence_decides_as_alone():
    alone = rand(3, 1, 2, 10, seed=7)
    other = rand(3, 1, 2, 16, seed=8)
    # Left-pad the shorter sequence to 16 pairs: its pad entries must not change its decision.
    batch = torch.zeros(3, 2, 2, 16)
    batch[:, 0, :, 6:] = alone[:, 0]
    batch[:, 1] = other[:, 0]
    valid = torch.ones(1, 2, 1, 16, dtype=torch.bool)
    valid[:, 0, :, :6] = False
    for budget in (RatioBudget(0.5), RatioBudget(0.5, layerwise=True), ThresholdBudget(0.3), HeadTargetBudget(4)):
        protection = Protection(2, 0.2)
        together = decide(batch, budget, protection, valid)
        single = decide(alone, budget, protection)
        assert torch.equal(together.evicted[:, 0, :, 6:], single.evicted[:, 0])
        assert not together.evicted[:, 0, :, :6].any()
        assert torch.equal(together.evicted[:, 1], decide(other, budget, protection).evicted[:, 0])
        assert together.shortfall == [single.shortfall[0], decide(other, budget, protection).shortfall[0]]


def test_per_sequence_targets():
    scores = rand(1, 2, 1, 10)
    decision = decide(scores, HeadTargetBudget((8, 3)))
    assert decision.evicted_per_sequence == [2, 7]


def test_scores_must_be_four_dimensional():
    with pytest.raises(ValueError, match="layers, sequences, heads, pairs"):
        decide(torch.rand(2, 10), RatioBudget(0.5))


def test_keep_largest_breaks_ties_by_index_in_every_row():
    from fastkvzip_press.eviction import keep_largest

    row = torch.tensor([0.5, 0.2, 0.5, 0.5, 0.9, 0.5])
    rows = torch.stack([row, torch.rand(6), row.flip(0)])
    kept = keep_largest(rows, 3)
    assert kept[0].nonzero().flatten().tolist() == [3, 4, 5]  # among the four 0.5s, the last two stay
    assert kept[2].nonzero().flatten().tolist() == [1, 3, 5]
    assert torch.equal(keep_largest(row, 3), kept[0])
    assert keep_largest(row, 6).all() and not keep_largest(row, 0).any()
    assert keep_largest(torch.empty(2, 0), 0).shape == (2, 0)


@pytest.mark.parametrize("ratio", [0.5, 0.8])
def test_a_per_head_budget_keeps_the_same_count_in_every_layer_and_head(ratio):
    scores = torch.rand(3, 2, 4, 60, generator=torch.Generator().manual_seed(3))
    valid = torch.ones(1, 2, 1, 60, dtype=torch.bool)
    valid[0, 1, 0, :10] = False  # sequence 1: 10 padding positions, 50 own tokens
    protection = Protection(2, 5)
    decision = decide(scores, RatioBudget(ratio, per_head=True), protection, valid)
    kept = decision.kept  # [L, B, H]
    assert (kept[:, 0] == 60 - int(60 * ratio)).all() and (kept[:, 1] == 50 - int(50 * ratio)).all()
    assert decision.shortfall == [0, 0]
    for layer in range(3):
        for sequence in range(2):
            for head in range(4):  # each head evicts its own smallest unprotected scores
                row = decide(
                    scores[layer : layer + 1, sequence : sequence + 1, head : head + 1],
                    RatioBudget(ratio),
                    protection,
                    valid[:, sequence : sequence + 1],
                )
                assert torch.equal(row.evicted[0, 0, 0], decision.evicted[layer, sequence, head])
    assert not torch.equal(decision.evicted[0, 0, 0], decision.evicted[0, 0, 1])  # heads choose differently


@pytest.mark.parametrize("length", [5, 6, 7, 40, 300, 1001])
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.99])
@pytest.mark.parametrize("window", [0, 3, 0.02, 0.5])
def test_kept_per_head_predicts_what_a_uniform_decision_keeps(length, ratio, window):
    protection = Protection(n_sink=2, window=window)
    budget = RatioBudget(ratio, per_head=True)
    scores = torch.rand(3, 1, 2, length, generator=torch.Generator().manual_seed(length))
    kept = decide(scores, budget, protection).kept
    assert kept.unique().tolist() == [budget.kept_per_head(length, protection)]
