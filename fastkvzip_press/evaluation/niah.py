"""Needle-in-a-haystack samples built locally, in kvpress's dataset columns.

Each context is consecutive prose paragraphs of a haystack with needles ("The special magic number for
silver-falcon is 4721093.", "The secret code that opens the amber-harbor vault is 1934877.") inserted between
paragraphs at random depths. Some needles are asked about; the others are distractors (another 7-digit number
near the same kind of sentence). Compression happens before the question
is known, so a press must keep every needle to answer every question.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


ADJECTIVES = (
    "amber", "ancient", "bitter", "brave", "bright", "calm", "clever", "copper", "crimson", "curious", "dusty",
    "eager", "emerald", "faint", "fierce", "frozen", "gentle", "golden", "hidden", "hollow", "humble", "icy",
    "ivory", "jolly", "lively", "lonely", "lucky", "marble", "misty", "noble", "olive", "pale", "proud", "quiet",
    "rapid", "rusty", "scarlet", "silent", "silver", "sleepy", "stormy", "sunny", "swift", "tender", "velvet",
    "violet", "wild", "windy", "wooden", "young",
)  # fmt: skip
NOUNS = (
    "anchor", "badger", "beacon", "canyon", "castle", "comet", "compass", "dolphin", "falcon", "feather", "forest",
    "fountain", "garden", "glacier", "harbor", "island", "lantern", "meadow", "mirror", "monkey", "needle", "orchard",
    "otter", "palace", "pebble", "pepper", "pillow", "planet", "quarry", "rabbit", "ribbon", "river", "saddle",
    "shadow", "spider", "teapot", "thunder", "tiger", "tower", "trumpet", "tulip", "valley", "violin", "walnut",
    "whistle", "willow", "window", "wizard", "zebra", "lighthouse",
)  # fmt: skip

# (needle, question, answer prefix): each context uses distinct templates, so a question names exactly one needle.
TEMPLATES = (
    (
        "The special magic number for {key} is {value}.",
        "What is the special magic number for {key}?",
        "The special magic number for {key} is",
    ),
    (
        "The secret code that opens the {key} vault is {value}.",
        "What is the secret code that opens the {key} vault?",
        "The secret code that opens the {key} vault is",
    ),
    (
        "The registration number of the {key} ship is {value}.",
        "What is the registration number of the {key} ship?",
        "The registration number of the {key} ship is",
    ),
    (
        "The {key} society was founded with {value} members.",
        "With how many members was the {key} society founded?",
        "The {key} society was founded with",
    ),
    (
        "The telephone number of the {key} office is {value}.",
        "What is the telephone number of the {key} office?",
        "The telephone number of the {key} office is",
    ),
    (
        "The {key} library holds exactly {value} books.",
        "How many books does the {key} library hold?",
        "The {key} library holds exactly",
    ),
)


@dataclass(frozen=True)
class NeedleConfig:
    """Shape of the generated samples.

    Attributes:
        context_tokens: target length of each context in tokens (haystack plus needles, before the chat template).
        n_needles: needles per context, each of a different template (at most ``len(TEMPLATES)``).
        n_questions: needles asked about (one row each); the other needles are distractors.
        n_near_misses: extra needles with an asked needle's template and adjective but another noun (hard
            distractors; the default model confuses them even with the full cache, so 0 by default).
        max_new_tokens: generation budget per answer.
    """

    context_tokens: int = 2000
    n_needles: int = 3
    n_questions: int = 1
    n_near_misses: int = 0
    max_new_tokens: int = 10

    def __post_init__(self):
        if not 1 <= self.n_needles <= len(TEMPLATES):
            raise ValueError(f"n_needles must be in [1, {len(TEMPLATES)}] (one template each), got {self.n_needles}")
        if not 1 <= self.n_questions <= self.n_needles:
            raise ValueError(f"n_questions must be in [1, n_needles={self.n_needles}], got {self.n_questions}")
        if self.n_near_misses < 0 or self.context_tokens < 64:
            raise ValueError("n_near_misses must be >= 0 and context_tokens >= 64")


def _keys(rng: random.Random, config: NeedleConfig) -> tuple[list[str], list[str]]:
    """Distinct needle keys, then near-miss keys (same adjective as an asked key, another noun)."""
    adjectives = rng.sample(ADJECTIVES, config.n_needles)
    keys = [f"{adjective}-{noun}" for adjective, noun in zip(adjectives, rng.sample(NOUNS, config.n_needles))]
    used_nouns = {key.split("-")[1] for key in keys}
    spare_nouns = [noun for noun in NOUNS if noun not in used_nouns]
    near_nouns = spare_nouns[: config.n_near_misses]
    near = [f"{adjectives[i % config.n_questions]}-{noun}" for i, noun in enumerate(near_nouns)]
    rng.shuffle(near)
    return keys, near


def make_niah_samples(
    tokenizer: PreTrainedTokenizerBase,
    paragraphs: list[str],
    n_contexts: int = 24,
    config: NeedleConfig | None = None,
    seed: int = 0,
) -> list[dict]:
    """Rows in kvpress's columns: ``context, question, answer_prefix, answer, task, max_new_tokens``.

    Rows that share a context are consecutive (kvpress's evaluation answers them on one compressed cache). Each row
    also carries ``context_id`` and ``depth`` (the asked needle's position in the context, in [0, 1]).

    Args:
        tokenizer: counts tokens to reach ``config.context_tokens``.
        paragraphs: haystack paragraphs (see :mod:`~fastkvzip_press.evaluation.haystack`); consecutive runs of them
            starting at a random paragraph form each haystack, so contexts differ in topic.
        n_contexts: contexts to build; rows = ``n_contexts * config.n_questions``.
    """
    config = config or NeedleConfig()
    if len(paragraphs) < 2:
        raise ValueError("the haystack needs at least 2 paragraphs")
    rng = random.Random(seed)
    lengths = [len(tokenizer.encode(p, add_special_tokens=False)) + 1 for p in paragraphs]
    rows: list[dict] = []
    for context_id in range(n_contexts):
        keys, near = _keys(rng, config)
        templates = rng.sample(TEMPLATES, config.n_needles)
        templates += [templates[i % config.n_questions] for i in range(len(near))]
        values = [str(v) for v in rng.sample(range(1_000_000, 10_000_000), len(keys) + len(near))]
        needles = [t[0].format(key=k, value=v) for t, k, v in zip(templates, keys + near, values)]
        budget = config.context_tokens - sum(len(tokenizer.encode(n, add_special_tokens=False)) + 1 for n in needles)
        start = rng.randrange(len(paragraphs))
        haystack, used = [], 0
        while used < budget and len(haystack) < len(paragraphs):
            index = (start + len(haystack)) % len(paragraphs)
            haystack.append(paragraphs[index])
            used += lengths[index]
        # Insert from the deepest slot down so earlier slots keep their index.
        slots = sorted(((rng.randint(0, len(haystack)), i) for i in range(len(needles))), reverse=True)
        depth_of = {}
        for slot, needle_index in slots:
            haystack.insert(slot, needles[needle_index])
        for position, text in enumerate(haystack):
            if text in needles:
                depth_of[needles.index(text)] = position / max(len(haystack) - 1, 1)
        context = "\n\n".join(haystack)
        for asked in range(config.n_questions):
            rows.append(
                {
                    "context": context,
                    "question": templates[asked][1].format(key=keys[asked]),
                    "answer_prefix": templates[asked][2].format(key=keys[asked]),
                    "answer": [values[asked]],
                    "task": "niah",
                    "max_new_tokens": config.max_new_tokens,
                    "context_id": context_id,
                    "depth": round(depth_of[asked], 3),
                }
            )
    return rows
