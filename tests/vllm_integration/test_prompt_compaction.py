"""A prompt given step by step is compacted at its schedule's points: the press's decisions (one budget over all
layers and heads, or one count per head), each head storing its kept pairs in prompt order, then the window."""

import pytest
import torch

from fastkvzip_press.eviction import ChunkPlan, Protection, RatioBudget, decide
from fastkvzip_press.vllm.compaction import PromptCompaction
from fastkvzip_press.vllm.schedule import RequestSchedule

L, H, D = 3, 2, 4


def prompt_tensors(tokens: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(L, H, tokens, generator=generator)
    keys = torch.randn(L, tokens, H, D, generator=generator)
    values = torch.randn(L, tokens, H, D, generator=generator)
    return scores, keys, values


def feed(compaction: PromptCompaction, scores, keys, values, step: int) -> dict:
    """Give the prompt in steps of at most ``step`` tokens, each ending at or before the next compaction point, and
    apply every write to per-head stores as the engine's pool would: ``{(layer, head): [n, 2, D]}``."""
    store = {(layer, head): torch.zeros(0, 2, D) for layer in range(L) for head in range(H)}
    begin = 0
    while begin < keys.shape[1]:
        end = min(begin + step, compaction.schedule.next_end(begin))
        for layer in range(L):
            for head in range(H):  # the forward appends the step's tokens to every head
                new = torch.stack([keys[layer, begin:end, head], values[layer, begin:end, head]], dim=1)
                store[layer, head] = torch.cat([store[layer, head], new])
        result = compaction.add(scores[..., begin:end], keys[:, begin:end], values[:, begin:end])
        if result is not None:
            _, write = result
            for layer in range(L):
                for head in range(H):
                    rows = (write.layer == layer) & (write.head == head)
                    assert write.position[rows].tolist() == list(
                        range(write.first[layer, head], write.stored[layer, head])
                    )
                    new = torch.stack([write.keys[rows], write.values[rows]], dim=1)
                    store[layer, head] = torch.cat([store[layer, head][: write.first[layer, head]], new])
        begin = end
    return store


def check_store(store, kept_indices, keys, values):
    for layer in range(L):
        for head in range(H):
            kept = kept_indices[layer][head]
            assert kept == sorted(set(kept))
            assert torch.equal(store[layer, head][:, 0], keys[layer, kept, head])
            assert torch.equal(store[layer, head][:, 1], values[layer, kept, head])


@pytest.mark.parametrize("budget", ["global", "uniform"])
def test_one_pass_stores_the_press_decision_head_by_head(budget):
    scores, keys, values = prompt_tensors(50)
    protection = Protection(2, 3)
    schedule = RequestSchedule.build(50, 0.6, budget, protection, None, L * H, 16)
    compaction = PromptCompaction(schedule)
    store = feed(compaction, scores, keys, values, step=16)
    kept = compaction.kept_indices()
    expected = ~decide(scores[:, None], RatioBudget(0.6, per_head=budget == "uniform"), protection).evicted[:, 0]
    assert kept == [[expected[layer, head].nonzero()[:, 0].tolist() for head in range(H)] for layer in range(L)]
    assert sum(len(head) for layer in kept for head in layer) == schedule.kept_pairs
    check_store(store, kept, keys, values)
    assert all(head[:2] == [0, 1] and head[-3:] == [47, 48, 49] for layer in kept for head in layer)
    assert (len({len(head) for layer in kept for head in layer}) == 1) == (budget == "uniform")


@pytest.mark.parametrize("budget", ["global", "uniform"])
@pytest.mark.parametrize("step", [7, 16, 64])
def test_chunked_compaction_makes_the_chunk_plans_decisions(budget, step):
    tokens, chunk = 100, 24
    scores, keys, values = prompt_tensors(tokens, seed=1)
    protection = Protection(2, 5)
    schedule = RequestSchedule.build(tokens, 0.5, budget, protection, chunk, L * H, 16)
    # chunks end at 4, 28, 52, 76, 100 (aligned to the prompt's end); the first decides nothing (4 tokens <= window)
    assert schedule.ends == (28, 52, 76, 100)
    compaction = PromptCompaction(schedule)
    store = feed(compaction, scores, keys, values, step)
    kept = compaction.kept_indices()
    # What the press's chunk plan decides with the same scores.
    plan = ChunkPlan.start(tokens, RatioBudget(0.5, per_head=budget == "uniform"), protection, chunk_size=chunk)
    evicted = torch.zeros(L, H, tokens, dtype=torch.bool)
    begin = 0
    for end in plan.chunk_ends():  # as FastKVzipPress(chunk_size=...) drives the plan
        plan.chunk_end = end
        for layer in range(L):
            plan.add_scores(layer, scores[layer, :, begin:end][None])
        (span,), (decided,) = plan.spans(), plan.decided
        if span or plan.finished:
            evicted[..., decided : decided + span] = plan.decide_span(list(range(L))).evicted[:, 0, :, :span]
        plan.advance()
        begin = end
    assert kept == [[(~evicted[layer, head]).nonzero()[:, 0].tolist() for head in range(H)] for layer in range(L)]
    check_store(store, kept, keys, values)


def test_a_step_across_a_compaction_point_is_refused():
    scores, keys, values = prompt_tensors(60, seed=2)
    schedule = RequestSchedule.build(60, 0.5, "global", Protection(0, 2), 20, L * H, 16)
    compaction = PromptCompaction(schedule)
    with pytest.raises(RuntimeError, match="crosses the compaction point 20"):
        compaction.add(scores[..., :30], keys[:, :30], values[:, :30])
