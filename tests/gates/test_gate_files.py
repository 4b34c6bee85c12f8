import json
import pickle

import numpy as np
import pytest
import torch

from fastkvzip_press import GateBank, GateFileError, GateMismatchError, ModelLayout, load_gates, save_gates
from fastkvzip_press.gates import read_native, read_released
from fastkvzip_press.gates.loading import released_filename


def assert_same_bank(a: GateBank, b: GateBank):
    assert a.layer_ids == b.layer_ids
    for gate_a, gate_b in zip(a.gates, b.gates):
        for (name, pa), (_, pb) in zip(gate_a.state_dict().items(), gate_b.state_dict().items()):
            assert pa.dtype == pb.dtype, name
            torch.testing.assert_close(pa, pb, rtol=0, atol=0)


@pytest.fixture
def gemma(tiny_models):
    return tiny_models("gemma3")[0]


def test_save_writes_both_formats_and_round_trips(tmp_path, gemma):
    bank = GateBank.random(ModelLayout.from_model(gemma), seed=3)
    bank.metadata.training = {"steps": 10}
    paths = save_gates(bank, tmp_path / "out")
    assert paths["released"].name == "q2_dim16_sink16.pt"
    meta = json.loads(paths["metadata"].read_text())
    assert meta["layer_ids"] == [2, 5] and meta["group_size"] == 2 and meta["training"] == {"steps": 10}

    native = load_gates(tmp_path / "out", gemma)  # folder -> native format
    assert_same_bank(bank, native)
    assert native.metadata.training == {"steps": 10}
    assert_same_bank(bank, load_gates(paths["safetensors"], gemma))
    released = load_gates(paths["released"], gemma)  # layer ids come from the model's gated layers
    assert_same_bank(bank, released)


def test_native_safetensors_alone_carries_metadata(tmp_path, llama):
    bank = GateBank.random(ModelLayout.from_model(llama[0]))
    paths = save_gates(bank, tmp_path)
    paths["metadata"].unlink()
    assert_same_bank(bank, read_native(paths["safetensors"]))


def test_released_file_with_numpy_curves_and_bf16(tmp_path, llama):
    model = llama[0]
    bank = GateBank.random(ModelLayout.from_model(model))
    states = []
    for gate in bank.gates:
        state = gate.state_dict()
        for key in ("q_proj.weight", "q_proj.bias", "k_proj.weight", "b"):
            state[key] = state[key].to(torch.bfloat16)
        states.append(state)
    curves = np.random.rand(100, 4).astype(np.float32)
    path = tmp_path / "q2_dim16_sink16.pt"
    torch.save({"module": states, "loss": curves, "acc": curves.astype(np.float64)}, path)
    loaded = load_gates(path, model)
    assert loaded.gates[0].q_proj.weight.dtype == torch.bfloat16
    assert loaded.gates[0].k_base.dtype == torch.float32
    assert np.allclose(loaded.metadata.training["released_curves"]["loss"], curves)


class Evil:
    def __reduce__(self):
        return (exec, ("raise SystemExit('code ran')",))


def test_released_loader_never_runs_code(tmp_path):
    path = tmp_path / "evil_sink16.pt"
    torch.save({"module": [], "payload": Evil()}, path)
    with pytest.raises(GateFileError, match="not a readable gate file"):
        read_released(path)


@pytest.mark.parametrize(
    "content",
    [b"", b"not a torch file at all", pickle.dumps({"module": []})],
    ids=["empty", "garbage", "plain-pickle"],
)
def test_corrupt_released_files(tmp_path, content):
    path = tmp_path / "gates.pt"
    path.write_bytes(content)
    with pytest.raises(GateFileError):
        load_gates(path)


def test_corrupt_and_truncated_native_files(tmp_path, llama):
    paths = save_gates(GateBank.random(ModelLayout.from_model(llama[0])), tmp_path)
    data = paths["safetensors"].read_bytes()
    paths["safetensors"].write_bytes(data[: len(data) // 2])
    with pytest.raises(GateFileError, match="safetensors"):
        load_gates(tmp_path)
    save_gates(GateBank.random(ModelLayout.from_model(llama[0])), tmp_path)
    paths["metadata"].write_text("{not json")
    with pytest.raises(GateFileError, match="JSON"):
        load_gates(tmp_path)


def test_malformed_state_dicts(tmp_path):
    path = tmp_path / "g.pt"
    torch.save({"module": [{"q_proj.weight": torch.zeros(4, 4)}]}, path)
    with pytest.raises(GateFileError, match="lacks"):
        load_gates(path)
    torch.save({"weights": []}, path)
    with pytest.raises(GateFileError, match="'module' list"):
        load_gates(path)


def test_sink_count_in_name_must_match(tmp_path, llama):
    bank = GateBank.random(ModelLayout.from_model(llama[0]), n_sink=8)
    path = save_gates(bank, tmp_path)["released"]
    wrong = path.with_name("q2_dim16_sink16.pt")
    path.rename(wrong)
    with pytest.raises(GateFileError, match="sink16"):
        load_gates(wrong)


def test_mismatched_model_names_expected_and_found(tmp_path, tiny_models):
    llama_model = tiny_models("llama")[0]
    gemma_model = tiny_models("gemma3")[0]
    save_gates(GateBank.random(ModelLayout.from_model(gemma_model)), tmp_path)
    with pytest.raises(GateMismatchError, match=r"gated layers: model expects 4, gates have 2"):
        load_gates(tmp_path, llama_model)


def test_hub_resolution_through_local_cache(tmp_path, monkeypatch, llama):
    """A fake hub cache: `HF_HUB_OFFLINE=1` resolves released gates locally, by the upstream naming rule."""
    model = llama[0]
    layout = ModelLayout.from_model(model)
    filename = released_filename(layout)
    assert filename == "tiny-random-llama/q2_dim16_sink16.pt"
    repo = tmp_path / "hub" / "models--Jang-Hyun--Fast-KVzip"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    target = repo / "snapshots" / commit / filename
    target.parent.mkdir(parents=True)
    bank = GateBank.random(layout, seed=5)
    torch.save({"module": [g.state_dict() for g in bank.gates]}, target)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert_same_bank(bank, load_gates(None, model))
    with pytest.raises(GateFileError, match="train gates"):
        load_gates("someone/no-such-repo", model)


def test_hub_needs_model_to_name_the_file():
    with pytest.raises(GateFileError, match="pass the model"):
        load_gates("Jang-Hyun/Fast-KVzip")
