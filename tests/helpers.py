"""Shared test helpers: contexts, greedy decoding under a press, cache measurements, kernel test inputs."""

import contextlib
import os
from unittest import mock

import torch
from hypothesis import settings
from hypothesis import strategies as st
from transformers import DynamicCache

from fastkvzip_press import RaggedLayer
from fastkvzip_press.presses.pipeline import kvpress_pipeline
from fastkvzip_press.triton import dispatch

HAYSTACK = " ".join(["the grass is green and the sky is blue ."] * 12)
CONTEXT = f"{HAYSTACK} the secret code is 7 2 9 . {HAYSTACK}"
QUESTIONS = ["what is the secret code ?", "what color is the sky ?", "what is green ?"]


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


def stored_pairs_per_head(cache, layer_ids) -> float:
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


def teacher_forced_after_prefill(model, tokenizer, press, forced: list[int] | None = None, steps: int = 8):
    """Prefill ``CONTEXT`` under ``press``, then decode after a question on the model's device: greedily, or feeding
    ``forced`` tokens (teacher forcing, so two runs compare step by step). Returns (tokens, logits ``[steps, V]`` in
    fp32, cache)."""
    device = model.device
    ids = tokenizer(CONTEXT, return_tensors="pt").input_ids.to(device)
    step_ids = tokenizer(QUESTIONS[0], return_tensors="pt").input_ids.to(device)
    cache = DynamicCache()
    tokens, logits = [], []
    with torch.no_grad():
        with press(model):
            model.model(input_ids=ids, past_key_values=cache)
        position = ids.shape[1]
        for step in range(steps):
            positions = torch.arange(position, position + step_ids.shape[1], device=device)[None]
            step_logits = model(step_ids, past_key_values=cache, position_ids=positions).logits[:, -1].float()
            position += step_ids.shape[1]
            tokens.append(int(step_logits.argmax()) if forced is None else forced[step])
            logits.append(step_logits)
            step_ids = torch.tensor([[tokens[-1]]], device=device)
    return tokens, torch.cat(logits), cache


def teacher_forced_decoding(model, tokenizer, press, forced: list[int] | None = None, steps: int = 40):
    """Prefill ``CONTEXT`` and decode ``steps`` tokens with ``press`` active throughout (greedy or ``forced``).

    Returns (tokens, logits ``[steps, V]`` in fp32, cache, ``{layer_id: masked_key_indices}`` as the press leaves them
    on the attention modules before it exits; kvpress's ``(batch, head, position)`` index tensors, or None).
    """
    device = model.device
    ids = tokenizer(CONTEXT, return_tensors="pt").input_ids.to(device)
    cache = DynamicCache()
    tokens, logits = [], []
    with torch.no_grad(), press(model):
        out = model(ids, past_key_values=cache)
        for step in range(steps):
            step_logits = out.logits[:, -1].float()
            tokens.append(int(step_logits.argmax()) if forced is None else forced[step])
            logits.append(step_logits)
            out = model(torch.tensor([[tokens[-1]]], device=device), past_key_values=cache)
        masked = {i: getattr(layer.self_attn, "masked_key_indices", None) for i, layer in enumerate(model.model.layers)}
    return tokens, torch.cat(logits), cache, masked


def assert_same_run(tol: float, tokens: list[int], logits: torch.Tensor, reference_logits: torch.Tensor) -> None:
    """Logits within ``tol`` at every step, and greedy tokens equal until the first near-tie: fed the same prefix,
    the reference picks the run's token unless the top-2 gap is within ``tol``."""
    diff = float((logits - reference_logits).abs().max())
    assert diff <= tol, f"max |logit difference| {diff:.5f} exceeds the tolerance {tol:.5f}"
    for step, (pick, token) in enumerate(zip(reference_logits.argmax(-1).tolist(), tokens)):
        if pick != token:
            top2 = logits[step].topk(2).values
            assert float(top2[0] - top2[1]) <= tol, f"step {step}: greedy picks differ without a near-tie"


def generate_left_padded(model, tokenizer, press, prompts: list[str], steps: int, **kwargs):
    """Left-padded greedy ``generate`` of ``steps`` tokens under ``press`` on the model's device: (new tokens
    ``[B, steps]``, logits ``[B, steps, V]`` in fp32, cache)."""
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    with torch.no_grad(), press(model):
        out = model.generate(
            **batch,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            **kwargs,
        )
    return out.sequences[:, batch.input_ids.shape[1] :], torch.stack(out.logits, dim=1).float(), out.past_key_values


def make_pipeline(model, tokenizer):
    return kvpress_pipeline(model, tokenizer)


# ------------------------------------------------------------------------------------------------------- kernels

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FEW = settings(max_examples=30, deadline=None)
ROW_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@contextlib.contextmanager
def kernel_backend(name: str):
    """Force ``FASTKVZIP_PRESS_KERNELS`` inside a hypothesis example (function-scoped fixtures are not reset there)."""
    with mock.patch.dict(os.environ, {dispatch.KERNELS_ENV: name}):
        yield


@st.composite
def ragged_layouts(draw, min_room: int = 0):
    """(starts, lengths, rooms, M): up to 6 segments in shuffled memory order, each followed by ``room`` unused rows
    (at least ``min_room``), with unused rows before the first and after the last segment."""
    n_segments = draw(st.integers(0, 6))
    lengths = draw(st.lists(st.integers(0, 40), min_size=n_segments, max_size=n_segments))
    rooms = draw(st.lists(st.integers(min_room, min_room + 5), min_size=n_segments, max_size=n_segments))
    order = draw(st.permutations(range(n_segments)))
    starts = [0] * n_segments
    row = draw(st.integers(0, 5))
    for s in order:
        starts[s] = row
        row += lengths[s] + rooms[s]
    return starts, lengths, rooms, row + draw(st.integers(0, 3))


def as_index(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=KERNEL_DEVICE)


@st.composite
def batch_layouts(draw, min_room: int = 0):
    """(starts, lengths, rooms, M) of a ragged layer holding a batch: B sequences x H heads, one segment each in
    (sequence, head) order, back to back, each with ``room`` spare rows (at least ``min_room``)."""
    bsz, heads = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    n_segments = bsz * heads
    lengths = draw(st.lists(st.integers(0, 30), min_size=n_segments, max_size=n_segments))
    rooms = draw(st.lists(st.integers(min_room, min_room + 4), min_size=n_segments, max_size=n_segments))
    starts, row = [], 0
    for length, room in zip(lengths, rooms):
        starts.append(row)
        row += length + room
    return starts, lengths, rooms, row
