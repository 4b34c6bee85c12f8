"""Eviction during generation on the default model: FastKVzipDecodingPress against the full cache and kvpress's
``DecodingPress(KnormPress())``, in one run, as ratios.

    .venv/bin/python benchmarks/decoding.py                          # 1k-token prompt, 2k generated (~12 min)
    .venv/bin/python benchmarks/decoding.py --new-tokens 256 --target-size 256

1. The full cache greedily generates ``--new-tokens`` tokens after the prompt (a story retold from
   ``examples/harbor_town.txt``; the end-of-sequence token is suppressed so every run has the same length).
2. Each press then replays that sequence token by token (teacher forcing) with eviction active. Fidelity is the
   share of steps whose greedy next token equals the full cache's, plus the first step where they differ. KV bytes
   are read after every step (peak and final); speed is tokens per second over the replay.

Writes ``<out>/decoding.{csv,md}`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INSTRUCTION = "\n\nRetell this story in your own words, in detail, paragraph by paragraph."


def replay(model, prompt_ids, sequence, press, progress: bool) -> dict:
    """Teacher-force ``sequence [n]`` after ``prompt_ids [1, P]`` with ``press`` active; per-step measurements."""
    import torch
    from tqdm.auto import tqdm
    from transformers import DynamicCache

    from fastkvzip_press import kv_cache_bytes

    cache = DynamicCache()
    context = press(model) if press is not None else torch.no_grad()
    agree, kv, first_miss = [], [], None
    with torch.no_grad(), context:
        start = time.perf_counter()
        out = model(prompt_ids, past_key_values=cache)
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        for step in tqdm(range(len(sequence)), disable=not progress, leave=False, desc="replay"):
            predicted = int(out.logits[0, -1].argmax())
            agree.append(predicted == int(sequence[step]))
            if not agree[-1] and first_miss is None:
                first_miss = step
            out = model(sequence[step].view(1, 1), past_key_values=cache)
            kv.append(kv_cache_bytes(cache))
        decode_s = time.perf_counter() - start
    return {
        "agreement": sum(agree) / len(agree),
        "first_divergence": first_miss if first_miss is not None else len(sequence),
        "peak_kv_bytes": max(kv),
        "final_kv_bytes": kv[-1],
        "prefill_s": prefill_s,
        "tokens_per_s": len(sequence) / decode_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=2048)
    parser.add_argument("--target-size", type=int, default=1024, help="pairs kept per head on average")
    parser.add_argument("--interval", type=int, default=128, help="tokens between compressions")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--model-cache", default=None)
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args()

    import torch
    from transformers.utils import logging as hf_logging

    if args.quiet:
        hf_logging.disable_progress_bar()
    from kvpress import DecodingPress, KnormPress

    from fastkvzip_press import FastKVzipDecodingPress
    from fastkvzip_press.models import load_default_model

    torch.manual_seed(0)
    model, tokenizer = load_default_model(cache_dir=args.model_cache)
    story = (ROOT / "examples" / "harbor_town.txt").read_text()
    story_ids = tokenizer(story).input_ids
    story = tokenizer.decode(story_ids[: args.prompt_tokens - 40])  # leave room for the template and instruction
    prompt_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": story + INSTRUCTION}], add_generation_prompt=True, return_tensors="pt"
    )
    if not isinstance(prompt_ids, torch.Tensor):
        prompt_ids = prompt_ids["input_ids"]
    with torch.no_grad():
        generated = model.generate(
            prompt_ids,
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
        )
    sequence = generated[0, prompt_ids.shape[1] :]
    presses = {
        "full cache": None,
        "FastKVzipDecodingPress": FastKVzipDecodingPress(
            compression_interval=args.interval, target_size=args.target_size
        ),
        "kvpress DecodingPress(KnormPress)": DecodingPress(
            KnormPress(), compression_interval=args.interval, target_size=args.target_size
        ),
    }
    rows = []
    for name, press in presses.items():
        result = replay(model, prompt_ids, sequence, press, progress=not args.quiet)
        rows.append({"press": name, **result})
        print(name, {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}, flush=True)
    full = rows[0]
    for row in rows:
        row["peak_kv_vs_full"] = row["peak_kv_bytes"] / full["peak_kv_bytes"]
        row["speed_vs_full"] = row["tokens_per_s"] / full["tokens_per_s"]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "decoding.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"SmolLM2-135M-Instruct, fp32, 2 CPU cores: {prompt_ids.shape[1]}-token prompt, {len(sequence)} tokens "
        f"replayed; target_size {args.target_size} pairs per head, interval {args.interval}.",
        "",
        "| press | token agreement | first divergence | peak KV MiB | peak KV / full | final KV MiB "
        "| tokens/s | speed / full |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['press']} | {100 * r['agreement']:.1f}% | {r['first_divergence']} "
            f"| {r['peak_kv_bytes'] / 2**20:.1f} | {r['peak_kv_vs_full']:.3f} | {r['final_kv_bytes'] / 2**20:.1f} "
            f"| {r['tokens_per_s']:.1f} "
            f"| {r['speed_vs_full']:.2f} |"
        )
    lines += ["", f"Command: `python benchmarks/decoding.py --new-tokens {args.new_tokens} "
              f"--target-size {args.target_size} --interval {args.interval}`", ""]  # fmt: skip
    (out / "decoding.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
