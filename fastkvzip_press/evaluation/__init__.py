"""Offline evaluation: locally generated long-context tasks, their metrics, and press comparisons."""

from fastkvzip_press.evaluation.haystack import stdlib_paragraphs, text_paragraphs
from fastkvzip_press.evaluation.metrics import string_match
from fastkvzip_press.evaluation.niah import NeedleConfig, make_niah_samples

__all__ = ["NeedleConfig", "make_niah_samples", "stdlib_paragraphs", "string_match", "text_paragraphs"]
