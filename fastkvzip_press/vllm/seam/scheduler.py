"""Engine-core side (vLLM's ``scheduler_cls``): end prefill steps at each compressed request's compaction points,
count each request as the tokens its heads may store (not its logical length), free its blocks past them after each
compaction, and admit a request when its largest footprint fits.

The counts are :class:`~fastkvzip_press.vllm.accounting.SchedulerAccounts`'; the worker derives the same schedule
from the same settings, so no message passes between the processes. Blocks are counted in vLLM's own pool: one
block stands for ``layers x KV heads`` single-head blocks of the worker's store.
"""

from __future__ import annotations

import inspect
import logging

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import RequestStatus

from fastkvzip_press.vllm.accounting import SchedulerAccounts
from fastkvzip_press.vllm.events import EventLog
from fastkvzip_press.vllm.settings import EngineSettings

logger = logging.getLogger("vllm.fastkvzip.scheduler")


def engine_heads(vllm_config) -> int:
    """Attention layers x KV heads of the served model (all gated): single-head blocks per scheduler block."""
    model_config, parallel = vllm_config.model_config, vllm_config.parallel_config
    return model_config.get_num_layers(parallel) * model_config.get_num_kv_heads(parallel)


def rebind(function, args: tuple, kwargs: dict, **changes) -> tuple[tuple, dict]:
    """``args`` / ``kwargs`` of a call to ``function`` with named arguments changed by ``changes`` (each a callable
    of the old value), however the caller passed them."""
    bound = inspect.signature(function).bind(*args, **kwargs)
    bound.apply_defaults()
    for name, change in changes.items():
        bound.arguments[name] = change(bound.arguments[name])
    return bound.args, bound.kwargs


def headwise_counts(manager_class: type, accounts: SchedulerAccounts) -> type:
    """``manager_class`` (the engine's full-attention block manager) whose block counts of a compressed request follow
    what its heads may store, counting with ``accounts``. A direct subclass, so that vLLM's object can take it as its
    class (a mixin base changes the object's layout)."""

    class HeadwiseCounts(manager_class):
        def get_num_blocks_to_allocate(self, *args, **kwargs) -> int:
            original = super().get_num_blocks_to_allocate
            arguments = inspect.signature(original).bind(*args, **kwargs).arguments
            request_id = arguments["request_id"]
            count = accounts.admission_tokens if arguments.get("apply_admission_cap") else accounts.counted_tokens
            args, kwargs = rebind(original, args, kwargs, num_tokens=lambda tokens: count(request_id, tokens))
            return original(*args, **kwargs)

        def allocate_new_blocks(self, *args, **kwargs):
            original = super().allocate_new_blocks
            request_id = inspect.signature(original).bind(*args, **kwargs).arguments["request_id"]
            args, kwargs = rebind(original, args, kwargs, num_tokens=lambda t: accounts.counted_tokens(request_id, t))
            return original(*args, **kwargs)

        def pop_blocks_for_free(self, request_id: str):
            accounts.forget(request_id)  # finished, aborted or preempted (recomputed from its first token)
            return super().pop_blocks_for_free(request_id)

    HeadwiseCounts.__name__ = HeadwiseCounts.__qualname__ = f"Headwise{manager_class.__name__}"
    return HeadwiseCounts


class FastKVzipScheduler(Scheduler):
    """vLLM's scheduler, with block counts and prefill steps that follow each request's compaction schedule."""

    def __init__(self, vllm_config, kv_cache_config, *args, **kwargs):
        super().__init__(vllm_config, kv_cache_config, *args, **kwargs)
        settings = EngineSettings.from_additional_config(vllm_config.additional_config)
        if len(kv_cache_config.kv_cache_groups) != 1:
            raise ValueError(
                f"Fast KVzip supports models with one full-attention KV-cache group; this one has "
                f"{len(kv_cache_config.kv_cache_groups)}"
            )
        (manager,) = self.kv_cache_manager.coordinator.single_type_managers
        self.fastkvzip = SchedulerAccounts(settings, engine_heads(vllm_config), manager.block_size)
        # The manager object stays vLLM's; only its block counts of compressed requests change.
        manager.__class__ = headwise_counts(type(manager), self.fastkvzip)
        self.fastkvzip_events = EventLog(settings.events)

    def _reserve_prefill_lookahead(self, request, num_computed_tokens: int, num_new_tokens: int) -> int:
        """End a compressed request's prefill step at its next compaction point (the worker decides there)."""
        num_new_tokens = super()._reserve_prefill_lookahead(request, num_computed_tokens, num_new_tokens)
        params = request.sampling_params
        self.fastkvzip.account(request.request_id, request.num_prompt_tokens, params.extra_args if params else None)
        return self.fastkvzip.step_tokens(request.request_id, num_computed_tokens, num_new_tokens)

    def update_from_output(self, scheduler_output, model_runner_output):
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        for request_id in scheduler_output.num_scheduled_tokens:
            request = self.requests.get(request_id)
            if request is not None and request.status == RequestStatus.RUNNING:
                self._free_after_compaction(request)
        pool = self.kv_cache_manager.block_pool
        self.fastkvzip_events.write(
            "scheduler_step",
            running=len(self.running),
            waiting=len(self.waiting),
            free_blocks=pool.get_num_free_blocks(),
            total_blocks=pool.num_gpu_blocks - 1,  # block 0 is the pool's null block
            scheduled=dict(scheduler_output.num_scheduled_tokens),
        )
        return outputs

    def _preempt_request(self, request, *args, **kwargs):
        self.fastkvzip_events.write(
            "preemption", request=request.request_id, computed_tokens=request.num_computed_tokens
        )
        return super()._preempt_request(request, *args, **kwargs)

    def _free_after_compaction(self, request) -> None:
        """At each compaction point the request's computed tokens reached, cut its blocks after what it now counts
        and return the rest to the pool."""
        request_id, computed = request.request_id, request.num_computed_tokens
        for point in self.fastkvzip.passed_points(request_id, computed):
            (manager,) = self.kv_cache_manager.coordinator.single_type_managers
            blocks = manager.req_to_blocks[request_id]
            keep = self.fastkvzip.blocks_after(request_id, computed, len(blocks))
            tail = blocks[keep:]
            del blocks[keep:]
            pool = self.kv_cache_manager.block_pool
            pool.free_blocks(reversed(tail))
            account = self.fastkvzip.account(request_id, request.num_prompt_tokens, None)
            final = point is account.schedule.points[-1]
            self.fastkvzip_events.write(
                "compaction" if final else "chunk_compaction",
                request=request_id,
                budget=account.schedule.budget,
                prompt_tokens=account.schedule.prompt_tokens,
                computed_tokens=point.end,
                kept_pairs=point.kept + self.fastkvzip.heads * point.undecided,
                heads=self.fastkvzip.heads,
                block_size=self.fastkvzip.block_size,
                counted_tokens=self.fastkvzip.counted_tokens(request_id, computed),
                blocks_before=keep + len(tail),
                blocks_after=keep,
                free_blocks=pool.get_num_free_blocks(),
            )
            if final:
                logger.info(
                    "request %s: %d of %d prompt pairs kept (%s budget); %d blocks held",
                    request_id,
                    account.schedule.kept_pairs,
                    account.schedule.prompt_tokens * self.fastkvzip.heads,
                    account.schedule.budget,
                    keep,
                )
