"""Speed of the cache kernels, one by one: selection, compaction, append and the ragged attention.

Shapes are those of one request on a model, per layer (``--model small``: the default model, 3 KV heads, head_dim 64;
``--model 8b``: Llama-3.1-8B / Qwen3-8B, 8 KV heads, head_dim 128), at the given contexts, half of every head kept.
On CPU each kernel's torch implementation is timed (medians of ``--repeats`` calls); on CUDA the Triton kernels are
timed with ``triton.testing.do_bench`` and their achieved bandwidth is printed against the device's peak (bytes every
kernel must read and write, over its time).

    .venv/bin/python benchmarks/kernel_timings.py                          # CPU, both shapes, 2k and 8k
    python benchmarks/kernel_timings.py --device cuda --contexts 8192 32768 --out /tmp/kernels

Writes ``<out>/kernels.{csv,md}`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from device_timing import hbm_peak_gbps, time_ms

from fastkvzip_press.cache import RaggedLayer, ragged_attention
from fastkvzip_press.triton import kernel_backend, ragged_append, ragged_compact, select_smallest_rows

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {  # layers, KV heads, query heads per KV head, head_dim
    "small": (30, 3, 3, 64),
    "8b": (32, 8, 4, 128),
}
# Peak memory bandwidth (GB/s) of devices by name, for the achieved/peak column; others print the measured copy rate.


def _peak_gbps(device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    if (peak := hbm_peak_gbps(device)) == peak:  # not NaN: a known device
        return peak
    # Unknown device: a large device-to-device copy as the practical peak.
    src = torch.empty(2**28, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, 10, warmup=3)
    return 2 * src.numel() / ms / 1e6


def _cases(shape: str, context: int, device: torch.device, dtype: torch.dtype) -> list[tuple[str, Callable, int]]:
    """``(kernel, call, bytes moved)`` for one layer (selection: all layers at once, as the press calls it)."""
    layers, heads, group, head_dim = SHAPES[shape]
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(layers * heads * context, generator=generator).to(device)
    keep_k = torch.tensor([scores.numel() // 2], device=device)
    keys = torch.randn(heads * context, head_dim, generator=generator).to(device, dtype)
    values = torch.randn(heads * context, head_dim, generator=generator).to(device, dtype)
    starts = torch.arange(heads, device=device) * context
    lengths = torch.full((heads,), context, device=device)
    keep = (torch.rand(heads * context, generator=generator) < 0.5).to(device)
    layer = RaggedLayer.from_dense(
        keys.view(1, heads, context, head_dim), values.view(1, heads, context, head_dim), keep.view(1, heads, context)
    )
    row_bytes = head_dim * keys.element_size()
    kept_rows = int(keep.sum())
    new_rows = torch.randn(heads, 1, head_dim, generator=generator).to(device, dtype)
    append_starts, append_lengths = layer.starts, layer.lengths
    query = torch.randn(1, heads * group, 1, head_dim, generator=generator).to(device, dtype)
    dense_keys = keys.view(1, heads, context, head_dim)
    dense_values = values.view(1, heads, context, head_dim)
    cases = [
        ("select (all layers)", lambda: select_smallest_rows(scores[None], keep_k), scores.numel() * 5),
        (
            "compact keys+values",
            lambda: ragged_compact([keys, values], starts, lengths, keep, spare=16),
            2 * (heads * context + kept_rows) * row_bytes,
        ),
        (
            "append 1 token",
            lambda: ragged_append(
                [layer.key_buffer, layer.value_buffer], append_starts, append_lengths, [new_rows, new_rows]
            ),
            2 * 2 * heads * row_bytes,
        ),
        (
            "ragged attention, 1 query",
            lambda: ragged_attention(query, layer, head_dim**-0.5),
            2 * kept_rows * row_bytes,
        ),
    ]
    if device.type == "cpu":  # the forms of one decoding step that per-segment SDPA was measured against
        cases += [
            ("  alt: whole buffer, masked", lambda: _whole_buffer(query, layer), 2 * kept_rows * row_bytes),
            ("  alt: padded copy, one SDPA", lambda: _padded(query, layer), 2 * kept_rows * row_bytes),
            (
                "  dense, full cache (reference)",
                lambda: F.scaled_dot_product_attention(query, dense_keys, dense_values, enable_gqa=True),
                2 * heads * context * row_bytes,
            ),
        ]
    return cases


def _whole_buffer(query: torch.Tensor, layer: RaggedLayer) -> torch.Tensor:
    """Every query head against all rows of the layer, other heads' and spare rows masked: one call, H x the work."""
    _, n_q_heads, _, head_dim = query.shape
    rows = torch.arange(layer.key_buffer.shape[0], device=query.device)
    own = (rows >= layer.starts[:, None]) & (rows < (layer.starts + layer.lengths)[:, None])  # [H, M]
    scores = (query.view(n_q_heads, head_dim) @ layer.key_buffer.T) * head_dim**-0.5
    scores = scores.view(layer.num_heads, -1, scores.shape[-1]).masked_fill(~own[:, None], float("-inf"))
    return scores.view(n_q_heads, -1).softmax(-1) @ layer.value_buffer


def _padded(query: torch.Tensor, layer: RaggedLayer) -> torch.Tensor:
    """The segments copied into zero-padded ``[1, H, max_len, D]`` tensors, then one masked SDPA call."""
    keys, values, mask = layer.to_padded()
    group = query.shape[1] // layer.num_heads
    visible = mask.repeat_interleave(group, dim=1)[:, :, None, :]  # [1, Hq, 1, max_len]
    return F.scaled_dot_product_attention(
        query, keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1), attn_mask=visible
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per kernel on CPU (medians)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = _peak_gbps(device)
    rows = []
    for shape in args.shapes:
        for context in args.contexts:
            for kernel, fn, moved in _cases(shape, context, device, dtype):
                ms = time_ms(fn, device, args.repeats, warmup=3)
                gbps = moved / ms / 1e6
                rows.append(
                    {
                        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                        "backend": kernel_backend(torch.empty(0, device=device)),
                        "shape": shape,
                        "context": context,
                        "kernel": kernel,
                        "ms": ms,
                        "gb_per_s": gbps,
                        "fraction_of_peak": gbps / peak,
                    }
                )
    lines = ["| device | backend | shape | context | kernel | ms | GB/s | of peak |", "|" + "---|" * 8]
    for r in rows:
        lines.append(
            f"| {r['device']} | {r['backend']} | {r['shape']} | {r['context']} | {r['kernel']} | {r['ms']:.3f} "
            f"| {r['gb_per_s']:.1f} | {r['fraction_of_peak']:.2f} |"
        )
    table = "\n".join(lines) + "\n"
    from isolated import write_csv

    write_csv(rows, args.out / "kernels.csv")
    (args.out / "kernels.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
