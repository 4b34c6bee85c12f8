"""How a bank scores a layer: in bounded token chunks, beside the layer's hidden states, in a loaded file's dtypes."""

import pytest
import torch
import torch.nn.functional as F

from fastkvzip_press import GateBank, ModelLayout, SinkGate
from fastkvzip_press.gates import gate as gate_module
from fastkvzip_press.gates import read_native, write_native

LAYOUT = ModelLayout("m", 2, 64, 8, 2, 16, (0, 1))


def rows_of_fp32_linear_inputs(monkeypatch) -> list[int]:
    """Record, for every ``F.linear`` call from now on, how many rows its input has when that input is fp32."""
    rows: list[int] = []
    linear = F.linear

    def recording(x, weight, bias=None):
        if x.dtype == torch.float32:
            rows.append(x.shape[:-1].numel())
        return linear(x, weight, bias)

    monkeypatch.setattr(F, "linear", recording)
    return rows


@pytest.mark.parametrize("bsz", [1, 3])
def test_a_long_prefill_is_upcast_in_bounded_chunks(monkeypatch, bsz):
    """bf16 hidden states meet fp32 gates: the fp32 copy of the hidden states (16 KB a token at hidden size 4096)
    never holds more than SCORE_CHUNK_TOKENS rows, however many tokens are scored."""
    bank = GateBank.random(LAYOUT, rank=4, n_sink=2)
    x = torch.randn(bsz, gate_module.SCORE_CHUNK_TOKENS + 5, LAYOUT.hidden_size).bfloat16()
    whole = bank.gate(0)(x)
    rows = rows_of_fp32_linear_inputs(monkeypatch)
    scores = bank.score(0, x)
    assert rows and max(rows) <= gate_module.SCORE_CHUNK_TOKENS
    assert sum(rows) == x.shape[0] * x.shape[1]
    # Each token is scored on its own; a matmul may round a row differently with the number of rows in the call
    # (x86 CPU kernels do below about 12 rows), so chunks agree with one call to fp32 rounding, not bit for bit.
    torch.testing.assert_close(scores, whole, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("gate_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bsz", [1, 3])
@pytest.mark.parametrize("chunk_tokens", [64, 150, 300])
def test_chunked_scores_equal_one_call(monkeypatch, gate_dtype, bsz, chunk_tokens):
    """The gate scores every token on its own, so chunks give the scores of one call: to fp32 rounding, since how a
    matmul rounds a row may depend on how many rows the call holds and on the CPU (equal-size chunks keep every call
    above the few rows where x86 kernels differ, so here they agree bit for bit)."""
    bank = GateBank.random(LAYOUT, dtype=gate_dtype, seed=3)
    x = (torch.randn(bsz, 301, LAYOUT.hidden_size) * 3).bfloat16()
    whole = bank.gate(1)(x)
    monkeypatch.setattr(gate_module, "SCORE_CHUNK_TOKENS", chunk_tokens)
    rows = rows_of_fp32_linear_inputs(monkeypatch)
    scores = bank.score(1, x)
    assert scores.shape == whole.shape and scores.dtype == torch.float32
    torch.testing.assert_close(scores, whole, rtol=1e-6, atol=1e-7)
    if gate_dtype == torch.float32:
        assert len(rows) > 1 and max(rows) <= chunk_tokens  # it did score in chunks


def test_scoring_on_another_device_moves_that_layers_gate_only_and_once(monkeypatch):
    """A model spread over devices: each gate goes to its layer's device once and stays; the other gates stay where
    they are ("meta" stands for a second accelerator: a move there keeps no values, so a whole-bank move would lose
    the other layer's gate)."""
    bank = GateBank.random(LAYOUT, seed=1)
    x = torch.randn(2, 7, LAYOUT.hidden_size)
    first_on_cpu = bank.score(0, x)
    moves = []

    def recording(cls):
        to = cls.to

        def wrapped(self, *args, **kwargs):
            moves.append((cls.__name__, *args))
            return to(self, *args, **kwargs)

        return wrapped

    monkeypatch.setattr(GateBank, "to", recording(GateBank))
    monkeypatch.setattr(SinkGate, "to", recording(SinkGate))
    elsewhere = x.to("meta")
    for _ in range(3):
        on_meta = bank.score(1, elsewhere)
        assert on_meta.device.type == "meta" and on_meta.shape == (2, LAYOUT.num_kv_heads, 7)
        assert torch.equal(bank.score(0, x), first_on_cpu)
    assert moves == [("SinkGate", torch.device("meta"))]
    assert {p.device.type for p in bank.gate(0).parameters()} == {"cpu"}
    assert {p.device.type for p in bank.gate(1).parameters()} == {"meta"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_bank_cast_whole_is_used_as_its_file_loads(tmp_path, dtype):
    """``bank.to(bf16)`` also casts the norms and sink keys; ``as_loaded`` gives the bank a file of it loads as
    (fp32 norms and sink keys), which scores fp32 hidden states, and leaves the caller's bank as it was."""
    cast = GateBank.random(LAYOUT, seed=2).to(dtype)
    write_native(cast, tmp_path)
    from_file = read_native(tmp_path)
    loaded = cast.as_loaded()
    assert loaded is not cast and loaded.metadata is cast.metadata and loaded.layer_ids == cast.layer_ids
    for ours, theirs, before in zip(loaded.gates, from_file.gates, cast.gates):
        for (name, value), (_, expected) in zip(ours.state_dict().items(), theirs.state_dict().items()):
            assert value.dtype == expected.dtype and torch.equal(value, expected), name
        assert before.k_base.dtype == dtype  # not cast in place
    assert loaded.gate(0).k_base.dtype == torch.float32 and loaded.gate(0).q_proj.weight.dtype == dtype
    x = torch.randn(1, 9, LAYOUT.hidden_size)
    assert torch.equal(loaded.score(0, x), from_file.score(0, x))


def test_an_fp32_bank_is_used_as_it_is():
    bank = GateBank.random(LAYOUT)
    assert bank.as_loaded() is bank
    half = GateBank.random(LAYOUT, dtype=torch.bfloat16)  # projections in bf16, norms and sinks in fp32 already
    assert half.as_loaded() is half


def test_an_fp64_bank_scores_in_fp32():
    """The gate's queries and keys are fp32 whatever the projections' dtype, so fp64 projections meet the fp32
    sink keys."""
    bank = GateBank.random(LAYOUT, seed=4)
    double = GateBank.random(LAYOUT, seed=4).double().as_loaded()
    x = torch.randn(1, 5, LAYOUT.hidden_size)
    scores = double.score(0, x)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, bank.score(0, x), atol=1e-6, rtol=1e-5)
