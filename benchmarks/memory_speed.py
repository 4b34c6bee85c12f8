"""KV memory, peak process memory, prefill and decode speed of FastKVzipPress on the default model.

Compares, in one run and as ratios: no press (full cache), masked eviction (kvpress-style: full-size cache, evicted
keys masked through kvpress's attention patch), ragged eviction (memory really freed), and ragged eviction with
chunked prefill. Every configuration runs in a fresh process so that its peak RSS is its own.

    .venv/bin/python benchmarks/memory_speed.py                       # 2k/4k/8k x 5 ratios (about 15 min on 2 cores)
    .venv/bin/python benchmarks/memory_speed.py --contexts 2048 --ratios 0.5 0.9 --decode-tokens 8

Writes ``<out>/memory_speed.{csv,md,png}`` (default ``benchmarks/results``). Gates are random (seeded) unless
``--gates`` names a gate file: memory and speed do not depend on gate quality, answers do.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from pathlib import Path

from isolated import add_shared_arguments, ran_as_worker, run_isolated, write_results

ROOT = Path(__file__).resolve().parent.parent
MODES = ("none", "masked", "ragged", "ragged+chunked")
MAX_CONTEXT = 8192


def _worker(config: dict) -> dict:
    """One configuration in this process: prefill, then greedy decode; returns the measurements."""
    import torch
    from transformers import DynamicCache

    from fastkvzip_press import FastKVzipPress, GateBank, ModelLayout, kv_cache_bytes, load_gates
    from fastkvzip_press.models import load_default_model

    torch.manual_seed(0)
    model, tokenizer = load_default_model(cache_dir=config["model_cache"])
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    text = (ROOT / "examples" / "harbor_town.txt").read_text()
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    repeats = -(-config["context"] // len(ids))
    ids = ids.repeat(repeats)[: config["context"]][None]

    press = None
    if config["mode"] != "none":
        layout = ModelLayout.from_model(model)
        gates = load_gates(config["gates"], model) if config["gates"] else GateBank.random(layout, seed=0)
        press = FastKVzipPress(
            config["ratio"],
            gates=gates,
            compaction="masked" if config["mode"] == "masked" else "ragged",
            chunk_size=config["chunk_size"] if config["mode"] == "ragged+chunked" else None,
        )

    cache = DynamicCache()
    peak_kv = [0]
    # Registered before the press's hooks, so it sees each layer's cache before that layer's eviction runs.
    hooks = [
        layer.self_attn.register_forward_hook(lambda *_: peak_kv.__setitem__(0, max(peak_kv[0], kv_cache_bytes(cache))))
        for layer in model.model.layers
    ]
    with torch.no_grad():
        start = time.perf_counter()
        if press is None:
            model.model(input_ids=ids, past_key_values=cache)
        else:
            with press(model):
                model.model(input_ids=ids, past_key_values=cache)
        prefill_s = time.perf_counter() - start
        for hook in hooks:
            hook.remove()
        kv_bytes = kv_cache_bytes(cache)

        token = ids[:, -1:]
        position = ids.shape[1]
        step_times = []
        for step in range(config["decode_tokens"] + 2):
            start = time.perf_counter()
            logits = model(token, past_key_values=cache, position_ids=torch.tensor([[position]])).logits
            token = logits[:, -1:].argmax(-1)
            position += 1
            if step >= 2:  # the first steps allocate spare rows and warm up kernels
                step_times.append(time.perf_counter() - start)
    return {
        **{k: config[k] for k in ("context", "ratio", "mode")},
        "kv_bytes": kv_bytes,
        "peak_kv_bytes": peak_kv[0],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_after_load_bytes": rss_loaded,
        "prefill_s": prefill_s,
        "decode_ms_per_token": 1000 * statistics.median(step_times),
        "achieved_ratio": press.last_stats.compression_ratio if press and press.last_stats else 0.0,
    }


def _with_ratios(rows: list[dict]) -> list[dict]:
    """Add ratios against the full cache (no press) and against masked eviction at the same context and ratio."""
    base = {row["context"]: row for row in rows if row["mode"] == "none"}
    masked = {(row["context"], row["ratio"]): row for row in rows if row["mode"] == "masked"}
    for row in rows:
        full, mask = base[row["context"]], masked.get((row["context"], row["ratio"]))
        row["kv_vs_full"] = row["kv_bytes"] / full["kv_bytes"]
        row["peak_kv_vs_full"] = row["peak_kv_bytes"] / full["peak_kv_bytes"]
        row["prefill_vs_full"] = row["prefill_s"] / full["prefill_s"]
        row["decode_vs_full"] = row["decode_ms_per_token"] / full["decode_ms_per_token"]
        row["decode_vs_masked"] = row["decode_ms_per_token"] / mask["decode_ms_per_token"] if mask else float("nan")
    return rows


def _markdown(rows: list[dict]) -> str:
    header = (
        "| context | mode | ratio | achieved | KV MiB | KV / full | peak KV / full | peak RSS MiB | prefill s "
        "| prefill / full | decode ms/token | decode / full | decode / masked |"
    )
    lines = [header, "|" + "---|" * 13]
    for r in rows:
        lines.append(
            f"| {r['context']} | {r['mode']} | {r['ratio']:.2f} | {r['achieved_ratio']:.3f} "
            f"| {r['kv_bytes'] / 2**20:.1f} | {r['kv_vs_full']:.3f} | {r['peak_kv_vs_full']:.3f} "
            f"| {r['peak_rss_bytes'] / 2**20:.0f} | {r['prefill_s']:.2f} | {r['prefill_vs_full']:.2f} "
            f"| {r['decode_ms_per_token']:.1f} | {r['decode_vs_full']:.2f} | {r['decode_vs_masked']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = sorted({r["context"] for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    panels = (("kv_vs_full", "KV bytes / full cache"), ("peak_kv_vs_full", "peak KV bytes / full cache"))
    for ax, (key, label) in zip(axes[:2], panels):
        for mode in MODES[1:]:
            for context in contexts:
                points = sorted((r["ratio"], r[key]) for r in rows if r["mode"] == mode and r["context"] == context)
                ax.plot(*zip(*points), marker="o", label=f"{mode} {context}")
        ax.set_xlabel("compression ratio")
        ax.set_ylabel(label)
    for mode in MODES[1:]:
        for context in contexts:
            points = sorted(
                (r["ratio"], r["decode_ms_per_token"]) for r in rows if r["mode"] == mode and r["context"] == context
            )
            axes[2].plot(*zip(*points), marker="o", label=f"{mode} {context}")
    for context in contexts:
        full = next(r for r in rows if r["mode"] == "none" and r["context"] == context)
        axes[2].axhline(full["decode_ms_per_token"], linestyle=":", color="gray")
    axes[2].set_xlabel("compression ratio")
    axes[2].set_ylabel("decode ms / token (dotted: full cache)")
    axes[2].legend(fontsize=7)
    fig.suptitle("FastKVzipPress on SmolLM2-135M-Instruct (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, MAX_CONTEXT - 64])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.7, 0.9])
    parser.add_argument("--decode-tokens", type=int, default=24)
    parser.add_argument("--chunk-size", type=int, default=1024)
    add_shared_arguments(parser, ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if ran_as_worker(args, _worker):
        return 0
    if max(args.contexts) + args.decode_tokens + 2 > MAX_CONTEXT:
        parser.error(f"context + decoded tokens must fit the model's {MAX_CONTEXT} positions")

    from tqdm import tqdm

    shared = {"decode_tokens": args.decode_tokens, "chunk_size": args.chunk_size, "gates": args.gates}
    shared["model_cache"] = args.model_cache
    configs = [{**shared, "context": c, "ratio": 0.0, "mode": "none"} for c in args.contexts]
    configs += [
        {**shared, "context": c, "ratio": r, "mode": m} for c in args.contexts for m in MODES[1:] for r in args.ratios
    ]
    rows = _with_ratios([run_isolated(__file__, config) for config in tqdm(configs, desc="configurations")])
    write_results(rows, args.out, "memory_speed", _markdown(rows), _plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
