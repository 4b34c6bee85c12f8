"""kvpress's presses as the comparisons build them: its FastKVzipPress given our gates, and KVzip reading a local
tokenizer (kvpress loads it from ``name_or_path``, a hub id for the default model); our threshold press as kvpress's
harness records it."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

from kvpress import FastKVzipPress as KvpressFastKVzipPress
from kvpress import KVzipPress
from kvpress.presses.fastkvzip_press import FastKVzipGate
from transformers import PreTrainedModel

from fastkvzip_press.gates import GateBank
from fastkvzip_press.layout import ModelLayout
from fastkvzip_press.presses import FastKVzipPress
from fastkvzip_press.presses.cache_position import pass_cache_position


def kvpress_fastkvzip_with_gates(bank: GateBank, model: PreTrainedModel, compression_ratio: float):
    """kvpress's ``FastKVzipPress`` with ``bank``'s gates instead of the hub download it would do.

    kvpress indexes its gate list by layer id; layers without a gate in ``bank`` (Gemma3 sliding layers, which
    kvpress skips) get ``None``.
    """
    layout = ModelLayout.from_model(model)
    param = next(model.parameters())
    gates: list = [None] * layout.num_layers
    for layer_id in bank.layer_ids:
        ours = bank.gate(layer_id)
        gate = FastKVzipGate(
            layer_id, ours.hidden_size, ours.num_kv_heads, ours.group_size, param.dtype, ours.rank, ours.n_sink
        )
        gate.load_state_dict({key: value.to(param.dtype) for key, value in ours.state_dict().items()}, strict=True)
        # kvpress keeps k_base and the norms in fp32 as created; the projections follow the model dtype.
        gate.k_base.data = ours.k_base.detach().float().clone()
        gates[layer_id] = gate.to(param.device)
    pass_cache_position(model)  # kvpress's hooks read cache_position, which transformers >= 5.3 no longer passes
    press = KvpressFastKVzipPress(compression_ratio=compression_ratio)
    press.gates = gates
    return press


@dataclass
class LocalTokenizerKVzipPress(KVzipPress):
    """kvpress's ``KVzipPress`` reading the tokenizer from a local folder instead of ``name_or_path``."""

    # Where the tokenizer sits on this machine says nothing about the press: kept out of its repr (the run's identity).
    tokenizer_path: str | None = field(default=None, repr=False)

    @contextmanager
    def __call__(self, model: PreTrainedModel):
        name = model.config.name_or_path
        if self.tokenizer_path:
            model.config.name_or_path = self.tokenizer_path
        try:
            with super().__call__(model):
                model.config.name_or_path = name
                yield
        finally:
            model.config.name_or_path = name


@dataclass
class AchievedRatioPress(FastKVzipPress):
    """FastKVzipPress(threshold=...) for kvpress's harness, which records ``press.compression_ratio`` after each
    context as the ratio reached (kvpress's own threshold presses report it that way); elsewhere the fields stay as
    set and the achieved ratio is ``last_stats.compression_ratio``."""

    def _record_stats(self, *args, **kwargs) -> None:
        super()._record_stats(*args, **kwargs)
        if self.threshold is not None:
            self.compression_ratio = self.last_stats.compression_ratio
