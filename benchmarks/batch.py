"""Batches on the default model: decode throughput, stored KV and peak process memory of FastKVzipPress against the
full cache and the masked path (kvpress's attention patch, the same eviction without freeing memory), in one run.

    .venv/bin/python benchmarks/batch.py                 # batch 1/4/8 x 2k/4k x ratios 0.5/0.75 (~30 min, 2 cores)
    .venv/bin/python benchmarks/batch.py --batches 1 4 --contexts 2048 --decode-tokens 8

Every configuration runs in a fresh process (its peak RSS is its own). A batch holds ``batch`` different contexts of
``context`` tokens cut from ``examples/harbor_town.txt`` at different offsets (equal lengths, so the full cache and
the masked path need no padding). The prefill runs under the press (``compression_ratio`` over each sequence); then
``--decode-tokens`` greedy steps are timed one by one for the whole batch; tokens/s is ``batch`` over the median step.
Gates are random (seeded) unless ``--gates`` names a gate file: memory and speed do not depend on gate quality.
Writes ``<out>/batch.{csv,md,png}`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

from isolated import add_shared_arguments, ran_as_worker, run_isolated, write_results

ROOT = Path(__file__).resolve().parent.parent
MODES = ("none", "ragged", "masked")


def _contexts(tokenizer, batch: int, context: int):
    """``[batch, context]`` token ids: the example text repeated, each sequence starting at its own offset."""
    import torch

    text = (ROOT / "examples" / "harbor_town.txt").read_text()
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    long = ids.repeat(-(-(context + 97 * batch) // len(ids)))
    return torch.stack([long[97 * b : 97 * b + context] for b in range(batch)])


def _worker(config: dict) -> dict:
    """One configuration in this process: prefill a batch under the press, then time greedy decoding steps."""
    import torch
    from transformers import DynamicCache

    from fastkvzip_press import FastKVzipPress, GateBank, ModelLayout, kv_cache_bytes, load_gates
    from fastkvzip_press.models import load_default_model

    torch.manual_seed(0)
    model, tokenizer = load_default_model(cache_dir=config["model_cache"])
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ids = _contexts(tokenizer, config["batch"], config["context"])
    press = None
    if config["mode"] != "none":
        layout = ModelLayout.from_model(model)
        gates = load_gates(config["gates"], model) if config["gates"] else GateBank.random(layout, seed=0)
        press = FastKVzipPress(config["ratio"], gates=gates, compaction=config["mode"])
    cache = DynamicCache()
    with torch.no_grad():
        start = time.perf_counter()
        if press is None:
            model.model(input_ids=ids, past_key_values=cache)
        else:
            with press(model):
                model.model(input_ids=ids, past_key_values=cache)
        prefill_s = time.perf_counter() - start
        kv_bytes = kv_cache_bytes(cache)
        tokens = ids[:, -1:]
        position = ids.shape[1]
        step_times = []
        for step in range(config["decode_tokens"] + 2):
            start = time.perf_counter()
            positions = torch.full((ids.shape[0], 1), position)
            tokens = model(tokens, past_key_values=cache, position_ids=positions).logits[:, -1:].argmax(-1)
            position += 1
            if step >= 2:  # the first steps allocate spare rows and warm up kernels
                step_times.append(time.perf_counter() - start)
    return {
        **{k: config[k] for k in ("batch", "context", "ratio", "mode")},
        "kv_bytes": kv_bytes,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_after_load_bytes": rss_loaded,
        "prefill_s": prefill_s,
        "step_ms": 1000 * statistics.median(step_times),
        "tokens_per_s": ids.shape[0] / statistics.median(step_times),
        "achieved_ratio": press.last_stats.compression_ratio if press is not None else 0.0,
    }


def _with_ratios(rows: list[dict]) -> list[dict]:
    """Ratios against the full cache at the same batch and context, and against the masked path at the same ratio."""
    full = {(r["batch"], r["context"]): r for r in rows if r["mode"] == "none"}
    masked = {(r["batch"], r["context"], r["ratio"]): r for r in rows if r["mode"] == "masked"}
    for row in rows:
        base, mask = full[(row["batch"], row["context"])], masked.get((row["batch"], row["context"], row["ratio"]))
        row["kv_vs_full"] = row["kv_bytes"] / base["kv_bytes"]
        row["rss_vs_full"] = row["peak_rss_bytes"] / base["peak_rss_bytes"]
        row["tokens_per_s_vs_full"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["tokens_per_s_vs_masked"] = row["tokens_per_s"] / mask["tokens_per_s"] if mask else float("nan")
    return rows


def _markdown(rows: list[dict], command: str) -> str:
    lines = [
        "| batch | context | mode | ratio | KV MiB | KV / full | peak RSS MiB | RSS / full | prefill s | tokens/s "
        "| tokens/s / full | tokens/s / masked |",
        "|" + "---|" * 12,
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['context']} | {r['mode']} | {r['ratio']:.2f} | {r['kv_bytes'] / 2**20:.1f} "
            f"| {r['kv_vs_full']:.3f} | {r['peak_rss_bytes'] / 2**20:.0f} | {r['rss_vs_full']:.2f} "
            f"| {r['prefill_s']:.1f} | {r['tokens_per_s']:.1f} | {r['tokens_per_s_vs_full']:.2f} "
            f"| {r['tokens_per_s_vs_masked']:.2f} |"
        )
    return "\n".join(lines) + f"\n\nCommand: `{command}`\n"


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = sorted({r["context"] for r in rows})
    ratios = sorted({r["ratio"] for r in rows if r["mode"] != "none"})
    panels = (("tokens_per_s", "decode tokens/s"), ("kv_bytes", "stored KV MiB"), ("peak_rss_bytes", "peak RSS MiB"))
    fig, axes = plt.subplots(len(contexts), 3, figsize=(15, 4 * len(contexts)), squeeze=False)
    for row_axes, context in zip(axes, contexts):
        for ax, (key, label) in zip(row_axes, panels):
            scale = 1 if key == "tokens_per_s" else 2**20
            series = [("none", 0.0)] + [(mode, ratio) for mode in MODES[1:] for ratio in ratios]
            for mode, ratio in series:
                points = sorted(
                    (r["batch"], r[key] / scale)
                    for r in rows
                    if r["mode"] == mode and r["context"] == context and (mode == "none" or r["ratio"] == ratio)
                )
                style = {"none": ":", "ragged": "-", "masked": "--"}[mode]
                name = "full cache" if mode == "none" else f"{mode} {ratio:.2f}"
                ax.plot(*zip(*points), marker="o", linestyle=style, label=name)
            ax.set_xlabel("batch")
            ax.set_ylabel(label)
            ax.set_title(f"{context} tokens")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("FastKVzipPress batches on SmolLM2-135M-Instruct (CPU): ragged frees memory, masked does not")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--decode-tokens", type=int, default=16)
    add_shared_arguments(parser, ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if ran_as_worker(args, _worker):
        return 0
    from tqdm import tqdm

    shared = {"decode_tokens": args.decode_tokens, "gates": args.gates, "model_cache": args.model_cache}
    configs = []
    for context in args.contexts:
        for batch in args.batches:
            configs.append({**shared, "batch": batch, "context": context, "ratio": 0.0, "mode": "none"})
            # ragged and masked alternate, so that slow drifts of the machine hit both alike
            configs += [
                {**shared, "batch": batch, "context": context, "ratio": ratio, "mode": mode}
                for ratio in args.ratios
                for mode in MODES[1:]
            ]
    rows = _with_ratios([run_isolated(__file__, config) for config in tqdm(configs, desc="configurations")])
    command = "python benchmarks/batch.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_results(rows, args.out, "batch", _markdown(rows, command.strip()), _plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
