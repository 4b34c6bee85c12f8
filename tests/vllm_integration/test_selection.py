"""A prompt captured chunk by chunk is compacted as if captured at once: the uniform decision, rows per head."""

import torch

from fastkvzip_press.eviction import Protection
from fastkvzip_press.vllm.selection import PromptCapture, kept_token_indices

L, H, D = 3, 2, 4


def prompt_tensors(tokens: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(L, H, tokens, generator=generator)
    keys = torch.randn(L, tokens, H, D, generator=generator)
    values = torch.randn(L, tokens, H, D, generator=generator)
    return scores, keys, values


def test_every_layer_and_head_keeps_the_same_count_of_its_own_tokens():
    scores, _, _ = prompt_tensors(50)
    kept = kept_token_indices(scores, 0.6, Protection(2, 3))
    assert kept.shape == (L, H, 50 - int(50 * 0.6))
    assert (kept.diff(dim=-1) > 0).all(), "ascending token order"
    assert (kept[..., :2] == torch.tensor([0, 1])).all() and (kept[..., -3:] == torch.tensor([47, 48, 49])).all()
    assert not all(torch.equal(kept[0, 0], kept[layer, head]) for layer in range(L) for head in range(H))
    for layer in range(L):
        for head in range(H):
            free = [t for t in range(2, 47) if t not in kept[layer, head].tolist()]
            chosen = [t for t in kept[layer, head].tolist() if 2 <= t < 47]
            assert min(scores[layer, head, chosen]) >= max(scores[layer, head, free]), "the highest scores stay"


def test_chunks_give_the_one_shot_result_and_row_j_holds_each_heads_jth_pair():
    scores, keys, values = prompt_tensors(40, seed=1)
    capture = PromptCapture(prompt_tokens=40)
    for start, end in ((0, 16), (16, 32), (32, 40)):
        assert not capture.complete
        capture.add(scores[..., start:end], keys[:, start:end], values[:, start:end])
    assert capture.complete
    compacted = capture.compacted(0.5, Protection(1, 2))
    kept = kept_token_indices(scores, 0.5, Protection(1, 2))
    assert torch.equal(compacted.kept_indices, kept)
    for layer in range(L):
        for head in range(H):
            assert torch.equal(compacted.keys[layer, :, head], keys[layer, kept[layer, head], head])
            assert torch.equal(compacted.values[layer, :, head], values[layer, kept[layer, head], head])


def test_tokens_past_the_prompt_follow_the_kept_pairs():
    """A request recomputed after preemption re-prefills answer tokens in the chunk that ends its prompt."""
    scores, keys, values = prompt_tensors(30, seed=2)
    capture = PromptCapture(prompt_tokens=24)
    capture.add(scores, keys, values)
    compacted = capture.compacted(0.5, Protection(0, 0))
    assert compacted.kept_tokens == 12
    assert compacted.keys.shape == (L, 12 + 6, H, D)
    assert torch.equal(compacted.keys[:, 12:], keys[:, 24:])
    assert torch.equal(compacted.kept_indices, kept_token_indices(scores[..., :24], 0.5, Protection(0, 0)))
