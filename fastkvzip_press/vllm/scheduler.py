"""Engine-core side (the scheduler's process): refuse configurations the compaction cannot serve, end prefill steps
at a request's compaction points, free its blocks past what it stores after each, allocate on physical lengths, and
admit a request chunk-compacted during its prefill when its largest footprint fits (not its whole prompt).

The worker compacts in the forward that reaches a compaction point (:mod:`~fastkvzip_press.vllm.worker`); both sides
derive the points and the stored counts from :meth:`EngineSettings.schedule`, so no message passes between them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from vllm.utils.math_utils import cdiv
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import RequestStatus

from fastkvzip_press.vllm.engine_checks import check_engine
from fastkvzip_press.vllm.events import EventLog
from fastkvzip_press.vllm.schedule import PromptSchedule
from fastkvzip_press.vllm.settings import EngineSettings

logger = logging.getLogger(__name__)

STATE = "fastkvzip_compaction"  # attribute of a vllm Request: its SchedulerCompaction


@dataclass
class SchedulerCompaction:
    """A request's compaction points (``None``: not compressed), how many of them have passed, and the prompt
    tokens it no longer stores."""

    schedule: PromptSchedule | None
    passed: int = 0
    discarded: int = 0


@dataclass
class SchedulerState:
    settings: EngineSettings
    events: EventLog


_original_init = Scheduler.__init__
_original_update_from_output = Scheduler.update_from_output
_original_preempt = Scheduler._preempt_request
_original_allocate_slots = KVCacheManager.allocate_slots
_original_reserve_prefill_lookahead = Scheduler._reserve_prefill_lookahead


def _init(self, vllm_config, kv_cache_config, *args, **kwargs):
    _original_init(self, vllm_config, kv_cache_config, *args, **kwargs)
    settings = check_engine(vllm_config, len(kv_cache_config.kv_cache_groups))
    self.fastkvzip = None
    if settings is None:
        return
    self.fastkvzip = SchedulerState(settings, EventLog(settings.events))
    self.kv_cache_manager.fastkvzip = settings
    logger.info("Fast KVzip compaction on: default ratio %s, gates %s", settings.ratio, settings.gates or "shipped")


def _update_from_output(self, scheduler_output, model_runner_output):
    outputs = _original_update_from_output(self, scheduler_output, model_runner_output)
    state: SchedulerState | None = getattr(self, "fastkvzip", None)
    if state is not None:
        for request_id in scheduler_output.num_scheduled_tokens:
            request = self.requests.get(request_id)
            if request is not None and request.status == RequestStatus.RUNNING:
                _free_after_compaction(self, state, request)
        pool = self.kv_cache_manager.block_pool
        state.events.write(
            "scheduler_step",
            running=len(self.running),
            waiting=len(self.waiting),
            free_blocks=pool.get_num_free_blocks(),
            total_blocks=pool.num_gpu_blocks - 1,  # block 0 is the pool's null block
            scheduled=dict(scheduler_output.num_scheduled_tokens),
        )
    return outputs


def _compaction(settings: EngineSettings, request) -> SchedulerCompaction:
    """The request's compaction state, made when first asked for (the frontend has checked its ratio)."""
    compaction = getattr(request, STATE, None)
    if compaction is None:
        ratio = settings.request_ratio(request.sampling_params.extra_args if request.sampling_params else None)
        compaction = SchedulerCompaction(settings.schedule(request.num_prompt_tokens, ratio))
        setattr(request, STATE, compaction)
    return compaction


def _free_after_compaction(scheduler: Scheduler, state: SchedulerState, request) -> None:
    """At each compaction point the request's computed tokens reach, cut its blocks after what it stores and return
    the rest to the pool."""
    compaction = _compaction(state.settings, request)
    schedule = compaction.schedule
    computed = request.num_computed_tokens
    while (
        schedule is not None and compaction.passed < len(schedule.ends) and schedule.ends[compaction.passed] <= computed
    ):
        end = schedule.ends[compaction.passed]
        compaction.passed += 1
        manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
        blocks = manager.req_to_blocks[request.request_id]
        compaction.discarded = schedule.discarded(end)
        keep = cdiv(computed - compaction.discarded, manager.block_size)  # what it stores, then any answer tokens
        tail = blocks[keep:]
        del blocks[keep:]
        pool = scheduler.kv_cache_manager.block_pool
        pool.free_blocks(reversed(tail))
        final = end == schedule.prompt_tokens
        state.events.write(
            "compaction" if final else "chunk_compaction",
            request=request.request_id,
            prompt_tokens=schedule.prompt_tokens,
            computed_tokens=end,
            kept_tokens=schedule.stored[compaction.passed - 1],
            blocks_before=keep + len(tail),
            blocks_after=keep,
            free_blocks=pool.get_num_free_blocks(),
        )
        if final:
            logger.info(
                "request %s: %d of %d prompt tokens kept per layer and head; %d blocks stored",
                request.request_id,
                schedule.kept_tokens,
                schedule.prompt_tokens,
                keep,
            )


def _reserve_prefill_lookahead(self, request, num_computed_tokens: int, num_new_tokens: int) -> int:
    """End a compressed request's prefill step at its next compaction point (the worker decides there)."""
    num_new_tokens = _original_reserve_prefill_lookahead(self, request, num_computed_tokens, num_new_tokens)
    state: SchedulerState | None = getattr(self, "fastkvzip", None)
    if state is None or num_new_tokens == 0:
        return num_new_tokens
    schedule = _compaction(state.settings, request).schedule
    end = None if schedule is None else schedule.next_end(num_computed_tokens)
    return num_new_tokens if end is None else min(num_new_tokens, end - num_computed_tokens)


def _preempt_request(self, request, *args, **kwargs):
    if getattr(request, STATE, None) is not None:
        setattr(request, STATE, None)  # recomputed from its first token, compacted again at the same points
    state: SchedulerState | None = getattr(self, "fastkvzip", None)
    if state is not None:
        state.events.write("preemption", request=request.request_id, computed_tokens=request.num_computed_tokens)
    return _original_preempt(self, request, *args, **kwargs)


def _allocate_slots(self, request, num_new_tokens, *args, **kwargs):
    settings: EngineSettings | None = getattr(self, "fastkvzip", None)
    compaction = None if settings is None else _compaction(settings, request)
    if compaction is None or compaction.schedule is None:
        return _original_allocate_slots(self, request, num_new_tokens, *args, **kwargs)
    if kwargs.get("full_sequence_must_fit") and len(compaction.schedule.ends) > 1:
        # Admission: the request never stores its whole prompt, only its largest footprint.
        if not _footprint_fits(self, request, compaction, kwargs.get("has_scheduled_reqs", True)):
            return None
        kwargs["full_sequence_must_fit"] = False
    if not compaction.discarded:
        return _original_allocate_slots(self, request, num_new_tokens, *args, **kwargs)
    # Blocks hold physical positions: the logical count less the discarded prompt tokens, for this call only.
    request.num_computed_tokens -= compaction.discarded
    try:
        return _original_allocate_slots(self, request, num_new_tokens, *args, **kwargs)
    finally:
        request.num_computed_tokens += compaction.discarded


def _footprint_fits(manager: KVCacheManager, request, compaction: SchedulerCompaction, others_scheduled: bool) -> bool:
    """Whether the pool has the blocks a chunk-compacted request needs at its largest, as vLLM's own admission
    asks the same of a whole sequence (watermark included for waiting and preempted requests)."""
    schedule = compaction.schedule
    past_prompt = max(0, min(request.num_tokens, manager.max_model_len) - schedule.prompt_tokens)
    peak = schedule.peak_tokens(request.num_computed_tokens, past_prompt)
    single = manager.coordinator.single_type_managers[0]
    held = len(single.req_to_blocks.get(request.request_id, ()))
    watermark = 0
    if others_scheduled and request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
        watermark = manager.watermark_blocks
    return cdiv(peak, single.block_size) - held + watermark <= manager.block_pool.get_num_free_blocks()


def install() -> None:
    Scheduler.__init__ = _init
    Scheduler.update_from_output = _update_from_output
    Scheduler._preempt_request = _preempt_request
    KVCacheManager.allocate_slots = _allocate_slots
    Scheduler._reserve_prefill_lookahead = _reserve_prefill_lookahead
