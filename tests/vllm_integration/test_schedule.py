"""Compaction points and stored counts, which the scheduler and the worker derive alike."""

import pytest

from fastkvzip_press.eviction import Protection, RatioBudget
from fastkvzip_press.vllm.schedule import prompt_schedule
from fastkvzip_press.vllm.settings import EngineSettings

PROTECTION = Protection(4, 0.02)


def test_nothing_to_evict_means_no_schedule():
    assert prompt_schedule(300, 0.0, PROTECTION, 64) is None
    assert prompt_schedule(5, 0.5, PROTECTION, 64) is None  # 4 sink tokens and a window of one


@pytest.mark.parametrize("chunk_size", [None, 300, 1000])
def test_one_compaction_when_the_prompt_fits_a_chunk(chunk_size):
    schedule = prompt_schedule(300, 0.5, PROTECTION, chunk_size)
    assert schedule.ends == (300,)
    assert schedule.kept_tokens == RatioBudget(0.5, per_head=True).kept_per_head(300, PROTECTION) == 150
    assert schedule.peak_tokens(0) == 300 and schedule.peak_tokens(0, past_prompt=200) == 350
    assert schedule.discarded(299) == 0 and schedule.discarded(300) == 150
    assert schedule.next_end(0) == 300 and schedule.next_end(300) is None


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_chunked_prompts_never_store_their_whole_prompt(ratio):
    tokens, chunk = 3000, 256
    schedule = prompt_schedule(tokens, ratio, PROTECTION, chunk)
    assert schedule.ends[-1] == tokens and all(b - a == chunk for a, b in zip(schedule.ends, schedule.ends[1:]))
    assert 0 < schedule.ends[0] <= chunk
    assert abs(schedule.kept_tokens - (1 - ratio) * tokens) <= 2
    assert list(schedule.stored) == sorted(schedule.stored)
    discarded = [schedule.discarded(end) for end in schedule.ends]
    assert discarded == sorted(discarded) and discarded[-1] == tokens - schedule.kept_tokens
    # at most the kept pairs, the window waiting for its chunk, and one chunk
    assert schedule.peak_tokens(0) <= schedule.kept_tokens + int(0.02 * tokens) + chunk
    assert schedule.peak_tokens(schedule.ends[-2]) == schedule.stored[-2] + chunk


def test_engine_settings_take_a_chunk_size():
    assert (
        EngineSettings(chunk_size=512).kept_tokens(3000, 0.5) == prompt_schedule(3000, 0.5, PROTECTION, 512).stored[-1]
    )
    for bad in (0, -3, 1.5, "64", True):
        with pytest.raises((ValueError, TypeError), match="fastkvzip.chunk_size"):
            EngineSettings(chunk_size=bad)
