"""Saved contexts on the default model: file size against the full cache's, save and load time, and time to the first
answer token from a loaded file against a fresh prefill with and without the press, in one run.

    .venv/bin/python benchmarks/saved_context.py                 # 2k and 8k tokens, ratios 0.5 / 0.75 / chunked

Each context is a NIAH sample (``fastkvzip_press.evaluation.make_niah_samples``) so that its answer can be checked.
For every configuration the answer from the loaded file must equal the answer given right after compression.
Writes ``<out>/saved_context.{csv,md,png}``.
"""

from __future__ import annotations

import argparse
import csv
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = (("0.5", 0.5, None), ("0.75", 0.75, None), ("0.5 chunked", 0.5, 1024))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", nargs="+", type=int, default=[2000, 8000], help="context tokens")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (medians)")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--model-cache", default=None)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("-q", "--quiet", action="store_true")
    return parser.parse_args(argv)


@torch.no_grad()
def compress(model, context_ids, press):
    """The context's cache after its prefill (under ``press``, or full)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    if press is None:
        model.model(input_ids=context_ids, past_key_values=cache)
    else:
        with press(model):
            model.model(input_ids=context_ids, past_key_values=cache)
    return cache


@torch.no_grad()
def first_token_after_prefill(model, context_ids, question_ids, press) -> tuple[float, object]:
    """Seconds from nothing to the first answer token: prefill (under ``press``), then the question."""
    start = time.perf_counter()
    cache = compress(model, context_ids, press)
    model(input_ids=question_ids, past_key_values=cache).logits[:, -1].argmax(-1)
    return time.perf_counter() - start


@torch.no_grad()
def first_token_from_file(model, path, question_ids) -> tuple[float, float]:
    """Seconds to load the file, and to the first answer token (load included)."""
    from fastkvzip_press.saved_cache import load_cache

    start = time.perf_counter()
    loaded = load_cache(path, model)
    loaded_at = time.perf_counter() - start
    model(input_ids=question_ids, past_key_values=loaded.cache).logits[:, -1].argmax(-1)
    return loaded_at, time.perf_counter() - start


def measure(model, tokenizer, row, args, folder: Path) -> list[dict]:
    """Every configuration on one NIAH row."""
    from fastkvzip_press import FastKVzipPress
    from fastkvzip_press.evaluation import string_match
    from fastkvzip_press.presses.pipeline import kvpress_pipeline
    from fastkvzip_press.saved_cache import LoadedCache, answer_questions, load_cache, save_cache

    pipe = kvpress_pipeline(model, tokenizer)
    inputs = pipe.preprocess(row["context"], [row["question"]], row["answer_prefix"], 10**9)
    context_ids, question_ids = inputs["context_ids"], inputs["questions_ids"][0]
    n_tokens = context_ids.shape[1]
    full_size = save_cache(compress(model, context_ids, None), folder / "full.kvz", model, context_ids=context_ids)
    no_press = statistics.median(
        first_token_after_prefill(model, context_ids, question_ids, None) for _ in range(args.repeats)
    )
    answers = row["answer"] if isinstance(row["answer"], list) else [row["answer"]]
    rows = []
    for name, ratio, chunk in CONFIGS:
        press = FastKVzipPress(ratio, chunk_size=chunk)
        fresh = statistics.median(
            first_token_after_prefill(model, context_ids, question_ids, press) for _ in range(args.repeats)
        )
        cache = compress(model, context_ids, press)
        path = folder / f"context-{name.replace(' ', '-')}.kvz"
        saves = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            size = save_cache(cache, path, model, context_ids=context_ids, press=press)
            saves.append(time.perf_counter() - start)
        loads, firsts = zip(*(first_token_from_file(model, path, question_ids) for _ in range(args.repeats)))
        right_away = LoadedCache.of(cache, model, context_ids)
        now = answer_questions(model, right_away, [question_ids], args.max_new_tokens)
        later = answer_questions(model, load_cache(path, model), [question_ids], args.max_new_tokens)
        answer = tokenizer.decode(later[0], skip_special_tokens=True).strip()
        ttft = statistics.median(firsts)
        rows.append(
            {
                "context_tokens": n_tokens,
                "config": name,
                "file_mib": size / 2**20,
                "full_file_mib": full_size / 2**20,
                "file_fraction": size / full_size,
                "save_s": statistics.median(saves),
                "load_s": statistics.median(loads),
                "ttft_loaded_s": ttft,
                "ttft_prefill_press_s": fresh,
                "ttft_prefill_full_s": no_press,
                "speedup_vs_press": fresh / ttft,
                "speedup_vs_full": no_press / ttft,
                "same_answer": now == later,
                "correct": string_match(answer, answers),
                "answer": answer,
            }
        )
        logging.info("%d tokens, %s: %.1fx sooner than a prefill with the press", n_tokens, name, fresh / ttft)
    return rows


def write_report(rows: list[dict], out: Path, command: str) -> None:
    with open(out / "saved_context.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "Saved contexts on SmolLM2-135M-Instruct (fp32, CPU): one NIAH context per length, the shipped gates; medians "
        "of the timed rounds. TTFT from the file includes loading it.",
        "",
        "| context | press | file MiB | full-cache file MiB | file / full | save s | load s | TTFT from file s "
        "| TTFT prefill + press s | TTFT full prefill s | x sooner (press) | x sooner (full) | same answer | answer |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['context_tokens']} | {r['config']} | {r['file_mib']:.2f} | {r['full_file_mib']:.2f} "
            f"| {r['file_fraction']:.3f} | {r['save_s']:.3f} | {r['load_s']:.3f} | {r['ttft_loaded_s']:.3f} "
            f"| {r['ttft_prefill_press_s']:.2f} | {r['ttft_prefill_full_s']:.2f} | {r['speedup_vs_press']:.1f} "
            f"| {r['speedup_vs_full']:.1f} | {'yes' if r['same_answer'] else 'NO'} | {r['answer'][:40]} |"
        )
    lines += ["", f"Command: `{command}`", ""]
    (out / "saved_context.md").write_text("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    labels = [f"{r['context_tokens']} {r['config']}" for r in rows]
    axes[0].bar(labels, [r["file_fraction"] for r in rows], color="#4c72b0")
    axes[0].set_title("file size / full cache's")
    axes[1].bar(labels, [r["speedup_vs_press"] for r in rows], color="#55a868")
    axes[1].set_title("first token: x sooner than prefill + press")
    for axis in axes:
        axis.tick_params(axis="x", rotation=30)
    figure.tight_layout()
    figure.savefig(out / "saved_context.png", dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    import sys

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    from fastkvzip_press.cli import quiet_other_libraries

    quiet_other_libraries()
    from fastkvzip_press.evaluation import NeedleConfig, make_niah_samples, stdlib_paragraphs
    from fastkvzip_press.models import load_default_model

    torch.manual_seed(0)
    model, tokenizer = load_default_model(cache_dir=args.model_cache)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for length in args.lengths:
            config = NeedleConfig(context_tokens=length, n_needles=3)
            [row] = make_niah_samples(tokenizer, stdlib_paragraphs(), n_contexts=1, config=config, seed=0)
            rows += measure(model, tokenizer, row, args, Path(folder))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/saved_context.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_report(rows, out, command.strip())
    print((out / "saved_context.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
