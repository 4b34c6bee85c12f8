"""The scheduler's count of each compressed request: where its prefill steps end, how many tokens it counts for
(what the scheduler allocates blocks for), and what it needs at most to be admitted.

Engine-independent: :mod:`fastkvzip_press.vllm.seam.scheduler` calls it with plain values. The counts come from the
request's :class:`~fastkvzip_press.vllm.schedule.RequestSchedule`, which the worker derives alike.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastkvzip_press.vllm.schedule import CompactionPoint, RequestSchedule
from fastkvzip_press.vllm.settings import EngineSettings

logger = logging.getLogger("vllm.fastkvzip.accounting")


@dataclass
class Account:
    """One request: its schedule (``None``: not compressed) and how many of its points have passed."""

    schedule: RequestSchedule | None
    passed: int = 0


class SchedulerAccounts:
    """Every request's account, made when the scheduler first asks about it and dropped when its blocks are freed
    (finished, aborted, or preempted: a preempted request is recomputed and compacted again at the same points)."""

    def __init__(self, settings: EngineSettings, heads: int, block_size: int):
        self.settings = settings
        self.heads = heads
        self.block_size = block_size
        self._accounts: dict[str, Account] = {}
        self._warned_whole = False

    def account(self, request_id: str, prompt_tokens: int, extra_args: Mapping[str, Any] | None) -> Account:
        account = self._accounts.get(request_id)
        if account is None:
            request = self.settings.request(extra_args)
            schedule = self.settings.schedule(prompt_tokens, request, self.heads, self.block_size)
            account = self._accounts[request_id] = Account(schedule)
            if schedule is None and request.ratio > 0 and not self._warned_whole:
                self._warned_whole = True  # once per engine: short prompts are common, the cause is one setting
                logger.warning(
                    "a request of %d prompt tokens asks for compression but is kept whole: n_sink=%s and "
                    "window_size=%s protect all of it (lower window_size to compact short prompts)",
                    prompt_tokens, self.settings.n_sink, self.settings.window_size,
                )  # fmt: skip
        return account

    def forget(self, request_id: str) -> None:
        self._accounts.pop(request_id, None)

    def step_tokens(self, request_id: str, computed: int, new_tokens: int) -> int:
        """``new_tokens`` cut so that a prefill step ends at the request's next compaction point."""
        account = self._accounts.get(request_id)
        end = None if account is None or account.schedule is None else account.schedule.next_end(computed)
        return new_tokens if end is None else min(new_tokens, end - computed)

    def counted_tokens(self, request_id: str, logical_tokens: int) -> int:
        """Tokens the scheduler allocates blocks for when the request has ``logical_tokens`` (its stored pairs'
        share, slack and window instead of its compacted prompt)."""
        account = self._accounts.get(request_id)
        if account is None or account.schedule is None or not account.passed:
            return logical_tokens
        point = account.schedule.points[account.passed - 1]
        return account.schedule.reserved_after(account.passed - 1) + logical_tokens - point.end

    def admission_tokens(self, request_id: str, full_tokens: int) -> int:
        """What a waiting request must find room for, given its whole sequence of ``full_tokens``: its largest
        footprint (compacted chunk by chunk, never its whole prompt)."""
        account = self._accounts.get(request_id)
        if account is None or account.schedule is None:
            return full_tokens
        schedule = account.schedule
        return schedule.peak_tokens(0, max(0, full_tokens - schedule.prompt_tokens))

    def passed_points(self, request_id: str, computed: int) -> list[CompactionPoint]:
        """The points ``computed`` logical tokens have newly passed (after a step); marks them passed."""
        account = self._accounts.get(request_id)
        if account is None or account.schedule is None:
            return []
        now = account.schedule.passed(computed)
        points = list(account.schedule.points[account.passed : now])
        account.passed = now
        return points

    def blocks_after(self, request_id: str, computed: int, held: int) -> int:
        """Blocks a request holding ``held`` keeps once compacted at ``computed`` logical tokens; the worker trims
        its own block table to the same count."""
        return min(held, -(-self.counted_tokens(request_id, computed) // self.block_size))
