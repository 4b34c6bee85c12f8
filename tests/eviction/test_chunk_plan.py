"""The chunk plan: deferred window, budget adjustment, spans decided once, and the whole context's budget met."""

import logging

import pytest
import torch

from fastkvzip_press.eviction import (
    ChunkPlan,
    Protection,
    RatioBudget,
    SpanBudget,
    ThresholdBudget,
    decide,
    span_budget,
)


def test_span_budget_counts_sink_and_window_toward_the_ratio():
    budget, window = span_budget(1000, RatioBudget(0.75), n_sink=4, window=20)
    assert window == 20
    assert budget.keep_fraction == pytest.approx((250 - 4 - 20) / (1000 - 4 - 20))


def test_a_budget_smaller_than_the_window_shrinks_it(caplog):
    budget, window = span_budget(100, RatioBudget(0.875), n_sink=4, window=20)
    assert (budget.keep_fraction, window) == (0.0, 8)  # 12.5 retained: the sink, then 8 recent tokens
    assert "cannot be met" not in caplog.text
    with caplog.at_level(logging.WARNING):
        budget, window = span_budget(100, RatioBudget(0.98), n_sink=4, window=20)
    assert (budget.keep_fraction, window) == (0.0, 0) and "sink tokens alone" in caplog.text


def run_plan(plan: ChunkPlan, scores: torch.Tensor, chunk: int) -> torch.Tensor:
    """Drive ``plan`` over ``scores [L, B, H, n]`` forward by forward as the prefill press does; returns what each
    (layer, sequence, head) keeps, ``[L, B, H, n]``."""
    layers, bsz, heads, n_tokens = scores.shape
    kept = torch.ones(layers, bsz, heads, n_tokens, dtype=torch.bool)
    ends = plan.chunk_ends()
    assert all(b - a <= chunk for a, b in zip([0, *ends], ends))  # no forward longer than a chunk
    for begin, end in zip([0, *ends[:-1]], ends):
        plan.chunk_end = end
        for layer in range(layers):
            plan.add_scores(layer, scores[layer, :, :, begin:end])
        spans, starts = plan.spans(), list(plan.decided)
        decision = plan.decide_span(list(range(layers)))
        for b, (n_span, start) in enumerate(zip(spans, starts)):
            kept[:, b, :, start : start + n_span] = ~decision.evicted[:, b, :, :n_span]
        plan.advance()
        assert all(pending.shape[-1] == end - min(plan.decided) for pending in plan.pending.values())
    # every token but each sequence's final window is decided, once (all of a sequence decided in one pass)
    expected = [n_tokens - (0 if n_tokens - lead <= chunk else window) for lead, window in zip(plan.lead, plan.windows)]
    assert plan.finished and plan.decided == expected
    return kept


@pytest.mark.parametrize("ratio", [0.5, 0.8])
@pytest.mark.parametrize("layerwise", [False, True])
def test_chunks_meet_the_contexts_budget_and_keep_sink_and_final_window(ratio, layerwise):
    scores = torch.rand(3, 1, 2, 203, generator=torch.Generator().manual_seed(1))
    plan = ChunkPlan.start(203, RatioBudget(ratio, layerwise), Protection(4, 10), chunk_size=40)
    assert isinstance(plan.budget, SpanBudget) and plan.windows == [10]
    kept = run_plan(plan, scores, chunk=40)[:, 0]
    assert kept[..., :4].all() and kept[..., -10:].all()
    expected = (1 - ratio) * 203 * 3 * 2
    assert abs(int(kept.sum()) - expected) <= 3 * 2 * 6  # rounding per span and layer
    if layerwise:
        per_layer = kept.sum(dim=(1, 2))
        assert int(per_layer.max() - per_layer.min()) <= 2 * 6


def test_threshold_plan_evicts_below_the_threshold_outside_the_protection():
    scores = torch.rand(2, 1, 2, 100, generator=torch.Generator().manual_seed(2))
    plan = ChunkPlan.start(100, ThresholdBudget(0.3), Protection(3, 5), chunk_size=32)
    kept = run_plan(plan, scores, chunk=32)[:, 0]
    expected = scores[:, 0] >= 0.3
    expected[..., :3] = True
    expected[..., -5:] = True
    assert torch.equal(kept, expected)


@pytest.mark.parametrize("budget", [RatioBudget(0.6), RatioBudget(0.5, layerwise=True), ThresholdBudget(0.3)])
def test_each_sequence_of_a_left_padded_batch_decides_as_it_would_alone(budget):
    lengths, total = [203, 150, 97], 203
    generator = torch.Generator().manual_seed(3)
    alone = [torch.rand(3, 1, 2, n, generator=generator) for n in lengths]
    batch = torch.zeros(3, 3, 2, total)
    padding = torch.zeros(3, total, dtype=torch.bool)
    for b, (n, scores) in enumerate(zip(lengths, alone)):
        batch[:, b, :, total - n :] = scores[:, 0]
        padding[b, : total - n] = True
    protection = Protection(4, 0.05)  # a window of 5 % of each sequence's own tokens
    together_plan = ChunkPlan.start(total, budget, protection, padding, chunk_size=40)
    assert together_plan.lead == [0, 53, 106]
    assert together_plan.chunk_ends() == [3, 43, 83, 123, 163, 203]
    together = run_plan(together_plan, batch, chunk=40)
    for b, (n, scores) in enumerate(zip(lengths, alone)):
        own = run_plan(ChunkPlan.start(n, budget, protection, chunk_size=40), scores, chunk=40)
        assert torch.equal(together[:, b, :, total - n :], own[:, 0]), b


def test_a_sequence_no_longer_than_a_chunk_is_decided_in_one_pass():
    total = 120
    generator = torch.Generator().manual_seed(4)
    batch = torch.rand(2, 2, 2, total, generator=generator)
    padding = torch.zeros(2, total, dtype=torch.bool)
    padding[1, :90] = True
    protection, budget = Protection(2, 4), RatioBudget(0.5)
    kept = run_plan(ChunkPlan.start(total, budget, protection, padding, chunk_size=40), batch, chunk=40)
    short = batch[:, 1:, :, 90:]
    alone = decide(short, budget, protection)  # the one-pass decision of the 30 tokens
    assert torch.equal(kept[:, 1, :, 90:], ~alone.evicted[:, 0])


def test_a_tiny_context_is_refused_before_any_chunk():
    with pytest.raises(ValueError, match="nothing could be evicted"):
        ChunkPlan.start(10, RatioBudget(0.5), Protection(4, 6), chunk_size=4)
