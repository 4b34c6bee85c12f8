"""The decoding press's record of one gated layer: gate scores of the pairs it holds, and tokens not scored yet."""

from __future__ import annotations

from collections.abc import Callable

import torch


class ScoreLedger:
    """Gate scores of the pairs one gated layer holds, per (sequence, head) in row order, plus the hidden states of
    the newest tokens, which are scored in one gate call per interval (as the paper buffers them).

    Invariant after :meth:`record`: for every head, scored pairs plus buffered tokens = the pairs the layer holds.
    """

    def __init__(self) -> None:
        self.scores: list[torch.Tensor] | None = None
        self._buffer: list[torch.Tensor] = []
        self.n_buffered = 0

    def record(
        self,
        hidden: torch.Tensor,
        rows_before: list[int],
        inherited: Callable[[], list[torch.Tensor] | None],
        score: Callable[[torch.Tensor], torch.Tensor],
        interval: int,
    ) -> int:
        """Buffer a forward's hidden states ``[t, D]`` of the layer's input.

        ``rows_before`` are the pairs each head held before this forward. When the ledger does not match them (the
        first forward on a cache, or a rollback), it is realigned first: scores of rolled-back pairs are dropped, and
        pairs never scored (a prefill this press did not see) get 1.0, the last to go. ``inherited`` gives scores a
        prefill press left with the cache, used on the first forward. Returns how many pairs got 1.0.
        """
        unscored = 0
        if self.scores is None or any(s.shape[0] + self.n_buffered != n for s, n in zip(self.scores, rows_before)):
            self.flush(score)
            unscored = self._align(rows_before, inherited, hidden.device)
        self._buffer.append(hidden)
        self.n_buffered += hidden.shape[0]
        if self.n_buffered >= interval:  # long prompts are scored at once
            self.flush(score)
        return unscored

    def flush(self, score: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Score the buffered hidden states (``score``: ``[1, n, D]`` → ``[1, H, n]``) and append to every head."""
        buffered, self._buffer, self.n_buffered = self._buffer, [], 0
        if not buffered:
            return
        fresh = score(torch.cat(buffered)[None])[0].float()  # [H, n]
        known = self.scores or [fresh.new_empty(0) for _ in range(fresh.shape[0])]
        self.scores = [torch.cat([s.to(fresh.device), f]) for s, f in zip(known, fresh)]

    def _align(
        self, rows_before: list[int], inherited: Callable[[], list[torch.Tensor] | None], device: torch.device
    ) -> int:
        known = self.scores
        if known is None:
            known = inherited() or []
            if len(known) != len(rows_before):
                known = [torch.empty(0, device=device) for _ in rows_before]
        unscored = 0
        aligned = []
        for scores, n_before in zip(known, rows_before):
            scores = scores.float().to(device)[:n_before]  # a rollback removed the newest pairs
            seen = torch.nan_to_num(scores, nan=1.0)  # appended to the cache while nobody scored them
            missing = n_before - scores.shape[0]
            unscored += missing + int(torch.isnan(scores).sum())
            aligned.append(torch.cat([seen, seen.new_ones(missing)]))
        self.scores = aligned
        return unscored

    def keep(self, keep: torch.Tensor) -> None:
        """Drop evicted pairs: ``keep [heads, N]`` flags every head's held pairs in order."""
        self.scores = [scores[flags[: scores.shape[0]]] for scores, flags in zip(self.scores, keep)]

    def padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores ``[heads, N]`` padded with zeros to the longest head, and which entries hold a pair."""
        lengths = [s.shape[0] for s in self.scores]
        width = max(lengths, default=0)
        device = self.scores[0].device
        scores = torch.zeros(len(lengths), width, device=device)
        valid = torch.zeros(len(lengths), width, dtype=torch.bool, device=device)
        for head, s in enumerate(self.scores):
            scores[head, : s.shape[0]] = s
            valid[head, : s.shape[0]] = True
        return scores, valid
