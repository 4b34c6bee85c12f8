"""Answering dataset rows through kvpress's pipeline: one compressed cache per context, scores and stored KV."""

import pytest
from helpers import make_pipeline
from kvpress import KnormPress

from fastkvzip_press import FastKVzipPress
from fastkvzip_press.evaluation import NeedleConfig, make_niah_samples, stdlib_paragraphs
from fastkvzip_press.evaluation.answers import answer_rows, group_by_context


@pytest.fixture(scope="module")
def paragraphs():
    return stdlib_paragraphs()


def test_group_by_context_keeps_runs_with_one_prefix():
    rows = [{"context": c, "answer_prefix": p} for c, p in ["aX", "aX", "aY", "bY", "aY"]]
    assert [len(group) for group in group_by_context(rows)] == [2, 1, 1, 1]


def test_answer_rows_scores_and_measures_the_cache(llama, random_gates, paragraphs):
    model, tokenizer = llama
    rows = make_niah_samples(tokenizer, paragraphs, n_contexts=2, config=NeedleConfig(context_tokens=300), seed=0)
    pipe = make_pipeline(model, tokenizer)
    full = answer_rows(pipe, rows, None, progress=False)
    assert [r["kv_fraction"] for r in full] == pytest.approx([1.0, 1.0], abs=0.02)
    pressed = answer_rows(pipe, rows, FastKVzipPress(0.5, gates=random_gates(model)), progress=False)
    assert all(0.45 < r["kv_fraction"] < 0.7 for r in pressed)
    assert all(r["score"] in (0.0, 1.0) and isinstance(r["prediction"], str) for r in pressed)
    knorm = answer_rows(pipe, rows, KnormPress(0.5), progress=False)  # dense pruning shortens the cache itself
    assert all(0.45 < r["kv_fraction"] < 0.55 for r in knorm)
