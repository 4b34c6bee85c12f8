"""Where a FastKVzipPress prefill spends its time beyond the model's own forward: a cProfile breakdown.

Runs the default model at one context: ``--rounds`` prefills without the press and with it (ratio ``--ratio``,
interleaved), then one profiled prefill with the press. Prints milliseconds per prefill and the share of the no-press
prefill for: the gate scores (their projections and logits, then the sink softmax), the selection
(``eviction.decide``), the compaction into ragged layers, and the rest of the press's hooks.

    .venv/bin/python benchmarks/profile_prefill.py --context 2048 --ratio 0.5
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# (label, file suffix, function name): cumulative time of these functions in the profiled prefill.
PARTS = (
    ("press hooks, all", "presses/prefill.py", "forward_hook"),
    ("gate scores", "gates/gate.py", "score"),
    ("  projections + logits", "gates/gate.py", "logits"),
    ("selection (decide)", "eviction/decision.py", "decide"),
    ("compaction", "presses/compaction.py", "evict_tail"),
)


def _cumulative(stats: pstats.Stats, suffix: str, name: str) -> float:
    return sum(
        entry[3] for (path, _, function), entry in stats.stats.items() if path.endswith(suffix) and function == name
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model-cache", default=None)
    args = parser.parse_args(argv)

    import torch
    from transformers import DynamicCache

    from fastkvzip_press import FastKVzipPress, load_gates
    from fastkvzip_press.cache import enable_ragged_attention
    from fastkvzip_press.models import load_default_model

    model, tokenizer = load_default_model(cache_dir=args.model_cache)
    enable_ragged_attention(model)
    ids = tokenizer((ROOT / "examples" / "harbor_town.txt").read_text(), return_tensors="pt").input_ids[0]
    ids = ids.repeat(-(-args.context // len(ids)))[: args.context][None]
    bank = load_gates(None, model)

    def prefill(press: FastKVzipPress | None) -> float:
        cache = DynamicCache()
        start = time.perf_counter()
        with torch.no_grad():
            if press is None:
                model.model(input_ids=ids, past_key_values=cache)
            else:
                with press(model):
                    model.model(input_ids=ids, past_key_values=cache)
        return time.perf_counter() - start

    prefill(None), prefill(FastKVzipPress(args.ratio, gates=bank))  # warm-up
    plain, pressed = [], []
    for _ in range(args.rounds):
        plain.append(prefill(None))
        pressed.append(prefill(FastKVzipPress(args.ratio, gates=bank)))
    profiler = cProfile.Profile()
    profiler.enable()
    prefill(FastKVzipPress(args.ratio, gates=bank))
    profiler.disable()
    stats = pstats.Stats(profiler)
    base = statistics.median(plain)
    print(f"context {args.context}, ratio {args.ratio}, {args.rounds} interleaved rounds")
    print(f"prefill without the press: {1000 * base:.0f} ms (median; min {1000 * min(plain):.0f})")
    with_press = statistics.median(pressed)
    print(f"prefill with the press:    {1000 * with_press:.0f} ms, {with_press / base:.3f}x")
    print("profiled prefill with the press (cProfile), ms and share of the prefill without it:")
    for label, suffix, name in PARTS:
        seconds = _cumulative(stats, suffix, name)
        print(f"  {label:<26} {1000 * seconds:8.1f} ms  {100 * seconds / base:5.2f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
