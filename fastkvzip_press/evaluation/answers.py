"""Answer dataset rows with a press through kvpress's pipeline, one compressed cache per context."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, Pipeline

from fastkvzip_press.cache import full_cache_bytes, kv_cache_bytes
from fastkvzip_press.evaluation.metrics import string_match

logger = logging.getLogger(__name__)


def group_by_context(rows: list[dict]) -> Iterator[list[dict]]:
    """Runs of consecutive rows that share a context (and answer prefix, which the pipeline takes once)."""
    group: list[dict] = []
    for row in rows:
        if group and (row["context"] != group[0]["context"] or row["answer_prefix"] != group[0]["answer_prefix"]):
            yield group
            group = []
        group.append(row)
    if group:
        yield group


def achieved_ratio(press) -> float:
    """The ratio a press reached on the last context: a threshold press's from its stats, else its setting (0
    without a press)."""
    if press is None:
        return 0.0
    stats = getattr(press, "last_stats", None)
    if getattr(press, "threshold", None) is not None and stats is not None:
        return float(stats.compression_ratio)
    return float(getattr(press, "compression_ratio", 0.0))


def answer_rows(pipe: Pipeline, rows: list[dict], press=None, progress: bool = True, desc: str = "") -> list[dict]:
    """Answer every row; returns one record per row with ``prediction``, ``score``, ``kv_fraction`` and
    ``compression_ratio``.

    Rows with the same context are answered together: the context is prefilled (and compressed) once and each
    question is asked on that cache, as kvpress's evaluation does. Questions differing in ``answer_prefix`` are
    asked one at a time, since the pipeline takes one prefix per call. ``kv_fraction`` is the stored KV bytes after
    answering over the bytes of a full cache of the context (a ragged cache includes its spare rows).
    ``compression_ratio`` is the press's ratio after the context, as kvpress's evaluation records it (a threshold
    press reports the ratio it achieved; 0 without a press). A context the press or the model refuses (too short,
    say) fails alone: its rows get an empty prediction, score 0 and the reason in ``error`` (only failed rows have
    that key).
    """
    results = []
    groups = list(group_by_context(rows))
    for group in tqdm(groups, desc=desc or "contexts", disable=not progress, leave=False):
        cache = DynamicCache()
        try:
            with torch.inference_mode():
                output = pipe(
                    group[0]["context"],
                    questions=[row["question"] for row in group],
                    answer_prefix=group[0]["answer_prefix"],
                    press=press,
                    cache=cache,
                    max_new_tokens=max(row["max_new_tokens"] for row in group),
                )
        except (ValueError, RuntimeError, IndexError, AssertionError) as error:
            # One bad sample (a context too short for the press, say) costs its rows, not the run.
            reason = f"{type(error).__name__}: {error}"
            logger.warning("%d rows failed (%s); they score 0 and the run goes on", len(group), reason)
            for row in group:
                failed = {"prediction": "", "score": 0.0, "kv_fraction": float("nan"), "compression_ratio": 0.0}
                results.append({**row, **failed, "error": reason})
            continue
        # The context's own length: a dense press that prunes shortens the cache's reported length too.
        n_tokens = pipe.preprocess(group[0]["context"], [], "", 10**9)["context_ids"].shape[1]
        full = full_cache_bytes(pipe.model, n_tokens)
        kv_fraction = kv_cache_bytes(cache) / full if full else 1.0
        ratio = achieved_ratio(press)
        for row, prediction in zip(group, output["answers"]):
            answers = row["answer"] if isinstance(row["answer"], list) else [row["answer"]]
            score = string_match(prediction, answers)
            measured = {"kv_fraction": kv_fraction, "compression_ratio": ratio}
            results.append({**row, "prediction": prediction, "score": score, **measured})
    return results
