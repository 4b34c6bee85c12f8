"""One decoding step's attention: vLLM's own CPU attention against the head-wise layout at the same batch and lengths.

    make vllm-install && .venv-vllm/bin/python benchmarks/vllm_attention.py     # about a minute on 2 cores

vLLM's layout holds blocks of every KV head of a layer, one block table and length per request; the head-wise layout
(:mod:`fastkvzip_press.paged`) holds single-head blocks, a table and length per (request, KV head). Both run vLLM's
CPU attention kernel (the head-wise store makes each (request, head) a sequence with one KV head); the package's
torch path is timed too. Heads hold the same lengths as vLLM's requests here, so the ratio is the layout's cost
alone. Interleaved rounds, medians. Writes ``<out>/vllm_attention.{csv,md}``.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--block-size", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--kv-heads", type=int, default=3, help="default: SmolLM2-135M (3 KV heads of 3 queries)")
    parser.add_argument("--group", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    return parser.parse_args(argv)


def vllm_attention(batch: int, length: int, heads: int, groups: int, head_dim: int, block_size: int):
    """vLLM's CPU_ATTN on its own layout: a callable running one decoding step."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(torch.float32, block_size, head_dim, "auto")
    blocks = -(-(length + 1) // block_size)
    cache = torch.randn(batch * blocks + 1, heads, block_size, 2 * head_dim).view(-1, heads, 2 * block_size, head_dim)
    key_cache, value_cache = cache.chunk(2, dim=2)
    table = torch.arange(1, batch * blocks + 1, dtype=torch.int32).view(batch, blocks)
    seq_lens = torch.full((batch,), length + 1, dtype=torch.int32)
    starts = torch.arange(batch + 1, dtype=torch.int32)
    query = torch.randn(batch, heads * groups, head_dim)
    out = torch.empty_like(query)

    def step():
        metadata = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=batch, num_heads=heads * groups, num_kv_heads=heads, head_dim=head_dim, seq_lens=seq_lens,
            dtype=torch.float32, query_start_loc=starts, causal=True, sliding_window_size=-1, isa=isa,
            enable_kv_split=False,
        )  # fmt: skip
        ops.cpu_attention_with_kv_cache(
            query=query, key_cache=key_cache, value_cache=value_cache, output=out, query_start_loc=starts,
            seq_lens=seq_lens, scale=head_dim**-0.5, causal=True, alibi_slopes=None, sliding_window=-1,
            block_table=table, softcap=0, scheduler_metadata=metadata, s_aux=None,
        )  # fmt: skip

    return step


def headwise_attention(batch: int, length: int, heads: int, groups: int, head_dim: int, block_size: int, path: str):
    """The head-wise store's attention (``path``: "vllm-cpu" or "torch") on single-head blocks."""
    from fastkvzip_press.paged import HeadBlockPool, HeadTables, plan_step
    from fastkvzip_press.vllm.headwise import TorchPath
    from fastkvzip_press.vllm.seam.backend import NativeCPUPath, cpu_attention_isa

    blocks_per_head = -(-(length + 1) // block_size)
    n_blocks = batch * heads * blocks_per_head + heads
    buffer = torch.randn(n_blocks, block_size * 2 * head_dim)
    tables = HeadTables(HeadBlockPool(n_blocks), batch, 1, heads, blocks_per_head + 1, block_size)
    slots = np.array([tables.slot(f"r{i}") for i in range(batch)])
    tables.grow(slots, np.full(batch, length))
    step = plan_step(tables, slots, np.ones(batch, dtype=np.int64), torch.device("cpu"))
    if path == "torch":
        store = TorchPath(buffer, block_size, head_dim)
    else:
        store = NativeCPUPath(buffer, block_size, head_dim, cpu_attention_isa(torch.float32, block_size, head_dim))
    store.prepare(step)
    query = torch.randn(batch, heads * groups, head_dim)
    out = torch.empty_like(query)
    return lambda: store.attend(query, step, 0, head_dim**-0.5, out)


def median_ms(functions: dict, rounds: int) -> dict[str, float]:
    """Interleaved timings of several callables, median milliseconds each."""
    times = {name: [] for name in functions}
    for function in functions.values():
        function()  # warm up
    for _ in range(rounds):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # vLLM's CPU worker computes on one core here
    rows = []
    for block_size in args.block_size:
        for batch in args.batch:
            for length in args.lengths:
                shape = (batch, length, args.kv_heads, args.group, args.head_dim, block_size)
                timed = median_ms(
                    {
                        "vllm": vllm_attention(*shape),
                        "headwise": headwise_attention(*shape, "vllm-cpu"),
                        "headwise_torch": headwise_attention(*shape, "torch"),
                    },
                    args.rounds,
                )
                rows.append({"block_size": block_size, "batch": batch, "length": length, **timed})
                print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "vllm_attention.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"One decoding step's attention of one layer (fp32, one thread, {args.kv_heads} KV heads x {args.group} "
        f"queries, head_dim {args.head_dim}; medians of {args.rounds} interleaved rounds, ms). vLLM: its CPU_ATTN "
        "kernel on its own layout; head-wise: the same kernel over single-head blocks, each (request, KV head) a "
        "sequence; torch: the package's torch path on the head-wise layout.",
        "",
        "| block | batch | tokens | vLLM ms | head-wise ms | x vLLM | torch path ms | x vLLM |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['block_size']} | {row['batch']} | {row['length']} | {row['vllm']:.3f} | {row['headwise']:.3f} "
            f"| {row['headwise'] / row['vllm']:.2f} | {row['headwise_torch']:.3f} "
            f"| {row['headwise_torch'] / row['vllm']:.2f} |"
        )
    command = "python benchmarks/vllm_attention.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines += ["", f"Command: `{command.strip()}`", ""]
    (out / "vllm_attention.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
