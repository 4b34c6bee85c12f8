"""Fast KVzip inside vLLM: gated eviction during each request's prefill, each KV head keeping its own number of pairs
in paged memory of single-head blocks, so blocks go back to the pool as the gates decide.

Loaded by vLLM through the ``vllm.general_plugins`` entry point ``fastkvzip`` in every vLLM process. It wraps vLLM's
engine configuration only; an engine started with a ``"fastkvzip"`` section in ``additional_config``
(:class:`~fastkvzip_press.vllm.settings.EngineSettings`) is checked there and pointed at the integration's scheduler,
worker and request check (:mod:`fastkvzip_press.vllm.seam`, the one package that knows vLLM's internals, built on
vLLM :data:`VLLM_VERSION`). Engines without the section are left as they are.
"""

from __future__ import annotations

from fastkvzip_press.vllm.settings import REQUEST_RATIO, SECTION, EngineSettings, RequestSettingError
from fastkvzip_press.vllm.version import VLLM_VERSION, UnsupportedVLLMVersion, check_vllm_version

__all__ = [
    "REQUEST_RATIO",
    "SECTION",
    "VLLM_VERSION",
    "EngineSettings",
    "RequestSettingError",
    "UnsupportedVLLMVersion",
    "check_vllm_version",
    "register",
]


def register() -> None:
    """The ``vllm.general_plugins`` entry point: wrap vLLM's engine configuration (once per process). Under another
    vLLM version nothing is installed; an engine that asks for Fast KVzip is then refused when configured."""
    import vllm

    if vllm.__version__.split("+")[0] == VLLM_VERSION:
        from fastkvzip_press.vllm.seam import config

        config.install()
        return
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, "fastkvzip_refusal", False):
        return

    def create_engine_config(self, *args, **kwargs):
        vllm_config = original(self, *args, **kwargs)
        if isinstance(vllm_config.additional_config, dict) and SECTION in vllm_config.additional_config:
            check_vllm_version(vllm.__version__)
        return vllm_config

    create_engine_config.fastkvzip_refusal = True
    EngineArgs.create_engine_config = create_engine_config
