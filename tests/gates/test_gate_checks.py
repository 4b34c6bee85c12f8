"""Gate files are checked against the model they were made for, and the loader survives any file: random bytes,
truncated archives, wrong dtypes and shapes, JSON of the wrong shape are a ``GateFileError``, never code execution."""

import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastkvzip_press import GateBank, GateFileError, GateMismatchError, ModelLayout, load_gates, save_gates
from fastkvzip_press.gates import read_native, read_released, write_native, write_released

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def bank_for(model, model_id: str, seed: int = 0) -> GateBank:
    bank = GateBank.random(ModelLayout.from_model(model), seed=seed)
    bank.metadata.model_id = model_id
    return bank


def test_gates_of_another_model_are_refused(llama, tmp_path):
    model, _ = llama
    save_gates(bank_for(model, "org/other-model"), tmp_path)
    with pytest.raises(GateMismatchError, match="trained for model 'org/other-model'.*allow_other_model=True"):
        load_gates(tmp_path, model)
    with pytest.raises(GateMismatchError, match="org/other-model"):
        load_gates(bank_for(model, "org/other-model"), model)


def test_the_override_warns_and_is_remembered(llama, tmp_path, caplog):
    model, _ = llama
    save_gates(bank_for(model, "org/other-model"), tmp_path)
    bank = load_gates(tmp_path, model, allow_other_model=True)
    assert "gates trained for 'org/other-model' are used on model" in caplog.text
    assert load_gates(bank, model) is bank  # accepted once, for this model


def test_sibling_checkpoints_warn(llama, caplog):
    model, _ = llama
    name = ModelLayout.from_model(model).model_id
    load_gates(bank_for(model, f"org/{name}-Instruct"), model)
    assert "are used on model" in caplog.text


def test_same_model_under_another_folder_loads(llama):
    model, _ = llama
    name = ModelLayout.from_model(model).model_id
    load_gates(bank_for(model, f"/somewhere/else/{name}"), model)
    load_gates(bank_for(model, ""), model)  # no id recorded: nothing to check


@pytest.fixture(scope="module")
def gate_files(tmp_path_factory, tiny_models):
    model, _ = tiny_models("llama")
    folder = tmp_path_factory.mktemp("gate_files")
    bank = GateBank.random(ModelLayout.from_model(model))
    write_native(bank, folder / "native")
    write_released(bank, folder / "q3_dim16_sink16.pt")
    return folder, bank


def read_any(path: Path) -> GateBank:
    return read_native(path) if path.suffix == ".safetensors" or path.is_dir() else read_released(path)


@FUZZ
@given(data=st.binary(max_size=2048), suffix=st.sampled_from([".pt", ".safetensors"]))
def test_random_bytes(tmp_path, data, suffix):
    path = tmp_path / f"gates{suffix}"
    path.write_bytes(data)
    with pytest.raises(GateFileError):
        read_any(path)


@FUZZ
@given(fraction=st.floats(0, 0.999), which=st.sampled_from(["native/gates.safetensors", "q3_dim16_sink16.pt"]))
def test_truncated_files(gate_files, tmp_path, fraction, which):
    folder, _ = gate_files
    whole = (folder / which).read_bytes()
    path = tmp_path / Path(which).name
    path.write_bytes(whole[: int(fraction * len(whole))])
    if path.suffix == ".safetensors":
        (tmp_path / "gates.json").write_text((folder / "native" / "gates.json").read_text())
    with pytest.raises(GateFileError):
        read_any(path)


@FUZZ
@given(
    key=st.sampled_from(["q_proj.weight", "q_proj.bias", "k_proj.weight", "q_norm.weight", "b", "k_base"]),
    change=st.sampled_from(["int", "bool", "shape", "scalar", "list", "drop"]),
    layer=st.integers(0, 1),
)
def test_wrong_dtypes_and_shapes(gate_files, tmp_path, key, change, layer):
    _, bank = gate_files
    module = [{k: v.detach().clone() for k, v in gate.state_dict().items()} for gate in bank.gates]
    value = module[layer][key]
    if change == "drop":
        del module[layer][key]
    else:
        module[layer][key] = {
            "int": value.to(torch.int32),
            "bool": value > 0,
            "shape": torch.zeros(*[n + 1 for n in value.shape]),
            "scalar": torch.tensor(1.0),
            "list": value.tolist(),
        }[change]
    path = tmp_path / "gates.pt"
    torch.save({"module": module}, path)
    with pytest.raises(GateFileError):
        read_released(path)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 40) | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(meta=JSON | st.fixed_dictionaries({"layer_ids": JSON}, optional={"model_id": JSON, "training": JSON}))
def test_metadata_of_the_wrong_shape(gate_files, tmp_path, meta):
    folder, bank = gate_files
    (tmp_path / "gates.safetensors").write_bytes((folder / "native" / "gates.safetensors").read_bytes())
    (tmp_path / "gates.json").write_text(json.dumps(meta))
    try:
        loaded = read_native(tmp_path)
    except GateFileError:
        return
    # Only metadata that fits the tensors loads, and then the weights are the file's.
    for ours, theirs in zip(loaded.gates, bank.gates):
        assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))


class Payload:
    def __reduce__(self):
        return (Path.touch, (Path(MARKER),))


MARKER = "/tmp/fastkvzip-press-gate-file-executed-code"


def test_a_pickle_with_code_is_refused_without_running_it(tmp_path):
    Path(MARKER).unlink(missing_ok=True)
    path = tmp_path / "gates.pt"
    with zipfile.ZipFile(path, "w") as archive:  # torch.save's layout, with a pickle that would run code
        archive.writestr("gates/data.pkl", pickle.dumps({"module": [Payload()]}, protocol=2))
        archive.writestr("gates/version", "3\n")
    for candidate in (path, tmp_path / "plain.pt"):
        if candidate.name == "plain.pt":
            candidate.write_bytes(pickle.dumps({"module": [Payload()]}))
        with pytest.raises(GateFileError):
            read_released(candidate)
    assert not Path(MARKER).exists()
