"""The engine's transformers reference is FastKVzipPress: the global budget (each head its own count) or the uniform
one, chunked or not — same greedy tokens, logprobs and pairs kept per head on tiny models."""

import pytest
import torch

from fastkvzip_press.gates import GateBank
from fastkvzip_press.layout import ModelLayout
from fastkvzip_press.models import tiny_model
from fastkvzip_press.presses import FastKVzipPress
from fastkvzip_press.vllm.reference import greedy_reference
from fastkvzip_press.vllm.settings import EngineSettings


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75])
@pytest.mark.parametrize("chunk_size", [None, 32])
@pytest.mark.parametrize("budget", ["global", "uniform"])
def test_the_reference_decodes_as_the_press(arch, ratio, chunk_size, budget):
    model, _ = tiny_model(arch)
    bank = GateBank.random(ModelLayout.from_model(model), seed=5)
    prompt = torch.randperm(model.config.vocab_size - 10, generator=torch.Generator().manual_seed(0))[:120] + 10
    settings = EngineSettings(chunk_size=chunk_size, budget=budget)
    reference = greedy_reference(model, bank, prompt.tolist(), ratio, max_new_tokens=6, settings=settings)
    chunking = {} if chunk_size is None else {"chunk_size": chunk_size}
    press = FastKVzipPress(compression_ratio=ratio, gates=bank, uniform=budget == "uniform", **chunking)
    with torch.no_grad(), press(model):
        generated = model.generate(
            prompt[None], max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
    assert generated.sequences[0, 120:].tolist() == reference.tokens
    logprobs = [float(step[0].log_softmax(-1)[token]) for step, token in zip(generated.scores, reference.tokens)]
    assert max(abs(a - b) for a, b in zip(logprobs, reference.logprobs)) < 1e-4
    if not ratio:
        assert reference.kept_indices is None
        return
    kept = [[len(head) for head in layer] for layer in reference.kept_indices]
    assert kept == [press.last_stats.kept_per_head[layer][0].tolist() for layer in bank.layer_ids]
    counts = {count for layer in kept for count in layer}
    assert (len(counts) == 1) == (budget == "uniform"), "the global budget gives heads their own counts"
