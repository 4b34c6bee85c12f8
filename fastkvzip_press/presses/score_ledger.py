"""The decoding press's record of one gated layer: gate scores of the pairs it holds, and tokens not scored yet."""

from __future__ import annotations

from collections.abc import Callable

import torch


class ScoreLedger:
    """Gate scores of the pairs one gated layer holds, per segment (sequence-major, then KV head) in row order, which
    of them are padding, and the hidden states of the newest tokens, scored in one gate call per interval (as the
    paper buffers them).

    Invariant after :meth:`record`: for every segment, scored pairs plus buffered tokens = the pairs the layer holds.
    """

    def __init__(self) -> None:
        self.scores: list[torch.Tensor] | None = None
        self.valid: list[torch.Tensor] | None = None  # False where a held pair is padding
        self._buffer: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.n_buffered = 0

    def record(
        self,
        hidden: torch.Tensor,
        rows_before: list[int],
        inherited: Callable[[], list[torch.Tensor] | None],
        score: Callable[[torch.Tensor], torch.Tensor],
        interval: int,
        valid: torch.Tensor | None = None,
    ) -> int:
        """Buffer a forward's hidden states ``[B, t, D]`` of the layer's input (``valid [B, t]``: not padding).

        ``rows_before`` are the pairs each segment held before this forward. When the ledger does not match them (the
        first forward on a cache, or a rollback), it is realigned first: scores of rolled-back pairs are dropped, and
        pairs never scored (a prefill this press did not see) get 1.0, the last to go. ``inherited`` gives scores a
        prefill press left with the cache, used on the first forward. Returns how many pairs got 1.0.
        """
        unscored = 0
        if self.scores is None or any(s.shape[0] + self.n_buffered != n for s, n in zip(self.scores, rows_before)):
            self.flush(score)
            unscored = self._align(rows_before, inherited, hidden.device)
        if valid is None:
            valid = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        self._buffer.append((hidden, valid))
        self.n_buffered += hidden.shape[1]
        if self.n_buffered >= interval:  # long prompts are scored at once
            self.flush(score)
        return unscored

    def flush(self, score: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Score the buffered hidden states (``score``: ``[B, n, D]`` → ``[B, H, n]``) and append to every segment."""
        buffered, self._buffer, self.n_buffered = self._buffer, [], 0
        if not buffered:
            return
        fresh = score(torch.cat([hidden for hidden, _ in buffered], dim=1)).float()  # [B, H, n]
        fresh_valid = torch.cat([valid for _, valid in buffered], dim=1)  # [B, n]
        bsz, heads, _ = fresh.shape
        fresh = fresh.reshape(bsz * heads, -1)
        fresh_valid = fresh_valid.repeat_interleave(heads, dim=0)
        known = self.scores or [fresh.new_empty(0) for _ in range(bsz * heads)]
        known_valid = self.valid or [fresh_valid.new_empty(0) for _ in range(bsz * heads)]
        self.scores = [torch.cat([s.to(fresh.device), f]) for s, f in zip(known, fresh)]
        self.valid = [torch.cat([v.to(fresh.device), f]) for v, f in zip(known_valid, fresh_valid)]

    def _align(
        self, rows_before: list[int], inherited: Callable[[], list[torch.Tensor] | None], device: torch.device
    ) -> int:
        known, known_valid = self.scores, self.valid
        if known is None:
            known = inherited() or []
            known_valid = [torch.ones(s.shape[0], dtype=torch.bool, device=device) for s in known]
            if len(known) != len(rows_before):
                known = [torch.empty(0, device=device) for _ in rows_before]
                known_valid = [torch.empty(0, dtype=torch.bool, device=device) for _ in rows_before]
        unscored = 0
        scores_out, valid_out = [], []
        for scores, valid, n_before in zip(known, known_valid, rows_before):
            scores = scores.float().to(device)[:n_before]  # a rollback removed the newest pairs
            valid = valid.to(device)[:n_before]
            seen = torch.nan_to_num(scores, nan=1.0)  # appended to the cache while nobody scored them
            missing = n_before - scores.shape[0]
            unscored += missing + int(torch.isnan(scores).sum())
            scores_out.append(torch.cat([seen, seen.new_ones(missing)]))
            valid_out.append(torch.cat([valid, valid.new_ones(missing)]))
        self.scores, self.valid = scores_out, valid_out
        return unscored

    def keep(self, keep: torch.Tensor) -> None:
        """Drop pairs: ``keep [segments, N]`` flags every segment's held pairs in order."""
        self.scores = [scores[flags[: scores.shape[0]]] for scores, flags in zip(self.scores, keep)]
        self.valid = [valid[flags[: valid.shape[0]]] for valid, flags in zip(self.valid, keep)]

    def padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scores ``[segments, N]`` zero-padded to the longest segment, which entries hold a pair, and which of those
        are not padding."""
        lengths = [s.shape[0] for s in self.scores]
        width = max(lengths, default=0)
        device = self.scores[0].device
        scores = torch.zeros(len(lengths), width, device=device)
        held = torch.zeros(len(lengths), width, dtype=torch.bool, device=device)
        real = torch.zeros(len(lengths), width, dtype=torch.bool, device=device)
        for segment, (s, v) in enumerate(zip(self.scores, self.valid)):
            scores[segment, : s.shape[0]] = s
            held[segment, : s.shape[0]] = True
            real[segment, : v.shape[0]] = v
        return scores, held, real
