"""RULER-style generator, kvpress results format, the eval runs and the report, on tiny models."""

import re
from collections import Counter

import pytest

from fastkvzip_press.evaluation.comparison import make_dataset
from fastkvzip_press.evaluation.ruler import (
    MAX_NEW_TOKENS,
    RULER_TASKS,
    cwe_common_repeats,
    make_ruler_samples,
    ruler_metrics,
)

KVPRESS_COLUMNS = {"context", "question", "answer_prefix", "answer", "task", "max_new_tokens"}


def n_tokens(tokenizer, row):
    return len(tokenizer.encode(row["context"] + row["question"] + row["answer_prefix"], add_special_tokens=False))


def test_ruler_rows_have_kvpress_columns_and_fill_the_length(tokenizer, rows_1k):
    assert [row["task"] for row in rows_1k] == [task for task in RULER_TASKS for _ in range(2)]
    for row in rows_1k:
        assert set(row) == KVPRESS_COLUMNS
        budget = 1024 - MAX_NEW_TOKENS[row["task"].split("_")[0]]
        # RULER's fitting: the largest haystack whose input plus the generation budget fits the length
        assert 0.8 * budget <= n_tokens(tokenizer, row) <= budget, row["task"]
        assert isinstance(row["answer"], list) and row["answer"]


def test_ruler_generation_is_deterministic_per_sample(tokenizer, rows_1k):
    assert make_ruler_samples(tokenizer, 1024, 2, seed=5) == rows_1k
    assert make_ruler_samples(tokenizer, 1024, 2, seed=6) != rows_1k
    # sample i depends on (seed, task, i, length) only: asking for fewer samples or tasks keeps it
    assert make_ruler_samples(tokenizer, 1024, 1, tasks=("vt",), seed=5)[0] == rows_1k[6]


def test_niah_tasks_hold_exactly_one_answer_needle(rows_1k):
    for row in rows_1k:
        if not row["task"].startswith("niah"):
            continue
        key = re.search(r"for (\S+) mentioned", row["question"]).group(1)
        needles = re.findall(rf"One of the special magic \w+ for {re.escape(key)} is: (\S+)\.", row["context"])
        assert needles == row["answer"], row["task"]
        assert key in row["answer_prefix"]
    multikey = [row for row in rows_1k if row["task"] == "niah_multikey_3"][0]
    assert multikey["context"].count("One of the special magic uuids for") > 10  # the haystack is other needles
    assert re.fullmatch(r"[0-9a-f-]{36}", multikey["answer"][0])


def test_vt_chain_is_in_order_and_answers_its_value(rows_1k):
    for row in (r for r in rows_1k if r["task"] == "vt"):
        task_text = row["context"].split("\n\n")[-1]  # after the worked example
        value = re.search(r"assigned the value (\d+)", row["question"]).group(1)
        names = row["answer"]
        assert len(names) == 5 and f"VAR {names[0]} = {value}" in task_text
        positions = [task_text.index(f"VAR {names[i + 1]} = VAR {names[i]}") for i in range(4)]
        assert positions == sorted(positions)


def test_cwe_and_fwe_answers_are_the_most_frequent_words(rows_1k):
    cwe = [row for row in rows_1k if row["task"] == "cwe"][0]
    words = re.findall(r"\d+\. (\w+)", cwe["context"].split("\n\n")[-1])
    counts = Counter(words)
    repeats = cwe_common_repeats(1024)
    assert sorted(counts[w] for w in cwe["answer"]) == [repeats] * 10
    assert max(c for w, c in counts.items() if w not in cwe["answer"]) == 3
    fwe = [row for row in rows_1k if row["task"] == "fwe"][0]
    counts = Counter(fwe["context"].split("\n")[0].split(" ")[-1:] + fwe["context"].split())
    top = [w for w in fwe["answer"]]
    others = max(c for w, c in counts.items() if w not in top and w != "..." and len(w) == 6 and w.isalpha())
    assert min(counts[w] for w in top) > others and counts["..."] > counts[top[0]] > counts[top[2]]


def test_ruler_errors_are_clear(tokenizer):
    with pytest.raises(ValueError, match="unknown RULER task"):
        make_ruler_samples(tokenizer, 1024, 1, tasks=("qa_1",))
    with pytest.raises(ValueError, match="longer context length"):
        make_ruler_samples(tokenizer, 150, 1, tasks=("cwe",))
    with pytest.raises(ValueError, match="n_samples"):
        make_ruler_samples(tokenizer, 1024, 0)
    with pytest.raises(ValueError, match="unknown dataset"):
        make_dataset("ruler", tokenizer, 1024, 1)


def test_ruler_metrics_follow_rulers_string_match_all():
    records = [
        {"task": "cwe", "answer": ["a", "b"], "prediction": " A and\x07 b"},
        {"task": "cwe", "answer": ["a", "b"], "prediction": "only a"},
        {"task": "vt", "answer": ["XYZ"], "prediction": "none"},
    ]
    assert ruler_metrics(records) == {"cwe": {"string_match": 75.0}, "vt": {"string_match": 0.0}}
