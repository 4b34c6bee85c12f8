"""Devices and dtypes a press meets on accelerators, run on CPU through stand-ins.

``device_map="auto"`` spreads a model's layers over several GPUs, so each gated layer's scores come from its own device;
a CPU has one device, so a tensor subclass stands for a tensor on a second GPU: it reports another device, refuses to
meet other devices' tensors in an operation (as CUDA refuses two GPUs), and comes back only through ``.to``.
"""

import pytest
import torch
from helpers import CONTEXT, greedy_decode
from transformers import DynamicCache

from fastkvzip_press import FastKVzipDecodingPress, FastKVzipPress, GateBank, ModelLayout, RaggedLayer
from fastkvzip_press.gates import read_native, write_native
from fastkvzip_press.presses.devices import stack_on_one_device

WORDS = CONTEXT.split()


class OnSecondDevice(torch.Tensor):
    """A CPU tensor standing for one on a second accelerator (it reports ``meta``); ``moves`` records every ``.to``."""

    moves: list = []

    @staticmethod
    def __new__(cls, data: torch.Tensor):
        out = data.as_subclass(cls)
        out.plain = data
        return out

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func == torch.Tensor.device.__get__:
            return torch.device("meta")
        if func == torch.Tensor.to:
            target = torch.device(kwargs.get("device", args[1] if len(args) > 1 else None))
            cls.moves.append(target)
            return args[0] if target.type == "meta" else args[0].plain.to(target)
        if func in (torch.Tensor.shape.__get__, torch.Tensor.dtype.__get__, torch.Tensor.__repr__):
            return super().__torch_function__(func, types, args, kwargs)
        raise RuntimeError(f"{func.__name__}: Expected all tensors to be on the same device, but found two devices")


@pytest.fixture
def second_device_from(monkeypatch):
    """``split(layer_id)``: from then on, gated layers from ``layer_id`` on score on the second device."""
    OnSecondDevice.moves = []
    score = GateBank.score

    def split(first_on_second: int):
        def scoring(bank, layer_id, hidden_states):
            scores = score(bank, layer_id, hidden_states)
            return OnSecondDevice(scores) if layer_id >= first_on_second else scores

        monkeypatch.setattr(GateBank, "score", scoring)

    return split


def prefill(model, tokenizer, press, prompts):
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model.model(**batch, past_key_values=cache)
    return cache


@pytest.mark.parametrize("compaction", ["ragged", "masked"])
@pytest.mark.parametrize("n_prompts", [1, 2])
def test_scores_of_layers_on_two_devices_are_decided_together(
    llama, random_gates, second_device_from, compaction, n_prompts
):
    """Layers 2 and 3 on a second device: their scores move once each to the first layer's device, and the decision
    is the one a single device makes."""
    model, tokenizer = llama
    gates = random_gates(model)
    prompts = [CONTEXT, " ".join(WORDS[30:])][:n_prompts]
    press = FastKVzipPress(0.5, gates=gates, window_size=4, compaction=compaction)
    prefill(model, tokenizer, press, prompts)
    expected = press.last_stats.kept_per_head
    second_device_from(2)
    cache = prefill(model, tokenizer, press, prompts)
    assert OnSecondDevice.moves == [torch.device("cpu")] * 2
    assert press.last_stats.kept_per_head.keys() == expected.keys()
    for layer_id, kept in expected.items():
        assert torch.equal(press.last_stats.kept_per_head[layer_id], kept)
    if compaction == "ragged":
        assert all(isinstance(cache.layers[layer_id], RaggedLayer) for layer_id in expected)


def test_stacking_brings_every_layer_to_the_first_layers_device():
    """Stand-in with two real devices: the first layer on ``meta``, the second on the CPU."""
    first, second = torch.zeros(2, 3, 5, device="meta"), torch.rand(2, 3, 5)
    with pytest.raises(RuntimeError):
        torch.stack([first, second])
    stacked = stack_on_one_device([first, second])
    assert stacked.device.type == "meta" and stacked.shape == (2, 2, 3, 5)
    on_cpu = [torch.rand(2, 3, 5) for _ in range(3)]
    assert torch.equal(stack_on_one_device(on_cpu), torch.stack(on_cpu))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_bank_in_memory_serves_an_fp32_model(llama, random_gates, tmp_path, dtype):
    """A bank cast whole to bf16 / fp16 in memory works as its gate file does: the same evictions, on an fp32
    model, with norms and sink keys bound in fp32 and the caller's bank left as it was."""
    model, tokenizer = llama
    cast = random_gates(model).to(dtype)
    write_native(cast, tmp_path)
    from_file = read_native(tmp_path)
    kept = {}
    for name, gates in (("memory", cast), ("file", from_file)):
        press = FastKVzipPress(0.5, gates=gates, window_size=4)
        prefill(model, tokenizer, press, [CONTEXT])
        kept[name] = press.last_stats.kept_per_head
        bound = press.gate_bank
        assert bound.gate(0).k_base.dtype == torch.float32 and bound.gate(0).q_proj.weight.dtype == dtype
    for layer_id, counts in kept["file"].items():
        assert torch.equal(kept["memory"][layer_id], counts)
    assert cast.gate(0).k_base.dtype == dtype
    decoding = FastKVzipDecodingPress(gates=cast, compression_interval=8, target_size=24, window_size=4)
    greedy_decode(model, tokenizer, decoding, 12, prompt=" ".join(WORDS[:60]))
    assert decoding.last_stats.evicted > 0


def test_a_half_precision_bank_for_another_model_is_still_refused(llama):
    """The cast copy is bound only after the fit checks: a bank for another model is still refused."""
    model, _ = llama
    layout = ModelLayout.from_model(model)
    other = ModelLayout("other", layout.num_layers, layout.hidden_size, 4, 1, 16, layout.gated_layer_ids)
    press = FastKVzipPress(0.5, gates=GateBank.random(other).to(torch.bfloat16))
    with pytest.raises(ValueError, match="KV heads"):
        with press(model):
            pass
