"""What an engine and each of its requests ask of Fast KVzip: read and checked here, without importing vLLM.

Engine-wide settings come from vLLM's ``additional_config`` under the key ``"fastkvzip"`` (``--additional-config``
on the command line, ``additional_config=`` for ``vllm.LLM``); the section's presence turns the integration on.
A request chooses its own ratio and budget with ``SamplingParams(extra_args={"fastkvzip_ratio": r,
"fastkvzip_budget": "uniform"})`` (``vllm_xargs`` in an OpenAI-API request); ratio ``0`` turns compression off for
that request. Both budgets store alike (each head its own length), so requests of one engine may mix them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from numbers import Real
from typing import Any

from fastkvzip_press.checks import require_bool, require_choice, require_int, require_real, require_window
from fastkvzip_press.eviction import Protection
from fastkvzip_press.vllm.schedule import BUDGETS, Budget, RequestSchedule

SECTION = "fastkvzip"
REQUEST_PREFIX = "fastkvzip_"
REQUEST_RATIO = "fastkvzip_ratio"
REQUEST_BUDGET = "fastkvzip_budget"
REQUEST_KEYS = (REQUEST_RATIO, REQUEST_BUDGET)
ATTENTION_PATHS = ("auto", "torch")
# FastKVzipPress's protection defaults, so that the engine and the transformers reference decide alike.
DEFAULT_N_SINK = 4
DEFAULT_WINDOW = 0.02


class RequestSettingError(ValueError):
    """A request's ``extra_args`` asks for something the engine cannot do; the message names the key."""


@dataclass(frozen=True)
class RequestSettings:
    """What one request asks for: the fraction of its prompt's pairs evicted (0: none) and the budget."""

    ratio: float
    budget: Budget


@dataclass(frozen=True)
class EngineSettings:
    """The ``"fastkvzip"`` section of vLLM's ``additional_config``.

    Attributes:
        gates: gate file or folder; ``None``: the gates this package ships for the served model.
        ratio: fraction of each prompt's KV pairs evicted when a request does not say, in [0, 1); 0 = only requests
            that ask are compressed.
        budget: ``"global"`` (one count over all layers and KV heads, each head keeps what it needs:
            ``FastKVzipPress()``) or ``"uniform"`` (the same count in every layer and head:
            ``FastKVzipPress(uniform=True)``), when a request does not say.
        n_sink: leading tokens never evicted.
        window_size: recent prompt tokens never evicted (a count, or a fraction of the prompt in (0, 1)).
        chunk_size: compact every ``chunk_size`` prompt tokens during the prefill (``FastKVzipPress(chunk_size=...)``:
            the last window of each chunk waits for the next), so that a prompt never sits whole in the pool and more
            requests are admitted; ``None``: compact once, when the prefill completes.
        attention: ``"auto"`` (vLLM's own CPU attention kernel per head on CPU, the Triton kernel on CUDA) or
            ``"torch"`` (the package's torch path, any device).
        allow_other_model: serve with gates trained for another model of the same shapes (a fine-tune of it).
        events: a JSON-lines file that receives one record per compaction and per scheduler step (tests, benchmarks).
        record_kept: also write each head's kept token indices into ``events``.
    """

    gates: str | None = None
    ratio: float = 0.0
    budget: Budget = "global"
    n_sink: int = DEFAULT_N_SINK
    window_size: int | float = DEFAULT_WINDOW
    chunk_size: int | None = None
    attention: str = "auto"
    allow_other_model: bool = False
    events: str | None = None
    record_kept: bool = False

    def __post_init__(self):
        if self.gates is not None and (not isinstance(self.gates, str) or not self.gates.strip()):
            raise ValueError(f"{SECTION}.gates must be a gate file or folder path, got {self.gates!r}")
        object.__setattr__(
            self, "ratio", require_real(f"{SECTION}.ratio", self.ratio, 0, 1, high_open=True, meaning=_RATIO_MEANING)
        )
        require_choice(f"{SECTION}.budget", self.budget, BUDGETS)
        require_choice(f"{SECTION}.attention", self.attention, ATTENTION_PATHS)
        object.__setattr__(self, "n_sink", require_int(f"{SECTION}.n_sink", self.n_sink, minimum=0))
        object.__setattr__(self, "window_size", require_window(f"{SECTION}.window_size", self.window_size))
        if self.chunk_size is not None:
            name = f"{SECTION}.chunk_size (prompt tokens per compaction, or null for one after the prefill)"
            object.__setattr__(self, "chunk_size", require_int(name, self.chunk_size, minimum=1))
        if self.events is not None and not isinstance(self.events, str):
            raise ValueError(f"{SECTION}.events must be a file path, got {self.events!r}")
        require_bool(f"{SECTION}.record_kept", self.record_kept)
        require_bool(f"{SECTION}.allow_other_model", self.allow_other_model)

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> EngineSettings | None:
        """The settings, or ``None`` when the engine was started without a ``"fastkvzip"`` section."""
        if not isinstance(additional_config, Mapping) or SECTION not in additional_config:
            return None
        section = additional_config[SECTION]
        if section is None:
            section = {}
        if not isinstance(section, Mapping):
            raise ValueError(f"additional_config[{SECTION!r}] must be a JSON object, got {type(section).__name__}")
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"unknown {SECTION} setting(s) {unknown}; known: {sorted(known)}")
        return cls(**section)

    @property
    def protection(self) -> Protection:
        return Protection(self.n_sink, self.window_size)

    def request(self, extra_args: Mapping[str, Any] | None) -> RequestSettings:
        """What a request with these ``extra_args`` asks for (the engine's defaults where it says nothing); raises
        :class:`RequestSettingError` for a bad or unknown ``fastkvzip_*`` key."""
        check_request_keys(extra_args)
        extra_args = extra_args or {}
        ratio = check_request_ratio(extra_args[REQUEST_RATIO]) if REQUEST_RATIO in extra_args else self.ratio
        budget = check_request_budget(extra_args[REQUEST_BUDGET]) if REQUEST_BUDGET in extra_args else self.budget
        return RequestSettings(ratio, budget)

    def schedule(
        self, prompt_tokens: int, request: RequestSettings, heads: int, block_size: int
    ) -> RequestSchedule | None:
        """Where a request's prompt is compacted over ``heads`` layers x KV heads and what each compaction decides;
        ``None``: nothing is evicted (ratio 0, or a prompt no longer than the protected sink and window)."""
        return RequestSchedule.build(
            prompt_tokens, request.ratio, request.budget, self.protection, self.chunk_size, heads, block_size
        )


_RATIO_MEANING = "the fraction of the prompt's KV pairs evicted; 0 = no compression"


def check_request_ratio(value: Any) -> float:
    """A request's ``fastkvzip_ratio`` as a float in [0, 1), or :class:`RequestSettingError` saying what is wrong."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise RequestSettingError(
            f"extra_args[{REQUEST_RATIO!r}] must be a number in [0, 1) ({_RATIO_MEANING}), got {value!r}"
        )
    value = float(value)
    if not 0 <= value < 1:  # NaN fails too
        raise RequestSettingError(f"extra_args[{REQUEST_RATIO!r}] must be in [0, 1) ({_RATIO_MEANING}), got {value}")
    return value


def check_request_budget(value: Any) -> Budget:
    """A request's ``fastkvzip_budget``, or :class:`RequestSettingError` saying what it takes."""
    if value not in BUDGETS:
        raise RequestSettingError(f"extra_args[{REQUEST_BUDGET!r}] must be one of {list(BUDGETS)}, got {value!r}")
    return value


def check_request_keys(extra_args: Mapping[str, Any] | None) -> None:
    """Refuse ``fastkvzip_*`` keys the integration does not know (a misspelt key would otherwise be ignored)."""
    unknown = sorted(k for k in extra_args or () if str(k).startswith(REQUEST_PREFIX) and k not in REQUEST_KEYS)
    if unknown:
        raise RequestSettingError(
            f"unknown Fast KVzip request setting(s) {unknown} in extra_args; known: {list(REQUEST_KEYS)}"
        )


def check_request(extra_args: Mapping[str, Any] | None, settings: EngineSettings | None) -> None:
    """Refuse a request the engine cannot serve as asked: a bad or unknown ``fastkvzip_*`` key, or compression asked
    of an engine without Fast KVzip."""
    if settings is not None:
        settings.request(extra_args)
        return
    check_request_keys(extra_args)
    if not extra_args or not any(key in extra_args for key in REQUEST_KEYS):
        return
    ratio = check_request_ratio(extra_args[REQUEST_RATIO]) if REQUEST_RATIO in extra_args else 0.0
    if REQUEST_BUDGET in extra_args:
        check_request_budget(extra_args[REQUEST_BUDGET])
    if ratio > 0:
        raise RequestSettingError(
            f"extra_args[{REQUEST_RATIO!r}]={ratio} asks for compression, but this engine was started without Fast "
            f"KVzip: start it with --additional-config '{{\"{SECTION}\": {{}}}}' (additional_config= for vllm.LLM)"
        )
