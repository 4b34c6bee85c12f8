import re

import pytest

from fastkvzip_press.evaluation import NeedleConfig, make_niah_samples, stdlib_paragraphs, string_match, text_paragraphs
from fastkvzip_press.evaluation.niah import TEMPLATES
from fastkvzip_press.models import tiny_tokenizer

KVPRESS_COLUMNS = {"context", "question", "answer_prefix", "answer", "task", "max_new_tokens"}


@pytest.fixture(scope="module")
def paragraphs():
    return stdlib_paragraphs()


def test_stdlib_haystack_is_prose_and_deterministic(paragraphs):
    assert len(paragraphs) > 200 and sum(map(len, paragraphs)) > 100_000
    assert paragraphs == stdlib_paragraphs()
    assert len(set(paragraphs)) == len(paragraphs)
    assert not any(">>>" in p for p in paragraphs)


def test_text_paragraphs_reads_a_file_and_rejects_empty_ones(tmp_path):
    path = tmp_path / "story.txt"
    path.write_text("Short.\n\n" + "A long paragraph of running English text about a harbor town. " * 3 + "\n")
    assert len(text_paragraphs(path)) == 1
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no prose paragraphs"):
        text_paragraphs(tmp_path / "empty.txt")


def test_niah_samples_have_kvpress_columns_needles_and_distractors(paragraphs):
    tokenizer = tiny_tokenizer()
    config = NeedleConfig(context_tokens=600, n_needles=4, n_questions=2)
    rows = make_niah_samples(tokenizer, paragraphs, n_contexts=5, config=config, seed=3)
    assert len(rows) == 10 and all(KVPRESS_COLUMNS <= set(row) for row in rows)
    assert rows == make_niah_samples(tokenizer, paragraphs, n_contexts=5, config=config, seed=3)
    assert rows != make_niah_samples(tokenizer, paragraphs, n_contexts=5, config=config, seed=4)
    contexts = list(dict.fromkeys(row["context"] for row in rows))
    assert len(contexts) == 5
    for row in rows:
        context = row["context"]
        n_tokens = len(tokenizer.encode(context, add_special_tokens=False))
        assert 550 <= n_tokens <= 800, n_tokens
        numbers = re.findall(r"\b\d{7}\b", context)
        assert len(numbers) == 4 and row["answer"][0] in numbers  # the asked needle and three distractors
        assert context.count(row["answer"][0]) == 1 and 0 <= row["depth"] <= 1
        assert row["answer_prefix"] and row["answer_prefix"].split()[-1] in {t[2].split()[-1] for t in TEMPLATES}
    # The two questions of a context ask about different needles.
    assert rows[0]["answer"] != rows[1]["answer"] and rows[0]["context"] == rows[1]["context"]


def test_niah_config_rejects_impossible_shapes():
    with pytest.raises(ValueError, match="n_needles"):
        NeedleConfig(n_needles=len(TEMPLATES) + 1)
    with pytest.raises(ValueError, match="n_questions"):
        NeedleConfig(n_needles=2, n_questions=3)


def test_string_match_is_ruler_string_match_all():
    assert string_match("The number is 4172.", ["4172"]) == 1.0
    assert string_match("ADA Fenwick and 4172", ["ada fenwick", "9"]) == 0.5
    with pytest.raises(ValueError):
        string_match("x", [])
