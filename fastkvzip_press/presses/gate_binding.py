"""Load a press's gates once per model and keep them bound to it."""

from __future__ import annotations

import os
from dataclasses import dataclass

from transformers import PreTrainedModel

from fastkvzip_press.checks import KnobTypeError
from fastkvzip_press.gates import GateBank, GateSource, load_gates


def check_gate_source(gates: object) -> GateSource:
    """``gates`` when it is a press's gate source (``None``, a path, a hub id or a :class:`GateBank`)."""
    if gates is None or isinstance(gates, GateBank | os.PathLike):
        return gates
    if not isinstance(gates, str):
        raise KnobTypeError(
            f"gates must be None (shipped or released gates), a gate file or folder, a hub repository id or a "
            f"GateBank, got {type(gates).__name__}"
        )
    if not gates.strip():
        raise ValueError("gates is an empty string; pass None for the shipped gates, or a gate path")
    return gates


@dataclass
class GateBinding:
    """The gate bank a press uses, loaded from ``source`` for the model last seen.

    ``post_init_from_model`` runs every time a press is entered, so loading is cached by (source, model). A bank
    given in memory is bound in the dtypes a gate file of it would load with (:meth:`GateBank.as_loaded`: a bank cast
    whole to bf16 keeps fp32 norms and sink keys), whatever the model's dtype.
    """

    bank: GateBank | None = None
    _key: tuple | None = None

    def bind(self, source: GateSource, model: PreTrainedModel) -> GateBank:
        key = (id(source) if isinstance(source, GateBank) else str(source), id(model))
        if self.bank is None or key != self._key:
            self.bank = load_gates(source, model).as_loaded()
            self._key = key
        return self.bank

    def require(self, press_name: str, source: GateSource = None) -> GateBank:
        """The bound bank. Wrappers that do not forward ``post_init_from_model`` (kvpress's
        ``PerLayerCompressionPress``) leave it unbound: then an explicit ``source`` is loaded without a model."""
        if self.bank is None and source is not None:
            self.bank = load_gates(source).as_loaded()
            self._key = None
        if self.bank is None:
            raise RuntimeError(
                f"{press_name} has no gates bound: enter it with `with press(model):` or pass it to the pipeline "
                "(kvpress calls post_init_from_model then)."
            )
        return self.bank
