"""Engine-core side (the scheduler's process): refuse configurations the compaction cannot serve, free a request's
blocks past its kept tokens when its prefill completes, and allocate on physical lengths afterwards.

The worker compacts in the forward that completes a prefill (:mod:`~fastkvzip_press.vllm.worker`); both sides
compute the kept count with :meth:`EngineSettings.kept_tokens`, so no message passes between them.
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
from fastkvzip_press.vllm.settings import EngineSettings

logger = logging.getLogger(__name__)

STATE = "fastkvzip_compaction"  # attribute of a vllm Request: its SchedulerCompaction


@dataclass
class SchedulerCompaction:
    """Prompt tokens a request no longer stores (0 until its prefill completes), and whether that happened."""

    discarded: int = 0
    done: bool = False


@dataclass
class SchedulerState:
    settings: EngineSettings
    events: EventLog


_original_init = Scheduler.__init__
_original_update_from_output = Scheduler.update_from_output
_original_preempt = Scheduler._preempt_request
_original_allocate_slots = KVCacheManager.allocate_slots


def _init(self, vllm_config, kv_cache_config, *args, **kwargs):
    _original_init(self, vllm_config, kv_cache_config, *args, **kwargs)
    settings = check_engine(vllm_config, len(kv_cache_config.kv_cache_groups))
    self.fastkvzip = None
    if settings is None:
        return
    self.fastkvzip = SchedulerState(settings, EventLog(settings.events))
    logger.info("Fast KVzip compaction on: default ratio %s, gates %s", settings.ratio, settings.gates or "shipped")


def _update_from_output(self, scheduler_output, model_runner_output):
    outputs = _original_update_from_output(self, scheduler_output, model_runner_output)
    state: SchedulerState | None = getattr(self, "fastkvzip", None)
    if state is not None:
        for request_id in scheduler_output.num_scheduled_tokens:
            request = self.requests.get(request_id)
            if request is not None and request.status == RequestStatus.RUNNING:
                _free_after_prefill(self, state, request)
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


def _free_after_prefill(scheduler: Scheduler, state: SchedulerState, request) -> None:
    """Once the request's prompt is computed, cut its blocks after the kept tokens and return the rest to the pool."""
    compaction = getattr(request, STATE, None)
    if compaction is None:
        compaction = SchedulerCompaction()
        setattr(request, STATE, compaction)
    prompt_tokens = request.num_prompt_tokens
    if compaction.done or request.num_computed_tokens < prompt_tokens:
        return
    compaction.done = True
    ratio = state.settings.request_ratio(request.sampling_params.extra_args if request.sampling_params else None)
    kept = state.settings.kept_tokens(prompt_tokens, ratio)
    if kept == prompt_tokens:
        return
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    blocks = manager.req_to_blocks[request.request_id]
    stored = request.num_computed_tokens - (prompt_tokens - kept)  # kept prompt tokens, then any recomputed answer
    keep = cdiv(stored, manager.block_size)
    tail = blocks[keep:]
    del blocks[keep:]
    pool = scheduler.kv_cache_manager.block_pool
    pool.free_blocks(reversed(tail))
    compaction.discarded = prompt_tokens - kept
    state.events.write(
        "compaction",
        request=request.request_id,
        prompt_tokens=prompt_tokens,
        kept_tokens=kept,
        blocks_before=keep + len(tail),
        blocks_after=keep,
        free_blocks=pool.get_num_free_blocks(),
    )
    logger.info(
        "request %s: %d of %d prompt tokens kept per layer and head, %d of %d blocks freed",
        request.request_id,
        kept,
        prompt_tokens,
        len(tail),
        keep + len(tail),
    )


def _preempt_request(self, request, *args, **kwargs):
    if getattr(request, STATE, None) is not None:
        setattr(request, STATE, None)  # recomputed from its first token, compacted again at its prompt's end
    state: SchedulerState | None = getattr(self, "fastkvzip", None)
    if state is not None:
        state.events.write("preemption", request=request.request_id, computed_tokens=request.num_computed_tokens)
    return _original_preempt(self, request, *args, **kwargs)


def _allocate_slots(self, request, num_new_tokens, *args, **kwargs):
    compaction = getattr(request, STATE, None)
    discarded = compaction.discarded if compaction is not None else 0
    if not discarded:
        return _original_allocate_slots(self, request, num_new_tokens, *args, **kwargs)
    # Blocks hold physical positions: the logical count less the discarded prompt tokens, for this call only.
    request.num_computed_tokens -= discarded
    try:
        return _original_allocate_slots(self, request, num_new_tokens, *args, **kwargs)
    finally:
        request.num_computed_tokens += discarded


def install() -> None:
    Scheduler.__init__ = _init
    Scheduler.update_from_output = _update_from_output
    Scheduler._preempt_request = _preempt_request
    KVCacheManager.allocate_slots = _allocate_slots
