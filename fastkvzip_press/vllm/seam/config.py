"""Engine configuration: refuse what the head-wise store cannot serve, check the settings, gates and events file,
and point the engine at the integration's scheduler, worker and request check, all before any engine process
starts. The one patch of the integration (:func:`install`) sees every engine's configuration and changes only those
with a ``"fastkvzip"`` section."""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path

from vllm.engine.arg_utils import EngineArgs
from vllm.exceptions import VLLMValidationError
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
from vllm.v1.sample.logits_processor import LogitsProcessor

from fastkvzip_press.vllm.engine_gates import EngineGatesError, engine_gates
from fastkvzip_press.vllm.settings import SECTION, EngineSettings, RequestSettingError, check_request
from fastkvzip_press.vllm.version import check_vllm_version

logger = logging.getLogger("vllm.fastkvzip")

SCHEDULER = "fastkvzip_press.vllm.seam.scheduler.FastKVzipScheduler"
WORKERS = {
    "vllm.v1.worker.cpu_worker.CPUWorker": "fastkvzip_press.vllm.seam.worker.FastKVzipCPUWorker",
    "vllm.v1.worker.gpu_worker.Worker": "fastkvzip_press.vllm.seam.worker.FastKVzipGPUWorker",
}
DEFAULT_SCHEDULERS = (None, "vllm.v1.core.sched.scheduler.Scheduler")
REQUEST_CHECK = "fastkvzip_press.vllm.seam.config:FastKVzipRequestCheck"


class EngineConfigError(ValueError):
    """The engine's configuration and Fast KVzip do not go together; the message names the option to change."""


def unsupported(vllm_config) -> list[str]:
    """What in ``vllm_config`` the head-wise store cannot serve, each with the option that avoids it."""
    problems = []
    if vllm_config.cache_config.enable_prefix_caching:
        problems.append(
            "prefix caching shares blocks between requests and compaction rewrites them: start the engine with "
            "enable_prefix_caching=False (--no-enable-prefix-caching)"
        )
    if vllm_config.cache_config.cache_dtype != "auto":
        problems.append("quantized KV caches are not supported: leave kv_cache_dtype at 'auto'")
    text_config = vllm_config.model_config.hf_text_config
    layer_types = getattr(text_config, "layer_types", None) or ()
    if getattr(text_config, "sliding_window", None) or any(kind != "full_attention" for kind in layer_types):
        problems.append(
            "the model has sliding-window layers, whose blocks vLLM frees by position; only models whose layers "
            "all attend to the full context are supported"
        )
    if vllm_config.speculative_config is not None:
        problems.append("speculative decoding is not supported with compaction: leave speculative_config unset")
    if getattr(vllm_config.scheduler_config, "async_scheduling", False):
        problems.append(
            "asynchronous scheduling would free blocks a step still in flight writes: start the engine with "
            "async_scheduling=False (--no-async-scheduling)"
        )
    if not vllm_config.model_config.enforce_eager:
        problems.append(
            "the gates read each layer's inputs through module hooks, which compiled graphs skip: start the engine "
            "with enforce_eager=True (--enforce-eager)"
        )
    if vllm_config.kv_transfer_config is not None:
        problems.append("KV transfer connectors are not supported with compaction: leave kv_transfer_config unset")
    parallel = vllm_config.parallel_config
    if parallel.pipeline_parallel_size > 1 or parallel.tensor_parallel_size > 1:
        problems.append(
            "one budget over all layers and heads needs every head's scores in one worker: use "
            "tensor_parallel_size=1 and pipeline_parallel_size=1"
        )
    if vllm_config.use_v2_model_runner:
        problems.append("vLLM's V2 model runner is not supported: unset VLLM_USE_V2_MODEL_RUNNER")
    if parallel.worker_cls not in WORKERS:
        problems.append(f"the integration brings its own worker; leave worker_cls unset (got {parallel.worker_cls!r})")
    if vllm_config.scheduler_config.scheduler_cls not in DEFAULT_SCHEDULERS:
        problems.append("the integration brings its own scheduler; leave scheduler_cls unset")
    return problems


def check_engine(vllm_config) -> EngineSettings | None:
    """The engine's Fast KVzip settings (``None``: not asked for), after refusing what it cannot serve: unsupported
    options, gates that do not fit the model, an events file that cannot be written, a window that protects every
    prompt."""
    try:
        settings = EngineSettings.from_additional_config(vllm_config.additional_config)
    except ValueError as error:
        raise EngineConfigError(f"additional_config[{SECTION!r}]: {error}") from None
    if settings is None:
        misspelt = close_to_section(vllm_config.additional_config)
        if misspelt:
            raise EngineConfigError(
                f"additional_config has {misspelt!r}, not {SECTION!r}: Fast KVzip reads the {SECTION!r} section "
                "(the engine would serve without compression)"
            )
        return None
    import vllm

    check_vllm_version(vllm.__version__)
    problems = unsupported(vllm_config)
    max_len = vllm_config.model_config.max_model_len
    if isinstance(settings.window_size, int) and settings.n_sink + settings.window_size >= max_len:
        problems.append(
            f"{SECTION}.n_sink + window_size ({settings.n_sink} + {settings.window_size}) protect every prompt of up "
            f"to max_model_len={max_len} tokens, so nothing would ever be compacted: use a smaller window_size (a "
            "fraction such as 0.02 follows each prompt's length)"
        )
    if settings.events is not None:
        problems.extend(_events_problem(settings.events))
    if problems:
        raise EngineConfigError("Fast KVzip cannot run in this vLLM engine: " + "; ".join(problems))
    try:
        engine_gates(settings, vllm_config.model_config.hf_config, vllm_config.model_config.model)
    except EngineGatesError as error:
        raise EngineConfigError(f"Fast KVzip cannot run in this vLLM engine: {error}") from None
    return settings


def close_to_section(additional_config) -> str | None:
    """A key of ``additional_config`` that looks like a misspelt ``"fastkvzip"`` (``None`` when there is none)."""
    if not isinstance(additional_config, dict):
        return None
    keys = [key for key in additional_config if isinstance(key, str)]
    close = difflib.get_close_matches(SECTION, [key.lower() for key in keys], n=1, cutoff=0.75)
    return next((key for key in keys if close and key.lower() == close[0]), None)


def _events_problem(path: str) -> list[str]:
    """Whether the events file can be appended to (created if missing), as a list of at most one problem."""
    target = Path(path).expanduser()
    if target.is_dir():
        return [f"{SECTION}.events {path!r} is a folder: give a file path"]
    try:
        descriptor = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as error:
        return [f"{SECTION}.events {path!r} cannot be written ({error.strerror}): give a writable file path"]
    os.close(descriptor)
    return []


def point_engine_at_integration(vllm_config) -> None:
    """Make the engine use the integration's scheduler and worker, and check each request's settings in the front
    end (a bad value answered with HTTP 400)."""
    parallel = vllm_config.parallel_config
    parallel.worker_cls = WORKERS[parallel.worker_cls]
    vllm_config.scheduler_config.scheduler_cls = SCHEDULER
    if parallel.worker_cls != WORKERS["vllm.v1.worker.cpu_worker.CPUWorker"]:
        from fastkvzip_press.vllm.seam.backend import BACKEND

        register_backend(AttentionBackendEnum.CUSTOM, BACKEND)  # the worker registers it too, in its process
        vllm_config.attention_config.backend = AttentionBackendEnum.CUSTOM
    processors = list(vllm_config.model_config.logits_processors or [])
    if REQUEST_CHECK not in processors:
        vllm_config.model_config.logits_processors = [*processors, REQUEST_CHECK]


class FastKVzipRequestCheck(LogitsProcessor):
    """vLLM's per-request validation hook, for the ``fastkvzip_*`` keys of ``extra_args``; changes no logits."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        try:
            check_request(sampling_params.extra_args, EngineSettings())
        except RequestSettingError as error:
            raise VLLMValidationError(str(error), parameter="extra_args") from None

    def __init__(self, vllm_config, device, is_pin_memory: bool) -> None:
        pass

    def apply(self, logits):
        return logits

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update) -> None:
        pass


_original_create_engine_config = EngineArgs.create_engine_config


def _create_engine_config(self, *args, **kwargs):
    vllm_config = _original_create_engine_config(self, *args, **kwargs)
    settings = check_engine(vllm_config)
    if settings is not None:
        point_engine_at_integration(vllm_config)
        logger.info("Fast KVzip on: %s budget, default ratio %s", settings.budget, settings.ratio)
    return vllm_config


def install() -> None:
    """Wrap vLLM's engine configuration (idempotent)."""
    EngineArgs.create_engine_config = _create_engine_config
