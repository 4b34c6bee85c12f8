"""GPU acceptance benchmark: FastKVzipPress on random-weight Llama-3.1-8B and Qwen3-8B shapes, in bf16.

The models are built from their published configs (written below; nothing is downloaded) with random weights, and
random gates (``GateBank.random``): speed and memory do not depend on what the weights know. Sections:

- **prefill overhead**: one-pass prefill under FastKVzipPress(0.7) and under kvpress's FastKVzipPress(0.7) (masked,
  same gates), against no press. Configurations interleave over rounds (the order rotating each round); each ratio
  is taken within a round, and the table gives the median over rounds with the min-max.
- **decode**: ms per greedy token after those prefills, against the full cache and against kvpress's masked press.
- **peak memory**: peak CUDA memory of each configuration (prefill and decode) over what was allocated before it,
  peak KV bytes during the prefill (read after every layer) and KV bytes after it.
- **longest context at ratio 0.7**: chunked prefill (8192-token chunks) of random tokens plus two decoded tokens,
  the context doubled until it fails, then bisected twice; full cache against FastKVzipPress(0.7, chunked).
  On CUDA the process is capped at what it held before the search plus ``--kv-budget-gib`` (so that both searches
  end within minutes; the ratio between them is what carries over to a whole device) and a failure is a real
  out-of-memory error. The CPU rehearsal stops a trial when the KV cache outgrows the budget instead.
- **compaction bandwidth**: ``ragged_compact`` of one layer's keys and values (8 KV heads x 128k tokens x 128, 30 %
  kept): the bytes it must move (read and write every kept row, read the keep flags) over its time, against the
  device's HBM peak (a table by device name, ``--hbm-peak`` to override) and against a device copy of the same
  bytes.
- **selection**: ``select_smallest_rows`` over 32 layers x 8 heads x 128k tokens of scores (one decision of a
  128k-token prefill of an 8B model), Triton against the torch reference.

The model sections stop starting runs once their time budget (``SECTION_BUDGET_S``, per model; ``--budget-s``
shares a total between them) is spent, and the kernel timings are bounded by ``do_bench``, so the whole run stays
within about 6 minutes on one H200. The report is rewritten after every model and after the kernels, so a run stopped
from outside leaves what it measured so far (its header says which sections are still missing).

    .venv/bin/python benchmarks/gpu.py                                   # CUDA, both models
    .venv/bin/python benchmarks/gpu.py --device cpu --tiny --out /tmp/gpu   # every section on tiny shapes, seconds

Writes ``<out>/gpu.md`` and ``<out>/gpu.csv`` (one row per measured value; default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from device_timing import hbm_peak_gbps
from gpu_measure import (
    compaction_rows,
    longest_rows,
    selection_rows,
    timed_rows,
    timed_runs,
)
from gpu_setup import (
    FULL,
    GIB,
    MODEL_CONFIGS,
    ROOT,
    TINY,
    Scale,
    build_model,
    free_memory,
    random_gates,
)
from isolated import write_csv

# ------------------------------------------------------------------------------------------------------ output


@dataclass(frozen=True)
class Section:
    """A table of the report: its title, what it shows, and its columns as ``(key, header, format)``."""

    title: str
    note: str
    columns: tuple[tuple[str, str, str], ...]


SECTIONS = {
    "prefill": Section(
        "Prefill overhead",
        "One-pass prefill of random tokens; ratios within a round, median over rounds (min-max).",
        (
            ("model", "model", ""),
            ("context", "context", ""),
            ("config", "press", ""),
            ("rounds", "rounds", ""),
            ("prefill_ms", "prefill ms", ".1f"),
            ("vs_none", "vs no press", ".3f"),
            ("vs_none_min", "min", ".2f"),
            ("vs_none_max", "max", ".2f"),
        ),
    ),
    "decode": Section(
        "Decode",
        "Greedy steps after the prefill (mean per run, median over rounds); ratios within a round.",
        (
            ("model", "model", ""),
            ("context", "context", ""),
            ("config", "press", ""),
            ("decode_ms_per_token", "ms/token", ".2f"),
            ("vs_full", "vs full cache", ".3f"),
            ("vs_full_min", "min", ".2f"),
            ("vs_full_max", "max", ".2f"),
            ("vs_kvpress_masked", "vs kvpress masked", ".3f"),
        ),
    ),
    "memory": Section(
        "Peak memory",
        "Peak device memory of the prefill and two decoded tokens over what was allocated before (CUDA only); KV "
        "bytes read after every layer of the prefill, and after it.",
        (
            ("model", "model", ""),
            ("context", "context", ""),
            ("config", "press", ""),
            ("peak_device_gib", "peak GiB", ".2f"),
            ("peak_device_vs_none", "vs no press", ".3f"),
            ("peak_kv_mib", "peak KV MiB", ".1f"),
            ("kv_after_prefill_mib", "KV MiB after prefill", ".1f"),
            ("kv_vs_full", "KV vs full", ".3f"),
        ),
    ),
    "longest": Section(
        "Longest context",
        "Chunked prefill plus two decoded tokens, doubled until a trial fails, then bisected. Cap: on CUDA the "
        "process's memory (what it held before the search plus the budget; a failure is out of memory), on CPU the KV "
        "bytes.",
        (
            ("model", "model", ""),
            ("config", "cache", ""),
            ("cap_bytes", "cap", "bytes"),
            ("longest_tokens", "longest tokens", ""),
            ("first_failure_tokens", "first failure", ".0f"),
            ("vs_full", "vs full cache", ".2f"),
            ("trials", "trials", ""),
            ("stop", "stopped by", ""),
        ),
    ),
    "compaction": Section(
        "Compaction bandwidth",
        "ragged_compact of one layer's keys and values; bytes = read and write every kept row + the keep flags.",
        (
            ("shape", "shape", ""),
            ("kept", "kept", ".2f"),
            ("backend", "backend", ""),
            ("ms", "ms", ".3f"),
            ("gb_per_s", "GB/s", ".1f"),
            ("hbm_peak_gb_per_s", "HBM peak GB/s", ".0f"),
            ("of_peak", "of peak", ".3f"),
            ("copy_gb_per_s", "copy GB/s", ".1f"),
            ("of_copy", "of copy", ".3f"),
        ),
    ),
    "selection": Section(
        "Selection",
        "select_smallest_rows over the scores of one decision (k = ratio x entries).",
        (
            ("shape", "scores", ""),
            ("entries", "entries", ""),
            ("backend", "backend", ""),
            ("ms", "ms", ".3f"),
            ("g_entries_per_s", "G entries/s", ".2f"),
        ),
    ),
}


def _cell(value, fmt: str) -> str:
    if isinstance(value, float) and value != value:
        return "n/a"
    if fmt == "bytes":
        return f"{value / GIB:.1f} GiB" if value >= GIB else f"{value / 2**10:.0f} KiB"
    return format(value, fmt) if fmt else str(value)


def markdown(results: dict[str, list[dict]], header: list[str]) -> str:
    lines = ["# GPU benchmark", "", *header]
    for key, section in SECTIONS.items():
        lines += ["", f"## {section.title}", "", section.note, ""]
        lines.append("| " + " | ".join(h for _, h, _ in section.columns) + " |")
        lines.append("|" + "---|" * len(section.columns))
        for row in results[key]:
            lines.append("| " + " | ".join(_cell(row[k], f) for k, _, f in section.columns) + " |")
    return "\n".join(lines) + "\n"


def long_rows(results: dict[str, list[dict]]) -> list[dict]:
    """One CSV row per measured value: section, model, context, config, metric, value."""
    rows = []
    for key, section_rows in results.items():
        for row in section_rows:
            ident = {name: row.get(name, "") for name in ("model", "context", "config")}
            ident["config"] = ident["config"] or f"{row.get('backend', '')} {row.get('shape', '')}".strip()
            for metric, value in row.items():
                if metric not in ("model", "context", "config", "backend", "shape"):
                    rows.append({"section": key, **ident, "metric": metric, "value": value})
    return rows


# -------------------------------------------------------------------------------------------------------- main


def scale_of(args) -> Scale:
    """The sizes and time budgets of this run."""
    scale = replace(
        TINY if args.tiny else FULL,
        **{k: v for k, v in (("contexts", tuple(args.contexts or ())), ("rounds", args.rounds)) if v},
    )
    if args.kv_budget_gib is not None:
        scale = replace(scale, kv_budget_bytes=int(args.kv_budget_gib * GIB))
    if args.budget_s is not None:  # shared by every model's sections in the default proportions
        share = args.budget_s / (len(args.models) * (scale.timed_s + scale.longest_s))
        scale = replace(scale, timed_s=scale.timed_s * share, longest_s=scale.longest_s * share)
    return scale


def run(args, save: Callable[[dict[str, list[dict]], str], None] = lambda results, missing: None):
    """Every section; ``save(results, missing)`` after every model and after the kernels (``missing``: what is still
    to come, empty at the end)."""
    from tqdm import tqdm

    scale = scale_of(args)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    results: dict[str, list[dict]] = {key: [] for key in SECTIONS}
    for index, name in enumerate(args.models):
        model = build_model(name, args.tiny, device, dtype)
        bank = random_gates(model)
        n_runs = len(scale.contexts) * 3 * (1 + scale.rounds)
        with tqdm(total=n_runs, desc=f"{name}: prefill and decode", disable=args.quiet) as progress:
            runs = timed_runs(model, bank, args, scale, progress)
        for key, rows in zip(("prefill", "decode", "memory"), timed_rows(name, runs)):
            results[key] += rows
        with tqdm(desc=f"{name}: longest context (trials)", disable=args.quiet) as progress:
            results["longest"] += longest_rows(name, model, bank, args, scale, progress)
        del model, bank, runs
        free_memory(device)
        save(results, ", ".join([*args.models[index + 1 :], "the kernels"]))
    with tqdm(total=2, desc="kernels", disable=args.quiet) as progress:
        peak = hbm_peak_gbps(device, args.hbm_peak)
        results["compaction"] = compaction_rows(scale, device, dtype, args.ratio, peak)
        progress.update()
        results["selection"] = selection_rows(scale, device, args.ratio)
        progress.update()
    save(results, "")
    return results


def describe(args, seconds: float, missing: str = "") -> list[str]:
    """The report's header: where and how it ran (``missing``: sections not measured yet, for a partial report)."""
    import transformers

    from fastkvzip_press.cache import attention_path_counts

    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    paths = ", ".join(f"{name}: {count}" for name, count in sorted(attention_path_counts().items())) or "none"
    return [
        f"{where}; torch {torch.__version__}, transformers {transformers.__version__}; {args.dtype}; random weights "
        f"and random gates; compression ratio {args.ratio}{' (tiny shapes: a rehearsal)' if args.tiny else ''}.",
        "",
        f"Command: `python benchmarks/gpu.py {' '.join(sys.argv[1:])}` ({seconds:.0f} s). "
        f"Ragged attention calls by path: {paths}.",
        *([] if not missing else ["", f"**Partial report**: not measured yet: {missing}."]),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes of every section (a rehearsal, seconds)")
    parser.add_argument("--models", nargs="+", default=list(MODEL_CONFIGS), choices=list(MODEL_CONFIGS))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--ratio", type=float, default=0.7, help="compression ratio of every press")
    parser.add_argument("--contexts", type=int, nargs="+", help="prefill / decode contexts (default 8k and 32k)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per context (default 3)")
    parser.add_argument("--kv-budget-gib", type=float, help="memory over the model for the longest-context search")
    parser.add_argument("--hbm-peak", type=float, help="peak memory bandwidth in GB/s (default: by device name)")
    parser.add_argument("--budget-s", type=float, help="seconds for the model sections of every model together")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; rehearse on CPU with --device cpu --tiny")
    if args.tiny and args.device == "cpu":
        torch.set_num_threads(1)  # tiny shapes gain nothing from threads; on a busy CPU spinning ones cost a lot
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)

    def save(results: dict[str, list[dict]], missing: str) -> None:
        (args.out / "gpu.md").write_text(markdown(results, describe(args, time.perf_counter() - start, missing)))
        write_csv(long_rows(results), args.out / "gpu.csv")

    run(args, save)
    print((args.out / "gpu.md").read_text())
    print(f"written: {args.out}/gpu.{{md,csv}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
