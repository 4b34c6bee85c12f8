"""Answer metrics."""

from __future__ import annotations


def string_match(prediction: str, references: list[str]) -> float:
    """RULER's ``string_match_all``: the share of reference strings found in the prediction, case-insensitive."""
    if not references:
        raise ValueError("string_match needs at least one reference answer")
    text = prediction.lower()
    return sum(reference.lower() in text for reference in references) / len(references)
