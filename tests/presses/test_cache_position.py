"""``cache_position`` for the attention hooks on transformers releases that no longer pass it (>= 5.3)."""

import torch
from transformers import DynamicCache

from fastkvzip_press import FastKVzipPress, GateBank, ModelLayout
from fastkvzip_press.models import tiny_model
from fastkvzip_press.presses import cache_position
from fastkvzip_press.presses.cache_position import add_cache_position, base_model, pass_cache_position


def filled_cache(model, n_tokens: int) -> DynamicCache:
    cache = DynamicCache()
    with torch.no_grad():
        model(torch.arange(n_tokens)[None] + 5, past_key_values=cache)
    return cache


def test_the_hook_gives_the_positions_after_what_the_cache_holds():
    model, _ = tiny_model("llama")
    cache = filled_cache(model, 3)
    ids = torch.zeros(2, 5, dtype=torch.long)
    _, kwargs = add_cache_position(model.model, (), {"input_ids": ids, "past_key_values": cache})
    assert kwargs["cache_position"].tolist() == [3, 4, 5, 6, 7]
    _, kwargs = add_cache_position(model.model, (ids,), {"past_key_values": None})  # positional ids, no cache
    assert kwargs["cache_position"].tolist() == [0, 1, 2, 3, 4]
    _, kwargs = add_cache_position(model.model, (), {"inputs_embeds": torch.zeros(1, 2, 64), "past_key_values": cache})
    assert kwargs["cache_position"].tolist() == [3, 4]
    given = torch.tensor([7, 8])
    assert add_cache_position(model.model, (), {"input_ids": ids, "cache_position": given}) is None
    assert add_cache_position(model.model, (), {"past_key_values": cache}) is None


def test_a_release_that_passes_cache_position_gets_no_hook():
    model, _ = tiny_model("llama")
    base = base_model(model)
    needed = not cache_position.takes_cache_position(base)  # False on transformers < 5.3
    assert pass_cache_position(model) == needed
    assert len(base._forward_pre_hooks) == int(needed)


def test_a_model_without_cache_position_gets_it_once_and_decodes_alike(monkeypatch):
    model, tokenizer = tiny_model("llama")
    gates = GateBank.random(ModelLayout.from_model(model), seed=0)
    ids = tokenizer("the quick brown fox jumps over the lazy dog " * 4, return_tensors="pt").input_ids

    def greedy() -> list[int]:
        with torch.no_grad(), FastKVzipPress(0.5, gates=gates, window_size=4)(model):
            return model.generate(ids, max_new_tokens=6, do_sample=False).tolist()

    before = greedy()
    monkeypatch.setattr(cache_position, "takes_cache_position", lambda module: False)
    assert pass_cache_position(model) and pass_cache_position(model)
    base = base_model(model)
    assert len(base._forward_pre_hooks) == 1
    seen = []
    base.register_forward_pre_hook(lambda m, a, k: seen.append(k["cache_position"].tolist()), with_kwargs=True)
    assert greedy() == before
    n = ids.shape[1]
    assert seen == [list(range(n)), *([n + step] for step in range(5))]
