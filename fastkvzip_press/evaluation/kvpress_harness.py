"""kvpress's evaluation harness (its ``evaluation/evaluate.py``, the leaderboard's runner) with our presses in its
``PRESS_REGISTRY``: ``fastkvzip-press kvpress-eval``.

kvpress's evaluation harness is not in its wheel, only in its source distribution, and it has no plugin hook:
presses are entries of the module-level dict ``evaluate_registry.PRESS_REGISTRY``. This module fetches the
harness of the installed kvpress version from PyPI (once, into a cache folder), adds our entries to that dict
(and, optionally, local datasets to ``DATASET_REGISTRY``/``SCORER_REGISTRY``), then runs kvpress's
``CliEntryPoint`` unchanged, so the results folders are exactly those kvpress writes for the leaderboard:
``<output_dir>/<dataset>__<data_dir>__<model>__<press>__<ratio>/{predictions.csv, metrics.json, config.yaml}``.

One adaptation: ``evaluate.py`` passes ``--threshold`` only to ``DMSPress`` instances, so for our threshold entry
the same value is handed to ``FastKVzipPress.threshold`` (the folder is named by the threshold, as for DMS).
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields, replace
from importlib.metadata import version
from pathlib import Path

from fastkvzip_press.evaluation.registry import our_entries
from fastkvzip_press.gates import GateSource
from fastkvzip_press.models import cache_root

logger = logging.getLogger(__name__)


def _safe_members(archive: tarfile.TarFile, prefix: str) -> Iterator[tarfile.TarInfo]:
    """Members under ``prefix`` that are plain files or folders with relative, non-escaping paths."""
    for member in archive.getmembers():
        path = Path(member.name)
        if not member.name.startswith(prefix) or path.is_absolute() or ".." in path.parts:
            continue
        if member.isfile() or member.isdir():
            yield member


def fetch_kvpress_harness(cache: Path | None = None, kvpress_version: str | None = None) -> Path:
    """kvpress's ``evaluation/`` folder for ``kvpress_version`` (default: the installed one), downloaded once.

    Runs ``pip download --no-deps --no-binary :all: kvpress==<version>`` (PyPI only) and extracts the
    ``evaluation/`` folder of the source archive into ``<cache>/kvpress-<version>/evaluation``.
    """
    kvpress_version = kvpress_version or version("kvpress")
    target = (cache or cache_root()) / f"kvpress-{kvpress_version}"
    evaluation = target / "evaluation"
    if (evaluation / "evaluate.py").is_file():
        return evaluation
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
        result = subprocess.run([*command, f"kvpress=={kvpress_version}", "-d", tmp], capture_output=True, text=True)
        archives = list(Path(tmp).glob("kvpress-*.tar.gz"))
        if result.returncode != 0 or not archives:
            raise RuntimeError(
                f"could not download the kvpress {kvpress_version} source archive from PyPI ({result.stderr.strip()}). "
                "Download it yourself (pip download --no-deps --no-binary :all: kvpress==<version>), extract it and "
                "pass its evaluation/ folder with --kvpress-evaluation."
            )
        prefix = f"kvpress-{kvpress_version}/evaluation/"
        staging = Path(tmp) / "extract"
        with tarfile.open(archives[0]) as archive:
            members = list(_safe_members(archive, prefix))
            if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4: also refuse odd modes and links
                archive.extractall(staging, members=members, filter="data")
            else:
                archive.extractall(staging, members=members)
        target.mkdir(parents=True, exist_ok=True)
        partial = target / ".evaluation.partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.move(str(staging / prefix), partial)
        partial.replace(evaluation)  # complete or absent, never half-extracted
    return evaluation


@contextmanager
def import_kvpress_harness(evaluation_dir: Path) -> Iterator[tuple]:
    """Import kvpress's ``evaluate`` and ``evaluate_registry`` from ``evaluation_dir`` (they import each other and
    ``benchmarks.*`` by top-level names, and read ``./evaluate_config.yaml``), restoring ``sys.path``, the working
    folder and ``sys.modules`` afterwards."""
    evaluation_dir = Path(evaluation_dir).resolve()
    if not (evaluation_dir / "evaluate.py").is_file():
        raise FileNotFoundError(f"{evaluation_dir} is not kvpress's evaluation folder (no evaluate.py in it)")
    shadowed = {name: module for name, module in sys.modules.items() if _harness_module(name)}
    for name in shadowed:
        del sys.modules[name]
    cwd = os.getcwd()
    sys.path.insert(0, str(evaluation_dir))
    os.chdir(evaluation_dir)
    try:
        registry = importlib.import_module("evaluate_registry")
        evaluate = importlib.import_module("evaluate")
        yield evaluate, registry
    finally:
        os.chdir(cwd)
        sys.path.remove(str(evaluation_dir))
        for name in [name for name in sys.modules if _harness_module(name)]:
            del sys.modules[name]
        sys.modules.update(shadowed)


def _harness_module(name: str) -> bool:
    return name in ("evaluate", "evaluate_registry", "benchmarks") or name.startswith("benchmarks.")


def _patch_threshold(evaluate) -> None:
    """Give ``--threshold`` to our threshold press too (kvpress only sets it on ``DMSPress``)."""
    from fastkvzip_press.evaluation.kvpress_presses import AchievedRatioPress
    from fastkvzip_press.presses import FastKVzipPress

    runner = evaluate.EvaluationRunner
    if getattr(runner, "_fastkvzip_press_patched", False):
        return
    original = runner._setup_press

    def setup_press(self):
        original(self)
        press = self.press
        if isinstance(press, FastKVzipPress) and press.threshold is not None:
            if self.config.threshold is None:
                raise ValueError(f"{self.config.press_name} evicts by gate score: pass --threshold (e.g. 0.005)")
            settings = {f.name: getattr(press, f.name) for f in fields(press) if f.init}
            press = replace(press, threshold=self.config.threshold, compression_ratio=0.0)
            self.config.press_init_command = str(press)
            settings.update(threshold=self.config.threshold, compression_ratio=0.0)
            self.press = AchievedRatioPress(**settings)

    runner._setup_press = setup_press
    runner._fastkvzip_press_patched = True


def run_kvpress_harness(
    evaluation_dir: Path,
    arguments: list[str],
    gates: GateSource = None,
    local_datasets: dict[str, Path] | None = None,
) -> None:
    """Run kvpress's evaluation CLI with ``arguments`` (its own flags, e.g. ``--press_name fastkvzip_press
    --compression_ratio 0.5 --dataset ruler --data_dir 4096 --model Qwen/Qwen3-8B``).

    Args:
        gates: gate source for our entries (see :func:`~fastkvzip_press.evaluation.registry.our_entries`).
        local_datasets: extra datasets, name -> a folder ``<name>/<data_dir>/*.parquet`` written by
            :func:`~fastkvzip_press.evaluation.comparison.write_parquet_dataset`; scored like ``ruler``.
    """
    from fire import Fire

    arguments = resolved_output_dir(list(arguments))
    with import_kvpress_harness(evaluation_dir) as (evaluate, registry):
        registry.PRESS_REGISTRY.update(our_entries(gates))
        for name, folder in (local_datasets or {}).items():
            registry.DATASET_REGISTRY[name] = str(Path(folder).resolve())
            registry.SCORER_REGISTRY[name] = registry.SCORER_REGISTRY["ruler"]
        _patch_threshold(evaluate)
        Fire(evaluate.CliEntryPoint, command=arguments, name="evaluate.py")


def resolved_output_dir(arguments: list[str]) -> list[str]:
    """kvpress resolves ``--output_dir`` (default ``./results``) from its own folder; make it the caller's."""
    for i, argument in enumerate(arguments):
        if argument == "--output_dir" and i + 1 < len(arguments):
            arguments[i + 1] = str(Path(arguments[i + 1]).resolve())
            return arguments
        if argument.startswith("--output_dir="):
            arguments[i] = "--output_dir=" + str(Path(argument.split("=", 1)[1]).resolve())
            return arguments
    return [*arguments, "--output_dir", str(Path("results").resolve())]
