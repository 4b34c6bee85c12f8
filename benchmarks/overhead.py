"""What the press costs: prefill and decode time of FastKVzipPress against no press, kvpress's FastKVzipPress (masked)
and kvpress's KVzip on the default model, plus peak memory with and without the press.

Timing runs load the model once per context and interleave the configurations (one prefill and a short greedy decode
of each per round, the order rotating each round), so that drifts of the machine hit all of them alike. Each ratio is
taken within a round (against that round's run without a press), and the table reports the median of those ratios
over rounds with their min-max. The decode is long enough (64 tokens) that the cache runs out of spare rows and
regrows during it, as it does in a real answer. Peak RSS and peak KV bytes come from one fresh process per
configuration, with glibc's allocator set to return freed blocks (``isolated.STEADY_MALLOC``).

    .venv/bin/python benchmarks/overhead.py                       # 512, 2k and 8k (about 60 min on 2 cores; alone)
    .venv/bin/python benchmarks/overhead.py --contexts 2048 --rounds 3 --decode-tokens 8

Writes ``<out>/overhead.{csv,md,png}`` (default ``benchmarks/results``). Gates: the shipped gates of the default model
unless ``--gates`` names others (kvpress's press is given the same gates).
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import time
from pathlib import Path

from isolated import add_shared_arguments, ran_as_worker, run_isolated, write_results

ROOT = Path(__file__).resolve().parent.parent
# name -> (kind, value); kinds: "none", "ours" (ratio), "threshold", "chunked" (ratio), "kvpress" (ratio), "kvzip"
CONFIGS = {
    "no press": ("none", 0.0),
    "FastKVzipPress 0.5": ("ours", 0.5),
    "FastKVzipPress 0.75": ("ours", 0.75),
    "FastKVzipPress threshold 0.05": ("threshold", 0.05),
    "FastKVzipPress 0.5 chunked 1024": ("chunked", 0.5),
    "kvpress FastKVzipPress 0.5 (masked)": ("kvpress", 0.5),
    "kvpress KVzipPress 0.5": ("kvzip", 0.5),
}
CHUNK_SIZE = 1024


def _setup(model_cache: str | None, gates: str | None, context: int):
    import torch

    from fastkvzip_press import load_gates
    from fastkvzip_press.cache import enable_ragged_attention
    from fastkvzip_press.models import default_model_dir, load_default_model

    torch.manual_seed(0)
    model, tokenizer = load_default_model(cache_dir=model_cache)
    text = (ROOT / "examples" / "harbor_town.txt").read_text()
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    ids = ids.repeat(-(-context // len(ids)))[:context][None]
    bank = load_gates(gates, model)
    # Every configuration runs with the same attention function (ragged eviction switches the model to a wrapper that
    # calls sdpa on ordinary layers; switching up front keeps "no press" rounds before and after it comparable).
    enable_ragged_attention(model)
    return model, ids, bank, str(default_model_dir(model_cache))


def _press(name: str, model, bank, tokenizer_path: str):
    from fastkvzip_press import FastKVzipPress
    from fastkvzip_press.evaluation.kvpress_presses import LocalTokenizerKVzipPress, kvpress_fastkvzip_with_gates

    kind, value = CONFIGS[name]
    if kind == "none":
        return None
    if kind == "ours":
        return FastKVzipPress(value, gates=bank)
    if kind == "threshold":
        return FastKVzipPress(threshold=value, gates=bank)
    if kind == "chunked":
        return FastKVzipPress(value, gates=bank, chunk_size=CHUNK_SIZE)
    if kind == "kvpress":
        return kvpress_fastkvzip_with_gates(bank, model, value)
    return LocalTokenizerKVzipPress(compression_ratio=value, tokenizer_path=tokenizer_path)


def _prefill_and_decode(model, ids, press, decode_tokens: int, on_layer=None) -> dict:
    """One prefill (under ``press``) and ``decode_tokens`` greedy steps after it; wall times and the final cache."""
    import torch
    from transformers import DynamicCache

    from fastkvzip_press import kv_cache_bytes

    cache = DynamicCache()
    hooks = []
    if on_layer is not None:
        # Registered before the press's hooks: sees each layer's cache before that layer's eviction runs.
        hooks = [layer.self_attn.register_forward_hook(lambda *_: on_layer(cache)) for layer in model.model.layers]
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
        token, position, steps = ids[:, -1:], ids.shape[1], []
        for step in range(decode_tokens + 1):
            start = time.perf_counter()
            logits = model(token, past_key_values=cache, position_ids=torch.tensor([[position]])).logits
            token, position = logits[:, -1:].argmax(-1), position + 1
            if step:  # the first step allocates spare rows and warms up
                steps.append(time.perf_counter() - start)
    achieved = getattr(press, "compression_ratio", 0.0) if press is not None else 0.0
    return {"prefill_s": prefill_s, "decode_ms": 1000 * statistics.mean(steps), "kv_bytes": kv_bytes, "ratio": achieved}


def _timing_worker(config: dict) -> dict:
    """All configurations at one context, interleaved over rounds in this process."""
    model, ids, bank, tokenizer_path = _setup(config["model_cache"], config["gates"], config["context"])
    names = list(config["names"])
    samples: dict[str, list[dict]] = {name: [] for name in names}
    _prefill_and_decode(model, ids, None, 2)  # warm-up: allocator, kernels, pages of the weights
    _prefill_and_decode(model, ids[:, :256], _press("FastKVzipPress 0.5", model, bank, tokenizer_path), 2)
    for round_index in range(config["rounds"]):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            press = _press(name, model, bank, tokenizer_path)
            samples[name].append(_prefill_and_decode(model, ids, press, config["decode_tokens"]))
            del press
            gc.collect()
    return {"context": config["context"], "samples": samples}


def _memory_worker(config: dict) -> dict:
    """One configuration in a fresh process: peak RSS, peak KV bytes during the prefill, KV bytes after it."""
    model, ids, bank, tokenizer_path = _setup(config["model_cache"], config["gates"], config["context"])
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak_kv = [0]

    def on_layer(cache) -> None:
        from fastkvzip_press import kv_cache_bytes

        peak_kv[0] = max(peak_kv[0], kv_cache_bytes(cache))

    press = _press(config["name"], model, bank, tokenizer_path)
    result = _prefill_and_decode(model, ids, press, 2, on_layer=on_layer)
    return {
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_after_load_bytes": rss_loaded,
        "peak_kv_bytes": max(peak_kv[0], result["kv_bytes"]),
        "kv_bytes": result["kv_bytes"],
    }


def _worker(config: dict) -> dict:
    return _timing_worker(config) if config["task"] == "timing" else _memory_worker(config)


def _rows(timings: list[dict], memory: dict[tuple[int, str], dict], decode_tokens: int) -> list[dict]:
    rows = []
    for result in timings:
        context, samples = result["context"], result["samples"]
        full = samples["no press"]
        full_kv = full[0]["kv_bytes"]
        weights = memory.get((context, "no press"), {}).get("weight_bytes", 0)
        for name, runs in samples.items():
            # Ratios within a round (runs[i] and full[i] ran minutes apart at most), then their median over rounds.
            prefill = [s["prefill_s"] / f["prefill_s"] for s, f in zip(runs, full)]
            decode = [s["decode_ms"] / f["decode_ms"] for s, f in zip(runs, full)]
            mem = memory.get((context, name), {})
            full_mem = memory.get((context, "no press"), {})
            kv = runs[0]["kv_bytes"]
            row = {
                "context": context,
                "press": name,
                "achieved_ratio": runs[0]["ratio"],
                "rounds": len(runs),
                "prefill_s": statistics.median(s["prefill_s"] for s in runs),
                "prefill_vs_none": statistics.median(prefill),
                "prefill_vs_none_min": min(prefill),
                "prefill_vs_none_max": max(prefill),
                "decode_ms_per_token": statistics.median(s["decode_ms"] for s in runs),
                "decode_vs_none": statistics.median(decode),
                "decode_vs_none_min": min(decode),
                "decode_vs_none_max": max(decode),
                "kv_vs_none": kv / full_kv,
                "bytes_ratio": (weights + kv) / (weights + full_kv) if weights else float("nan"),
                "peak_rss_mib": mem.get("peak_rss_bytes", 0) / 2**20,
                "peak_rss_vs_none": mem.get("peak_rss_bytes", 0) / full_mem["peak_rss_bytes"] if full_mem else 0.0,
                "peak_kv_mib": mem.get("peak_kv_bytes", 0) / 2**20,
                # Chunked prefill's bound: the retained cache plus one chunk of full KV.
                "peak_kv_vs_retained_plus_chunk": (
                    mem["peak_kv_bytes"] / (kv + full_kv * CHUNK_SIZE / context)
                    if CONFIGS[name][0] == "chunked" and mem
                    else float("nan")
                ),
                "decode_tokens": decode_tokens,
            }
            rows.append(row)
    return rows


def _markdown(rows: list[dict]) -> str:
    header = (
        "| context | press | achieved ratio | prefill s | prefill / none (min-max) | decode ms/token "
        "| decode / none (min-max) | KV / none | bytes ratio | peak RSS MiB | peak RSS / none | peak KV MiB "
        "| peak KV / (retained + chunk) |"
    )
    lines = [header, "|" + "---|" * 13]
    for r in rows:
        lines.append(
            f"| {r['context']} | {r['press']} | {r['achieved_ratio']:.3f} | {r['prefill_s']:.2f} "
            f"| {r['prefill_vs_none']:.3f} ({r['prefill_vs_none_min']:.2f}-{r['prefill_vs_none_max']:.2f}) "
            f"| {r['decode_ms_per_token']:.1f} "
            f"| {r['decode_vs_none']:.3f} ({r['decode_vs_none_min']:.2f}-{r['decode_vs_none_max']:.2f}) "
            f"| {r['kv_vs_none']:.3f} | {r['bytes_ratio']:.3f} | {r['peak_rss_mib']:.0f} "
            f"| {r['peak_rss_vs_none']:.3f} | {r['peak_kv_mib']:.1f} | {r['peak_kv_vs_retained_plus_chunk']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = sorted({r["context"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    for ax, key, label in ((axes[0], "prefill_vs_none", "prefill"), (axes[1], "decode_vs_none", "decode per token")):
        names = list(dict.fromkeys(r["press"] for r in rows))
        width = 0.8 / len(contexts)
        for i, context in enumerate(contexts):
            values = [next(r for r in rows if r["context"] == context and r["press"] == n) for n in names]
            ax.barh(
                [j + i * width for j in range(len(names))],
                [v[key] for v in values],
                height=width,
                xerr=[[v[key] - v[key + "_min"] for v in values], [v[key + "_max"] - v[key] for v in values]],
                label=f"{context} tokens",
            )
        ax.set_yticks([j + width * (len(contexts) - 1) / 2 for j in range(len(names))], names, fontsize=7)
        ax.axvline(1.0, color="gray", linestyle=":")
        ax.set_xlabel(f"{label} time / no press (median, min-max)")
        ax.legend(fontsize=7)
    fig.suptitle("Cost of the press on SmolLM2-135M-Instruct (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8000])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per context (medians over them)")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--presses", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), metavar="PRESS")
    parser.add_argument("--skip-memory", action="store_true", help="timings only (no fresh process per press)")
    add_shared_arguments(parser, ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if ran_as_worker(args, _worker):
        return 0
    if args.rounds < 1 or args.decode_tokens < 1:
        parser.error("--rounds and --decode-tokens must be >= 1")
    names = ["no press", *[name for name in args.presses if name != "no press"]]

    from tqdm import tqdm

    shared = {"model_cache": args.model_cache, "gates": args.gates}
    memory: dict[tuple[int, str], dict] = {}
    if not args.skip_memory:
        jobs = [(context, name) for context in args.contexts for name in names]
        for context, name in tqdm(jobs, desc="peak memory (one process each)"):
            memory[(context, name)] = run_isolated(
                __file__, {**shared, "task": "memory", "context": context, "name": name}, steady_malloc=True
            )
        for context in args.contexts:
            base = memory[(context, "no press")]
            base["weight_bytes"] = _weight_bytes(args.model_cache)
    timings = [
        run_isolated(
            __file__,
            {
                **shared,
                "task": "timing",
                "context": c,
                "names": names,
                "rounds": args.rounds,
                "decode_tokens": args.decode_tokens,
            },
        )
        for c in tqdm(args.contexts, desc="interleaved timings (one process per context)")
    ]
    rows = _rows(timings, memory, args.decode_tokens)
    write_results(rows, args.out, "overhead", _markdown(rows), _plot)
    return 0


def _weight_bytes(model_cache: str | None) -> int:
    """Bytes a decoding step reads of the model: its parameters (tied embeddings counted once)."""
    from fastkvzip_press.models import load_default_model

    model, _ = load_default_model(cache_dir=model_cache)
    return sum(p.numel() * p.element_size() for p in model.parameters())


if __name__ == "__main__":
    raise SystemExit(main())
