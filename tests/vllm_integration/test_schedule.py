"""A request's schedule, which the scheduler and the worker derive alike: compaction points, what each keeps, what
the scheduler reserves (never less than the heads' blocks, at most the kept pairs' share plus one block)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastkvzip_press.eviction import ChunkPlan, Protection, RatioBudget, decide
from fastkvzip_press.paged import blocks_for
from fastkvzip_press.vllm.schedule import RequestSchedule

PROTECTION = Protection(4, 0.02)
HEADS = 6  # 3 layers x 2 KV heads
BLOCK = 16


def build(tokens, ratio, budget="global", chunk=None, protection=PROTECTION):
    return RequestSchedule.build(tokens, ratio, budget, protection, chunk, HEADS, BLOCK)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def test_nothing_to_evict_means_no_schedule():
    assert build(300, 0.0) is None
    assert build(5, 0.5, chunk=64) is None  # 4 sink tokens and a window of one


@pytest.mark.parametrize("budget", ["global", "uniform"])
def test_one_compaction_keeps_what_decide_keeps(budget):
    schedule = build(300, 0.5, budget)
    (point,) = schedule.points
    assert (point.end, point.decided, point.span, point.undecided) == (300, 0, 300, 0)
    scores = torch.rand(3, 1, 2, 300, generator=torch.Generator().manual_seed(0))
    kept = (~decide(scores, RatioBudget(0.5, per_head=budget == "uniform"), PROTECTION).evicted).sum()
    assert schedule.kept_pairs == int(kept) == 150 * HEADS
    slack = 0 if budget == "uniform" else BLOCK - 1
    assert schedule.reserved_tokens(299) == 299 and schedule.reserved_tokens(300) == 150 + slack
    assert schedule.discarded(300) == 150 - slack
    assert schedule.peak_tokens(0) == 300 and schedule.peak_tokens(0, past_prompt=200) == 150 + slack + 200
    assert schedule.next_end(0) == 300 and schedule.next_end(300) is None


@pytest.mark.parametrize("budget", ["global", "uniform"])
@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_chunked_points_are_the_press_chunks_and_keep_what_decide_keeps(budget, ratio):
    tokens, chunk = 3000, 256
    schedule = build(tokens, ratio, budget, chunk)
    assert schedule.ends == tuple(
        ChunkPlan.start(tokens, RatioBudget(ratio), PROTECTION, chunk_size=chunk).chunk_ends()
    )
    generator = torch.Generator().manual_seed(1)
    kept = 0
    for point in schedule.points:
        scores = torch.rand(3, 1, 2, point.span, generator=generator)
        kept += int((~decide(scores, point.budget, point.protection).evicted).sum())
        assert kept == point.kept
    window = schedule.points[-1].undecided
    assert schedule.kept_pairs == kept + HEADS * window
    assert abs(schedule.kept_pairs - (1 - ratio) * tokens * HEADS) <= 2 * HEADS
    assert window == int(0.02 * tokens)  # the final window is kept
    reserved = [schedule.reserved_tokens(end) for end in schedule.ends]
    assert schedule.peak_tokens(0) == max(schedule.reserved_tokens(end - 1) + 1 for end in schedule.ends)
    assert schedule.peak_tokens(0) <= reserved[-1] + chunk


@settings(max_examples=200, deadline=None)
@given(
    kept=st.lists(st.integers(0, 300), min_size=HEADS, max_size=HEADS),
    later=st.integers(0, 100),
    uniform=st.booleans(),
)
def test_what_the_scheduler_reserves_holds_every_heads_blocks_and_at_most_one_block_more(kept, later, uniform):
    """Whatever the heads keep of the budget's total, the reserved blocks times layers x heads hold them, decoding
    included; and a compacted request reserves at most its kept pairs' share plus one block."""
    if uniform:
        kept = [kept[0]] * HEADS
    total = sum(kept)
    slack = 0 if uniform else BLOCK - 1
    reserved = cdiv(total, HEADS) + slack
    needed = int(blocks_for(np.array(kept) + later, BLOCK).sum())
    assert needed <= HEADS * cdiv(reserved + later, BLOCK)
    assert cdiv(reserved, BLOCK) <= cdiv(total, HEADS * BLOCK) + 1
