"""Fixtures of the evaluation tests: a local tokenizer and RULER-style rows at 1k tokens."""

import pytest

from fastkvzip_press.evaluation.ruler import make_ruler_samples
from fastkvzip_press.models import tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def rows_1k(tokenizer):
    return make_ruler_samples(tokenizer, context_length=1024, n_samples=2, seed=5)
