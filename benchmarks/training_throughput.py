"""Feature-extraction throughput of ``fastkvzip-press train``: one process against torchrun ranks.

Each configuration trains into a fresh folder (``--max-tokens`` context tokens of the built-in corpus, a short fit) and
reads the extraction time from its ``report.json`` (``times.features_s``: from the start of the extraction until every
rank's shards are on disk). Configurations are ``ranks x threads per rank``; on a machine with C cores compare
``1 x C`` with ``C x 1`` (the same cores). On a GPU machine add ``--device cuda`` to run the ranks on GPUs.

    .venv/bin/python benchmarks/training_throughput.py                  # 1x1, 1x2, 2x1 on the default model
    .venv/bin/python benchmarks/training_throughput.py --configs 1x8 8x1 --max-tokens 65536

Writes ``<out>/training_throughput.{csv,md}`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from isolated import write_csv

ROOT = Path(__file__).resolve().parent.parent


def _run(ranks: int, threads: int, args: argparse.Namespace, out: Path) -> dict:
    train = ["-q", "train", "--model", args.model, "--corpus", args.corpus, "--out", str(out)]
    train += ["--max-tokens", str(args.max_tokens), "--context-len", str(args.context_len), "--steps", "20"]
    if args.device:
        train += ["--device", args.device]  # under torchrun "cuda" is each rank's own GPU
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    launcher += [] if ranks == 1 else [f"--nproc-per-node={ranks}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run([*launcher, "-m", "fastkvzip_press.cli", *train], env=env, check=True, capture_output=True)
    wall = time.perf_counter() - start
    report = json.loads((out / "report.json").read_text())
    tokens = report["train_tokens"] + report["val_tokens"]
    features_s = report["times"]["features_s"]
    return {
        "ranks": ranks,
        "threads_per_rank": threads,
        "context_tokens": tokens,
        "features_s": features_s,
        "tokens_per_s": tokens / features_s,
        "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["1x1", "1x2", "2x1"], help="RANKSxTHREADS per rank")
    parser.add_argument("--model", default="default")
    parser.add_argument("--corpus", default="builtin")
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--context-len", type=int, default=1024)
    parser.add_argument("--device", default=None, help="e.g. cuda (ranks take cuda:<local rank>)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for config in args.configs:
            ranks, threads = (int(part) for part in config.split("x"))
            rows.append(_run(ranks, threads, args, Path(scratch) / config))
            print(rows[-1], flush=True)
    base = rows[0]["tokens_per_s"]
    lines = [
        "| ranks x threads | context tokens | extraction s | tokens/s | vs first |",
        "|---|---|---|---|---|",
        *(
            f"| {r['ranks']} x {r['threads_per_rank']} | {r['context_tokens']} | {r['features_s']:.1f} "
            f"| {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base:.2f} |"
            for r in rows
        ),
    ]
    table = "\n".join(lines) + "\n"
    write_csv(rows, args.out / "training_throughput.csv")
    (args.out / "training_throughput.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
