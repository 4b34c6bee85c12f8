"""Needle-in-a-haystack accuracy on the default model: FastKVzipPress with the shipped gates against the full cache
and kvpress's StreamingLLMPress and KnormPress, at the same compression ratios, in one run.

    .venv/bin/python benchmarks/niah_presses.py              # 24 contexts of ~2k tokens x 7 configs, ~20 min
    .venv/bin/python benchmarks/niah_presses.py --contexts 4 --presses fastkvzip --ratios 0.5

Contexts come from :func:`fastkvzip_press.evaluation.make_niah_samples` over the standard library's docstring prose
(disjoint from the gates' training text): each holds several needles of different kinds at random depths, one of
which is asked about; the others are distractors. The score is RULER's string match of the 7-digit answer.
Finished configurations are kept in ``<out>/niah_runs/`` and skipped on a rerun with the same settings. Writes
``<out>/niah.{csv,md}`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRESSES = (
    "fastkvzip",
    "fastkvzip_chunked",
    "fastkvzip_uniform",
    "fastkvzip_uniform_chunked",
    "fastkvzip_random",
    "streaming_llm",
    "knorm",
    "snapkv",
)
CHUNK_SIZE = 256  # the *_chunked presses: benchmarks/vllm_serving.py's default --chunk-size
DEPTH_BINS = ((0.0, 1 / 3), (1 / 3, 2 / 3), (2 / 3, 1.0001))


def build_press(name: str, ratio: float, model):
    """A fresh press; ``None`` for the full cache. kvpress's presses come from the ``eval`` command's registry."""
    from fastkvzip_press import FastKVzipPress, GateBank, ModelLayout
    from fastkvzip_press.evaluation.registry import PressResources, press_spec

    if name == "full":
        return None
    if name == "fastkvzip":
        return FastKVzipPress(ratio)  # gates=None: the gates shipped for the default model
    if name == "fastkvzip_chunked":  # compacted every CHUNK_SIZE tokens (vLLM's chunk_size)
        return FastKVzipPress(ratio, chunk_size=CHUNK_SIZE)
    if name == "fastkvzip_uniform":  # the same count in every layer and KV head
        return FastKVzipPress(ratio, uniform=True)
    if name == "fastkvzip_uniform_chunked":  # the same, compacted every CHUNK_SIZE tokens
        return FastKVzipPress(ratio, uniform=True, chunk_size=CHUNK_SIZE)
    if name == "fastkvzip_random":
        return FastKVzipPress(ratio, gates=GateBank.random(ModelLayout.from_model(model), seed=0))
    return press_spec(name).build(ratio, PressResources(model))


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson 95 % interval of a proportion."""
    if n == 0:
        return 0.0, 0.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def write_report(configs: list[tuple[str, float]], records: dict[str, list[dict]], out: Path, settings: dict) -> None:
    rows = [r | {"press": name, "ratio": ratio} for name, ratio in configs for r in records[f"{name}@{ratio}"]]
    with open(out / "niah.csv", "w", newline="") as handle:
        fields = ["press", "ratio", "context_id", "depth", "answer", "prediction", "score", "kv_fraction"]
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**r, "answer": r["answer"][0], "prediction": r["prediction"].strip()} for r in rows)
    full = records.get("full@0.0")
    full_score = 100 * sum(r["score"] for r in full) / len(full) if full else None
    lines = [
        f"Needle in a haystack on SmolLM2-135M-Instruct: {settings['contexts']} contexts of ~{settings['tokens']} "
        f"tokens, {settings['needles']} needles each (1 asked, the rest distractors), seed {settings['seed']}.",
        "",
        "| press | ratio | accuracy % | 95 % CI | vs full (points) | stored KV / full | depth 0-⅓ | ⅓-⅔ | ⅔-1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, ratio in configs:
        rec = records[f"{name}@{ratio}"]
        score = sum(r["score"] for r in rec)
        low, high = wilson(score, len(rec))
        delta = "" if full_score is None or name == "full" else f"{100 * score / len(rec) - full_score:+.1f}"
        by_depth = []
        for lo, hi in DEPTH_BINS:
            part = [r["score"] for r in rec if lo <= r["depth"] < hi]
            by_depth.append(f"{sum(part):.0f}/{len(part)}")
        kv = sum(r["kv_fraction"] for r in rec) / len(rec)
        lines.append(
            f"| {name} | {ratio:.2f} | {100 * score / len(rec):.1f} | {100 * low:.0f}-{100 * high:.0f} | {delta} "
            f"| {kv:.3f} | " + " | ".join(by_depth) + " |"
        )
    lines += ["", f"Command: `{settings['command']}`", ""]
    (out / "niah.md").write_text("\n".join(lines))


def add_niah_arguments(parser: argparse.ArgumentParser, contexts: int) -> None:
    """The NIAH set's flags (contexts, length, needles, ratios, seed), output, model cache and quiet."""
    parser.add_argument("--contexts", type=int, default=contexts)
    parser.add_argument("--context-tokens", type=int, default=2000)
    parser.add_argument("--needles", type=int, default=3, help="needles per context (1 asked, the rest distractors)")
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.75])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--model-cache", default=None)
    parser.add_argument("-q", "--quiet", action="store_true")


def niah_setup(args: argparse.Namespace, dtype=None):
    """Logging, the default model (in ``dtype``; fp32 by default), kvpress's pipeline and the seeded NIAH rows that
    ``args`` describe: ``(model, pipeline, rows)``."""
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    import torch
    from transformers.utils import logging as hf_logging

    if args.quiet:
        hf_logging.disable_progress_bar()

    from fastkvzip_press.evaluation import NeedleConfig, make_niah_samples, stdlib_paragraphs
    from fastkvzip_press.models import load_default_model
    from fastkvzip_press.presses.pipeline import kvpress_pipeline

    torch.manual_seed(0)
    model, tokenizer = load_default_model(cache_dir=args.model_cache, **({} if dtype is None else {"dtype": dtype}))
    config = NeedleConfig(context_tokens=args.context_tokens, n_needles=args.needles)
    rows = make_niah_samples(tokenizer, stdlib_paragraphs(), n_contexts=args.contexts, config=config, seed=args.seed)
    return model, kvpress_pipeline(model, tokenizer), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_niah_arguments(parser, contexts=24)
    parser.add_argument("--presses", nargs="+", default=["fastkvzip", "streaming_llm", "knorm"], choices=PRESSES)
    args = parser.parse_args()
    model, pipe, rows = niah_setup(args)
    from fastkvzip_press.evaluation.answers import answer_rows

    settings = {"contexts": args.contexts, "tokens": args.context_tokens, "needles": args.needles, "seed": args.seed}
    settings["command"] = (
        f"python benchmarks/niah_presses.py --contexts {args.contexts} --needles {args.needles} --seed {args.seed} "
        f"--presses {' '.join(args.presses)} --ratios {' '.join(str(r) for r in args.ratios)}"
    )

    out = Path(args.out)
    runs = out / "niah_runs"
    runs.mkdir(parents=True, exist_ok=True)
    configs = [("full", 0.0)] + [(name, ratio) for ratio in args.ratios for name in args.presses]
    records: dict[str, list[dict]] = {}
    for name, ratio in configs:
        key = f"{name}@{ratio}"
        path = runs / f"{key}.json"
        if path.exists():
            saved = json.loads(path.read_text())
            if saved["settings"] == {k: v for k, v in settings.items() if k != "command"}:
                records[key] = saved["records"]
                logging.info("%s: reusing %s", key, path)
                continue
        start = time.perf_counter()
        results = answer_rows(pipe, rows, build_press(name, ratio, model), progress=not args.quiet, desc=key)
        records[key] = [{k: v for k, v in r.items() if k != "context"} for r in results]
        saved = {"settings": {k: v for k, v in settings.items() if k != "command"}, "records": records[key]}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(saved))
        tmp.replace(path)
        accuracy = 100 * sum(r["score"] for r in results) / len(results)
        logging.info("%s: accuracy %.1f%% in %.0fs", key, accuracy, time.perf_counter() - start)
    write_report(configs, records, out, settings)
    print((out / "niah.md").read_text())


if __name__ == "__main__":
    main()
