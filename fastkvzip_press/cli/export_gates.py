"""``fastkvzip-press export-gates``: rewrite gates in the native format (safetensors + JSON), optionally in bf16."""

from __future__ import annotations

import argparse

from fastkvzip_press.cli.arguments import add_command, add_model_cache

EXAMPLE = "fastkvzip-press export-gates runs/smollm2/gates --model default --out gates-bf16"


def add_parser(commands: argparse._SubParsersAction) -> None:
    command = add_command(
        commands,
        "export-gates",
        summary="rewrite gates in the native format, optionally in bf16 to ship",
        example=EXAMPLE,
        other_model=True,
    )
    command.add_argument("gates", help="gate file or folder (native or released format)")
    command.add_argument(
        "--out", required=True, metavar="FOLDER", help="output folder for gates.safetensors and gates.json"
    )
    command.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default="bfloat16",
        help="dtype of the stored projections (default: bfloat16)",
    )
    command.add_argument("--model", default=None, help="'default' or a model folder, to check the gates fit it")
    add_model_cache(command)
    command.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from fastkvzip_press.gates import load_gates, write_native
    from fastkvzip_press.models import load_model

    model = load_model(args.model, args.model_cache)[0] if args.model else None
    bank = load_gates(args.gates, model, allow_other_model=args.allow_other_model)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": None}[args.dtype]
    weights, meta = write_native(bank, args.out, storage_dtype=dtype)
    print(f"Gates: {len(bank.layer_ids)} layers, {weights} ({weights.stat().st_size / 2**20:.1f} MiB), {meta}")
    return 0
