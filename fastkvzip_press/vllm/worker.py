"""Worker side (the process that runs the model): score prompts, compact each request's KV after its prefill, and
address the compacted cache.

- Capture: a forward pre-hook on every decoder layer's ``self_attn`` scores the post-layernorm hidden states of the
  requests being compressed with the layer's gate; one on ``self_attn.attn`` copies their post-RoPE keys and values.
  Only rows of requests still in their compressed prefill are touched.
- Compaction: when a request's prefill reaches a compaction point of its schedule (the scheduler ends steps there),
  :class:`~fastkvzip_press.vllm.selection.PromptCompaction` picks every (layer, head)'s kept pairs of the span just
  decided (the same count everywhere), the attention backend writes them after the pairs kept before, followed by the
  undecided window (row ``j`` holds each head's ``j``-th pair), and the block-table row is cut after them. The
  scheduler frees the same blocks (:mod:`~fastkvzip_press.vllm.scheduler`).
- Addressing: for every later step, sequence lengths and slot mappings use the physical position (logical minus the
  prompt tokens discarded so far); RoPE positions and the sampler's lengths stay logical.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from vllm.utils.math_utils import cdiv
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from fastkvzip_press.gates import GateBank, ModelLayout, load_gates, load_shipped
from fastkvzip_press.vllm.events import EventLog
from fastkvzip_press.vllm.schedule import PromptSchedule
from fastkvzip_press.vllm.selection import ChunkWrite, PromptCompaction
from fastkvzip_press.vllm.settings import EngineSettings

logger = logging.getLogger(__name__)

STATE = "fastkvzip_compaction"  # attribute of a request's CachedRequestState: its RequestCompaction


@dataclass
class RequestCompaction:
    """A request's compaction on the worker: its ratio and schedule, its prompt until the prefill is over, and the
    count of prompt tokens it no longer stores (the shift from logical to physical positions)."""

    ratio: float
    schedule: PromptSchedule | None
    prompt: PromptCompaction | None = None
    discarded: int = 0
    done: bool = False


@dataclass
class StepCapture:
    """Rows of one forward that belong to requests in a compressed prefill, and what the hooks took from them."""

    requests: list[tuple[str, int, int]]  # (request id, first row in the captured rows, row count)
    rows: torch.Tensor  # [R] rows of the forward's flattened tokens
    scores: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [H, R]
    keys: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [R, H, D]
    values: dict[int, torch.Tensor] = field(default_factory=dict)


class WorkerCompactor:
    """The integration's state in one model runner: gates, hooks and the step being captured."""

    def __init__(self, runner: GPUModelRunner, settings: EngineSettings):
        self.runner = runner
        self.settings = settings
        self.events = EventLog(settings.events)
        model = runner.get_model()
        self.layers = _decoder_layers(model)
        model_config = runner.model_config
        self.num_kv_heads = model_config.get_num_kv_heads(runner.parallel_config)
        self.head_size = model_config.get_head_size()
        self.bank = _load_bank(settings, model_config)
        if tuple(self.bank.layer_ids) != tuple(range(len(self.layers))):
            raise ValueError(
                f"Fast KVzip in vLLM compacts every attention layer to one length per request; these gates cover "
                f"layers {self.bank.layer_ids} of {len(self.layers)}. Models with ungated (sliding-window) layers "
                "are not supported in vLLM."
            )
        self.step: StepCapture | None = None
        for layer_id, layer in enumerate(self.layers):
            layer.self_attn.register_forward_pre_hook(self._score_hook(layer_id), with_kwargs=True)
            layer.self_attn.attn.register_forward_pre_hook(self._kv_hook(layer_id), with_kwargs=True)

    # ------------------------------------------------------------------------------------------------- hooks

    def _score_hook(self, layer_id: int):
        def hook(module, args, kwargs):
            step = self.step
            if step is not None:
                hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[1]  # [tokens, hidden]
                rows = hidden.index_select(0, step.rows.to(hidden.device))
                step.scores[layer_id] = self.bank.score(layer_id, rows[None])[0]  # [H, R]

        return hook

    def _kv_hook(self, layer_id: int):
        heads, size = self.num_kv_heads, self.head_size

        def hook(module, args, kwargs):
            step = self.step
            if step is not None:
                key = args[1] if len(args) > 1 else kwargs["key"]
                value = args[2] if len(args) > 2 else kwargs["value"]
                rows = step.rows.to(key.device)
                step.keys[layer_id] = key.index_select(0, rows).view(-1, heads, size).clone()
                step.values[layer_id] = value.index_select(0, rows).view(-1, heads, size).clone()

        return hook

    # ---------------------------------------------------------------------------------------------- per step

    def request_state(self, request_id: str) -> RequestCompaction | None:
        """The request's compaction state, created at its first step (``None``: not compressed)."""
        cached = self.runner.requests.get(request_id)
        if cached is None:
            return None
        state = getattr(cached, STATE, None)
        if state is None:
            ratio = self.settings.request_ratio(cached.sampling_params.extra_args if cached.sampling_params else None)
            schedule = self.settings.schedule(cached.num_prompt_tokens, ratio)
            # nothing to capture when nothing will be evicted (ratio 0, or a prompt within sink and window)
            state = RequestCompaction(ratio=ratio, schedule=schedule, done=schedule is None)
            setattr(cached, STATE, state)
        return state

    def reset(self, request_id: str) -> None:
        """Forget a preempted request's compaction: it is recomputed from its first token."""
        cached = self.runner.requests.get(request_id)
        if cached is not None and getattr(cached, STATE, None) is not None:
            setattr(cached, STATE, None)

    def after_prepare_inputs(self, num_scheduled_tokens: np.ndarray, total: int) -> None:
        """Shift the compacted requests' sequence lengths and slots to physical positions; plan this step's capture."""
        runner = self.runner
        num_reqs = runner.input_batch.num_reqs
        request_ids = list(runner.input_batch.req_ids)
        states = [self.request_state(request_id) for request_id in request_ids]
        discarded = np.array([state.discarded if state else 0 for state in states], dtype=np.int64)
        if discarded.any():
            request_of_row = np.repeat(np.arange(num_reqs), num_scheduled_tokens)
            runner.seq_lens[:num_reqs] -= torch.from_numpy(discarded).to(runner.seq_lens.device, runner.seq_lens.dtype)
            shift = torch.from_numpy(discarded[request_of_row]).to(runner.positions.device)
            physical = runner.positions[:total] - shift
            query_start = runner.query_start_loc.gpu[: num_reqs + 1]
            runner.input_batch.block_table.compute_slot_mapping(num_reqs, query_start, physical)
        starts = runner.query_start_loc.cpu[: num_reqs + 1].tolist()
        computed = runner.input_batch.num_computed_tokens_cpu[:num_reqs]
        plan, ranges, offset = [], [], 0
        for index, (request_id, state) in enumerate(zip(request_ids, states)):
            if state is None or state.done:
                continue
            if int(computed[index]) == 0 or state.prompt is None:
                state.prompt = PromptCompaction(
                    state.schedule, state.ratio, self.settings.protection, self.settings.chunk_size
                )
            count = starts[index + 1] - starts[index]
            plan.append((request_id, offset, count))
            ranges.append(torch.arange(starts[index], starts[index + 1]))
            offset += count
        self.step = StepCapture(plan, torch.cat(ranges)) if plan else None

    def after_forward(self) -> None:
        """Hand each captured request its rows; store what a compaction point decides."""
        step, self.step = self.step, None
        if step is None:
            return
        n_layers = len(self.layers)
        for request_id, first, count in step.requests:
            state = self.request_state(request_id)
            if state is None or state.prompt is None:
                continue
            rows = slice(first, first + count)
            write = state.prompt.add(
                torch.stack([step.scores[layer][:, rows] for layer in range(n_layers)]),
                torch.stack([step.keys[layer][rows] for layer in range(n_layers)]),
                torch.stack([step.values[layer][rows] for layer in range(n_layers)]),
            )
            if write is not None:
                self._store(request_id, state, write)

    # ------------------------------------------------------------------------------------------- compaction

    def _store(self, request_id: str, state: RequestCompaction, write: ChunkWrite) -> None:
        prompt = state.prompt
        runner = self.runner
        row = runner.input_batch.req_id_to_index[request_id]
        table = runner.input_batch.block_table[0]
        block_size = table.block_size
        n_blocks = int(table.num_blocks_per_row[row])
        blocks = torch.from_numpy(table.block_table.np[row, :n_blocks].astype(np.int64))
        positions = torch.arange(write.first, write.stored)
        slots = blocks[positions // block_size] * block_size + positions % block_size
        for layer_id, layer in enumerate(self.layers):
            attention = layer.self_attn.attn
            cache = attention.kv_cache
            attention.impl.do_kv_cache_update(
                attention,
                write.keys[layer_id].to(cache.device, cache.dtype),
                write.values[layer_id].to(cache.device, cache.dtype),
                cache,
                slots.to(cache.device),
            )
        kept_blocks = cdiv(write.stored, block_size)
        table.block_table.np[row, kept_blocks:n_blocks] = 0
        table.num_blocks_per_row[row] = kept_blocks
        del runner.requests[request_id].block_ids[0][kept_blocks:]
        state.discarded = prompt.computed - write.stored
        if not prompt.complete:
            return
        state.prompt, state.done = None, True
        schedule = prompt.schedule
        record = dict(request=request_id, prompt_tokens=schedule.prompt_tokens, kept_tokens=schedule.kept_tokens)
        if self.settings.record_kept:
            record["kept_indices"] = prompt.kept_indices().tolist()
        self.events.write("worker_compaction", **record)
        logger.debug(
            "request %s: kept %d of %d prompt tokens per head", request_id, schedule.kept_tokens, schedule.prompt_tokens
        )


def _decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") and hasattr(layer.self_attn, "attn") for layer in layers):
        raise ValueError(
            f"Fast KVzip in vLLM supports decoder-only models with model.layers[i].self_attn.attn (Llama, Qwen2, "
            f"Qwen3, Mistral); {type(model).__name__} has another structure"
        )
    return layers


def served_model_id(model: str) -> str:
    """The id gates are matched with: the package's default model id for its converted folder, else the model
    name or path as vLLM got it."""
    from fastkvzip_press.models import DEFAULT_MODEL_ID, default_model_dir

    try:
        if Path(model).resolve() == default_model_dir().resolve():
            return DEFAULT_MODEL_ID
    except OSError:
        pass
    return model


def _load_bank(settings: EngineSettings, model_config) -> GateBank:
    layout = ModelLayout.from_config(model_config.hf_config)
    model_id = served_model_id(model_config.model)
    layout = ModelLayout(**{**layout.__dict__, "model_id": model_id})
    bank = load_shipped(model_id) if settings.gates is None else load_gates(settings.gates)
    if bank is None:
        raise ValueError(
            f"no gates are shipped for {model_id!r}: give a gate file or folder as "
            '--additional-config \'{"fastkvzip": {"gates": "PATH"}}\' (train some with `fastkvzip-press train`)'
        )
    bank.check_fits(layout)
    bank.check_model(layout)
    return bank.as_loaded()


# ------------------------------------------------------------------------------------------ model-runner patches

_original_prepare_inputs = GPUModelRunner._prepare_inputs
_original_model_forward = GPUModelRunner._model_forward
_original_update_states = GPUModelRunner._update_states


def _compactor(runner: GPUModelRunner) -> WorkerCompactor | None:
    """The runner's compactor, made on first use (the model is loaded by then); ``None`` when the engine runs
    without Fast KVzip."""
    compactor = runner.__dict__.get("fastkvzip")
    if compactor is None and "fastkvzip" not in runner.__dict__:
        settings = EngineSettings.from_additional_config(runner.vllm_config.additional_config)
        compactor = WorkerCompactor(runner, settings) if settings is not None else None
        runner.fastkvzip = compactor
    return compactor


def _update_states(self, scheduler_output):
    compactor = _compactor(self)
    if compactor is not None:
        for request_id in scheduler_output.scheduled_cached_reqs.resumed_req_ids:
            compactor.reset(request_id)
    return _original_update_states(self, scheduler_output)


def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
    outputs = _original_prepare_inputs(self, scheduler_output, num_scheduled_tokens)
    compactor = _compactor(self)
    if compactor is not None:
        total = int(scheduler_output.total_num_scheduled_tokens)
        compactor.after_prepare_inputs(np.asarray(num_scheduled_tokens, dtype=np.int64), total)
    return outputs


def _model_forward(self, *args, **kwargs):
    outputs = _original_model_forward(self, *args, **kwargs)
    compactor = self.__dict__.get("fastkvzip")
    if compactor is not None:
        compactor.after_forward()
    return outputs


def load_compactor(runner: GPUModelRunner) -> None:
    """Build the runner's compactor right after its model loads, so that bad gates stop the engine at start."""
    _compactor(runner)


def install() -> None:
    GPUModelRunner._update_states = _update_states
    GPUModelRunner._prepare_inputs = _prepare_inputs
    GPUModelRunner._model_forward = _model_forward
    for runner_class in _runner_classes():
        original = runner_class.__dict__["load_model"]

        def load_model(self, *args, _original=original, **kwargs):
            result = _original(self, *args, **kwargs)
            load_compactor(self)
            return result

        runner_class.load_model = load_model


def _runner_classes() -> list[type]:
    classes = [GPUModelRunner]
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except ImportError:  # a GPU build without the CPU runner
        return classes
    if "load_model" in CPUModelRunner.__dict__:
        classes.append(CPUModelRunner)
    return classes
