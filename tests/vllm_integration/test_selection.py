"""A prompt given step by step is compacted at its schedule's points: the uniform decision, each head its own
tokens, row j holding each head's j-th pair, the undecided window after the kept pairs."""

import pytest
import torch

from fastkvzip_press.eviction import Protection, RatioBudget, decide
from fastkvzip_press.vllm.schedule import prompt_schedule
from fastkvzip_press.vllm.selection import PromptCompaction

L, H, D = 3, 2, 4


def prompt_tensors(tokens: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(L, H, tokens, generator=generator)
    keys = torch.randn(L, tokens, H, D, generator=generator)
    values = torch.randn(L, tokens, H, D, generator=generator)
    return scores, keys, values


def feed(compaction: PromptCompaction, scores, keys, values, step: int) -> torch.Tensor:
    """Give the prompt in steps of at most ``step`` tokens, each ending at or before the next compaction point, and
    store every write in a slot array ``[L, T, H, D]`` as the engine's cache would; the slots in use."""
    slots = torch.full((2, L, keys.shape[1], H, D), float("nan"))
    begin, stored = 0, 0
    while begin < keys.shape[1]:
        end = min(begin + step, compaction.schedule.next_end(begin))
        write = compaction.add(scores[..., begin:end], keys[:, begin:end], values[:, begin:end])
        if write is not None:
            slots[0, :, write.first : write.stored] = write.keys
            slots[1, :, write.first : write.stored] = write.values
            stored = write.stored
            assert stored == compaction.schedule.stored[compaction.schedule.ends.index(end)]
        begin = end
    return slots[:, :, :stored]


def test_one_pass_keeps_the_uniform_decision_in_the_first_slots():
    scores, keys, values = prompt_tensors(50)
    protection = Protection(2, 3)
    schedule = prompt_schedule(50, 0.6, protection)
    compaction = PromptCompaction(schedule, 0.6, protection, chunk_size=None)
    slots = feed(compaction, scores, keys, values, step=16)
    kept = compaction.kept_indices()
    assert kept.shape == (L, H, 50 - int(50 * 0.6)) and schedule.kept_tokens == kept.shape[-1]
    expected = ~decide(scores[:, None], RatioBudget(0.6, per_head=True), protection).evicted[:, 0]
    for layer in range(L):
        for head in range(H):
            assert kept[layer, head].tolist() == expected[layer, head].nonzero()[:, 0].tolist()
            assert torch.equal(slots[0, layer, :, head], keys[layer, kept[layer, head], head])
            assert torch.equal(slots[1, layer, :, head], values[layer, kept[layer, head], head])
    assert (kept[..., :2] == torch.tensor([0, 1])).all() and (kept[..., -3:] == torch.tensor([47, 48, 49])).all()
    assert not all(torch.equal(kept[0, 0], kept[layer, head]) for layer in range(L) for head in range(H))


@pytest.mark.parametrize("step", [7, 16, 64])
def test_chunked_compaction_stores_each_heads_kept_pairs_then_the_window(step):
    tokens, chunk = 100, 24
    scores, keys, values = prompt_tensors(tokens, seed=1)
    protection = Protection(2, 5)
    schedule = prompt_schedule(tokens, 0.5, protection, chunk)
    assert schedule.ends == (4, 28, 52, 76, 100)  # aligned to the prompt's end, the first chunk the remainder
    compaction = PromptCompaction(schedule, 0.5, protection, chunk_size=chunk)
    slots = feed(compaction, scores, keys, values, step)
    kept = compaction.kept_indices()
    assert kept.shape == (L, H, schedule.kept_tokens) and abs(schedule.kept_tokens - tokens // 2) <= 2
    assert (kept[..., :2] == torch.tensor([0, 1])).all() and (kept[..., -5:] == torch.arange(95, 100)).all()
    assert (kept.diff(dim=-1) > 0).all()
    for layer in range(L):
        for head in range(H):
            assert torch.equal(slots[0, layer, :, head], keys[layer, kept[layer, head], head])
            assert torch.equal(slots[1, layer, :, head], values[layer, kept[layer, head], head])


def test_a_step_across_a_compaction_point_is_refused():
    scores, keys, values = prompt_tensors(60, seed=2)
    schedule = prompt_schedule(60, 0.5, Protection(0, 2), chunk_size=20)
    compaction = PromptCompaction(schedule, 0.5, Protection(0, 2), chunk_size=20)
    with pytest.raises(RuntimeError, match="crosses the compaction point 20"):
        compaction.add(scores[..., :30], keys[:, :30], values[:, :30])
