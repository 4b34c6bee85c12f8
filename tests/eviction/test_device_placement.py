"""Eviction bookkeeping stays on the scores' device. The "meta" device stands in for a GPU: like CUDA, it refuses to
combine its tensors with a CPU tensor that is not a scalar."""

import torch

from fastkvzip_press.eviction import ChunkPlan, Decision, EvictionStats, Protection, RatioBudget, chunk_plan


def test_head_retention_of_a_padded_batch_stays_on_the_device():
    kept = torch.ones(2, 3, dtype=torch.long, device="meta")
    stats = EvictionStats(12, {0: kept, 2: kept}, pairs_per_layer=3 * 20, num_layers=4, sequence_lengths=[12, 8])
    retention = stats.head_retention()
    assert (retention.device.type, retention.shape) == ("meta", (2, 2, 3))


def test_a_chunked_padded_batch_decides_on_the_scores_device(monkeypatch):
    """A sequence no longer than a chunk is decided in one pass at the end; its mask must follow the scores."""
    seen = []

    def decide(scores, budget, protection, valid=None):
        seen.append(None if valid is None else valid.device.type)
        bsz = scores.shape[1]
        evicted = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
        return Decision(evicted, (~evicted).sum(-1), [0] * bsz, [0] * bsz)

    monkeypatch.setattr(chunk_plan, "decide", decide)
    padding = torch.zeros(2, 12, dtype=torch.bool)
    padding[1, :6] = True  # sequence 1: 6 tokens, decided in one pass
    plan = ChunkPlan.start(12, RatioBudget(0.5), Protection(1, 1), padding=padding, chunk_size=8)
    scores = torch.rand(2, 2, 3, 12).to("meta")
    ends = plan.chunk_ends()
    for begin, end in zip([0, *ends[:-1]], ends):
        plan.chunk_end = end
        for layer in range(2):
            plan.add_scores(layer, scores[layer, :, :, begin:end])
        decision = plan.decide_span([0, 1])
        assert decision.evicted.device.type == "meta"
        plan.advance()
    assert plan.finished and seen[-2:] == ["meta", "meta"]  # the chunked and the one-pass decision
