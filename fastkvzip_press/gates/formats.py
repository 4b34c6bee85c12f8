"""The two gate file formats: reading and writing.

Two formats:

* **released** (upstream Fast KVzip): ``torch.save`` of ``{"module": [state_dict per gated layer], ...}``, with
  optional numpy training curves. Read with ``torch.load(weights_only=True)`` and a numpy allow-list, so loading
  never executes code. Hyperparameters are inferred from tensor shapes; the file name's ``sink(\\d+)`` part, when
  present, is checked against ``k_base``.
* **native**: a folder with ``gates.safetensors`` (keys ``layers.<i>.<param>``) and ``gates.json`` (model id,
  layer ids, shapes, training information). The JSON is also stored in the safetensors header, so the
  ``.safetensors`` file alone is enough.

Where gates come from (a path, the hub, the package) is :mod:`fastkvzip_press.gates.loading`'s job.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fastkvzip_press.atomic import atomic_write
from fastkvzip_press.gates.gate import GateBank, GateMetadata, SinkGate
from fastkvzip_press.layout import ModelLayout

NATIVE_WEIGHTS = "gates.safetensors"
NATIVE_METADATA = "gates.json"
FORMAT_VERSION = 1
GATE_KEYS = ("q_proj.weight", "q_proj.bias", "k_proj.weight", "q_norm.weight", "k_norm.weight", "b", "k_base")
# The bulk of a gate's parameters; a storage dtype applies to these only (sink keys and norm weights stay fp32).
PROJECTION_KEYS = ("q_proj.weight", "q_proj.bias", "k_proj.weight", "b")


class GateFileError(ValueError):
    """A gate file is missing, corrupt or not in a known format."""


class GateFileNotFoundError(GateFileError, FileNotFoundError):
    """A gate path that does not exist."""


# What malformed content raises while a bank is assembled from it (wrong types, shapes or JSON structure).
_MALFORMED = (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError, ZeroDivisionError)


# ----------------------------------------------------------------------------------------------------- building


def bank_from_state_dicts(
    state_dicts: list[dict[str, torch.Tensor]], layer_ids: tuple[int, ...], metadata: GateMetadata, origin: str
) -> GateBank:
    """Build a bank from per-layer state dicts, inferring hidden size, heads, group size, rank and sinks."""
    if not state_dicts:
        raise GateFileError(f"{origin}: the file holds no gate layers")
    try:
        bank = _assemble(state_dicts, layer_ids, metadata, origin)
    except GateFileError:
        raise
    except _MALFORMED as error:
        raise GateFileError(f"{origin}: malformed gate data ({type(error).__name__}: {error})") from error
    require_finite(bank, origin)
    return bank


def require_finite(bank: GateBank, origin: str) -> None:
    """Raise :class:`GateFileError` when a gate weight of ``bank`` (read from ``origin``) is NaN or infinite."""
    bad = bank.non_finite()
    if bad:
        raise GateFileError(
            f"{origin}: gate weights hold NaN or infinite values ({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''}"
            "); the file is corrupt or its training diverged. Retrain or re-export the gates."
        )


def _assemble(
    state_dicts: list[dict[str, torch.Tensor]], layer_ids: tuple[int, ...], metadata: GateMetadata, origin: str
) -> GateBank:
    gates = []
    for index, state in enumerate(state_dicts):
        if not isinstance(state, dict):
            raise GateFileError(f"{origin}: layer entry {index} is a {type(state).__name__}, not a state dict")
        missing = [key for key in GATE_KEYS if key not in state]
        if missing:
            raise GateFileError(f"{origin}: layer entry {index} lacks {missing}; found keys {sorted(map(str, state))}")
        for key in GATE_KEYS:
            value = state[key]
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                kind = f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__
                raise GateFileError(f"{origin}: layer entry {index} {key} is {kind}, not a floating-point tensor")
        q_weight, k_weight, k_base = state["q_proj.weight"], state["k_proj.weight"], state["k_base"]
        rank = state["q_norm.weight"].shape[-1]
        if k_weight.shape[0] % rank or q_weight.shape[0] % k_weight.shape[0] or k_base.ndim != 4:
            raise GateFileError(
                f"{origin}: layer entry {index} has inconsistent shapes q_proj {tuple(q_weight.shape)}, "
                f"k_proj {tuple(k_weight.shape)}, rank {rank}, k_base {tuple(k_base.shape)}"
            )
        heads = k_weight.shape[0] // rank
        group = q_weight.shape[0] // k_weight.shape[0]
        gate = SinkGate(q_weight.shape[1], heads, group, rank, k_base.shape[2], dtype=q_weight.dtype)
        try:
            gate.load_state_dict({key: state[key] for key in GATE_KEYS})
        except RuntimeError as error:
            raise GateFileError(f"{origin}: layer entry {index} does not load: {error}") from error
        gates.append(gate)
    metadata.layer_ids = tuple(layer_ids)
    try:
        return GateBank(gates, metadata)
    except ValueError as error:
        raise GateFileError(f"{origin}: {error}") from error


def _default_layer_ids(count: int, layout: ModelLayout | None) -> tuple[int, ...]:
    # Released files carry no layer ids: they are ordered like the model's gated layers.
    return (
        tuple(layout.gated_layer_ids)
        if layout is not None and len(layout.gated_layer_ids) == count
        else tuple(range(count))
    )


# ----------------------------------------------------------------------------------------------------- released


def _numpy_safe_globals() -> list[Any]:
    """Globals a pickled numpy array needs; allow-listed for ``torch.load(weights_only=True)``."""
    reconstruct = getattr(np, "_core", np.core).multiarray._reconstruct
    dtype_classes = [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
    return [reconstruct, np.ndarray, np.dtype, *dtype_classes]


def read_released(path: str | Path, layout: ModelLayout | None = None) -> GateBank:
    """Read a released-format ``.pt`` gate file (never unpickles code)."""
    path = Path(path)
    origin = str(path)
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise GateFileNotFoundError(f"gate file {origin} does not exist") from error
    except Exception as error:  # pickle and zip errors have many types
        raise GateFileError(
            f"{origin} is not a readable gate file ({type(error).__name__}: {error}). "
            "Released gates are torch.save dicts with a 'module' list; "
            "native gates are a folder with gates.safetensors."
        ) from error
    if not isinstance(payload, dict) or not isinstance(payload.get("module"), list):
        raise GateFileError(f"{origin}: expected a dict with a 'module' list of per-layer state dicts")
    state_dicts = payload["module"]
    if not all(isinstance(state, dict) for state in state_dicts):
        raise GateFileError(f"{origin}: every 'module' entry must be a state dict")
    try:
        training = {str(key): np.asarray(value).tolist() for key, value in payload.items() if key != "module"}
    except _MALFORMED as error:
        raise GateFileError(f"{origin}: unreadable training curves ({error})") from error
    model_id = layout.model_id if layout is not None else ""
    metadata = GateMetadata(model_id=model_id, training={"released_curves": training} if training else {})
    bank = bank_from_state_dicts(state_dicts, _default_layer_ids(len(state_dicts), layout), metadata, origin)
    sink_match = re.search(r"sink(\d+)", path.name)
    if sink_match and int(sink_match.group(1)) != bank.n_sink:
        raise GateFileError(f"{origin}: the name says {sink_match.group(0)} but k_base holds {bank.n_sink} sink keys")
    return bank


def write_released(bank: GateBank, path: str | Path) -> Path:
    """Write ``bank`` in the released format (``{"module": [state_dict per layer]}``), atomically."""
    payload = {
        "module": [{key: value.detach().cpu() for key, value in gate.state_dict().items()} for gate in bank.gates]
    }
    path = Path(path)
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    return path


# ------------------------------------------------------------------------------------------------------- native


def _metadata_dict(bank: GateBank) -> dict[str, Any]:
    return {
        "format": "fastkvzip-press-gates",
        "format_version": FORMAT_VERSION,
        "model_id": bank.metadata.model_id,
        "layer_ids": list(bank.layer_ids),
        "hidden_size": bank.hidden_size,
        "num_kv_heads": bank.num_kv_heads,
        "group_size": bank.group_size,
        "rank": bank.rank,
        "n_sink": bank.n_sink,
        "training": bank.metadata.training,
    }


def write_native(bank: GateBank, directory: str | Path, storage_dtype: torch.dtype | None = None) -> tuple[Path, Path]:
    """Write ``gates.safetensors`` and ``gates.json`` into ``directory``, atomically.

    ``storage_dtype`` (e.g. ``torch.bfloat16``) casts the projections, which hold nearly all parameters, to halve the
    file; the reader builds gates in the stored dtype, so call ``.float()`` on the loaded bank to compute in fp32.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = _metadata_dict(bank)
    tensors = {}
    for i, gate in enumerate(bank.gates):
        for key, value in gate.state_dict().items():
            if storage_dtype is not None and key in PROJECTION_KEYS:
                value = value.to(storage_dtype)
            tensors[f"layers.{i}.{key}"] = value.detach().cpu().contiguous()
    weights, meta_path = directory / NATIVE_WEIGHTS, directory / NATIVE_METADATA
    atomic_write(weights, lambda tmp: save_file(tensors, str(tmp), metadata={"fastkvzip_press": json.dumps(meta)}))
    atomic_write(meta_path, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
    return weights, meta_path


def _parse_metadata(meta: Any) -> tuple[tuple[int, ...], str, dict]:
    """Layer ids, model id and training information of a native metadata dict; ``TypeError`` / ``ValueError``
    when its structure is wrong."""
    if not isinstance(meta, dict):
        raise TypeError(f"expected a JSON object, got {type(meta).__name__}")
    raw_ids = meta.get("layer_ids", [])
    if not isinstance(raw_ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in raw_ids):
        raise TypeError(f"layer_ids must be a list of integers, got {raw_ids!r:.80}")
    if len(set(raw_ids)) != len(raw_ids) or any(i < 0 for i in raw_ids):
        raise ValueError(f"layer_ids must be distinct and >= 0, got {raw_ids}")
    model_id, training = meta.get("model_id", ""), meta.get("training", {})
    if not isinstance(model_id, str) or not isinstance(training, dict):
        raise TypeError("model_id must be a string and training an object")
    return tuple(raw_ids), model_id, training


def read_native(path: str | Path) -> GateBank:
    """Read native gates from a folder or a ``.safetensors`` file (its JSON metadata beside it or in its header)."""
    path = Path(path)
    weights = path / NATIVE_WEIGHTS if path.is_dir() else path
    origin = str(weights)
    if not weights.exists():
        raise GateFileNotFoundError(f"no gate weights at {weights}")
    try:
        # One pass over the file gives both the tensors and the header's metadata.
        with safe_open(str(weights), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise GateFileError(f"{origin} is not a readable safetensors file: {error}") from error
    sidecar = weights.with_name(NATIVE_METADATA) if weights.name == NATIVE_WEIGHTS else weights.with_suffix(".json")
    try:
        if sidecar.exists():
            meta = json.loads(sidecar.read_text())
        elif "fastkvzip_press" in header:
            meta = json.loads(header["fastkvzip_press"])
        else:
            raise GateFileError(f"{origin}: no metadata ({sidecar.name} beside it or in the file header)")
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as error:
        raise GateFileError(f"{origin}: gate metadata is not valid JSON: {error}") from error
    try:
        layer_ids, model_id, training = _parse_metadata(meta)
    except _MALFORMED as error:
        raise GateFileError(f"{origin}: malformed gate metadata ({type(error).__name__}: {error})") from error
    state_dicts: list[dict[str, torch.Tensor]] = [{} for _ in layer_ids]
    for name, tensor in tensors.items():
        match = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
        if not match or int(match.group(1)) >= len(state_dicts):
            raise GateFileError(f"{origin}: unexpected tensor {name!r} for {len(layer_ids)} layers")
        state_dicts[int(match.group(1))][match.group(2)] = tensor
    metadata = GateMetadata(model_id=model_id, training=training)
    bank = bank_from_state_dicts(state_dicts, layer_ids, metadata, origin)
    for key in ("hidden_size", "num_kv_heads", "group_size", "rank", "n_sink"):
        if key in meta and meta[key] != getattr(bank, key):
            raise GateFileError(f"{origin}: metadata says {key}={meta[key]} but the tensors give {getattr(bank, key)}")
    return bank
