"""The integration inside a vLLM engine: the same tokens and kept pairs as the transformers reference, blocks
returned to the pool, more requests at once, requests that do not ask left alone, bad settings refused."""

from __future__ import annotations

import time

import pytest
from vllm_helpers import BLOCK_SIZE, POOL_BLOCKS, distinct_prompts, engine_options

from fastkvzip_press.vllm.events import read_events
from fastkvzip_press.vllm.reference import greedy_reference
from fastkvzip_press.vllm.settings import EngineSettings

STEPS = 8
ENGINE_DEFAULT = {"llama": 0.0, "qwen3": 0.5}  # llama: requests opt in; qwen3: requests opt out with 0
CHUNK_SIZE = {"llama": None, "qwen3": 64}  # llama: one compaction after the prefill; qwen3: one every 64 tokens


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def engine(request, tiny_models, tmp_path_factory):
    from vllm import LLM

    arch = request.param
    model_dir, gates, model, bank = tiny_models[arch]
    events = tmp_path_factory.mktemp(f"events-{arch}") / "events.jsonl"
    section = {
        "gates": str(gates),
        "events": str(events),
        "record_kept": True,
        "ratio": ENGINE_DEFAULT[arch],
        "chunk_size": CHUNK_SIZE[arch],
    }
    llm = LLM(
        model=str(model_dir), skip_tokenizer_init=True, additional_config={"fastkvzip": section}, **engine_options()
    )
    yield arch, llm, model, bank, events, EngineSettings(**section)
    llm.llm_engine.engine_core.shutdown()


def sampling(ratio, steps: int = STEPS):
    """``ratio`` None: no extra_args (the engine's default)."""
    from vllm import SamplingParams

    return SamplingParams(
        max_tokens=steps,
        temperature=0,
        ignore_eos=True,
        logprobs=1,
        detokenize=False,
        extra_args=None if ratio is None else {"fastkvzip_ratio": ratio},
    )


def generate(llm, prompts, ratios, steps: int = STEPS):
    """(tokens, logprobs) per prompt, and the events the run wrote."""
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], [sampling(r, steps) for r in ratios])
    results = []
    for output in outputs:
        completion = output.outputs[0]
        tokens = list(completion.token_ids)
        results.append((tokens, [float(step[t].logprob) for t, step in zip(tokens, completion.logprobs)]))
    return results


def run(engine, prompts, ratios, steps: int = STEPS):
    arch, llm, model, bank, events, settings = engine
    since = time.time()
    results = generate(llm, prompts, ratios, steps)
    return results, read_events(events, since=since)


def test_tokens_and_kept_pairs_equal_the_transformers_reference(engine):
    arch, llm, model, bank, events, settings = engine
    prompts = distinct_prompts([300, 200, 100, 150])
    ratios = [0.5, 0.75, 0.0, None]
    results, log = run(engine, prompts, ratios)
    kept_by_length = {e["prompt_tokens"]: e["kept_indices"] for e in log if e["event"] == "worker_compaction"}
    for prompt, ratio, (tokens, logprobs) in zip(prompts, ratios, results):
        effective = settings.ratio if ratio is None else ratio
        reference = greedy_reference(model, bank, prompt, effective, STEPS, settings)
        assert tokens == reference.tokens, (arch, len(prompt), effective)
        assert max(abs(a - b) for a, b in zip(logprobs, reference.logprobs)) < 1e-4
        if effective:
            assert kept_by_length[len(prompt)] == reference.kept_indices.tolist()
            heads = reference.kept_indices
            assert not (heads[:, 0] == heads[:, 1]).all(), "each head chooses its own tokens"
        else:
            assert len(prompt) not in kept_by_length


def test_compression_changes_only_the_requests_that_ask(engine):
    arch, llm, model, bank, events, settings = engine
    prompts = distinct_prompts([300, 300], seed=1)
    [(_, full)], _ = run(engine, prompts[:1], [0.0])
    [(_, compressed), (plain, _)], log = run(engine, prompts, [0.75, 0.0])
    assert plain == greedy_reference(model, bank, prompts[1], 0.0, STEPS).tokens
    assert max(abs(a - b) for a, b in zip(full, compressed)) > 1e-3, "keeping a quarter of the pairs shows"
    assert [e["prompt_tokens"] for e in log if e["event"] == "compaction"] == [300]


def test_blocks_past_the_kept_tokens_return_to_the_pool(engine):
    arch, llm, model, bank, events, settings = engine
    prompts = distinct_prompts([300, 200, 64], seed=2)
    _, log = run(engine, prompts, [0.5, 0.75, 0.5])
    compactions = {e["prompt_tokens"]: e for e in log if e["event"] == "compaction"}
    for length, ratio in ((300, 0.5), (200, 0.75), (64, 0.5)):
        schedule = settings.schedule(length, ratio)
        # before the last compaction: the whole prompt, or (chunked) what the one before stored and the last chunk
        before = schedule.peak_tokens(schedule.ends[-2]) if len(schedule.ends) > 1 else length
        assert compactions[length]["kept_tokens"] == schedule.kept_tokens == settings.kept_tokens(length, ratio)
        assert compactions[length]["blocks_before"] == cdiv(before, BLOCK_SIZE)
        assert compactions[length]["blocks_after"] == cdiv(schedule.kept_tokens, BLOCK_SIZE)
    chunked = [e for e in log if e["event"] == "chunk_compaction"]
    assert len(chunked) == (0 if settings.chunk_size is None else 4 + 3)  # 300 and 200 tokens in chunks of 64
    assert all(e["blocks_after"] == cdiv(e["kept_tokens"], BLOCK_SIZE) for e in chunked)
    steps = [e for e in log if e["event"] == "scheduler_step"]
    assert steps[-1]["free_blocks"] == POOL_BLOCKS - 1, "every block is back once the requests finish"


def test_a_pool_too_small_for_four_full_requests_runs_them_together_once_compressed(engine):
    prompts = distinct_prompts([300] * 4, seed=3)
    full_tokens, full_log = run(engine, prompts, [0.0] * 4)
    _, compressed_log = run(engine, prompts, [0.75] * 4)

    def most_running(log):
        return max(e["running"] for e in log if e["event"] == "scheduler_step")

    assert 4 * cdiv(300 + STEPS, BLOCK_SIZE) > POOL_BLOCKS - 1  # the pool cannot hold four full requests
    assert most_running(full_log) == 2
    assert most_running(compressed_log) == 4


def test_chunk_by_chunk_compaction_admits_requests_whose_whole_prompt_would_not_fit(engine):
    """Compacted once after the prefill, a request needs its whole prompt's blocks to be admitted; compacted every
    64 tokens, only its largest footprint."""
    arch, llm, model, bank, events, settings = engine
    prompts = distinct_prompts([300] * 6, seed=7)
    results, log = run(engine, prompts, [0.75] * 6)
    running = max(e["running"] for e in log if e["event"] == "scheduler_step")
    schedule = settings.schedule(300, 0.75)
    footprint = cdiv(schedule.peak_tokens(0), BLOCK_SIZE)
    stored = cdiv(schedule.kept_tokens + STEPS, BLOCK_SIZE)
    assert (
        6 * stored < POOL_BLOCKS - 1 < 5 * stored + cdiv(300, BLOCK_SIZE)
    )  # six fit compacted, not with a whole prompt
    assert settings.chunk_size is None or 5 * stored + footprint <= POOL_BLOCKS - 1
    if settings.chunk_size:
        assert running == 6, (arch, running)
    else:
        assert running < 6, (arch, running)  # 4 measured
    for prompt, (tokens, _) in zip(prompts, results):
        assert tokens == greedy_reference(model, bank, prompt, 0.75, STEPS, settings).tokens


def test_bad_settings_are_refused_and_the_engine_keeps_serving(engine):
    from vllm.exceptions import VLLMValidationError

    arch, llm, model, bank, events, settings = engine
    prompt = distinct_prompts([100], seed=4)
    for bad, message in ((1.5, "must be in [0, 1)"), ("half", "must be a number"), (-0.1, "must be in [0, 1)")):
        with pytest.raises(VLLMValidationError, match="fastkvzip_ratio") as error:
            generate(llm, prompt, [bad])
        assert message in str(error.value)
    ((tokens, _),) = generate(llm, prompt, [0.0])
    assert tokens == greedy_reference(model, bank, prompt[0], 0.0, STEPS).tokens


def test_a_preempted_request_is_recomputed_and_compacted_again(engine):
    arch, llm, model, bank, events, settings = engine
    prompts = distinct_prompts([300] * 4, seed=5)
    # Each compacted request grows past its 5 kept blocks while decoding, so the pool runs out and vLLM preempts.
    results, log = run(engine, prompts, [0.5] * 4, steps=200)
    preempted = {e["request"] for e in log if e["event"] == "preemption"}
    assert preempted, "the pool is meant to run out"
    compactions = [e["request"] for e in log if e["event"] == "compaction"]
    assert all(compactions.count(request) == 2 for request in preempted)
    assert all(len(tokens) == 200 for tokens, _ in results)
    assert [e for e in log if e["event"] == "scheduler_step"][-1]["free_blocks"] == POOL_BLOCKS - 1


def test_a_prompt_within_sink_and_window_is_kept_whole(engine):
    arch, llm, model, bank, events, settings = engine
    prompt = distinct_prompts([5], seed=6)
    assert settings.kept_tokens(5, 0.5) == 5  # 4 sink tokens and a window of at least one
    [(tokens, _)], log = run(engine, prompt, [0.5])
    assert tokens == greedy_reference(model, bank, prompt[0], 0.5, STEPS, settings).tokens
    assert not [e for e in log if e["event"] in ("compaction", "worker_compaction")]
