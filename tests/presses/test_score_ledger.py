"""The decoding press's ledger: scores aligned with the pairs a layer holds; tokens scored once per interval."""

import torch

from fastkvzip_press.presses.score_ledger import ScoreLedger


def scorer(calls: list):
    def score(hidden: torch.Tensor) -> torch.Tensor:  # [B, n, D] -> [B, 2 heads, n]: the first feature, twice
        calls.append(hidden.shape[1])
        return hidden[..., 0][:, None].expand(-1, 2, -1)

    return score


def tokens(*values: float) -> torch.Tensor:
    return torch.tensor(values).view(1, -1, 1)  # [1 sequence, t, D = 1]


def test_tokens_are_buffered_and_scored_once_per_interval():
    ledger, calls = ScoreLedger(), []
    assert ledger.record(tokens(1.0, 2.0), [0, 0], lambda: None, scorer(calls), interval=4) == 0
    ledger.record(tokens(3.0), [2, 2], lambda: None, scorer(calls), interval=4)
    assert calls == [] and ledger.n_buffered == 3
    ledger.record(tokens(4.0), [3, 3], lambda: None, scorer(calls), interval=4)
    assert calls == [4] and ledger.n_buffered == 0
    assert [s.tolist() for s in ledger.scores] == [[1.0, 2.0, 3.0, 4.0]] * 2
    ledger.record(tokens(5.0, 6.0, 7.0, 8.0, 9.0), [4, 4], lambda: None, scorer(calls), interval=4)
    assert calls == [4, 5]  # a long prompt is scored at once


def test_a_prefills_scores_are_taken_and_unseen_pairs_score_one():
    ledger, calls = ScoreLedger(), []
    inherited = [torch.tensor([5.0, 6.0, float("nan")]), torch.tensor([7.0])]
    unscored = ledger.record(tokens(9.0), [3, 2], lambda: inherited, scorer(calls), interval=8)
    assert unscored == 2  # one appended while nobody scored it, one never known
    assert [s.tolist() for s in ledger.scores] == [[5.0, 6.0, 1.0], [7.0, 1.0]]


def test_a_rollback_drops_the_newest_scores_and_eviction_drops_the_evicted():
    ledger, calls = ScoreLedger(), []
    ledger.record(tokens(1.0, 2.0, 3.0, 4.0), [0, 0], lambda: None, scorer(calls), interval=1)
    ledger.keep(torch.tensor([[True, False, True, True], [True, True, True, False]]))
    assert [s.tolist() for s in ledger.scores] == [[1.0, 3.0, 4.0], [1.0, 2.0, 3.0]]
    scores, held, real = ledger.padded()
    assert scores.shape == held.shape == (2, 3) and held.all() and real.all()
    # The pipeline rolled back the newest pair of every head, then a new forward comes.
    ledger.record(tokens(6.0), [2, 2], lambda: None, scorer(calls), interval=1)
    assert [s.tolist() for s in ledger.scores] == [[1.0, 3.0, 6.0], [1.0, 2.0, 6.0]]


def test_a_batch_keeps_one_record_per_sequence_and_head_and_knows_its_padding():
    ledger, calls = ScoreLedger(), []
    hidden = torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]).view(2, 3, 1)
    valid = torch.tensor([[False, True, True], [True, True, True]])  # sequence 0 is left-padded
    ledger.record(hidden, [0, 0, 0, 0], lambda: None, scorer(calls), interval=2, valid=valid)
    assert [s.tolist() for s in ledger.scores] == [[0.0, 1.0, 2.0]] * 2 + [[3.0, 4.0, 5.0]] * 2
    scores, held, real = ledger.padded()
    assert held.all() and real.tolist() == [[False, True, True]] * 2 + [[True, True, True]] * 2
