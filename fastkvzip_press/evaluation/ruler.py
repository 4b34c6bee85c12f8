"""RULER's synthetic tasks that need no downloaded data, generated locally and deterministically.

Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context Language Models?" (arXiv 2404.06654).
kvpress's ``ruler`` dataset is RULER's ``prepare.py --benchmark synthetic`` output split into kvpress's columns;
this module rebuilds the six tasks whose inputs are fully synthetic, with RULER's templates, needle formats and
task parameters:

========================  =======================================================================================
niah_single_1             one ``adjective-noun`` key with a 7-digit value in a repeated "The grass is green..." text
niah_multikey_2           one asked needle hidden among needles of the same form (word keys, number values)
niah_multikey_3           the same with UUID keys and UUID values
vt                        variable tracking: one chain of 4 hops (``VAR ABCDE = 12345``, ``VAR FGHIJ = VAR ABCDE``)
                          in repeated noise; the answer is the 5 variables; one worked example precedes it
cwe                       common-words extraction: a numbered list where 10 words appear 30 times (fewer below 4k
                          tokens, see :func:`cwe_common_repeats`) and the others 3 times; the answer is the 10
                          common words; one worked example precedes it
fwe                       frequent-words extraction: random 6-letter "coded words" with Zipf (alpha 2) frequencies;
                          the answer is the 3 most frequent ones after the noise word "..."
========================  =======================================================================================

Differences from kvpress's hub dataset, so scores here are not comparable with the leaderboard's: lengths are
fitted with the evaluated model's tokenizer (kvpress used Llama-3.1's), the random draws differ, and the word lists
are local: needle keys come from :data:`~fastkvzip_press.evaluation.niah.ADJECTIVES` x ``NOUNS``, the cwe
vocabulary from the words of the standard library's docstrings.
"""

from __future__ import annotations

import random
import re
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from fastkvzip_press.evaluation.haystack import stdlib_paragraphs
from fastkvzip_press.evaluation.metrics import string_match
from fastkvzip_press.evaluation.niah import ADJECTIVES, NOUNS

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

RULER_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "vt", "cwe", "fwe")
# RULER's generation budgets per task family (kvpress's create_huggingface_dataset.py).
MAX_NEW_TOKENS = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50}

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NIAH_NEEDLE = "One of the special magic {type_v} for {key} is: {value}."
NIAH_INSTRUCTION = (
    "A special magic {type_v1} is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_v1} afterwards.\n"
)
NIAH_QUESTION = "What is the special magic {type_v1} for {key} mentioned in the provided text? "
NIAH_ANSWER_PREFIX = "The special magic {type_v1} for {key} mentioned in the provided text is"
VT_INSTRUCTION = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
VT_QUESTION = "Question: Find all variables that are assigned the value {value} in the text above. "
VT_ANSWER_PREFIX = (
    "Answer: According to the chain(s) of variable assignment in the text above, {n} variables are assigned the "
    "value {value}, they are: "
)
CWE_INSTRUCTION = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n"
)
CWE_QUESTION = "Question: What are the 10 most common words in the above list? "
CWE_ANSWER_PREFIX = "Answer: The top 10 words that appear most often in the list are:"
FWE_INSTRUCTION = (
    "Read the following coded text and track the frequency of each coded word. "
    "Find the three most frequently appeared coded words. "
)
FWE_QUESTION = (
    "Question: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text? "
)
FWE_ANSWER_PREFIX = "Answer: According to the coded text above, the three most frequently appeared words are:"


@dataclass(frozen=True)
class TaskText:
    """One generated sample before splitting into kvpress's columns."""

    context: str
    question: str
    answer_prefix: str
    answer: list[str]


# A task builder maps (rng, size) to a sample; ``size`` is the number of haystack units, fitted to the length.
TaskBuilder = Callable[[random.Random, int], TaskText]


def _word_key(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _niah(haystack: str, key_kind: str, value_kind: str) -> TaskBuilder:
    """RULER's niah generator with one key, one value and one query."""
    make_key = _uuid if key_kind == "uuids" else _word_key
    make_value = _uuid if value_kind == "uuids" else _number
    type_v1 = value_kind[:-1]  # RULER's singular form when one value is asked

    def build(rng: random.Random, size: int) -> TaskText:
        key, value = make_key(rng), make_value(rng)
        if haystack == "repeat":
            sentences = [NOISE] * size
        else:  # "needle": the haystack is other needles of the same form
            sentences = []
            for _ in range(size):
                other = make_key(rng)
                while other == key:
                    other = make_key(rng)
                sentences.append(NIAH_NEEDLE.format(type_v=value_kind, key=other, value=make_value(rng)))
        sentences.insert(rng.randint(0, size), NIAH_NEEDLE.format(type_v=value_kind, key=key, value=value))
        context = NIAH_INSTRUCTION.format(type_v1=type_v1) + "\n".join(sentences) + "\n"
        return TaskText(
            context,
            NIAH_QUESTION.format(type_v1=type_v1, key=key),
            NIAH_ANSWER_PREFIX.format(type_v1=type_v1, key=key),
            [value],
        )

    return build


def _vt_body(rng: random.Random, n_noise: int, n_hops: int, name_length: int) -> tuple[str, str, list[str]]:
    """Noise sentences with one assignment chain inserted in order; returns (text, value, variables)."""
    names: list[str] = []
    while len(names) < n_hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=name_length))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(n_hops)]
    sentences = [NOISE] * n_noise
    positions = sorted(rng.sample(range(n_noise + 1), len(chain))) if n_noise + 1 >= len(chain) else []
    if not positions:
        raise ValueError("the context is too short for a variable-tracking chain; use a longer context length")
    for offset, (position, statement) in enumerate(zip(positions, chain)):
        sentences.insert(position + offset, statement)
    return "\n".join(sentences), value, names


def _vt(n_hops: int = 4) -> TaskBuilder:
    def build(rng: random.Random, size: int) -> TaskText:
        demo_text, demo_value, demo_names = _vt_body(rng, 8, n_hops, 3)
        demo = (
            VT_INSTRUCTION + demo_text + "\n" + VT_QUESTION.format(value=demo_value)
            + VT_ANSWER_PREFIX.format(n=n_hops + 1, value=demo_value) + " ".join(demo_names) + "\n\n"
        )  # fmt: skip
        text, value, names = _vt_body(rng, size, n_hops, 5)
        return TaskText(
            demo + VT_INSTRUCTION + text + "\n",
            VT_QUESTION.format(value=value),
            VT_ANSWER_PREFIX.format(n=n_hops + 1, value=value),
            names,
        )

    return build


@lru_cache(maxsize=1)
def cwe_vocabulary() -> tuple[str, ...]:
    """Distinct lowercase words of 4-10 letters from the standard library's docstring prose, sorted."""
    words = {w for p in stdlib_paragraphs() for w in re.findall(r"\b[a-z]{4,10}\b", p)}
    return tuple(sorted(words))


def _cwe_list(rng: random.Random, n_words: int, n_common: int, common_repeats: int, rare_repeats: int):
    chosen = rng.sample(cwe_vocabulary(), n_common + n_words)
    common, rare = chosen[:n_common], chosen[n_common:]
    words = common * common_repeats + rare * rare_repeats
    rng.shuffle(words)
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(words)), common


def _cwe(n_common: int = 10, common_repeats: int = 30, rare_repeats: int = 3) -> TaskBuilder:
    def build(rng: random.Random, size: int) -> TaskText:
        demo_list, demo_common = _cwe_list(rng, 10, n_common, 3, 1)
        demo = CWE_INSTRUCTION + demo_list + "\n" + CWE_QUESTION + CWE_ANSWER_PREFIX + " " + " ".join(demo_common)
        text, common = _cwe_list(rng, size, n_common, common_repeats, rare_repeats)
        return TaskText(demo + "\n\n" + CWE_INSTRUCTION + text + "\n", CWE_QUESTION, CWE_ANSWER_PREFIX, common)

    return build


def _fwe_text(rng: random.Random, n_words: int, alpha: float, vocab_size: int = 2000) -> tuple[str, list[str]]:
    """Coded words with Zipf frequencies; rank 0 is the noise word "...", ranks 1-3 are the answer."""
    vocab: list[str] = []
    seen: set[str] = set()
    while len(vocab) < vocab_size:
        word = "".join(rng.choices(string.ascii_lowercase, k=6))
        if word not in seen:
            seen.add(word)
            vocab.append(word)
    vocab[0] = "..."
    zeta = sum(k**-alpha for k in range(1, 10_000))
    counts = [int(n_words * k**-alpha / zeta) for k in range(1, vocab_size + 1)]
    words = [word for word, count in zip(vocab, counts) for _ in range(count)]
    rng.shuffle(words)
    return " ".join(words), vocab[1:4]


def _fwe(alpha: float = 2.0) -> TaskBuilder:
    def build(rng: random.Random, size: int) -> TaskText:
        text, answer = _fwe_text(rng, size, alpha)
        return TaskText(FWE_INSTRUCTION + text + "\n", FWE_QUESTION, FWE_ANSWER_PREFIX, answer)

    return build


def cwe_common_repeats(context_length: int) -> int:
    """RULER's 30 repeats of each common word at 4k tokens and above; proportionally fewer below, so that the
    common words fill about half of a shorter context, as they do at 4k."""
    return max(3, min(30, round(30 * context_length / 4096)))


# Per task: a builder for a context length, and the smallest haystack size worth trying.
TASK_BUILDERS: dict[str, tuple[Callable[[int], TaskBuilder], int]] = {
    "niah_single_1": (lambda length: _niah("repeat", "words", "numbers"), 1),
    "niah_multikey_2": (lambda length: _niah("needle", "words", "numbers"), 1),
    "niah_multikey_3": (lambda length: _niah("needle", "uuids", "uuids"), 1),
    "vt": (lambda length: _vt(), 5),
    "cwe": (lambda length: _cwe(common_repeats=cwe_common_repeats(length)), 0),
    "fwe": (lambda length: _fwe(), 40),
}


def _n_tokens(tokenizer: PreTrainedTokenizerBase, sample: TaskText) -> int:
    text = sample.context + sample.question + sample.answer_prefix
    return len(tokenizer.encode(text, add_special_tokens=False))


def _fit(build: TaskBuilder, smallest: int, seed_text: str, budget: int, tokenizer) -> TaskText:
    """The largest sample whose input fits ``budget`` tokens (RULER's fitting, by bisection on the size)."""

    def sample(size: int) -> TaskText:
        return build(random.Random(seed_text), size)  # same draws for every size: fitting is deterministic

    if _n_tokens(tokenizer, sample(smallest)) > budget:
        raise ValueError(
            f"{seed_text.split('|')[1]}: even the smallest sample exceeds {budget} tokens; use a longer context length"
        )
    low, high = smallest, max(2 * smallest, 16)
    while _n_tokens(tokenizer, sample(high)) <= budget:
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        if _n_tokens(tokenizer, sample(middle)) <= budget:
            low = middle
        else:
            high = middle
    return sample(low)


def make_ruler_samples(
    tokenizer: PreTrainedTokenizerBase,
    context_length: int = 4096,
    n_samples: int = 10,
    tasks: tuple[str, ...] = RULER_TASKS,
    seed: int = 0,
) -> list[dict]:
    """Rows in kvpress's ``ruler`` columns: ``context, question, answer_prefix, answer, task, max_new_tokens``.

    Like RULER, each sample's input (context + question + answer prefix, in ``tokenizer``'s tokens, before any chat
    template) plus the task's generation budget fits ``context_length``; the haystack is as long as that allows.
    Sample ``i`` of a task depends only on ``(seed, task, i, context_length)``, so adding samples or tasks keeps
    the existing ones.
    """
    unknown = [task for task in tasks if task not in TASK_BUILDERS]
    if unknown:
        raise ValueError(f"unknown RULER task(s) {unknown}; choose from {RULER_TASKS}")
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    rows = []
    for task in tasks:
        make_builder, smallest = TASK_BUILDERS[task]
        build = make_builder(context_length)
        max_new_tokens = MAX_NEW_TOKENS[task.split("_")[0]]
        budget = context_length - max_new_tokens
        if budget <= 0:
            raise ValueError(
                f"context length {context_length} leaves no room for {task}'s input: its answer alone takes "
                f"{max_new_tokens} tokens. Use a context length (--data-dir) above {max_new_tokens}, e.g. 1024"
            )
        for index in range(n_samples):
            sample = _fit(build, smallest, f"{seed}|{task}|{index}|{context_length}", budget, tokenizer)
            rows.append(
                {
                    "context": sample.context,
                    "question": sample.question,
                    "answer_prefix": sample.answer_prefix,
                    "answer": sample.answer,
                    "task": task,
                    "max_new_tokens": max_new_tokens,
                }
            )
    return rows


def ruler_metrics(records: list[dict]) -> dict[str, dict[str, float]]:
    """kvpress's ``ruler`` metrics: ``{task: {"string_match": percent}}``, all references required per row
    (RULER's ``string_match_all``), control characters stripped from predictions, rounded to 2 decimals."""
    by_task: dict[str, list[float]] = {}
    for record in records:
        prediction = re.sub(r"[\x00-\x1f]", "", record["prediction"].strip()).strip()
        by_task.setdefault(record["task"], []).append(string_match(prediction, list(record["answer"])))
    return {task: {"string_match": round(100 * sum(s) / len(s), 2)} for task, s in sorted(by_task.items())}
