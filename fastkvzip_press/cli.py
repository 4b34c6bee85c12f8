"""`fastkvzip-press` command line."""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fastkvzip_press.checks import require_int, require_real, require_window

logger = logging.getLogger("fastkvzip_press")


def _integer(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum`` (checked by :func:`~fastkvzip_press.checks.require_int`)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        try:
            return require_int("the value", value, minimum)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def _fraction(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number between ``low`` and ``high`` (checked by
    :func:`~fastkvzip_press.checks.require_real`)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        try:
            return require_real("the value", value, low, high, low_open=low_open, high_open=high_open)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def _device(text: str) -> str:
    """--device: a torch device this machine has (``cpu``, ``cuda``, ``cuda:N``)."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a device such as cpu, cuda or cuda:1, got {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available here; leave --device out to use the CPU")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    return text


# accelerate's placement strategies for ``device_map``.
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def _window(text: str) -> int | float:
    """--window-size: a fraction of the context in (0, 1), or a whole number of tokens >= 0 (checked by
    :func:`~fastkvzip_press.checks.require_window`)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1) or a token count, got {text!r}") from None
    try:
        return require_window("the value", int(value) if math.isfinite(value) and value == int(value) else value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a fraction in (0, 1) or a whole number of tokens >= 0, got {text}") from None


def gate_bank_for(args: argparse.Namespace, model):
    """The gates ``--gates`` names, checked against ``model``: 'default' (shipped, else released), 'random'
    (untrained, seeded by ``--seed``) or a gate file or folder."""
    from fastkvzip_press.gates import GateBank, ModelLayout, load_gates

    if args.gates == "random":
        return GateBank.random(ModelLayout.from_model(model), seed=args.seed)
    source = None if args.gates == "default" else args.gates
    return load_gates(source, model, allow_other_model=args.allow_other_model)


def press_from_arguments(args: argparse.Namespace, gates):
    """The FastKVzipPress that the press flags (:func:`add_press_arguments`) describe."""
    from fastkvzip_press.presses import FastKVzipPress

    return FastKVzipPress(
        compression_ratio=0.0 if args.threshold is not None else args.ratio,
        threshold=args.threshold,
        gates=gates,
        n_sink=args.n_sink,
        window_size=args.window_size,
        compaction=args.compaction,
        chunk_size=args.chunk_size,
    )


def add_press_arguments(command: argparse.ArgumentParser) -> None:
    """The press's flags, shared by ``generate`` and ``compress``."""
    command.add_argument(
        "--ratio", type=_fraction(0, 1, high_open=True), default=0.5, help="compression ratio: fraction removed"
    )
    command.add_argument(
        "--threshold", type=_fraction(0, 1), default=None, help="adaptive mode: evict gate scores below this"
    )
    command.add_argument(
        "--gates", default="default", help="'default' (shipped trained gates), a gate file or folder, or 'random'"
    )
    command.add_argument("--seed", type=_integer(0), default=0, help="seed for random gates")
    command.add_argument("--n-sink", type=_integer(0), default=4)
    command.add_argument(
        "--window-size", type=_window, default=0.02, help="recent window: tokens (>=1) or fraction (<1)"
    )
    command.add_argument("--compaction", choices=["ragged", "masked"], default="ragged", help="free memory or mask")
    command.add_argument("--chunk-size", type=_integer(1), default=None, help="prefill in chunks of this many tokens")


def _generate(args: argparse.Namespace) -> int:
    import torch
    from transformers import DynamicCache

    from fastkvzip_press.cache.accounting import format_bytes, full_cache_bytes, kv_cache_bytes
    from fastkvzip_press.cli_saved import generate_from_cache, read_context
    from fastkvzip_press.gates import ModelLayout
    from fastkvzip_press.models import load_default_model
    from fastkvzip_press.presses.pipeline import kvpress_pipeline

    if (args.cache is None) == (args.context_file is None):
        print("error: give --context-file (compress now) or --cache (a context saved by `compress`)", file=sys.stderr)
        return 2
    if args.cache is not None:
        return generate_from_cache(args)
    context = read_context(Path(args.context_file))
    if context is None:
        return 2

    torch.manual_seed(0)
    step = time.perf_counter()
    logger.info("loading the default model (SmolLM2-135M-Instruct)")
    model, tokenizer = load_default_model(cache_dir=args.model_cache)
    layout = ModelLayout.from_model(model)
    logger.info("model ready in %.1fs", time.perf_counter() - step)

    gates = gate_bank_for(args, model)
    if args.gates == "random":
        gate_label = f"RANDOM untrained gates (seed {args.seed}): eviction is arbitrary, expect worse answers"
    elif args.gates == "default":
        training = gates.metadata.training
        corpus = training.get("config", {}).get("corpus", "?")
        gate_label = (
            f"shipped trained gates for {layout.model_id} "
            f"({training.get('train_tokens', '?')} training tokens, corpus {corpus})"
        )
    else:
        gate_label = f"gates from {args.gates}"

    press = press_from_arguments(args, gates)
    pipe = kvpress_pipeline(model, tokenizer)
    questions = args.question

    answers_full = None
    if not args.no_compare:
        step = time.perf_counter()
        answers_full = pipe(context, questions=questions, max_new_tokens=args.max_new_tokens)["answers"]
        logger.info("full-cache answers in %.1fs", time.perf_counter() - step)

    step = time.perf_counter()
    cache = DynamicCache()
    answers = pipe(context, questions=questions, press=press, cache=cache, max_new_tokens=args.max_new_tokens)[
        "answers"
    ]
    logger.info("compressed answers in %.1fs", time.perf_counter() - step)

    stats = press.last_stats
    stored_bytes = kv_cache_bytes(cache)
    n_context = stats.context_length if stats else cache.get_seq_length()
    full_bytes = full_cache_bytes(model, n_context)
    print(f"Gates: {gate_label}")
    print(f"Context: {n_context} tokens, {layout.num_layers} layers")
    for i, question in enumerate(questions):
        print(f"\nQuestion: {question}")
        print(f"Answer (FastKVzipPress): {answers[i]}")
        if answers_full is not None:
            print(f"Answer (full cache):     {answers_full[i]}")
    print("\nKV cache of the context")
    print(f"  full cache:       {format_bytes(full_bytes)} (100.0%)")
    if stats is not None:
        kept_fraction = stats.kept_fraction
        print(
            f"  retained pairs:   {format_bytes(full_bytes * kept_fraction)} ({100 * kept_fraction:.1f}%), "
            f"compression ratio {stats.compression_ratio:.3f} over gated layers"
        )
        share = stats.head_retention()
        print(
            f"  per-head retained fraction: min {share.min():.2f}, median {share.median():.2f}, max {share.max():.2f}"
        )
        if press.compaction == "ragged":
            note = "ragged: evicted pairs are freed; includes spare rows for question and answer tokens"
        else:
            note = "masked: evicted keys are masked, their memory is still held"
        print(f"  stored now:       {format_bytes(stored_bytes)} ({100 * stored_bytes / full_bytes:.1f}%; {note})")
    else:
        print("  no eviction (ratio 0)")
    return 0


def _train(args: argparse.Namespace) -> int:
    import torch

    from fastkvzip_press.models import load_model
    from fastkvzip_press.training import FitConfig, Ranks, TrainConfig, train

    torch.manual_seed(args.seed)
    ranks = Ranks.from_environment()
    if args.device_map and ranks.distributed:
        print(
            "error: --device-map shards one model over the devices of one process; under torchrun each rank loads "
            "its own copy, so leave --device-map out there (or run one process with --device-map auto)",
            file=sys.stderr,
        )
        return 2
    fit = FitConfig(steps=args.steps, lr=args.lr, batch_tokens=args.batch_tokens, seed=args.seed)
    config = TrainConfig(
        corpus=args.corpus,
        text_column=args.text_column,
        context_len=args.context_len,
        max_tokens=args.max_tokens,
        val_fraction=args.val_fraction,
        fit=fit,
    )
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        print(f"error: --out {out} is a file; give a folder for the run's features, gates and report", file=sys.stderr)
        return 2
    if not args.resume and (out / "features").exists() and any((out / "features").iterdir()):
        print(
            f"error: {out} already holds features; pass --resume to continue that run or pick a new --out",
            file=sys.stderr,
        )
        return 2
    model, tokenizer = load_model(args.model, args.model_cache, device_map=args.device_map)
    if not args.device_map:
        model.to(ranks.device(args.device))
    result = train(
        model,
        tokenizer,
        out,
        config,
        resume=args.resume,
        progress=not args.quiet,
        allow_other_model=args.allow_other_model,
        ranks=ranks,
    )
    if result is None:  # a rank other than 0: its shards are written, rank 0 fits and reports
        return 0
    _, report = result
    print(f"Model: {report['model_id']}")
    print(
        f"Tokens: {report['train_tokens']} training, {report['val_tokens']} validation "
        f"({len(report['val_documents'])} held-out documents)"
    )
    print("Layer  val BCE  val accuracy")
    for layer_id, loss, accuracy in zip(
        report["layer_ids"], report["val_loss_per_layer"], report["val_accuracy_per_layer"]
    ):
        print(f"{layer_id:5d}  {loss:7.4f}  {accuracy:12.4f}")
    mean_accuracy = sum(report["val_accuracy_per_layer"]) / len(report["val_accuracy_per_layer"])
    print(f"mean   {sum(report['val_loss_per_layer']) / len(report['val_loss_per_layer']):7.4f}  {mean_accuracy:12.4f}")
    print("Time: " + ", ".join(f"{name[:-2]} {seconds:.0f}s" for name, seconds in report["times"].items()))
    print(
        f"Gates: {out / 'gates'} (use --gates {out / 'gates'}); report: {out / 'report.json'}; "
        f"curves: {out / 'curves.png'}"
    )
    return 0


def _export_gates(args: argparse.Namespace) -> int:
    import torch

    from fastkvzip_press.gates import load_gates, write_native
    from fastkvzip_press.models import load_model

    model = load_model(args.model, args.model_cache)[0] if args.model else None
    bank = load_gates(args.gates, model, allow_other_model=args.allow_other_model)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": None}[args.dtype]
    weights, meta = write_native(bank, args.out, storage_dtype=dtype)
    print(f"Gates: {len(bank.layer_ids)} layers, {weights} ({weights.stat().st_size / 2**20:.1f} MiB), {meta}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from fastkvzip_press.evaluation.comparison import check_plan, execute_runs, make_dataset, plan_runs
    from fastkvzip_press.evaluation.registry import PressResources
    from fastkvzip_press.evaluation.report import write_report
    from fastkvzip_press.evaluation.results import RunConfig, collect_runs, is_finished
    from fastkvzip_press.gates.atomic import remove_stale_temporaries
    from fastkvzip_press.models import load_model, tokenizer_folder
    from fastkvzip_press.presses.pipeline import kvpress_pipeline

    out = Path(args.out)
    check_plan(args.presses, args.ratios, args.thresholds)  # bad names and values fail before the model loads
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a results folder")
    remove_stale_temporaries(out)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model, args.model_cache)
    gates = gate_bank_for(args, model)  # checked once, before any run
    model_id = model.config.name_or_path
    tokenizer_path = tokenizer_folder(args.model, args.model_cache)
    pipe = kvpress_pipeline(model, tokenizer)
    for context_length in args.data_dir:
        rows = make_dataset(
            args.dataset, tokenizer, context_length, args.samples, args.seed, tuple(args.tasks), args.haystack
        )
        if args.max_new_tokens is not None:
            rows = [row | {"max_new_tokens": args.max_new_tokens} for row in rows]
        base = RunConfig(
            dataset=args.dataset,
            data_dir=str(context_length),
            model=model_id,
            press_name="",
            device=str(model.device),
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            model_kwargs={"attn_implementation": "sdpa", "dtype": str(model.dtype).removeprefix("torch.")},
        )
        runs = plan_runs(args.presses, args.ratios, args.thresholds, base, out)
        logger.info(
            "%s %d tokens: %d rows, %d runs (%d finished earlier)",
            args.dataset,
            context_length,
            len(rows),
            len(runs),
            sum(is_finished(run.folder) for run in runs),
        )
        resources = PressResources(model, gates, tokenizer_path)
        execute_runs(pipe, rows, runs, resources, progress=not args.quiet)
    if args.report:
        write_report(out, Path(args.report), args.command_line)
    summaries = [r for r in collect_runs(out) if r.dataset == args.dataset and r.model == model_id]
    for run in summaries:
        print(f"{run.folder.name}: {run.score:.1f} (ratio {run.compression_ratio:.2f}, {run.n_rows} rows)")
    return 0


def _eval_report(args: argparse.Namespace) -> int:
    from fastkvzip_press.evaluation.report import write_report

    readme = Path(args.readme) if args.readme else None
    print(write_report(Path(args.results), Path(args.out), args.command_line, readme).read_text())
    return 0


def _export_dataset(args: argparse.Namespace) -> int:
    from fastkvzip_press.evaluation.comparison import make_dataset, write_parquet_dataset
    from fastkvzip_press.models import load_model

    _, tokenizer = load_model(args.model, args.model_cache)
    for context_length in args.data_dir:
        rows = make_dataset(
            args.dataset, tokenizer, context_length, args.samples, args.seed, tuple(args.tasks), args.haystack
        )
        path = write_parquet_dataset(rows, args.out, str(context_length))
        print(f"{path}: {len(rows)} rows")
    return 0


def _kvpress_eval(args: argparse.Namespace) -> int:
    from fastkvzip_press.evaluation.kvpress_harness import fetch_kvpress_harness, run_kvpress_harness

    evaluation = Path(args.kvpress_evaluation) if args.kvpress_evaluation else fetch_kvpress_harness()
    local = {}
    for item in args.local_dataset:
        name, sep, folder = item.partition("=")
        if not sep or not Path(folder).is_dir():
            raise ValueError(f"--local-dataset takes NAME=FOLDER with an existing folder, got {item!r}")
        local[name] = Path(folder)
    arguments = args.arguments[1:] if args.arguments[:1] == ["--"] else args.arguments
    gates = None if args.gates == "default" else args.gates
    run_kvpress_harness(evaluation, arguments, gates=gates, local_datasets=local)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastkvzip-press", description=__doc__)
    parser.add_argument("-q", "--quiet", action="store_true", help="only print results, no progress or logs")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="also show other libraries' progress bars and logs"
    )
    # -q / -v also after the subcommand; SUPPRESS keeps a subcommand from resetting what was given before it.
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    quiet.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    other_model = argparse.ArgumentParser(add_help=False)
    other_model.add_argument(
        "--allow-other-model",
        action="store_true",
        help="use gates (or resume on features) recorded for another model of the same shapes, e.g. a fine-tune",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser(
        "generate",
        help="answer questions about a context on the default model, with eviction",
        parents=[quiet, other_model],
    )
    gen.add_argument("--context-file", default=None, help="text file holding the context")
    gen.add_argument("--cache", default=None, help="a context saved by `compress` (instead of --context-file)")
    gen.add_argument("--question", action="append", required=True, help="question (repeat for several)")
    add_press_arguments(gen)
    gen.add_argument("--max-new-tokens", type=_integer(1), default=32)
    gen.add_argument("--model-cache", default=None, help="folder of the converted default model")
    gen.add_argument("--no-compare", action="store_true", help="skip the full-cache answer")
    gen.set_defaults(run=_generate)

    from fastkvzip_press.cli_saved import add_compress_parser

    add_compress_parser(commands, [quiet, other_model], add_press_arguments, press_from_arguments, gate_bank_for)

    tr = commands.add_parser(
        "train",
        help="train gates for a model: KVzip targets, feature shards, fit, export",
        parents=[quiet, other_model],
    )
    tr.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a local model folder")
    tr.add_argument("--corpus", default="builtin", help="text file or folder, .parquet, hf:<dataset>, or 'builtin'")
    tr.add_argument("--text-column", default="text", help="column holding the text in .parquet files and hf: datasets")
    tr.add_argument("--out", required=True, help="output folder (features, checkpoint, gates, report, curves)")
    tr.add_argument("--max-tokens", type=_integer(256), default=200_000, help="context tokens to extract")
    tr.add_argument("--context-len", type=_integer(256), default=2048, help="tokens per training context")
    tr.add_argument("--steps", type=_integer(1), default=5000)
    tr.add_argument("--lr", type=_fraction(0, None, low_open=True, high_open=True), default=0.2)
    tr.add_argument("--batch-tokens", type=_integer(1), default=1000)
    tr.add_argument(
        "--val-fraction",
        type=_fraction(0, 1, low_open=True, high_open=True),
        default=0.1,
        help="share of documents held out for validation (of windows, for a one-document corpus)",
    )
    tr.add_argument("--seed", type=_integer(0), default=0)
    tr.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    tr.add_argument("--model-cache", default=None, help="folder of the converted default model")
    placement = tr.add_mutually_exclusive_group()
    placement.add_argument(
        "--device",
        type=_device,
        default=None,
        help="where the model runs (default: cuda:<local rank> where CUDA is available, else cpu; under torchrun "
        "'cuda' means each rank's own GPU)",
    )
    placement.add_argument(
        "--device-map",
        choices=DEVICE_MAPS,
        default=None,
        help="shard a model larger than one device over all of them with accelerate (one process, not torchrun)",
    )
    tr.set_defaults(run=_train)

    ex = commands.add_parser(
        "export-gates",
        help="rewrite gates in the native format, optionally in bf16 to ship",
        parents=[quiet, other_model],
    )
    ex.add_argument("gates", help="gate file or folder (native or released format)")
    ex.add_argument("--out", required=True, help="output folder for gates.safetensors and gates.json")
    ex.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ex.add_argument("--model", default=None, help="'default' or a model folder, to check the gates fit it")
    ex.add_argument("--model-cache", default=None, help="folder of the converted default model")
    ex.set_defaults(run=_export_gates)

    from fastkvzip_press.evaluation.comparison import DATASETS
    from fastkvzip_press.evaluation.registry import PRESS_SPECS, press_names_help
    from fastkvzip_press.evaluation.ruler import RULER_TASKS

    ours = ", ".join(name for name, spec in PRESS_SPECS.items() if spec.ours)

    ev = commands.add_parser(
        "eval",
        help="compare presses on a locally generated benchmark; writes kvpress's results folders",
        description="Presses:\n" + press_names_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[quiet, other_model],
    )
    ev.add_argument("--dataset", choices=DATASETS, default="ruler-local")
    ev.add_argument(
        "--data-dir",
        type=_integer(64),
        nargs="+",
        default=[4096],
        help="context length(s) in tokens (kvpress's data_dir)",
    )
    ev.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a local model folder")
    ev.add_argument(
        "--presses",
        nargs="+",
        default=["no_press", "fastkvzip_press"],
        metavar="NAME",
        help="press names (listed above)",
    )
    ev.add_argument(
        "--ratios",
        type=_fraction(0, 1, low_open=True, high_open=True),
        nargs="+",
        default=[0.5],
        help="compression ratios for ratio presses",
    )
    ev.add_argument(
        "--thresholds", type=_fraction(0, 1), nargs="*", default=[], help="gate thresholds for threshold presses"
    )
    ev.add_argument(
        "--samples", type=_integer(1), default=4, help="samples per task (ruler-local) or contexts (niah-local)"
    )
    ev.add_argument("--tasks", nargs="+", default=list(RULER_TASKS), choices=RULER_TASKS)
    ev.add_argument("--haystack", default=None, help="niah-local: a local text file to hide needles in")
    ev.add_argument(
        "--max-new-tokens", type=_integer(1), default=None, help="cap every answer (default: the task's own)"
    )
    ev.add_argument(
        "--gates", default="default", help="'default' (shipped or hub gates), 'random' or a gate file or folder"
    )
    ev.add_argument("--seed", type=_integer(0), default=0, help="seed of the generated samples and of random gates")
    ev.add_argument("--out", default="results", help="results folder (one sub-folder per run, as kvpress writes)")
    ev.add_argument("--report", default=None, help="also write <dataset>.md and <dataset>.png here")
    ev.add_argument("--model-cache", default=None, help="folder of the converted default model")
    ev.set_defaults(run=_eval)

    rp = commands.add_parser("eval-report", help="Markdown table and PNG plot from a results folder", parents=[quiet])
    rp.add_argument("results", help="folder of results sub-folders (ours or kvpress's evaluate.py's)")
    rp.add_argument("--out", required=True, help="where to write <dataset>.md and <dataset>.png")
    rp.add_argument("--readme", default=None, help="also fill the <!-- <dataset>:start/end --> block of this file")
    rp.set_defaults(run=_eval_report)

    xd = commands.add_parser(
        "export-dataset", help="write a generated dataset as parquet for kvpress's evaluate.py", parents=[quiet]
    )
    xd.add_argument("--dataset", choices=DATASETS, default="ruler-local")
    xd.add_argument("--data-dir", type=_integer(64), nargs="+", default=[4096], help="context length(s) in tokens")
    xd.add_argument("--model", default="default", help="whose tokenizer fits the lengths: 'default' or a folder")
    xd.add_argument("--samples", type=_integer(1), default=10)
    xd.add_argument("--tasks", nargs="+", default=list(RULER_TASKS), choices=RULER_TASKS)
    xd.add_argument("--haystack", default=None, help="niah-local: a local text file to hide needles in")
    xd.add_argument("--seed", type=_integer(0), default=0)
    xd.add_argument("--out", required=True, help="dataset folder: <out>/<data_dir>/test-00000-of-00001.parquet")
    xd.add_argument("--model-cache", default=None, help="folder of the converted default model")
    xd.set_defaults(run=_export_dataset)

    kv = commands.add_parser(
        "kvpress-eval",
        help="run kvpress's own evaluation/evaluate.py with our presses registered (leaderboard folders)",
        description="Everything after the options goes to kvpress's evaluate.py, e.g. -- --model Qwen/Qwen3-8B "
        f"--dataset ruler --data_dir 4096 --press_name fastkvzip_press --compression_ratio 0.5. Our entries: {ours} "
        "(the threshold entry takes --threshold, the decoding one --target_size).",
        parents=[quiet],
    )
    kv.add_argument("--kvpress-evaluation", default=None, help="kvpress's evaluation/ folder (default: fetch it)")
    kv.add_argument("--gates", default="default", help="'default' (shipped or released hub gates) or a gate path")
    kv.add_argument(
        "--local-dataset", action="append", default=[], help="NAME=FOLDER of export-dataset output (repeatable)"
    )
    kv.add_argument("arguments", nargs=argparse.REMAINDER, help="kvpress evaluate.py flags")
    kv.set_defaults(run=_kvpress_eval)
    return parser


def quiet_other_libraries() -> None:
    """Other libraries' progress bars and info logs off (transformers' weight loading writes hundreds of updates to a
    file or pipe); this package's own progress bars and logs stay unless -q."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    disable_progress_bars()
    for name in ("datasets", "huggingface_hub", "accelerate", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command_line = " ".join(["fastkvzip-press", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    if args.quiet or not args.verbose:
        quiet_other_libraries()
    try:
        return args.run(args)
    except (ValueError, RuntimeError, OSError) as error:  # OSError: files, folders, the network
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
