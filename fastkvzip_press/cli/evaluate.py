"""``fastkvzip-press eval``: compare presses on a locally generated benchmark, into kvpress's results folders."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from fastkvzip_press.cli.arguments import add_command, add_dataset_flags, add_model_cache, fraction, integer
from fastkvzip_press.cli.press_flags import add_gates_argument, gate_bank_for
from fastkvzip_press.evaluation.registry import press_names_help
from fastkvzip_press.evaluation.ruler import RULER_TASKS

logger = logging.getLogger("fastkvzip_press")

EXAMPLE = (
    "fastkvzip-press eval --dataset ruler-local --samples 2 --data-dir 2048 --ratios 0.5 0.75 "
    "--presses no_press fastkvzip_press snapkv --out results/ruler-local"
)


def add_parser(commands: argparse._SubParsersAction) -> None:
    command = add_command(
        commands,
        "eval",
        summary="compare presses on a locally generated benchmark; writes kvpress's results folders",
        description="Compare presses on a locally generated benchmark; writes kvpress's results folders.\n\n"
        "Presses:\n" + press_names_help(),
        example=EXAMPLE,
        other_model=True,
    )
    add_dataset_flags(command, "kvpress's data_dir; ")
    command.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a local model folder")
    command.add_argument(
        "--presses",
        nargs="+",
        default=["no_press", "fastkvzip_press"],
        metavar="NAME",
        help="press names (listed above; default: no_press fastkvzip_press)",
    )
    command.add_argument(
        "--ratios",
        type=fraction(0, 1, low_open=True, high_open=True),
        nargs="+",
        default=[0.5],
        metavar="R",
        help="compression ratios for ratio presses, each in (0, 1) (default: 0.5)",
    )
    command.add_argument(
        "--thresholds",
        type=fraction(0, 1),
        nargs="*",
        default=[],
        metavar="T",
        help="gate thresholds for threshold presses, each in [0, 1]",
    )
    command.add_argument(
        "--samples", type=integer(1), default=4, help="samples per task (ruler-local) or contexts (niah-local), >= 1"
    )
    command.add_argument(
        "--tasks", nargs="+", default=list(RULER_TASKS), choices=RULER_TASKS, help="ruler-local tasks (default: all)"
    )
    command.add_argument("--haystack", default=None, help="niah-local: a local text file to hide needles in")
    command.add_argument(
        "--max-new-tokens", type=integer(1), default=None, help="cap every answer, >= 1 (default: the task's own)"
    )
    add_gates_argument(command, default="default")
    command.add_argument(
        "--seed", type=integer(0), default=0, help="seed of the generated samples and of random gates, >= 0"
    )
    command.add_argument(
        "--out", default="results", help="results folder (one sub-folder per run, as kvpress writes; default: results)"
    )
    command.add_argument("--report", default=None, help="also write <dataset>.md and <dataset>.png in this folder")
    add_model_cache(command)
    command.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from fastkvzip_press.atomic import remove_stale_temporaries
    from fastkvzip_press.evaluation.comparison import check_plan, make_dataset
    from fastkvzip_press.evaluation.registry import PressResources
    from fastkvzip_press.evaluation.report import write_report
    from fastkvzip_press.evaluation.results import collect_runs
    from fastkvzip_press.models import load_model, tokenizer_folder
    from fastkvzip_press.presses.pipeline import kvpress_pipeline

    out = Path(args.out)
    check_plan(args.presses, args.ratios, args.thresholds)  # bad names and values fail before the model loads
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a results folder")
    remove_stale_temporaries(out)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, args.model_cache)
    resources = PressResources(model, gate_bank_for(args, model), tokenizer_folder(args.model, args.model_cache))
    pipe = kvpress_pipeline(model, tokenizer)
    for context_length in args.data_dir:
        rows = make_dataset(
            args.dataset, tokenizer, context_length, args.samples, args.seed, tuple(args.tasks), args.haystack
        )
        if args.max_new_tokens is not None:
            rows = [row | {"max_new_tokens": args.max_new_tokens} for row in rows]
        run_length(args, pipe, rows, context_length, resources)
    if args.report:
        write_report(out, Path(args.report), args.command_line)
    model_id = model.config.name_or_path
    for run_ in [r for r in collect_runs(out) if r.dataset == args.dataset and r.model == model_id]:
        print(f"{run_.folder.name}: {run_.score:.1f} (ratio {run_.compression_ratio:.2f}, {run_.n_rows} rows)")
    return 0


def run_length(args: argparse.Namespace, pipe, rows: list[dict], context_length: int, resources) -> None:
    """Every planned run of one context length on the same rows (finished runs are skipped)."""
    from fastkvzip_press.evaluation.comparison import execute_runs, plan_runs
    from fastkvzip_press.evaluation.results import RunConfig, is_finished

    model = resources.model
    base = RunConfig(
        dataset=args.dataset,
        data_dir=str(context_length),
        model=model.config.name_or_path,
        press_name="",
        device=str(model.device),
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        model_kwargs={"attn_implementation": "sdpa", "dtype": str(model.dtype).removeprefix("torch.")},
    )
    runs = plan_runs(args.presses, args.ratios, args.thresholds, base, Path(args.out))
    logger.info(
        "%s %d tokens: %d rows, %d runs (%d finished earlier)",
        args.dataset,
        context_length,
        len(rows),
        len(runs),
        sum(is_finished(run.folder) for run in runs),
    )
    execute_runs(pipe, rows, runs, resources, progress=not args.quiet)
