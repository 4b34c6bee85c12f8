"""The chunk plan: deferred window, budget adjustment, spans decided once, and the whole context's budget met."""

import logging

import pytest
import torch

from fastkvzip_press.eviction import ChunkPlan, Protection, RatioBudget, SpanBudget, ThresholdBudget, span_budget


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
    """Drive ``plan`` over ``scores [L, 1, H, n]`` chunk by chunk as the prefill press does; returns what is kept."""
    layers, _, heads, n_tokens = scores.shape
    kept = torch.ones(layers, heads, n_tokens, dtype=torch.bool)
    for begin in range(0, n_tokens, chunk):
        plan.chunk_end = end = min(n_tokens, begin + chunk)
        for layer in range(layers):
            plan.add_scores(layer, scores[layer, :, :, begin:end])
        n_span, start = plan.span_to_decide(), plan.decided
        decision = plan.decide_span(list(range(layers)))
        assert decision.evicted.shape == (layers, 1, heads, n_span)
        kept[:, :, start : start + n_span] = ~decision.evicted[:, 0]
        plan.advance(n_span)
        assert all(pending.shape[-1] == end - plan.decided for pending in plan.pending.values())
    assert plan.finished and plan.decided == n_tokens - plan.window  # every token but the final window, once
    return kept


@pytest.mark.parametrize("ratio", [0.5, 0.8])
@pytest.mark.parametrize("layerwise", [False, True])
def test_chunks_meet_the_contexts_budget_and_keep_sink_and_final_window(ratio, layerwise):
    scores = torch.rand(3, 1, 2, 203, generator=torch.Generator().manual_seed(1))
    plan = ChunkPlan.start(203, RatioBudget(ratio, layerwise), Protection(4, 10))
    assert isinstance(plan.budget, SpanBudget) and plan.window == 10
    kept = run_plan(plan, scores, chunk=40)
    assert kept[..., :4].all() and kept[..., -10:].all()
    expected = (1 - ratio) * 203 * 3 * 2
    assert abs(int(kept.sum()) - expected) <= 3 * 2 * 6  # rounding per span and layer
    if layerwise:
        per_layer = kept.sum(dim=(1, 2))
        assert int(per_layer.max() - per_layer.min()) <= 2 * 6


def test_threshold_plan_evicts_below_the_threshold_outside_the_protection():
    scores = torch.rand(2, 1, 2, 100, generator=torch.Generator().manual_seed(2))
    plan = ChunkPlan.start(100, ThresholdBudget(0.3), Protection(3, 5))
    kept = run_plan(plan, scores, chunk=32)
    expected = scores[:, 0] >= 0.3
    expected[..., :3] = True
    expected[..., -5:] = True
    assert torch.equal(kept, expected)


def test_a_tiny_context_is_refused_before_any_chunk():
    with pytest.raises(ValueError, match="nothing could be evicted"):
        ChunkPlan.start(10, RatioBudget(0.5), Protection(4, 6))
