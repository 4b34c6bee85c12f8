"""Worker side (vLLM's ``worker_cls``): the attention backend registered, the model runner given the head-wise store
over vLLM's KV memory, gate scores read from each layer's inputs, and each request's heads grown, compacted and
released with it.

vLLM 0.32 has no option for the model runner, so the worker gives its runner (vLLM's own object) the methods of
:class:`HeadwiseRunner` in front of its class's.
"""

from __future__ import annotations

import functools
import inspect
import logging

import numpy as np
import torch
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
from vllm.v1.worker.cpu_worker import CPUWorker
from vllm.v1.worker.gpu_worker import Worker

from fastkvzip_press.layout import decoder_layers
from fastkvzip_press.vllm.engine_gates import engine_gates
from fastkvzip_press.vllm.headwise import Compacted, HeadwiseStore, TorchPath
from fastkvzip_press.vllm.seam.backend import BACKEND, HeadwiseBuilder, NativeCPUPath, cpu_attention_isa
from fastkvzip_press.vllm.settings import EngineSettings

logger = logging.getLogger("vllm.fastkvzip.worker")


class HeadwiseRunner:
    """Mixed in front of vLLM's model runner class for an engine with Fast KVzip."""

    fastkvzip: HeadwiseStore

    def load_model(self, *args, **kwargs):
        result = super().load_model(*args, **kwargs)
        settings = EngineSettings.from_additional_config(self.vllm_config.additional_config)
        bank = engine_gates(settings, self.model_config.hf_config, self.model_config.model)
        layers = _attention_modules(self.get_model())
        if len(layers) != len(bank.layer_ids):
            raise ValueError(f"the model has {len(layers)} attention layers, the gates {len(bank.layer_ids)}")
        self.fastkvzip_setup = (settings, bank)
        for layer_id, module in enumerate(layers):
            module.register_forward_pre_hook(self._score_hook(layer_id, module), with_kwargs=True)
        return result

    def _score_hook(self, layer_id: int, module: torch.nn.Module):
        signature = inspect.signature(module.forward)

        def hook(module, args, kwargs):
            store = getattr(self, "fastkvzip", None)
            if store is not None and store.capture is not None:
                store.score(layer_id, signature.bind(*args, **kwargs).arguments["hidden_states"])

        return hook

    def initialize_kv_cache(self, kv_cache_config, *args, **kwargs):
        super().initialize_kv_cache(kv_cache_config, *args, **kwargs)
        settings, bank = self.fastkvzip_setup
        (group,) = kv_cache_config.kv_cache_groups
        names = list(group.layer_names)
        caches = [self.compilation_config.static_forward_context[name].kv_cache for name in names]
        buffer, block_size = _pool_buffer(caches, group.kv_cache_spec.block_size)
        heads, head_dim = caches[0].shape[1], caches[0].shape[3] // 2
        path = _attention_path(settings, buffer, block_size, head_dim, self.device)
        self.fastkvzip = HeadwiseStore(
            path, names, buffer.shape[0], heads, block_size, self.scheduler_config.max_num_seqs,
            self.model_config.max_model_len, settings, bank,
        )  # fmt: skip
        for groups in self.attn_groups:
            for attention_group in groups:
                for builder in attention_group.metadata_builders:
                    if isinstance(builder, HeadwiseBuilder):
                        builder.store = self.fastkvzip
        logger.info(
            "Fast KVzip: %d single-head blocks of %d tokens (%d layers x %d KV heads), attention %s",
            buffer.shape[0], block_size, len(names), heads, path.name,
        )  # fmt: skip

    def _zero_block_ids(self, block_ids) -> None:
        """vLLM's block ids are counts here; the store never reads past what a head wrote, so nothing is zeroed."""

    def _update_states(self, scheduler_output):
        store = getattr(self, "fastkvzip", None)
        if store is not None:
            cached = scheduler_output.scheduled_cached_reqs
            for request_id in (
                *scheduler_output.finished_req_ids,
                *(scheduler_output.preempted_req_ids or ()),
                *cached.resumed_req_ids,
            ):
                store.release(request_id)
        return super()._update_states(scheduler_output)

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        outputs = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        store = getattr(self, "fastkvzip", None)
        if store is not None:
            batch = self.input_batch
            ids = list(batch.req_ids)
            states = [self.requests[request_id] for request_id in ids]
            store.begin_step(
                ids,
                [state.num_prompt_tokens for state in states],
                batch.num_computed_tokens_cpu[: len(ids)].tolist(),
                np.asarray(num_scheduled_tokens).tolist(),
                [state.sampling_params.extra_args if state.sampling_params else None for state in states],
                self.device,
            )
            table = batch.block_table[0]
            for row, request_id in enumerate(ids):
                store.check_held(request_id, int(table.num_blocks_per_row[row]))
        return outputs

    def _model_forward(self, *args, **kwargs):
        outputs = super()._model_forward(*args, **kwargs)
        store = getattr(self, "fastkvzip", None)
        if store is not None:
            for compacted in store.end_step():
                self._trim_block_row(compacted)
        return outputs

    def _trim_block_row(self, compacted: Compacted) -> None:
        """Cut the request's vLLM block row as the scheduler cuts its blocks (same count, no message)."""
        table = self.input_batch.block_table[0]
        row = self.input_batch.req_id_to_index[compacted.request_id]
        held = int(table.num_blocks_per_row[row])
        keep = min(held, compacted.blocks)
        table.block_table.np[row, keep:held] = 0
        table.num_blocks_per_row[row] = keep
        del self.requests[compacted.request_id].block_ids[0][keep:]


@functools.cache
def headwise_runner(runner_class: type) -> type:
    return type(f"Headwise{runner_class.__name__}", (HeadwiseRunner, runner_class), {})


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Each decoder layer's attention module (whose inputs are the post-layernorm hidden states)."""
    try:
        layers = decoder_layers(model)
    except (AttributeError, ValueError, TypeError):
        layers = None
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise ValueError(
            f"Fast KVzip in vLLM supports decoder-only models with model.layers[i].self_attn (Llama, Qwen2, Qwen3, "
            f"Mistral); {type(model).__name__} has another structure"
        )
    return [layer.self_attn for layer in layers]


def _pool_buffer(caches: list[torch.Tensor], block_size: int) -> tuple[torch.Tensor, int]:
    """vLLM's per-layer KV views ``[B, H, N, 2D]`` as one pool ``[L * B * H, N * 2D]`` of single-head blocks; they
    must be consecutive slices of one allocation (vLLM 0.32's layer-outermost ``LBHNC`` layout)."""
    first = caches[0]
    blocks, heads, tokens, width = first.shape
    layer_bytes = first.numel() * first.element_size()
    for index, cache in enumerate(caches):
        if not cache.is_contiguous() or cache.data_ptr() != first.data_ptr() + index * layer_bytes:
            raise ValueError("Fast KVzip needs vLLM's KV memory laid out layer after layer (LBHNC), one allocation")
    if tokens != block_size:
        raise ValueError(f"the attention splits {block_size}-token blocks into {tokens}: use --block-size {tokens}")
    pool = torch.as_strided(first, (len(caches) * blocks * heads, tokens * width), (tokens * width, 1))
    return pool, tokens


def _attention_path(settings: EngineSettings, buffer: torch.Tensor, block_size: int, head_dim: int, device):
    """vLLM's CPU kernel on CPU unless the torch path is asked for; the package's path (Triton on CUDA) otherwise."""
    if device.type == "cpu" and settings.attention == "auto":
        if block_size % 32:
            raise ValueError(f"vLLM's CPU attention needs blocks of a multiple of 32 tokens, got {block_size}")
        return NativeCPUPath(buffer, block_size, head_dim, cpu_attention_isa(buffer.dtype, block_size, head_dim))
    return TorchPath(buffer, block_size, head_dim)


class FastKVzipCPUWorker(CPUWorker):
    """vLLM's CPU worker with the head-wise attention backend and store."""

    def init_device(self):
        register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND)  # vLLM's CPU platform always picks CPU_ATTN
        super().init_device()
        self.model_runner.__class__ = headwise_runner(type(self.model_runner))


class FastKVzipGPUWorker(Worker):
    """vLLM's GPU worker with the head-wise attention backend (``CUSTOM``, Triton) and store."""

    def init_device(self):
        register_backend(AttentionBackendEnum.CUSTOM, BACKEND)
        super().init_device()
        self.model_runner.__class__ = headwise_runner(type(self.model_runner))
