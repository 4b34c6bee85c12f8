import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import kvpress  # noqa: E402,F401  (registers the pipeline and patches attention)
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import DynamicCache, pipeline  # noqa: E402

from fastkvzip_press import GateBank, ModelLayout, RaggedLayer  # noqa: E402
from fastkvzip_press.models import TINY_ARCHITECTURES, tiny_model  # noqa: E402

torch.set_num_threads(2)

HAYSTACK = " ".join(["the grass is green and the sky is blue ."] * 12)
CONTEXT = f"{HAYSTACK} the secret code is 7 2 9 . {HAYSTACK}"
QUESTIONS = ["what is the secret code ?", "what color is the sky ?", "what is green ?"]


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


def greedy_after_prefill(model, tokenizer, press, context=CONTEXT, question=QUESTIONS[0], steps=4):
    """Prefill ``context`` under ``press``, then greedy-decode after ``question``: (tokens, logits per step, cache)."""
    ids = tokenizer(context, return_tensors="pt").input_ids
    question_ids = tokenizer(question, return_tensors="pt").input_ids
    cache = DynamicCache()
    with torch.no_grad():
        if press is None:
            model.model(input_ids=ids, past_key_values=cache)
        else:
            with press(model):
                model.model(input_ids=ids, past_key_values=cache)
        position = ids.shape[1]
        tokens, logits = [], []
        step_ids = question_ids
        for _ in range(steps):
            positions = torch.arange(position, position + step_ids.shape[1])[None]
            step_logits = model(step_ids, past_key_values=cache, position_ids=positions).logits[:, -1]
            position += step_ids.shape[1]
            step_ids = step_logits.argmax(-1, keepdim=True)
            tokens.append(int(step_ids))
            logits.append(step_logits)
    return tokens, torch.cat(logits), cache


def stored_rows_per_head(cache, layer_ids) -> float:
    """Average pairs held per (gated layer, KV head)."""
    counts = []
    for layer_id in layer_ids:
        layer = cache.layers[layer_id]
        counts += layer.head_lengths if isinstance(layer, RaggedLayer) else [layer.keys.shape[2]] * layer.keys.shape[1]
    return sum(counts) / len(counts)


def greedy_decode(model, tokenizer, press, n_steps: int, prompt: str = CONTEXT, observe=None):
    """Prefill ``prompt`` and greedy-decode ``n_steps`` tokens with ``press`` active throughout.

    Returns (tokens, logits [n_steps, V], cache); ``observe(cache, step)`` runs after every step.
    """
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    cache = DynamicCache()
    tokens, logits = [], []
    with torch.no_grad(), press(model):
        out = model(ids, past_key_values=cache)
        for step in range(n_steps):
            step_logits = out.logits[:, -1]
            next_id = step_logits.argmax(-1, keepdim=True)
            tokens.append(int(next_id))
            logits.append(step_logits)
            out = model(next_id, past_key_values=cache)
            if observe is not None:
                observe(cache, step)
    return tokens, torch.cat(logits), cache


def make_pipeline(model, tokenizer):
    return pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")


@pytest.fixture(scope="session")
def default_model_dir(tmp_path_factory):
    """Converted default model, once per session (about half a minute)."""
    from fastkvzip_press.models import convert_default_model

    target = tmp_path_factory.mktemp("models") / "smollm2"
    convert_default_model(target)
    return target
