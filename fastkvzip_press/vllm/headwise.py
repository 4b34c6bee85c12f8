"""The worker's head-wise KV store: the engine's KV memory as a pool of single-head blocks, each request's heads at
their own lengths, the forward's attention over them, and each compressed request's compaction.

Engine-independent: :mod:`fastkvzip_press.vllm.seam` hands it plain values (request ids, prompt lengths, scheduled
token counts, the engine's KV buffer) and calls it from vLLM's model runner and attention backend.

Shapes: ``L`` attention layers (all gated), ``H`` KV heads, ``D`` head size, ``T`` tokens of a forward, ``R``
requests of a forward, ``N`` single-head blocks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from fastkvzip_press.gates import GateBank
from fastkvzip_press.paged import HeadBlockPool, HeadTables, StepLayout, plan_step
from fastkvzip_press.paged import write_pairs as torch_write_pairs
from fastkvzip_press.triton.paged_attention import paged_attention
from fastkvzip_press.vllm.compaction import HeadWrite, PromptCompaction
from fastkvzip_press.vllm.events import EventLog
from fastkvzip_press.vllm.schedule import RequestSchedule
from fastkvzip_press.vllm.settings import EngineSettings, RequestSettings

logger = logging.getLogger(__name__)


class AttentionPath(Protocol):
    """How pairs are stored in the pool and attended to (the pool's in-block layout belongs to the path)."""

    def write(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store ``keys`` / ``values`` ``[n, D]`` at flat pool ``slots`` ``[n]``."""

    def prepare(self, step: StepLayout) -> None:
        """Get ready for a forward laid out as ``step``."""

    def attend(self, query: torch.Tensor, step: StepLayout, layer: int, scale: float, out: torch.Tensor) -> None:
        """``out [T, Hq, D]`` = attention of ``layer``'s ``query [T, Hq, D]`` over each head's pairs."""


class TorchPath:
    """The package's own layout (``[N, 2, block_size, D]``: keys then values of each block) and attention: the
    Triton kernel on CUDA, the torch path elsewhere."""

    name = "torch"

    def __init__(self, buffer: torch.Tensor, block_size: int, head_dim: int):
        self.pool = buffer.view(-1, 2, block_size, head_dim)

    def write(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        torch_write_pairs(self.pool, slots, keys, values)

    def prepare(self, step: StepLayout) -> None:
        pass

    def attend(self, query: torch.Tensor, step: StepLayout, layer: int, scale: float, out: torch.Tensor) -> None:
        paged_attention(query, self.pool, step, layer, scale, out)


@dataclass
class RequestState:
    """A request on the worker: what it asked for, its schedule, and its prompt until the last compaction."""

    settings: RequestSettings
    schedule: RequestSchedule | None
    compaction: PromptCompaction | None = None


@dataclass
class StepCapture:
    """Rows of one forward that belong to requests in a compressed prefill, and what was taken from them."""

    requests: list[tuple[str, int, int]]  # (request id, first captured row, row count)
    rows: torch.Tensor  # [R_c] rows of the forward's tokens
    scores: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [H, R_c]
    keys: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [R_c, H, D]
    values: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class Compacted:
    """One compaction the worker made: the request, and the scheduler blocks it holds from now on."""

    request_id: str
    blocks: int
    complete: bool


class HeadwiseStore:
    """The head-wise KV store of one worker."""

    def __init__(
        self,
        path: AttentionPath,
        layer_names: list[str],
        num_blocks: int,
        num_heads: int,
        block_size: int,
        max_requests: int,
        max_model_len: int,
        settings: EngineSettings,
        bank: GateBank,
    ):
        self.path = path
        self.settings = settings
        self.bank = bank
        self.block_size = block_size
        self.layer_index = {name: index for index, name in enumerate(layer_names)}  # the engine's layer names
        self.num_layers, self.num_heads = len(layer_names), num_heads
        # vLLM never reads or writes this memory itself (the backend does), so even its null block is ours.
        self.pool = HeadBlockPool(num_blocks)
        max_blocks = -(-max_model_len // block_size) + 1
        self.tables = HeadTables(self.pool, max_requests, self.num_layers, num_heads, max_blocks, block_size)
        self.requests: dict[str, RequestState] = {}
        self.events = EventLog(settings.events)
        self.step: StepLayout | None = None
        self.capture: StepCapture | None = None

    @property
    def heads(self) -> int:
        """Layers x KV heads: what a scheduler block holds in single-head blocks."""
        return self.num_layers * self.num_heads

    # ------------------------------------------------------------------------------------------ request life

    def request(self, request_id: str, prompt_tokens: int, extra_args) -> RequestState:
        state = self.requests.get(request_id)
        if state is None:
            settings = self.settings.request(extra_args)
            schedule = self.settings.schedule(prompt_tokens, settings, self.heads, self.block_size)
            state = self.requests[request_id] = RequestState(settings, schedule)
        return state

    def release(self, request_id: str) -> None:
        """A request finished, was aborted or preempted: its blocks go back to the pool, its state is forgotten
        (a preempted request is recomputed from its first token and compacted again at the same points)."""
        self.tables.close(request_id)
        self.requests.pop(request_id, None)

    # ---------------------------------------------------------------------------------------------- forward

    def begin_step(
        self,
        request_ids: list[str],
        prompt_tokens: list[int],
        computed: list[int],
        scheduled: list[int],
        extra_args: list,
        device: torch.device,
    ) -> StepLayout:
        """Lay out one forward of requests ``request_ids`` (batch order) with ``scheduled`` new tokens each after
        ``computed`` logical ones, and plan what to capture of requests in a compressed prefill."""
        plan, rows, offset, start = [], [], 0, 0
        for request_id, prompt, done, count, args in zip(request_ids, prompt_tokens, computed, scheduled, extra_args):
            state = self.request(request_id, prompt, args)
            if state.schedule is not None and done < state.schedule.prompt_tokens:
                if done == 0 or state.compaction is None:
                    state.compaction = PromptCompaction(state.schedule)
                plan.append((request_id, offset, count))
                rows.append(torch.arange(start, start + count))
                offset += count
            start += count
        slots = np.array([self.tables.slot(request_id) for request_id in request_ids])
        self.step = plan_step(self.tables, slots, np.array(scheduled), device)
        self.path.prepare(self.step)
        self.capture = StepCapture(plan, torch.cat(rows).to(device)) if plan else None
        return self.step

    def score(self, layer: int, hidden_states: torch.Tensor) -> None:
        """Gate scores of the captured rows of ``layer``'s post-layernorm ``hidden_states [T, hidden]``."""
        if self.capture is not None:
            rows = hidden_states.index_select(0, self.capture.rows)
            self.capture.scores[layer] = self.bank.score(layer, rows[None])[0]  # [H, R_c]

    def attend(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, out: torch.Tensor
    ) -> None:
        """Store ``layer``'s new ``key`` / ``value`` ``[T, H, D]`` in every head and attend (``query``, ``out``:
        ``[T, Hq, D]``)."""
        step = self.step
        head_dim = key.shape[-1]
        self.path.write(step.write_slots[layer].reshape(-1), key.reshape(-1, head_dim), value.reshape(-1, head_dim))
        if self.capture is not None:
            self.capture.keys[layer] = key.index_select(0, self.capture.rows).clone()
            self.capture.values[layer] = value.index_select(0, self.capture.rows).clone()
        self.path.attend(query, step, layer, scale, out)

    def end_step(self) -> list[Compacted]:
        """Hand each captured request its rows; compact those that reached a compaction point."""
        capture, self.capture, self.step = self.capture, None, None
        if capture is None:
            return []
        done = []
        layers = range(self.num_layers)
        for request_id, first, count in capture.requests:
            state = self.requests[request_id]
            rows = slice(first, first + count)
            result = state.compaction.add(
                torch.stack([capture.scores[layer][:, rows] for layer in layers]),
                torch.stack([capture.keys[layer][rows] for layer in layers]),
                torch.stack([capture.values[layer][rows] for layer in layers]),
            )
            if result is not None:
                done.append(self._store(request_id, state, result[1]))
        return done

    # ------------------------------------------------------------------------------------------- compaction

    def _store(self, request_id: str, state: RequestState, write: HeadWrite) -> Compacted:
        slot = self.tables.slot(request_id)
        layer, head, position = (index.cpu().numpy() for index in (write.layer, write.head, write.position))
        slots = self.tables.pool_slots(slot, layer, head, position)
        self.path.write(torch.from_numpy(slots).to(write.keys.device), write.keys, write.values)
        self.tables.shrink(slot, write.stored.cpu().numpy())
        compaction = state.compaction
        schedule = state.schedule
        complete = compaction.complete
        blocks = -(-schedule.reserved_tokens(compaction.computed) // self.block_size)
        if complete:
            state.compaction = None
            record = dict(request=request_id, prompt_tokens=schedule.prompt_tokens, kept_pairs=schedule.kept_pairs)
            record.update(budget=state.settings.budget, head_blocks=self.tables.blocks_held(slot), blocks=blocks)
            record["kept_per_head"] = self.tables.lengths[slot].tolist()
            if self.settings.record_kept:
                record["kept_indices"] = compaction.kept_indices()
            self.events.write("worker_compaction", **record)
            logger.debug(
                "request %s: %d of %d prompt pairs kept",
                request_id,
                schedule.kept_pairs,
                schedule.prompt_tokens * self.heads,
            )
        return Compacted(request_id, blocks, complete)

    def check_held(self, request_id: str, scheduler_blocks: int) -> None:
        """The pool can never be oversubscribed: a request's heads hold at most what its scheduler blocks stand
        for (``layers x heads`` single-head blocks each)."""
        held = self.tables.blocks_held(self.tables.slot(request_id))
        if held > self.heads * scheduler_blocks:
            raise AssertionError(
                f"request {request_id} holds {held} single-head blocks, more than its {scheduler_blocks} scheduler "
                f"blocks stand for ({self.heads} each)"
            )
