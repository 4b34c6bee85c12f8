"""``fastkvzip-press train``: train gates for a model (KVzip targets, feature shards, fit, export), in one process
or on every rank under torchrun."""

from __future__ import annotations

import argparse
from pathlib import Path

from fastkvzip_press.cli.arguments import DEVICE_MAPS, add_command, add_model_cache, device, fraction, integer

EXAMPLE = "fastkvzip-press train --model default --corpus builtin --out runs/smollm2 --max-tokens 200000"


def add_parser(commands: argparse._SubParsersAction) -> None:
    command = add_command(
        commands,
        "train",
        summary="train gates for a model: KVzip targets, feature shards, fit, export",
        example=EXAMPLE,
        other_model=True,
    )
    command.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a local model folder")
    command.add_argument(
        "--corpus",
        default="builtin",
        help="text file or folder, .parquet file or folder, hf:<dataset>, or 'builtin' (default: builtin)",
    )
    command.add_argument(
        "--text-column", default="text", help="column holding the text in .parquet files and hf: datasets"
    )
    command.add_argument(
        "--out", required=True, metavar="FOLDER", help="output folder (features, checkpoint, gates, report, curves)"
    )
    command.add_argument(
        "--max-tokens", type=integer(256), default=200_000, metavar="N", help="context tokens to extract, >= 256"
    )
    command.add_argument(
        "--context-len", type=integer(256), default=2048, metavar="N", help="tokens per training context, >= 256"
    )
    command.add_argument("--steps", type=integer(1), default=5000, metavar="N", help="SGD steps per layer, >= 1")
    command.add_argument(
        "--lr", type=fraction(0, None, low_open=True, high_open=True), default=0.2, help="learning rate, > 0"
    )
    command.add_argument(
        "--batch-tokens", type=integer(1), default=1000, metavar="N", help="tokens per SGD batch, >= 1"
    )
    command.add_argument(
        "--val-fraction",
        type=fraction(0, 1, low_open=True, high_open=True),
        default=0.1,
        metavar="F",
        help="share of documents held out for validation, in (0, 1) (of windows, for a one-document corpus)",
    )
    command.add_argument("--seed", type=integer(0), default=0, metavar="N", help="seed of the fit, >= 0")
    command.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    add_model_cache(command)
    placement = command.add_mutually_exclusive_group()
    placement.add_argument(
        "--device",
        type=device,
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
    command.set_defaults(run=run)


def check_out(args: argparse.Namespace, out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the run's features, gates and report")
    if not args.resume and (out / "features").exists() and any((out / "features").iterdir()):
        raise ValueError(f"{out} already holds features; pass --resume to continue that run or pick a new --out")


def run(args: argparse.Namespace) -> int:
    import torch

    from fastkvzip_press.models import load_model
    from fastkvzip_press.training import FitConfig, Ranks, TrainConfig, train

    torch.manual_seed(args.seed)
    ranks = Ranks.from_environment()
    if args.device_map and ranks.distributed:
        raise ValueError(
            "--device-map shards one model over the devices of one process; under torchrun each rank loads "
            "its own copy, so leave --device-map out there (or run one process with --device-map auto)"
        )
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
    check_out(args, out)
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
    print_report(result[1], out)
    return 0


def print_report(report: dict, out: Path) -> None:
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
