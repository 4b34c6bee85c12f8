"""The integration inside a vLLM engine: the same tokens and the same pairs kept head by head as the transformers
reference under either budget, blocks that follow what the heads keep, more requests at once, requests that do not
ask left alone, bad settings refused."""

from __future__ import annotations

import time

import pytest
from vllm_helpers import BLOCK_SIZE, POOL_BLOCKS, distinct_prompts, engine_options

from fastkvzip_press.vllm.events import read_events
from fastkvzip_press.vllm.reference import greedy_reference
from fastkvzip_press.vllm.settings import EngineSettings

STEPS = 8
# llama: requests opt in, global budget by default, vLLM's CPU kernel; qwen3: requests opt out with ratio 0, uniform
# budget by default, compacted every 64 prompt tokens, the package's torch attention path.
SECTIONS = {
    "llama": {"ratio": 0.0, "budget": "global", "chunk_size": None, "attention": "auto"},
    "qwen3": {"ratio": 0.5, "budget": "uniform", "chunk_size": 64, "attention": "torch"},
}
HEADS = 2 * 2  # layers x KV heads of the tiny models


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def engine(request, tiny_models, tmp_path_factory):
    from vllm import LLM

    arch = request.param
    model_dir, gates, model, bank = tiny_models[arch]
    events = tmp_path_factory.mktemp(f"events-{arch}") / "events.jsonl"
    section = {"gates": str(gates), "events": str(events), "record_kept": True, **SECTIONS[arch]}
    llm = LLM(
        model=str(model_dir), skip_tokenizer_init=True, additional_config={"fastkvzip": section}, **engine_options()
    )
    yield arch, llm, model, bank, events, EngineSettings(**section)
    llm.llm_engine.engine_core.shutdown()


def sampling(ratio, budget=None, steps: int = STEPS):
    """``ratio`` / ``budget`` None: not in extra_args (the engine's default)."""
    from vllm import SamplingParams

    extra = {}
    if ratio is not None:
        extra["fastkvzip_ratio"] = ratio
    if budget is not None:
        extra["fastkvzip_budget"] = budget
    return SamplingParams(
        max_tokens=steps, temperature=0, ignore_eos=True, logprobs=1, detokenize=False, extra_args=extra or None
    )


def generate(llm, prompts, ratios, budgets=None, steps: int = STEPS):
    """(tokens, logprobs) per prompt."""
    budgets = budgets or [None] * len(prompts)
    params = [sampling(ratio, budget, steps) for ratio, budget in zip(ratios, budgets)]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    results = []
    for output in outputs:
        completion = output.outputs[0]
        tokens = list(completion.token_ids)
        results.append((tokens, [float(step[t].logprob) for t, step in zip(tokens, completion.logprobs)]))
    return results


def run(engine, prompts, ratios, budgets=None, steps: int = STEPS):
    """(tokens, logprobs) per prompt, and the events the run wrote."""
    arch, llm, model, bank, events, settings = engine
    since = time.time()
    results = generate(llm, prompts, ratios, budgets, steps)
    return results, read_events(events, since=since)


def test_tokens_and_kept_pairs_equal_the_transformers_reference_under_either_budget(engine):
    arch, llm, model, bank, events, settings = engine
    prompts = distinct_prompts([300, 200, 100, 150, 250])
    ratios = [0.5, 0.75, 0.0, None, 0.75]
    budgets = [None, "global", None, "uniform", "uniform"]
    results, log = run(engine, prompts, ratios, budgets)
    kept_by_length = {e["prompt_tokens"]: e for e in log if e["event"] == "worker_compaction"}
    for prompt, ratio, budget, (tokens, logprobs) in zip(prompts, ratios, budgets, results):
        effective = settings.ratio if ratio is None else ratio
        budget = budget or settings.budget
        reference = greedy_reference(model, bank, prompt, effective, STEPS, settings, budget=budget)
        assert tokens == reference.tokens, (arch, len(prompt), effective, budget)
        assert max(abs(a - b) for a, b in zip(logprobs, reference.logprobs)) < 1e-4
        if not effective:
            assert len(prompt) not in kept_by_length
            continue
        record = kept_by_length[len(prompt)]
        assert record["budget"] == budget
        assert record["kept_indices"] == reference.kept_indices, "each head keeps the reference's pairs"
        counts = {len(head) for layer in reference.kept_indices for head in layer}
        assert (len(counts) == 1) == (budget == "uniform"), "under the global budget heads keep their own counts"
        assert record["kept_per_head"] == [[len(head) for head in layer] for layer in reference.kept_indices]


def test_compression_changes_only_the_requests_that_ask(engine):
    arch, llm, model, bank, events, settings = engine
    prompts = distinct_prompts([300, 300], seed=1)
    [(_, full)], _ = run(engine, prompts[:1], [0.0])
    [(_, compressed), (plain, _)], log = run(engine, prompts, [0.75, 0.0])
    assert plain == greedy_reference(model, bank, prompts[1], 0.0, STEPS).tokens
    assert max(abs(a - b) for a, b in zip(full, compressed)) > 1e-3, "keeping a quarter of the pairs shows"
    assert [e["prompt_tokens"] for e in log if e["event"] == "compaction"] == [300]


@pytest.mark.parametrize("budget", ["global", "uniform"])
def test_blocks_follow_the_kept_pairs_and_return_to_the_pool(engine, budget):
    """After its prompt is compacted a request holds at most its kept pairs' share of blocks plus one, never less
    than its heads' single-head blocks need; every block is back once the requests finish."""
    arch, llm, model, bank, events, settings = engine
    prompts = distinct_prompts([300, 200, 64], seed=2)
    _, log = run(engine, prompts, [0.5, 0.75, 0.5], [budget] * 3)
    compactions = {e["prompt_tokens"]: e for e in log if e["event"] == "compaction"}
    stored = {e["prompt_tokens"]: e for e in log if e["event"] == "worker_compaction"}
    for length, ratio in ((300, 0.5), (200, 0.75), (64, 0.5)):
        schedule = settings.schedule(length, settings.request({"fastkvzip_ratio": ratio, "fastkvzip_budget": budget}),
                                     HEADS, BLOCK_SIZE)  # fmt: skip
        record = compactions[length]
        kept = sum(sum(layer) for layer in stored[length]["kept_per_head"])  # what the worker's heads hold
        assert kept == schedule.kept_pairs == record["kept_pairs"]
        share = cdiv(schedule.kept_pairs, HEADS * BLOCK_SIZE)
        assert record["blocks_after"] <= share + 1
        assert stored[length]["head_blocks"] <= HEADS * record["blocks_after"]
        if length > 100:
            assert record["blocks_after"] < cdiv(length, BLOCK_SIZE)
    steps = [e for e in log if e["event"] == "scheduler_step"]
    assert steps[-1]["free_blocks"] == POOL_BLOCKS - 1, "every block is back once the requests finish"


def test_a_pool_too_small_for_four_full_requests_runs_them_together_once_compressed(engine):
    prompts = distinct_prompts([300] * 4, seed=3)
    _, full_log = run(engine, prompts, [0.0] * 4)
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
    results, log = run(engine, prompts, [0.75] * 6, ["uniform"] * 6)
    running = max(e["running"] for e in log if e["event"] == "scheduler_step")
    schedule = settings.schedule(300, settings.request({"fastkvzip_ratio": 0.75, "fastkvzip_budget": "uniform"}),
                                 HEADS, BLOCK_SIZE)  # fmt: skip
    footprint = cdiv(schedule.peak_tokens(0), BLOCK_SIZE)
    stored = cdiv(schedule.reserved_tokens(300) + STEPS, BLOCK_SIZE)
    assert 6 * stored < POOL_BLOCKS - 1 < 5 * stored + cdiv(300, BLOCK_SIZE)  # six fit compacted, not with a prompt
    assert settings.chunk_size is None or 5 * stored + footprint <= POOL_BLOCKS - 1
    if settings.chunk_size:
        assert running == 6, (arch, running)
    else:
        assert running < 6, (arch, running)  # 4 measured
    for prompt, (tokens, _) in zip(prompts, results):
        assert tokens == greedy_reference(model, bank, prompt, 0.75, STEPS, settings, budget="uniform").tokens


@pytest.mark.parametrize(
    ("extra_args", "message"),
    [
        ({"fastkvzip_ratio": 1.5}, "must be in [0, 1)"),
        ({"fastkvzip_ratio": "half"}, "must be a number"),
        ({"fastkvzip_ratio": -0.1}, "must be in [0, 1)"),
        ({"fastkvzip_budget": "layerwise"}, "must be one of ['global', 'uniform']"),
        ({"fastkvzip_ratoi": 0.5}, "unknown Fast KVzip request setting(s) ['fastkvzip_ratoi']"),
    ],
)
def test_bad_settings_are_refused_and_the_engine_keeps_serving(engine, extra_args, message):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    arch, llm, model, bank, events, settings = engine
    prompt = distinct_prompts([100], seed=4)
    params = SamplingParams(max_tokens=STEPS, temperature=0, ignore_eos=True, detokenize=False, extra_args=extra_args)
    with pytest.raises(VLLMValidationError) as error:
        llm.generate([{"prompt_token_ids": prompt[0]}], params, use_tqdm=False)
    assert message in str(error.value)
    ((tokens, _),) = generate(llm, prompt, [0.0])
    assert tokens == greedy_reference(model, bank, prompt[0], 0.0, STEPS).tokens


def test_a_preempted_request_is_recomputed_and_compacted_again(engine):
    arch, llm, model, bank, events, settings = engine
    prompts = distinct_prompts([300] * 4, seed=5)
    # Each compacted request grows past its kept blocks while decoding, so the pool runs out and vLLM preempts.
    results, log = run(engine, prompts, [0.5] * 4, ["global"] * 4, steps=200)
    preempted = {e["request"] for e in log if e["event"] == "preemption"}
    assert preempted, "the pool is meant to run out"
    for request in preempted:  # recomputed from its first token and compacted again (also if preempted mid-prefill)
        last_preemption = max(e["time"] for e in log if e["event"] == "preemption" and e["request"] == request)
        assert any(e["time"] > last_preemption for e in log if e["event"] == "compaction" and e["request"] == request)
    for prompt, (tokens, _) in zip(prompts, results):
        assert tokens == greedy_reference(model, bank, prompt, 0.5, 200, settings, budget="global").tokens
    assert [e for e in log if e["event"] == "scheduler_step"][-1]["free_blocks"] == POOL_BLOCKS - 1


def test_a_prompt_within_sink_and_window_is_kept_whole(engine):
    arch, llm, model, bank, events, settings = engine
    prompt = distinct_prompts([5], seed=6)
    assert settings.schedule(5, settings.request({"fastkvzip_ratio": 0.5}), HEADS, BLOCK_SIZE) is None
    [(tokens, _)], log = run(engine, prompt, [0.5])
    assert tokens == greedy_reference(model, bank, prompt[0], 0.5, STEPS, settings).tokens
    assert not [e for e in log if e["event"] in ("compaction", "worker_compaction")]


def test_random_traffic_with_aborts_and_preemptions_never_oversubscribes_the_pool(engine):
    """Requests of random lengths, ratios and budgets arrive while others decode; some are aborted mid-way and the
    small pool forces preemptions. The worker checks after every step that each request's heads hold no more than its
    scheduler blocks stand for (the engine stops otherwise), and every block comes back."""
    import numpy as np
    from vllm import SamplingParams

    arch, llm, model, bank, events, settings = engine
    engine_core = llm.llm_engine
    rng = np.random.default_rng(11)
    since = time.time()
    pending = [(f"traffic-{i}", int(rng.integers(40, 400))) for i in range(24)]
    prompts = dict(zip((name for name, _ in pending), distinct_prompts([length for _, length in pending], seed=12)))
    live, finished, aborted, steps = set(), set(), set(), 0
    while pending or engine_core.has_unfinished_requests():
        for _ in range(int(rng.integers(0, 3))):
            if pending:
                name, _ = pending.pop()
                extra = {"fastkvzip_ratio": float(rng.choice([0.0, 0.5, 0.75])),
                         "fastkvzip_budget": str(rng.choice(["global", "uniform"]))}  # fmt: skip
                params = SamplingParams(max_tokens=int(rng.integers(1, 60)), temperature=0, ignore_eos=True,
                                        detokenize=False, extra_args=extra)  # fmt: skip
                engine_core.add_request(name, {"prompt_token_ids": prompts[name]}, params)
                live.add(name)
        if live and rng.random() < 0.1:
            victim = sorted(live)[int(rng.integers(len(live)))]
            engine_core.abort_request([victim])
            live.discard(victim)
            aborted.add(victim)
        if not engine_core.has_unfinished_requests():
            continue  # nothing to run until the next arrival (a step would wait for output)
        for output in engine_core.step():
            if output.finished:
                live.discard(output.request_id)
                finished.add(output.request_id)
        steps += 1
        assert steps < 5000
    assert aborted and len(finished | aborted) == 24 and not live
    generate(llm, distinct_prompts([20], seed=13), [0.0], steps=1)  # a step after the last abort, to read the pool
    log = read_events(events, since=since)
    assert any(e["event"] == "compaction" for e in log)
    assert [e for e in log if e["event"] == "scheduler_step"][-1]["free_blocks"] == POOL_BLOCKS - 1
