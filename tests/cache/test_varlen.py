"""The varlen path (CUDA) driven on CPU through a stand-in of torch's varlen_attn, and when it is chosen."""

import inspect
import logging
import math

import pytest
import torch
from stand_ins import cpu_varlen_attn, torch_2_10_varlen_attn, torch_2_11_varlen_attn, varlen_on_cpu

from fastkvzip_press.cache import RaggedLayer, attention_path_counts, ragged_attention, ragged_attention_path, varlen

HEADS, GROUP, DIM = 3, 3, 64


def test_a_stand_in_has_the_installed_signature():
    """torch 2.13's signature or torch 2.11's: the suite drives the varlen path through both."""
    installed = varlen.installed_varlen_attn()
    if installed is None:
        pytest.skip("this torch has no varlen_attn")

    def shape(function):  # names, kinds and defaults (annotations are strings on one side)
        return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]

    stand_in = cpu_varlen_attn if varlen.takes_used_lengths(installed) else torch_2_11_varlen_attn
    assert shape(stand_in) == shape(installed)
    assert varlen.missing_varlen_parameters(installed) == ()


def ragged_batch(dtype: torch.dtype, bsz: int = 3, tokens: int = 40, n_new: int = 4, seed: int = 0) -> RaggedLayer:
    """A batch layer with segments of uneven lengths, spare rows after each, and ``n_new`` appended tokens."""
    generator = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(2, bsz, HEADS, tokens, DIM, generator=generator).to(dtype).unbind(0)
    keep = torch.rand(bsz, HEADS, tokens, generator=generator) < 0.5
    keep[..., -1] = True
    layer = RaggedLayer.from_dense(keys, values, keep, spare_tokens=7)
    layer.update(*torch.randn(2, bsz, HEADS, n_new, DIM, generator=generator).to(dtype).unbind(0))
    return layer


@pytest.mark.parametrize("function", [cpu_varlen_attn, torch_2_11_varlen_attn], ids=["torch-2.13", "torch-2.11"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_new", [1, 4, 7])  # 7: the new rows fill every segment's spare rows (no gaps)
def test_varlen_path_equals_per_segment_attention(monkeypatch, dtype, n_new, function):
    layer = ragged_batch(dtype, n_new=n_new)
    query = torch.randn(3, HEADS * GROUP, n_new, DIM).to(dtype)
    scaling = 1 / math.sqrt(DIM)
    monkeypatch.setenv(varlen.VARLEN_ENV, "0")
    per_segment = ragged_attention(query, layer, scaling)
    monkeypatch.delenv(varlen.VARLEN_ENV)
    before = attention_path_counts().get(varlen.VARLEN, 0)
    with varlen_on_cpu(monkeypatch, function):
        assert ragged_attention_path(query.device, dtype, DIM).name == varlen.VARLEN
        through_varlen = ragged_attention(query, layer, scaling)
    assert attention_path_counts()[varlen.VARLEN] == before + 1
    # Both compute in fp32 and round once: at most one ulp of the half type apart.
    torch.testing.assert_close(through_varlen, per_segment, atol=1e-2, rtol=1e-2)


def test_varlen_needs_no_host_read_of_device_data(monkeypatch):
    layer = ragged_batch(torch.bfloat16, n_new=1)
    query = torch.randn(3, HEADS * GROUP, 1, DIM).to(torch.bfloat16)
    seen = []

    def recording(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, **kwargs):
        seen.append((cu_seq_k.device, kwargs["seqused_k"].dtype, max_k))
        return cpu_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, **kwargs)

    with varlen_on_cpu(monkeypatch, recording), monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "new_tensor", lambda *a, **k: pytest.fail("host-to-device copy per call"))
        ragged_attention(query, layer, 0.1)
    assert seen == [(query.device, torch.int32, max(layer.head_lengths))]


def test_torch_2_11_gets_the_spare_rows_as_sequences_of_their_own(monkeypatch):
    """Without ``seqused_k``: segments alternate with the spare rows after them, each with the segment's queries."""
    layer = ragged_batch(torch.bfloat16, n_new=2)
    query = torch.randn(3, HEADS * GROUP, 2, DIM).to(torch.bfloat16)
    seen = []

    def recording(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, **kwargs):
        seen.append((cu_seq_q.tolist(), cu_seq_k.tolist(), max_k, sorted(kwargs)))
        return torch_2_11_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, **kwargs)

    recording.__signature__ = inspect.signature(torch_2_11_varlen_attn)
    with varlen_on_cpu(monkeypatch, recording), monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "new_tensor", lambda *a, **k: pytest.fail("host-to-device copy per call"))
        ragged_attention(query, layer, 0.1)
    starts, lengths = layer.starts.tolist(), layer.head_lengths
    bounds = [row for start, length in zip(starts, lengths) for row in (start, start + length)]
    n_sequences = 2 * len(starts)
    assert seen == [
        (
            [2 * i for i in range(n_sequences + 1)],
            [*bounds, layer.key_buffer.shape[0]],
            max(layer.head_capacities),
            ["scale", "window_size"],
        )
    ]
    assert all(capacity > length for capacity, length in zip(layer.head_capacities, lengths))  # gaps not empty


def test_a_varlen_attn_without_the_needed_arguments_falls_back(monkeypatch, caplog):
    layer = ragged_batch(torch.bfloat16)
    query = torch.randn(3, HEADS * GROUP, 4, DIM).to(torch.bfloat16)
    with varlen_on_cpu(monkeypatch, torch_2_10_varlen_attn), caplog.at_level(logging.INFO):
        path = ragged_attention_path(query.device, query.dtype, DIM)
        out = ragged_attention(query, layer, 0.1)  # the stand-in fails the test if it is called
    assert path.name == varlen.PER_SEGMENT
    assert "lacks scale, window_size" in path.reason
    assert out.shape == (3, 4, HEADS * GROUP, DIM)
    assert any("lacks scale" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize(
    ("dtype", "head_dim", "reason"),
    [
        (torch.float32, 64, "float32 (varlen needs fp16/bf16)"),
        (torch.bfloat16, 320, "head_dim 320"),
        (torch.float16, 72 + 4, "head_dim 76"),
    ],
)
def test_dtypes_and_head_sizes_the_kernels_lack_fall_back(monkeypatch, dtype, head_dim, reason):
    with varlen_on_cpu(monkeypatch):
        path = ragged_attention_path(torch.device("cpu"), dtype, head_dim)
        assert ragged_attention_path(torch.device("cpu"), torch.bfloat16, 256).name == varlen.VARLEN
    assert path.name == varlen.PER_SEGMENT
    assert path.reason.startswith(reason)


def test_the_environment_turns_varlen_off(monkeypatch):
    monkeypatch.setenv(varlen.VARLEN_ENV, "0")
    with varlen_on_cpu(monkeypatch):
        path = ragged_attention_path(torch.device("cpu"), torch.bfloat16, DIM)
    assert (path.name, path.reason) == (varlen.PER_SEGMENT, f"{varlen.VARLEN_ENV}=0")


@pytest.mark.parametrize(
    ("capability", "hip", "reason"),
    [
        ((9, 0), None, None),
        ((8, 0), None, None),
        ((7, 5), None, "compute capability 7.5 < 8.0"),
        ((9, 4), "6.2", "a ROCm device"),
    ],
)
def test_cuda_devices_are_checked_for_capability_and_vendor(monkeypatch, capability, hip, reason):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: asked.append(device) or capability)
    monkeypatch.setattr(torch.version, "hip", hip)
    varlen.device_supports_varlen.cache_clear()
    try:
        assert varlen.device_supports_varlen(torch.device("cuda", 1)) == reason
        varlen.device_supports_varlen(torch.device("cuda", 1))
    finally:
        varlen.device_supports_varlen.cache_clear()
    assert asked == ([] if hip else [torch.device("cuda", 1)])  # once per device, on the tensor's own device
    assert varlen.device_supports_varlen(torch.device("cpu")) == "cpu tensors"


def test_the_path_names_itself():
    assert str(varlen.AttentionPath(varlen.VARLEN, "")) == "varlen"
    assert str(varlen.AttentionPath(varlen.PER_SEGMENT, "cpu tensors")) == "per-segment (cpu tensors)"


def test_the_prefill_press_reports_the_path_its_ragged_layers_get(llama, random_gates, monkeypatch):
    from helpers import greedy_after_prefill

    from fastkvzip_press import FastKVzipPress

    model, tokenizer = llama
    stats = {}
    for compaction in ("ragged", "masked"):
        press = FastKVzipPress(0.5, gates=random_gates(model), window_size=4, compaction=compaction)
        greedy_after_prefill(model, tokenizer, press, steps=1)
        stats[compaction] = press.last_stats.attention_path
    assert stats == {"ragged": "per-segment (cpu tensors)", "masked": None}


def test_a_torch_without_varlen_falls_back(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.nn.attention.varlen", None)  # the import fails, as on torch < 2.10
    assert varlen.installed_varlen_attn() is None
    monkeypatch.setattr(varlen, "device_supports_varlen", lambda device: None)
    path = ragged_attention_path(torch.device("cpu"), torch.bfloat16, DIM)
    assert path.name == varlen.PER_SEGMENT and "has no torch.nn.attention.varlen" in path.reason


def test_a_function_without_a_readable_signature_counts_as_lacking_everything():
    assert varlen.missing_varlen_parameters(object()) == varlen.VARLEN_PARAMETERS
    assert varlen.missing_varlen_parameters(lambda *args, **kwargs: None) == ()


def test_a_varlen_attn_with_enable_gqa_but_no_used_lengths_is_told_to_group(monkeypatch):
    layer = ragged_batch(torch.bfloat16, n_new=1)
    query = torch.randn(3, HEADS * GROUP, 1, DIM).to(torch.bfloat16)
    seen = []

    def grouping(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                 enable_gqa=False):  # fmt: skip
        seen.append(enable_gqa)
        return torch_2_11_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale,
                                      window_size=window_size)  # fmt: skip

    with varlen_on_cpu(monkeypatch, grouping):
        ragged_attention(query, layer, 0.1)
    assert seen == [True]
