"""Fixtures of the evaluation tests: a local tokenizer, RULER-style rows at 1k tokens, a saved tiny model."""

import pytest

from fastkvzip_press.evaluation.ruler import make_ruler_samples
from fastkvzip_press.gates import write_native
from fastkvzip_press.models import load_model, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory, random_gates):
    """A tiny Llama saved as a model folder, with random gates made for it (as loaded from that folder)."""
    folder = tmp_path_factory.mktemp("tiny")
    model, tokenizer = tiny_model("llama")
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    write_native(random_gates(load_model(str(folder / "model"))[0], seed=2), folder / "gates")
    return folder


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def rows_1k(tokenizer):
    return make_ruler_samples(tokenizer, context_length=1024, n_samples=2, seed=5)
