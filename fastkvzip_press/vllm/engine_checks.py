"""Engine configurations the compaction cannot serve, refused when the engine is configured (front end) and again
when its scheduler starts (where the KV-cache groups are known)."""

from __future__ import annotations

from pathlib import Path

from fastkvzip_press.vllm.settings import SECTION, EngineSettings


class EngineConfigError(ValueError):
    """The engine's configuration and Fast KVzip do not go together; the message names the option to change."""


def unsupported(vllm_config, kv_cache_groups: int | None = None) -> list[str]:
    """What in ``vllm_config`` the compaction cannot serve, each with the option that avoids it."""
    problems = []
    if vllm_config.cache_config.enable_prefix_caching:
        problems.append(
            "prefix caching shares blocks between requests and compaction rewrites them: start the engine with "
            "enable_prefix_caching=False (--no-enable-prefix-caching)"
        )
    text_config = vllm_config.model_config.hf_text_config
    layer_types = getattr(text_config, "layer_types", None) or ()
    if getattr(text_config, "sliding_window", None) or any(kind != "full_attention" for kind in layer_types):
        problems.append(
            "the model has sliding-window layers, whose blocks vLLM frees by position; only models whose layers "
            "all attend to the full context are supported"
        )
    if kv_cache_groups is not None and kv_cache_groups != 1:
        problems.append(f"the model has {kv_cache_groups} KV-cache groups; only one full-attention group is supported")
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
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        problems.append("pipeline parallelism is not supported with compaction: use pipeline_parallel_size=1")
    return problems


def check_engine(vllm_config, kv_cache_groups: int | None = None) -> EngineSettings | None:
    """The engine's Fast KVzip settings (``None``: not asked for), after refusing what it cannot serve."""
    try:
        settings = EngineSettings.from_additional_config(vllm_config.additional_config)
    except ValueError as error:
        raise EngineConfigError(f"additional_config[{SECTION!r}]: {error}") from None
    if settings is None:
        return None
    problems = unsupported(vllm_config, kv_cache_groups)
    if settings.gates is not None and not Path(settings.gates).expanduser().exists():
        problems.append(f"{SECTION}.gates {settings.gates!r} does not exist: give a gate file or folder")
    if problems:
        raise EngineConfigError("Fast KVzip cannot run in this vLLM engine: " + "; ".join(problems))
    return settings
