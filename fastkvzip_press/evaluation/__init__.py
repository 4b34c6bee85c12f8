"""Offline evaluation: locally generated long-context tasks, their metrics, press comparisons in kvpress's results
format, reports, and kvpress's own evaluation harness with our presses registered."""

from fastkvzip_press.evaluation.haystack import stdlib_paragraphs, text_paragraphs
from fastkvzip_press.evaluation.metrics import string_match
from fastkvzip_press.evaluation.niah import NeedleConfig, make_niah_samples
from fastkvzip_press.evaluation.ruler import RULER_TASKS, make_ruler_samples, ruler_metrics

__all__ = [
    "RULER_TASKS",
    "NeedleConfig",
    "make_niah_samples",
    "make_ruler_samples",
    "ruler_metrics",
    "stdlib_paragraphs",
    "string_match",
    "text_paragraphs",
]
