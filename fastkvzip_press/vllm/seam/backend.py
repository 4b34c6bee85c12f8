"""The attention backend of engines with Fast KVzip, registered through vLLM's backend registry: every layer writes
its new keys and values to each KV head at that head's own length in the head-wise store and attends over each
head's own pairs (:class:`~fastkvzip_press.vllm.headwise.HeadwiseStore`).

On CPU vLLM always picks ``CPU_ATTN``, so the worker of such an engine registers this backend under that name; on
CUDA it is ``CUSTOM``, which the engine configuration selects. :class:`NativeCPUPath` drives vLLM's own CPU attention
kernel over single-head blocks: every (request, KV head) is one sequence with one KV head and the group's query heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm import _custom_ops as ops
from vllm import envs
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import KVCacheLayout

from fastkvzip_press.paged import StepLayout
from fastkvzip_press.vllm.headwise import HeadwiseStore


@dataclass
class HeadwiseMetadata:
    """What a forward's layers read: the store and the step laid out over it (``None`` in warm-up runs)."""

    store: HeadwiseStore | None
    step: StepLayout | None


class HeadwiseBuilder(AttentionMetadataBuilder[HeadwiseMetadata]):
    """Hands every layer the store's current step; the runner binds the store after allocating the KV memory."""

    store: HeadwiseStore | None = None

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False) -> HeadwiseMetadata:
        store = self.store
        return HeadwiseMetadata(store, None if store is None else store.step)


class HeadwiseImpl(AttentionImpl):
    """Decoder self-attention over the head-wise store."""

    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                 logits_soft_cap=None, attn_type=AttentionType.DECODER, kv_sharing_target_layer_name=None,
                 sinks=None):  # fmt: skip
        if alibi_slopes is not None or sliding_window is not None or logits_soft_cap or sinks is not None:
            raise ValueError("Fast KVzip's head-wise attention supports plain causal attention only")
        if kv_sharing_target_layer_name is not None or attn_type != AttentionType.DECODER:
            raise ValueError("Fast KVzip's head-wise attention supports decoder self-attention only")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads
        self.layer_index: dict[str, int] = {}

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):  # fmt: skip
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by Fast KVzip's attention")
        if attn_metadata is None or attn_metadata.step is None:  # warm-up and profiling runs
            return output
        store, step = attn_metadata.store, attn_metadata.step
        tokens = step.num_tokens
        index = store.layer_index[layer.layer_name]
        store.attend(index, query[:tokens], key[:tokens], value[:tokens], self.scale, output[:tokens])
        return output


class HeadwiseBackend(AttentionBackend):
    """Attention over a head-wise store of single-head blocks (vLLM's KV memory, laid out ``[L, B, H, N, C]``)."""

    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list:
        return [MultipleOf(16)]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (KVCacheLayout.LBHNC,)

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[HeadwiseImpl]:
        return HeadwiseImpl

    @staticmethod
    def get_builder_cls() -> type[HeadwiseBuilder]:
        return HeadwiseBuilder

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


BACKEND = f"{HeadwiseBackend.__module__}.{HeadwiseBackend.__qualname__}"


def cpu_attention_isa(dtype: torch.dtype, block_size: int, head_size: int) -> str:
    """The instruction set vLLM's CPU attention kernel picks for these shapes (its own choice)."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(dtype, block_size, head_size, "auto")


class NativeCPUPath:
    """Single-head blocks in vLLM's CPU layout (its kernel's own in-block packing), written and attended by vLLM's
    CPU attention kernel: sequence ``(r, h)`` of a forward is request ``r``'s KV head ``h`` with its ``G`` query
    heads."""

    name = "vllm-cpu"

    def __init__(self, buffer: torch.Tensor, block_size: int, head_dim: int, isa: str):
        cache = buffer.view(-1, 1, 2 * block_size, head_dim)
        self.key_cache, self.value_cache = cache.chunk(2, dim=2)  # [N, 1, block_size, D] each
        self.isa = isa
        self._order: torch.Tensor | None = None  # the current forward's rows in sequence order
        self._starts: torch.Tensor | None = None  # query starts of its R x H sequences

    def write(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        ops.cpu_attn_reshape_and_cache(
            keys[:, None], values[:, None], self.key_cache, self.value_cache, slots.to(torch.int64), self.isa
        )

    def attend(self, query: torch.Tensor, step: StepLayout, layer: int, scale: float, out: torch.Tensor) -> None:
        n_tokens, n_query_heads, head_dim = query.shape
        sequences, heads = step.lengths_before.shape[1:]
        groups = n_query_heads // heads
        order, starts = self._order, self._starts
        grouped = query.reshape(n_tokens * heads, groups, head_dim)
        queries = grouped if order is None else grouped[order]
        result = torch.empty_like(queries) if order is not None else out.view(n_tokens * heads, groups, head_dim)
        seq_lens = step.seq_lens(layer).reshape(-1)
        metadata = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=sequences * heads, num_heads=groups, num_kv_heads=1, head_dim=head_dim, seq_lens=seq_lens,
            dtype=query.dtype, query_start_loc=starts, causal=True, sliding_window_size=-1, isa=self.isa,
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
        )  # fmt: skip
        ops.cpu_attention_with_kv_cache(
            query=queries.contiguous(), key_cache=self.key_cache, value_cache=self.value_cache, output=result,
            query_start_loc=starts, seq_lens=seq_lens, scale=scale, causal=True, alibi_slopes=None,
            sliding_window=-1, block_table=step.block_tables[layer].reshape(sequences * heads, -1), softcap=0,
            scheduler_metadata=metadata, s_aux=None,
        )  # fmt: skip
        if order is not None:
            out.view(n_tokens * heads, groups, head_dim)[order] = result

    def prepare(self, step: StepLayout) -> None:
        """Order a forward's rows ``(token, head)`` as the kernel's sequences ``(request, head, token)`` (no reorder
        when every request has one token: the order is the same), and their query starts."""
        heads = step.lengths_before.shape[2]
        lens = step.query_lens.long().repeat_interleave(heads)  # [R * H]
        starts = torch.zeros(len(lens) + 1, dtype=torch.int32)
        starts[1:] = lens.cumsum(0)
        self._starts, self._order = starts, None
        if step.max_query_len > 1:
            request_start = step.query_start[:-1].long().repeat_interleave(heads)
            head = torch.arange(heads).repeat(step.num_sequences)
            offset = torch.arange(int(lens.sum())) - starts[:-1].long().repeat_interleave(lens)
            self._order = (request_start.repeat_interleave(lens) + offset) * heads + head.repeat_interleave(lens)
