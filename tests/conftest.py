"""Fixtures: tiny random models of every covered architecture, random gates, the converted default model."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Kernels run in Triton's interpreter where no GPU is present. Triton reads the variable when triton.language is first
# imported (kvpress imports it below), so it is set before: then tl.max / tl.sum work in interpreted kernels too.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kvpress  # noqa: E402,F401  (registers the pipeline and patches attention)
import pytest  # noqa: E402

from fastkvzip_press import GateBank, ModelLayout  # noqa: E402
from fastkvzip_press.models import TINY_ARCHITECTURES, tiny_model  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session", params=TINY_ARCHITECTURES)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_models():
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            cache[name] = tiny_model(name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def llama(tiny_models):
    return tiny_models("llama")


@pytest.fixture(scope="session")
def random_gates():
    def make(model, seed: int = 0) -> GateBank:
        return GateBank.random(ModelLayout.from_model(model), seed=seed)

    return make


@pytest.fixture(scope="session")
def default_model_dir(tmp_path_factory):
    """Converted default model, once per session (about half a minute)."""
    from fastkvzip_press.models import convert_default_model

    target = tmp_path_factory.mktemp("models") / "smollm2"
    convert_default_model(target)
    return target


@pytest.fixture()
def corpus_dir(tmp_path):
    """Four small text documents (the haystack with a different colour word each), for training runs."""
    from helpers import CONTEXT

    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, word in enumerate(["green", "blue", "grass", "sky"]):
        (folder / f"doc{i}.txt").write_text(" ".join([CONTEXT.replace("green", word)] * 3))
    return folder
