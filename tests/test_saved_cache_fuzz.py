"""Cache files fuzzed like gate files: random bytes, truncations, headers and tensors of the wrong shape are refused
with CacheFileError (never another exception, never a cache that loads wrong)."""

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from test_saved_cache import compressed_context

from fastkvzip_press.saved_cache import HEADER_KEY, CacheFileError, load_cache, read_header, save_cache

FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 400) | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def saved(tiny_models, tmp_path_factory):
    from fastkvzip_press import GateBank, ModelLayout

    model, tokenizer = tiny_models("llama")
    cache, _, press = compressed_context(model, tokenizer, GateBank.random(ModelLayout.from_model(model)), 0.5)
    path = tmp_path_factory.mktemp("saved") / "context.kvz"
    save_cache(cache, path, model, press=press)
    return model, path


@FUZZ
@given(data=st.binary(max_size=2048))
def test_random_bytes(saved, tmp_path, data):
    model, _ = saved
    path = tmp_path / "random.kvz"
    path.write_bytes(data)
    with pytest.raises(CacheFileError):
        load_cache(path, model)


@FUZZ
@given(fraction=st.floats(0, 0.999))
def test_truncated_files(saved, tmp_path, fraction):
    model, whole = saved
    path = tmp_path / "truncated.kvz"
    data = whole.read_bytes()
    path.write_bytes(data[: int(fraction * len(data))])
    with pytest.raises(CacheFileError):
        load_cache(path, model)


@FUZZ
@given(layer=st.integers(0, 3), field=st.sampled_from(["kind", "logical_length", "batch_size", "pad_tokens",
       "spare_tokens", "columns", "sliding_window"]), value=JSON)  # fmt: skip
def test_layer_descriptions_of_the_wrong_shape(saved, tmp_path, layer, field, value):
    model, whole = saved
    header = read_header(whole)
    header["layers"][layer][field] = value
    path = tmp_path / "header.kvz"
    save_file(load_file(str(whole)), str(path), metadata={HEADER_KEY: json.dumps(header)})
    try:
        loaded = load_cache(path, model)
    except CacheFileError:
        return
    # What still loads is the file's cache: it continues exactly as the undamaged file does.
    ids = torch.arange(5, 9)[None]
    with torch.no_grad():
        expected = model(input_ids=ids, past_key_values=load_cache(whole, model).cache).logits
        assert torch.equal(model(input_ids=ids, past_key_values=loaded.cache).logits, expected)


@FUZZ
@given(
    layer=st.integers(0, 3),
    part=st.sampled_from(["keys", "values", "lengths", "column.scores"]),
    change=st.sampled_from(["int", "bool", "shape", "scalar", "drop", "half"]),
)
def test_tensors_of_the_wrong_dtype_or_shape(saved, tmp_path, layer, part, change):
    model, whole = saved
    tensors = load_file(str(whole))
    name = f"layers.{layer}.{part}"
    value = tensors[name]
    if change == "drop":
        del tensors[name]
    else:
        tensors[name] = {
            "int": value.to(torch.int32),
            "bool": value > 0,
            "shape": torch.zeros(*[n + 1 for n in value.shape]),
            "scalar": torch.tensor(1.0),
            "half": value.to(torch.float16),
        }[change]
    path = tmp_path / "tensors.kvz"
    save_file(tensors, str(path), metadata={HEADER_KEY: json.dumps(read_header(whole))})
    with pytest.raises(CacheFileError):
        load_cache(path, model)
