"""Where gates come from: a bank, a local file or folder, the gates shipped in this package, or the hub.

Released gates live on the Hugging Face hub in :data:`RELEASED_HUB_REPO` as
``<model basename lower>/q{G}_dim16_sink16.pt``.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn
from transformers import PreTrainedModel

from fastkvzip_press.checks import KnobTypeError, require_bool
from fastkvzip_press.gates.formats import (
    NATIVE_WEIGHTS,
    GateFileError,
    GateFileNotFoundError,
    read_native,
    read_released,
    require_finite,
    write_native,
    write_released,
)
from fastkvzip_press.gates.gate import GateBank
from fastkvzip_press.gates.shipped import shipped_gates_path
from fastkvzip_press.layout import ModelLayout

RELEASED_HUB_REPO = "Jang-Hyun/Fast-KVzip"
GateSource = str | Path | GateBank | None


def released_filename(layout: ModelLayout, rank: int = 16, n_sink: int = 16) -> str:
    """Hub file name of the released gates for a model: ``<basename lower>/q{G}_dim{r}_sink{S}.pt``."""
    base = layout.model_id.rstrip("/").split("/")[-1].lower()
    if not base:
        raise GateFileError("the model has no name_or_path, so its released gate file cannot be named; pass gates=")
    return f"{base}/q{layout.group_size}_dim{rank}_sink{n_sink}.pt"


def load_shipped(model_id: str) -> GateBank | None:
    """The gates shipped in this package for ``model_id``, in fp32, or ``None``."""
    path = shipped_gates_path(model_id)
    return None if path is None else read_native(path).float()


def save_gates(bank: GateBank, directory: str | Path) -> dict[str, Path]:
    """Save ``bank`` into ``directory`` in both formats.

    Returns the written paths: ``{"safetensors": ..., "metadata": ..., "released": q{G}_dim{r}_sink{S}.pt}``.
    """
    if not isinstance(bank, GateBank):
        raise KnobTypeError(f"save_gates saves a GateBank, got {type(bank).__name__}")
    if not isinstance(directory, str | os.PathLike) or not str(directory).strip():
        raise KnobTypeError(f"save_gates needs a folder path as directory, got {directory!r}")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise GateFileError(f"save_gates writes a folder, but {directory} is a file; pick a folder path")
    weights, meta = write_native(bank, directory)
    released = write_released(bank, directory / f"q{bank.group_size}_dim{bank.rank}_sink{bank.n_sink}.pt")
    return {"safetensors": weights, "metadata": meta, "released": released}


def looks_like_path(source: str | Path) -> bool:
    """Whether a gate source names a local path rather than a hub repository id (``owner/name``)."""
    if isinstance(source, Path):
        return True
    text = str(source)
    return (
        text.startswith(("/", ".", "~"))
        or "\\" in text
        or text.count("/") != 1
        or Path(text).suffix in (".pt", ".safetensors", ".json")
    )


def load_gates(
    source: GateSource = None,
    model: PreTrainedModel | None = None,
    *,
    filename: str | None = None,
    allow_other_model: bool = False,
) -> GateBank:
    """Load gates and, when ``model`` is given, check that they fit it.

    Args:
        source: a :class:`GateBank`; a local native folder, ``.safetensors`` or released ``.pt`` file; a hub
            repository id, resolved with ``huggingface_hub``; or ``None``: the gates shipped in this package for
            ``model`` when there are any (see :mod:`fastkvzip_press.gates.shipped`), else :data:`RELEASED_HUB_REPO`.
        model: the model the gates are for. Needed to name the hub file and to match layer ids.
        filename: file inside a hub repository; defaults to ``<model basename lower>/q{G}_dim16_sink16.pt``.
        allow_other_model: use gates recorded for another model of the same shapes (a fine-tune of it) with a
            warning instead of refusing them (see :meth:`GateBank.check_model`).

    Raises:
        GateFileNotFoundError: a local path (absolute, relative with ``./``, or with a gate file suffix) that does
            not exist.
        GateFileError: unreadable, malformed or non-finite gates, or a hub file that cannot be fetched.
        GateMismatchError: the gates do not fit ``model``, or were made for another model.
    """
    require_bool("allow_other_model", allow_other_model)
    if source is not None and not isinstance(source, GateBank | str | os.PathLike):
        raise KnobTypeError(
            f"gates must be None, a path, a hub repository id or a GateBank, got {type(source).__name__}"
        )
    if model is not None and not (isinstance(model, nn.Module) and hasattr(model, "config")):
        raise KnobTypeError(f"model must be a loaded transformers causal LM (or None), got {type(model).__name__}")
    layout = ModelLayout.from_model(model) if model is not None else None
    if isinstance(source, GateBank):
        bank = source
        require_finite(bank, "the gate bank")
    elif source is None and layout is not None and (shipped := load_shipped(layout.model_id)) is not None:
        bank = shipped
    else:
        path = Path(source).expanduser() if source is not None else None
        if path is not None and path.exists():
            bank = _read_local(path, layout)
        elif source is not None and looks_like_path(source):
            raise GateFileNotFoundError(
                f"gate path {str(source)!r} does not exist. Give an existing gate file (.safetensors, .pt) or folder "
                "(from `fastkvzip-press train` or `export-gates`), or a hub repository id such as owner/name."
            )
        else:
            bank = _read_hub(str(source) if source is not None else RELEASED_HUB_REPO, layout, filename)
    if layout is not None:
        bank.check_fits(layout)
        bank.check_model(layout, allow_other_model)
        if not bank.metadata.model_id:
            bank.metadata.model_id = layout.model_id
    return bank


def _read_local(path: Path, layout: ModelLayout | None) -> GateBank:
    if path.is_dir():
        if (path / NATIVE_WEIGHTS).exists():
            return read_native(path)
        released = sorted(path.glob("*.pt"))
        if len(released) == 1:
            return read_released(released[0], layout)
        raise GateFileError(f"{path} holds neither {NATIVE_WEIGHTS} nor exactly one released .pt gate file")
    if path.suffix == ".safetensors":
        return read_native(path)
    return read_released(path, layout)


def _read_hub(repo_id: str, layout: ModelLayout | None, filename: str | None) -> GateBank:
    if filename is None:
        if layout is None:
            raise GateFileError(f"to fetch gates from hub repository {repo_id!r}, pass the model (or filename=)")
        filename = released_filename(layout)
    try:
        from huggingface_hub import hf_hub_download

        local = hf_hub_download(repo_id, filename)
    except Exception as error:  # offline, missing file, bad repo id: all mean "no gates here"
        raise GateFileError(
            f"{repo_id!r} is no local path, and gates {filename!r} could not be fetched from hub repository "
            f"{repo_id!r} ({type(error).__name__}: {error}). Pass an existing gate file or folder, or train gates "
            "for this model with `fastkvzip-press train`."
        ) from error
    return read_released(local, layout)
