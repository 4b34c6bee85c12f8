"""Needle in a haystack on the default model in bf16 (or fp16): the full cache and FastKVzipPress with the shipped
gates, compared context by context with the fp32 run of ``benchmarks/niah_presses.py``.

    .venv/bin/python benchmarks/niah_bf16.py              # 10 contexts, about 6 min on 2 cores
    .venv/bin/python benchmarks/niah_bf16.py --contexts 2 --ratios 0.5 --out /tmp/niah   # a quick look

The contexts are the first ``--contexts`` of ``niah_presses.py``'s (same generator, seed and sizes), so every
context has an fp32 answer in ``benchmarks/results/niah.csv`` to compare with. The model is loaded with its
weights cast to ``--dtype`` (the GGUF default model is converted to fp32 once); the shipped gates are used as they
load (their scores are computed in fp32). Writes ``<out>/niah_{bf16,fp16,fp32}.{csv,md}`` (default
``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from niah_presses import add_niah_arguments, niah_setup, wilson  # noqa: E402  (a sibling script, not a package)

DTYPES = ("bfloat16", "float16", "float32")
SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def fp32_records(path: Path) -> dict[tuple[str, float], dict[int, dict]]:
    """``{(press, ratio): {context_id: row}}`` from ``niah_presses.py``'s CSV (empty when the file is missing)."""
    if not path.exists():
        return {}
    records: dict[tuple[str, float], dict[int, dict]] = {}
    with open(path) as handle:
        for row in csv.DictReader(handle):
            records.setdefault((row["press"], float(row["ratio"])), {})[int(row["context_id"])] = row
    return records


def write_report(configs, records, reference, out: Path, settings: dict) -> str:
    """Write ``niah_<dtype>.{csv,md}``; returns the markdown."""
    tag = SHORT[settings["dtype"]]
    with open(out / f"niah_{tag}.csv", "w", newline="") as handle:
        fields = ["press", "ratio", "context_id", "depth", "answer", "prediction", "score", "kv_fraction"]
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for name, ratio in configs:
            for r in records[name, ratio]:
                answer, prediction = r["answer"][0], r["prediction"].strip()
                writer.writerow({**r, "press": name, "ratio": ratio, "answer": answer, "prediction": prediction})
    lines = [
        f"Needle in a haystack on SmolLM2-135M-Instruct in {tag}: the first {settings['contexts']} contexts of "
        f"`niah_presses.py` (~{settings['tokens']} tokens, {settings['needles']} needles each, seed "
        f"{settings['seed']}), shipped gates. fp32: the same contexts in `benchmarks/results/niah.csv`.",
        "",
        f"| press | ratio | {tag} accuracy % | 95 % CI | fp32 accuracy % (same contexts) | same answer as fp32 "
        f"| stored KV / full | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, ratio in configs:
        rec = records[name, ratio]
        score = sum(r["score"] for r in rec)
        low, high = wilson(score, len(rec))
        ref = reference.get((name, ratio), {})
        same = [r for r in rec if r["context_id"] in ref]
        fp32 = f"{100 * sum(float(ref[r['context_id']]['score']) for r in same) / len(same):.1f}" if same else "n/a"
        agree = sum(r["prediction"].strip() == ref[r["context_id"]]["prediction"].strip() for r in same)
        agreement = f"{agree}/{len(same)}" if same else "n/a"
        kv = sum(r["kv_fraction"] for r in rec) / len(rec)
        lines.append(
            f"| {name} | {ratio:.2f} | {100 * score / len(rec):.1f} | {100 * low:.0f}-{100 * high:.0f} | {fp32} "
            f"| {agreement} | {kv:.3f} | {settings['seconds'][name, ratio]:.0f} |"
        )
    lines += ["", f"Command: `{settings['command']}`", ""]
    text = "\n".join(lines)
    (out / f"niah_{tag}.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    add_niah_arguments(parser, contexts=10)
    parser.add_argument("--fp32-csv", default=str(ROOT / "benchmarks" / "results" / "niah.csv"))
    args = parser.parse_args()
    import torch

    from fastkvzip_press import FastKVzipPress
    from fastkvzip_press.evaluation.answers import answer_rows

    model, pipe, rows = niah_setup(args, dtype=getattr(torch, args.dtype))
    settings = {
        "dtype": args.dtype,
        "contexts": args.contexts,
        "tokens": args.context_tokens,
        "needles": args.needles,
        "seed": args.seed,
        "seconds": {},
        "command": (
            f".venv/bin/python benchmarks/niah_bf16.py --dtype {args.dtype} "
            f"--contexts {args.contexts} --ratios {' '.join(str(r) for r in args.ratios)}"
        ),
    }
    configs = [("full", 0.0)] + [("fastkvzip", ratio) for ratio in args.ratios]
    records: dict[tuple[str, float], list[dict]] = {}
    for name, ratio in configs:
        press = None if name == "full" else FastKVzipPress(ratio)  # gates=None: the gates shipped for the model
        start = time.perf_counter()
        results = answer_rows(pipe, rows, press, progress=not args.quiet, desc=f"{name}@{ratio}")
        settings["seconds"][name, ratio] = time.perf_counter() - start
        records[name, ratio] = [{k: v for k, v in r.items() if k != "context"} for r in results]
        if press is not None:
            bank = press.gate_bank
            logging.info("gates: %s, model %s", next(bank.parameters()).dtype, model.dtype)
        accuracy = 100 * sum(r["score"] for r in results) / len(results)
        logging.info("%s@%s: accuracy %.1f%% in %.0fs", name, ratio, accuracy, settings["seconds"][name, ratio])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(write_report(configs, records, fp32_records(Path(args.fp32_csv)), out, settings))


if __name__ == "__main__":
    main()
