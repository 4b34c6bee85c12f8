"""GPU acceptance benchmark: FastKVzipPress on random-weight Llama-3.1-8B and Qwen3-8B shapes, in bf16.

The models are built from their published configs (written below; nothing is downloaded) with random weights, and
random gates (``GateBank.random``): speed and memory do not depend on what the weights know. Sections:

- **prefill overhead**: one-pass prefill under FastKVzipPress(0.7) and under kvpress's FastKVzipPress(0.7) (masked,
  same gates), against no press. Configurations interleave over rounds (the order rotating each round); each ratio
  is taken within a round, and the table gives the median over rounds with the min-max.
- **decode**: ms per greedy token after those prefills, against the full cache and against kvpress's masked press.
- **peak memory**: peak CUDA memory of each configuration (prefill and decode) over what was allocated before it,
  peak KV bytes during the prefill (read after every layer) and KV bytes after it.
- **longest context at ratio 0.7**: chunked prefill (8192-token chunks) of random tokens plus two decoded tokens,
  the context doubled until it fails, then bisected twice; full cache against FastKVzipPress(0.7, chunked).
  On CUDA the process is capped at what it held before the search plus ``--kv-budget-gib`` (so that both searches
  end within minutes; the ratio between them is what carries over to a whole device) and a failure is a real
  out-of-memory error. The CPU rehearsal stops a trial when the KV cache outgrows the budget instead.
- **compaction bandwidth**: ``ragged_compact`` of one layer's keys and values (8 KV heads x 128k tokens x 128, 30 %
  kept): the bytes it must move (read and write every kept row, read the keep flags) over its time, against the
  device's HBM peak (a table by device name, ``--hbm-peak`` to override) and against a device copy of the same
  bytes.
- **selection**: ``select_smallest_rows`` over 32 layers x 8 heads x 128k tokens of scores (one decision of a
  128k-token prefill of an 8B model), Triton against the torch reference.

The model sections stop starting runs once their time budget (``SECTION_BUDGET_S``, per model) is spent, and the
kernel timings are bounded by ``do_bench``, so the whole run stays within about 6 minutes on one H200.

    .venv/bin/python benchmarks/gpu.py                                   # CUDA, both models
    .venv/bin/python benchmarks/gpu.py --device cpu --tiny --out /tmp/gpu   # every section on tiny shapes, seconds

Writes ``<out>/gpu.md`` and ``<out>/gpu.csv`` (one row per measured value; default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from isolated import write_csv

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30
MIB = 2**20

# Published configs (config.json on the hub), the values that shape the model; weights are random.
MODEL_CONFIGS: dict[str, tuple[str, dict]] = {
    "Llama-3.1-8B": (
        "llama",
        dict(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            hidden_act="silu",
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
            rope_scaling={
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
                "rope_type": "llama3",
            },
            attention_bias=False,
            mlp_bias=False,
            tie_word_embeddings=False,
            bos_token_id=128000,
            eos_token_id=128001,
        ),
    ),
    "Qwen3-8B": (
        "qwen3",
        dict(
            vocab_size=151936,
            hidden_size=4096,
            intermediate_size=12288,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            hidden_act="silu",
            max_position_embeddings=40960,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            attention_bias=False,
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=36,
            tie_word_embeddings=False,
            bos_token_id=151643,
            eos_token_id=151645,
        ),
    ),
}
TINY_OVERRIDES = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)

# Peak HBM bandwidth (GB/s, SXM parts) by device name; the longest matching name wins ("H200" before "H20").
HBM_PEAK_GBPS = {"H200": 4800.0, "H100": 3350.0, "H20": 4000.0, "A100": 2039.0, "B200": 8000.0, "L40S": 864.0}

# Seconds each section may spend (per model for the model sections): it stops starting new runs once spent.
SECTION_BUDGET_S = {"timed": 75.0, "longest": 70.0}

NO_PRESS, OURS, KVPRESS = "no press", "FastKVzipPress", "kvpress FastKVzipPress (masked)"
FULL_CACHE, OURS_CHUNKED = "full cache", "FastKVzipPress chunked"


@dataclass(frozen=True)
class Scale:
    """Sizes of every section: the GPU run's, or the CPU rehearsal's (``--tiny``)."""

    contexts: tuple[int, ...]
    decode_tokens: int
    rounds: int
    chunk_size: int
    search_start: int
    search_max: int
    refine_steps: int
    kv_budget_bytes: int
    compact_shape: tuple[int, int, int]  # KV heads, tokens, head_dim
    select_shape: tuple[int, int, int]  # layers, KV heads, tokens


FULL = Scale(
    contexts=(8192, 32768),
    decode_tokens=32,
    rounds=3,
    chunk_size=8192,
    search_start=8192,
    search_max=2**20,
    refine_steps=2,
    kv_budget_bytes=8 * GIB,
    compact_shape=(8, 131072, 128),
    select_shape=(32, 8, 131072),
)
TINY = Scale(
    contexts=(192,),
    decode_tokens=4,
    rounds=2,
    chunk_size=64,
    search_start=64,
    search_max=4096,
    refine_steps=1,
    kv_budget_bytes=96 * 1024,
    compact_shape=(2, 1024, 16),
    select_shape=(32, 8, 256),
)


class Budget:
    """A section's time allowance: ``spent()`` once ``seconds`` have passed since it was made."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def spent(self) -> bool:
        return time.monotonic() >= self.end


class OverBudget(RuntimeError):
    """The CPU rehearsal's stand-in for an out-of-memory error: the KV cache outgrew the search's budget."""


# ------------------------------------------------------------------------------------------------- device helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_out_of_memory(error: BaseException) -> bool:
    """A real CUDA out-of-memory error (from the caching allocator or a library's own allocation) or the stand-in."""
    return isinstance(error, (torch.cuda.OutOfMemoryError, OverBudget)) or "out of memory" in str(error)


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int = 5) -> float:
    """Milliseconds per call: ``triton.testing.do_bench`` on CUDA (it flushes the L2 cache), median wall time on
    CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=10, rep=50))
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def hbm_peak_gbps(device: torch.device, override: float | None) -> float:
    """The device's peak memory bandwidth in GB/s: ``override``, else the table by device name, else NaN."""
    if override is not None:
        return override
    if device.type != "cuda":
        return float("nan")
    name = torch.cuda.get_device_name(device)
    for key in sorted(HBM_PEAK_GBPS, key=len, reverse=True):
        if key in name:
            return HBM_PEAK_GBPS[key]
    return float("nan")


@contextlib.contextmanager
def kernels(choice: str) -> Iterator[None]:
    """``FASTKVZIP_PRESS_KERNELS=choice`` while inside (the dispatcher reads it at every call)."""
    from fastkvzip_press.triton.dispatch import KERNELS_ENV

    previous = os.environ.get(KERNELS_ENV)
    os.environ[KERNELS_ENV] = choice
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(KERNELS_ENV, None)
        else:
            os.environ[KERNELS_ENV] = previous


# ---------------------------------------------------------------------------------------------------- the models


def build_model(name: str, tiny: bool, device: torch.device, dtype: torch.dtype):
    """A random-weight model of ``name``'s shapes (``tiny``: the same architecture at test sizes) on ``device``."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    arch, values = MODEL_CONFIGS[name]
    config = (LlamaConfig if arch == "llama" else Qwen3Config)(**{**values, **(TINY_OVERRIDES if tiny else {})})
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.config.name_or_path = f"random-{name}"
    return model.eval()


def random_gates(model):
    """Untrained gates in the model's dtype, on its device (the first scoring call would move them)."""
    from fastkvzip_press import GateBank, ModelLayout

    param = next(model.parameters())
    return GateBank.random(ModelLayout.from_model(model), seed=0, dtype=param.dtype).to(param.device)


def make_press(config: str, model, bank, ratio: float, chunk_size: int | None = None):
    from fastkvzip_press import FastKVzipPress
    from fastkvzip_press.evaluation.kvpress_presses import kvpress_fastkvzip_with_gates

    if config in (NO_PRESS, FULL_CACHE):
        return None
    if config == KVPRESS:
        return kvpress_fastkvzip_with_gates(bank, model, ratio)
    return FastKVzipPress(ratio, gates=bank, chunk_size=chunk_size if config == OURS_CHUNKED else None)


def random_ids(model, n_tokens: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(model.config.vocab_size, (1, n_tokens), generator=generator)
    return ids.to(next(model.parameters()).device)


# ----------------------------------------------------------------------------------------------- one measured run


@contextlib.contextmanager
def kv_watch(model, cache, limit: int | None = None) -> Iterator[list[int]]:
    """Record the peak KV bytes of ``cache`` after every attention layer (before that layer's eviction: registered
    ahead of the press's hooks); with ``limit``, raise :class:`OverBudget` once it is passed."""
    from fastkvzip_press import kv_cache_bytes
    from fastkvzip_press.gates import decoder_layers

    peak = [0]

    def check(*_) -> None:
        peak[0] = max(peak[0], kv_cache_bytes(cache))
        if limit is not None and peak[0] > limit:
            raise OverBudget(f"KV cache of {peak[0]} bytes over the budget of {limit}")

    hooks = [layer.self_attn.register_forward_hook(check) for layer in decoder_layers(model)]
    try:
        yield peak
    finally:
        for hook in hooks:
            hook.remove()


def prefill_and_decode(model, ids: torch.Tensor, press, decode_tokens: int, watch: bool = False) -> dict:
    """One prefill of ``ids [1, T]`` under ``press``, then ``decode_tokens`` greedy steps after it (outside the
    press, as kvpress's pipeline answers). Returns wall times, KV bytes and peak device memory over the run."""
    from transformers import DynamicCache

    from fastkvzip_press import kv_cache_bytes

    device = ids.device
    cache = DynamicCache()
    if watch:  # garbage of earlier runs out of the way of the peak (gc.collect costs a fraction of a second)
        free_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = allocated(device)
    watcher = kv_watch(model, cache) if watch else contextlib.nullcontext([0])
    with torch.no_grad():
        sync(device)
        start = time.perf_counter()
        with watcher as peak_kv, press(model) if press is not None else contextlib.nullcontext():
            model.model(input_ids=ids, past_key_values=cache)
        sync(device)
        prefill_s = time.perf_counter() - start
        kv_bytes = kv_cache_bytes(cache)
        token, position, steps = ids[:, -1:], ids.shape[1], []
        for step in range(decode_tokens + 1):
            start = time.perf_counter()
            positions = torch.tensor([[position]], device=device)
            token = model(token, past_key_values=cache, position_ids=positions).logits[:, -1:].argmax(-1)
            sync(device)
            position += 1
            if step:  # the first step allocates spare rows
                steps.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else float("nan")
    return {
        "prefill_ms": 1000 * prefill_s,
        "decode_ms": 1000 * statistics.mean(steps),
        "kv_bytes": kv_bytes,
        "peak_kv_bytes": max(peak_kv[0], kv_bytes),
        "peak_device_bytes": peak,
    }


# ------------------------------------------------------------------------------------ prefill, decode and memory


def timed_runs(model, bank, args, scale: Scale, progress) -> dict[int, dict[str, list[dict]]]:
    """Per context, per configuration: the warm-up run (KV watched, memory read) then the timed rounds."""
    names = [NO_PRESS, OURS, KVPRESS]
    budget = Budget(SECTION_BUDGET_S["timed"])
    prefill_and_decode(model, random_ids(model, 64), make_press(OURS, model, bank, args.ratio), 2)  # first launches
    runs: dict[int, dict[str, list[dict]]] = {}
    for context in scale.contexts:
        ids = random_ids(model, context)
        runs[context] = {name: [] for name in names}
        warm = {}
        for name in names:
            warm[name] = prefill_and_decode(model, ids, make_press(name, model, bank, args.ratio), 2, watch=True)
            progress.update()
        runs[context]["memory"] = warm
        for round_index in range(scale.rounds):
            if round_index and budget.spent():
                break
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                press = make_press(name, model, bank, args.ratio)
                runs[context][name].append(prefill_and_decode(model, ids, press, scale.decode_tokens))
                progress.update()
    return runs


def _ratios(runs: list[dict], base: list[dict], key: str) -> list[float]:
    """Within-round ratios (a run against the base configuration's run of the same round)."""
    return [run[key] / other[key] for run, other in zip(runs, base)]


def timed_rows(model_name: str, runs: dict[int, dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """Rows of the prefill, decode and memory tables."""
    prefill, decode, memory = [], [], []
    for context, by_name in runs.items():
        full, masked = by_name[NO_PRESS], by_name[KVPRESS]
        for name in (NO_PRESS, OURS, KVPRESS):
            samples, ident = by_name[name], {"model": model_name, "context": context, "config": name}
            vs_none = _ratios(samples, full, "prefill_ms")
            prefill.append(
                {
                    **ident,
                    "rounds": len(samples),
                    "prefill_ms": statistics.median(s["prefill_ms"] for s in samples),
                    "vs_none": statistics.median(vs_none),
                    "vs_none_min": min(vs_none),
                    "vs_none_max": max(vs_none),
                }
            )
            vs_full = _ratios(samples, full, "decode_ms")
            vs_masked = _ratios(samples, masked, "decode_ms")
            decode.append(
                {
                    **ident,
                    "decode_ms_per_token": statistics.median(s["decode_ms"] for s in samples),
                    "vs_full": statistics.median(vs_full),
                    "vs_full_min": min(vs_full),
                    "vs_full_max": max(vs_full),
                    "vs_kvpress_masked": statistics.median(vs_masked),
                }
            )
            warm, warm_full = by_name["memory"][name], by_name["memory"][NO_PRESS]
            memory.append(
                {
                    **ident,
                    "peak_device_gib": warm["peak_device_bytes"] / GIB,
                    "peak_device_vs_none": warm["peak_device_bytes"] / warm_full["peak_device_bytes"],
                    "peak_kv_mib": warm["peak_kv_bytes"] / MIB,
                    "kv_after_prefill_mib": warm["kv_bytes"] / MIB,
                    "kv_vs_full": warm["kv_bytes"] / warm_full["kv_bytes"],
                }
            )
    return prefill, decode, memory


# ------------------------------------------------------------------------------------------- longest context


@contextlib.contextmanager
def memory_cap(device: torch.device, extra_bytes: int) -> Iterator[int]:
    """Cap this process's CUDA memory at what it holds now plus ``extra_bytes`` (a no-op on CPU); yields the cap."""
    if device.type != "cuda":
        yield extra_bytes
        return
    free_memory(device)
    cap = torch.cuda.memory_reserved(device) + extra_bytes
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
    try:
        yield cap
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        free_memory(device)


def fits(model, bank, config: str, n_tokens: int, args, scale: Scale) -> bool:
    """Whether a chunked prefill of ``n_tokens`` random tokens and two decoded tokens run without running out of
    memory (on CPU: without the KV cache passing the budget)."""
    from transformers import DynamicCache

    ids = random_ids(model, n_tokens, seed=1)
    device = ids.device
    cache = DynamicCache()
    limit = scale.kv_budget_bytes if device.type != "cuda" else None
    press = make_press(config, model, bank, args.ratio, scale.chunk_size)
    ok = True
    try:
        with torch.no_grad(), kv_watch(model, cache, limit):
            if press is None:  # the full cache, prefilled in the same chunks as the press's
                for begin in range(0, n_tokens, scale.chunk_size):
                    model.model(input_ids=ids[:, begin : begin + scale.chunk_size], past_key_values=cache)
            else:
                with press(model):
                    model.model(input_ids=ids, past_key_values=cache)
            token = ids[:, -1:]
            for position in range(n_tokens, n_tokens + 2):
                positions = torch.tensor([[position]], device=device)
                token = model(token, past_key_values=cache, position_ids=positions).logits[:, -1:].argmax(-1)
            sync(device)
    except (RuntimeError, MemoryError) as error:
        if not is_out_of_memory(error):
            raise
        ok = False
    del cache, ids
    free_memory(device)
    return ok


def longest_context(model, bank, config: str, args, scale: Scale, budget: Budget, progress) -> dict:
    """Double the context from ``search_start`` until a trial fails (or ``search_max`` / the budget), then bisect
    between the last success and the first failure ``refine_steps`` times, in whole chunks."""
    trials, longest, failed = 0, 0, None
    n_tokens = scale.search_start
    while n_tokens <= scale.search_max and not budget.spent():
        trials += 1
        ok = fits(model, bank, config, n_tokens, args, scale)
        progress.update()
        if not ok:
            failed = n_tokens
            break
        longest, n_tokens = n_tokens, 2 * n_tokens
    for _ in range(scale.refine_steps if failed else 0):
        middle = (longest + failed) // 2 // scale.chunk_size * scale.chunk_size
        if middle <= longest or budget.spent():
            break
        trials += 1
        ok = fits(model, bank, config, middle, args, scale)
        progress.update()
        longest, failed = (middle, failed) if ok else (longest, middle)
    if failed is not None:
        stop = "out of memory" if model.device.type == "cuda" else "KV over budget"
    else:
        stop = "time budget" if n_tokens <= scale.search_max else f"search bound {scale.search_max}"
    return {"longest_tokens": longest, "first_failure_tokens": failed or float("nan"), "trials": trials, "stop": stop}


def longest_rows(model_name: str, model, bank, args, scale: Scale, progress) -> list[dict]:
    """The longest context of the full cache and of the chunked press, each search with half the section's time."""
    rows = []
    with memory_cap(model.device, scale.kv_budget_bytes) as cap:
        for config in (FULL_CACHE, OURS_CHUNKED):
            budget = Budget(SECTION_BUDGET_S["longest"] / 2)
            found = longest_context(model, bank, config, args, scale, budget, progress)
            rows.append({"model": model_name, "config": config, "cap_bytes": cap, **found})
    full = rows[0]["longest_tokens"]
    for row in rows:
        row["vs_full"] = row["longest_tokens"] / full if full else float("nan")
    return rows


# --------------------------------------------------------------------------------------------------- the kernels


def compaction_rows(scale: Scale, device: torch.device, dtype: torch.dtype, ratio: float, peak: float) -> list[dict]:
    """``ragged_compact`` of one layer's keys and values, each backend, against the HBM peak and a device copy."""
    from fastkvzip_press.triton import kernel_backend, ragged_compact

    heads, tokens, head_dim = scale.compact_shape
    generator = torch.Generator(device).manual_seed(0)
    keys, values = (torch.randn(heads * tokens, head_dim, generator=generator, device=device).to(dtype) for _ in "kv")
    starts = torch.arange(heads, device=device) * tokens
    lengths = torch.full((heads,), tokens, device=device)
    keep = torch.rand(heads * tokens, generator=generator, device=device) >= ratio
    kept = int(keep.sum())
    row_bytes = head_dim * keys.element_size()
    moved = 2 * 2 * kept * row_bytes + keep.numel()  # keys and values: read and write every kept row; the flags
    source = torch.empty(moved // 2, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    copy_gbps = moved / time_ms(lambda: target.copy_(source), device) / 1e6
    rows, seen = [], set()
    for choice in ("auto", "torch"):
        with kernels(choice):
            backend = kernel_backend(keys)
            if backend in seen:
                continue
            seen.add(backend)
            ms = time_ms(lambda: ragged_compact([keys, values], starts, lengths, keep, spare=16), device)
        gbps = moved / ms / 1e6
        rows.append(
            {
                "shape": f"{heads} heads x {tokens} tokens x {head_dim}, {str(dtype).removeprefix('torch.')}",
                "kept": kept / keep.numel(),
                "backend": backend,
                "ms": ms,
                "gb_per_s": gbps,
                "hbm_peak_gb_per_s": peak,
                "of_peak": gbps / peak,
                "copy_gb_per_s": copy_gbps,
                "of_copy": gbps / copy_gbps,
            }
        )
    return rows


def selection_rows(scale: Scale, device: torch.device, ratio: float) -> list[dict]:
    """``select_smallest_rows`` over every score of one prefill decision, each backend."""
    from fastkvzip_press.triton import kernel_backend, select_smallest_rows

    layers, heads, tokens = scale.select_shape
    generator = torch.Generator(device).manual_seed(0)
    scores = torch.rand(1, layers * heads * tokens, generator=generator, device=device)
    k = torch.tensor([int(ratio * scores.numel())], device=device)
    rows, seen = [], set()
    for choice in ("auto", "torch"):
        with kernels(choice):
            backend = kernel_backend(scores)
            if backend in seen:
                continue
            seen.add(backend)
            ms = time_ms(lambda: select_smallest_rows(scores, k), device)
        rows.append(
            {
                "shape": f"{layers} layers x {heads} heads x {tokens} tokens",
                "entries": scores.numel(),
                "backend": backend,
                "ms": ms,
                "g_entries_per_s": scores.numel() / ms / 1e6,
            }
        )
    return rows


# ------------------------------------------------------------------------------------------------------ output


@dataclass(frozen=True)
class Section:
    """A table of the report: its title, what it shows, and its columns as ``(key, header, format)``."""

    title: str
    note: str
    columns: tuple[tuple[str, str, str], ...]


SECTIONS = {
    "prefill": Section(
        "Prefill overhead",
        "One-pass prefill of random tokens; ratios within a round, median over rounds (min-max).",
        (
            ("model", "model", ""),
            ("context", "context", ""),
            ("config", "press", ""),
            ("rounds", "rounds", ""),
            ("prefill_ms", "prefill ms", ".1f"),
            ("vs_none", "vs no press", ".3f"),
            ("vs_none_min", "min", ".2f"),
            ("vs_none_max", "max", ".2f"),
        ),
    ),
    "decode": Section(
        "Decode",
        "Greedy steps after the prefill (mean per run, median over rounds); ratios within a round.",
        (
            ("model", "model", ""),
            ("context", "context", ""),
            ("config", "press", ""),
            ("decode_ms_per_token", "ms/token", ".2f"),
            ("vs_full", "vs full cache", ".3f"),
            ("vs_full_min", "min", ".2f"),
            ("vs_full_max", "max", ".2f"),
            ("vs_kvpress_masked", "vs kvpress masked", ".3f"),
        ),
    ),
    "memory": Section(
        "Peak memory",
        "Peak device memory of the prefill and two decoded tokens over what was allocated before (CUDA only); KV "
        "bytes read after every layer of the prefill, and after it.",
        (
            ("model", "model", ""),
            ("context", "context", ""),
            ("config", "press", ""),
            ("peak_device_gib", "peak GiB", ".2f"),
            ("peak_device_vs_none", "vs no press", ".3f"),
            ("peak_kv_mib", "peak KV MiB", ".1f"),
            ("kv_after_prefill_mib", "KV MiB after prefill", ".1f"),
            ("kv_vs_full", "KV vs full", ".3f"),
        ),
    ),
    "longest": Section(
        "Longest context",
        "Chunked prefill plus two decoded tokens, doubled until a trial fails, then bisected. Cap: on CUDA the "
        "process's memory (what it held before the search plus the budget; a failure is out of memory), on CPU the KV "
        "bytes.",
        (
            ("model", "model", ""),
            ("config", "cache", ""),
            ("cap_bytes", "cap", "bytes"),
            ("longest_tokens", "longest tokens", ""),
            ("first_failure_tokens", "first failure", ".0f"),
            ("vs_full", "vs full cache", ".2f"),
            ("trials", "trials", ""),
            ("stop", "stopped by", ""),
        ),
    ),
    "compaction": Section(
        "Compaction bandwidth",
        "ragged_compact of one layer's keys and values; bytes = read and write every kept row + the keep flags.",
        (
            ("shape", "shape", ""),
            ("kept", "kept", ".2f"),
            ("backend", "backend", ""),
            ("ms", "ms", ".3f"),
            ("gb_per_s", "GB/s", ".1f"),
            ("hbm_peak_gb_per_s", "HBM peak GB/s", ".0f"),
            ("of_peak", "of peak", ".3f"),
            ("copy_gb_per_s", "copy GB/s", ".1f"),
            ("of_copy", "of copy", ".3f"),
        ),
    ),
    "selection": Section(
        "Selection",
        "select_smallest_rows over the scores of one decision (k = ratio x entries).",
        (
            ("shape", "scores", ""),
            ("entries", "entries", ""),
            ("backend", "backend", ""),
            ("ms", "ms", ".3f"),
            ("g_entries_per_s", "G entries/s", ".2f"),
        ),
    ),
}


def _cell(value, fmt: str) -> str:
    if isinstance(value, float) and value != value:
        return "n/a"
    if fmt == "bytes":
        return f"{value / GIB:.1f} GiB" if value >= GIB else f"{value / 2**10:.0f} KiB"
    return format(value, fmt) if fmt else str(value)


def markdown(results: dict[str, list[dict]], header: list[str]) -> str:
    lines = ["# GPU benchmark", "", *header]
    for key, section in SECTIONS.items():
        lines += ["", f"## {section.title}", "", section.note, ""]
        lines.append("| " + " | ".join(h for _, h, _ in section.columns) + " |")
        lines.append("|" + "---|" * len(section.columns))
        for row in results[key]:
            lines.append("| " + " | ".join(_cell(row[k], f) for k, _, f in section.columns) + " |")
    return "\n".join(lines) + "\n"


def long_rows(results: dict[str, list[dict]]) -> list[dict]:
    """One CSV row per measured value: section, model, context, config, metric, value."""
    rows = []
    for key, section_rows in results.items():
        for row in section_rows:
            ident = {name: row.get(name, "") for name in ("model", "context", "config")}
            ident["config"] = ident["config"] or f"{row.get('backend', '')} {row.get('shape', '')}".strip()
            for metric, value in row.items():
                if metric not in ("model", "context", "config", "backend", "shape"):
                    rows.append({"section": key, **ident, "metric": metric, "value": value})
    return rows


# -------------------------------------------------------------------------------------------------------- main


def run(args) -> dict[str, list[dict]]:
    from tqdm import tqdm

    scale = replace(
        TINY if args.tiny else FULL,
        **{k: v for k, v in (("contexts", tuple(args.contexts or ())), ("rounds", args.rounds)) if v},
    )
    if args.kv_budget_gib is not None:
        scale = replace(scale, kv_budget_bytes=int(args.kv_budget_gib * GIB))
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    results: dict[str, list[dict]] = {key: [] for key in SECTIONS}
    for name in args.models:
        model = build_model(name, args.tiny, device, dtype)
        bank = random_gates(model)
        n_runs = len(scale.contexts) * 3 * (1 + scale.rounds)
        with tqdm(total=n_runs, desc=f"{name}: prefill and decode", disable=args.quiet) as progress:
            runs = timed_runs(model, bank, args, scale, progress)
        for key, rows in zip(("prefill", "decode", "memory"), timed_rows(name, runs)):
            results[key] += rows
        with tqdm(desc=f"{name}: longest context (trials)", disable=args.quiet) as progress:
            results["longest"] += longest_rows(name, model, bank, args, scale, progress)
        del model, bank, runs
        free_memory(device)
    with tqdm(total=2, desc="kernels", disable=args.quiet) as progress:
        peak = hbm_peak_gbps(device, args.hbm_peak)
        results["compaction"] = compaction_rows(scale, device, dtype, args.ratio, peak)
        progress.update()
        results["selection"] = selection_rows(scale, device, args.ratio)
        progress.update()
    return results


def describe(args, seconds: float) -> list[str]:
    """The report's header: where and how it ran."""
    import transformers

    from fastkvzip_press.cache import attention_path_counts

    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    paths = ", ".join(f"{name}: {count}" for name, count in sorted(attention_path_counts().items())) or "none"
    return [
        f"{where}; torch {torch.__version__}, transformers {transformers.__version__}; {args.dtype}; random weights "
        f"and random gates; compression ratio {args.ratio}{' (tiny shapes: a rehearsal)' if args.tiny else ''}.",
        "",
        f"Command: `python benchmarks/gpu.py {' '.join(sys.argv[1:])}` ({seconds:.0f} s). "
        f"Ragged attention calls by path: {paths}.",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes of every section (a rehearsal, seconds)")
    parser.add_argument("--models", nargs="+", default=list(MODEL_CONFIGS), choices=list(MODEL_CONFIGS))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--ratio", type=float, default=0.7, help="compression ratio of every press")
    parser.add_argument("--contexts", type=int, nargs="+", help="prefill / decode contexts (default 8k and 32k)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per context (default 3)")
    parser.add_argument("--kv-budget-gib", type=float, help="memory over the model for the longest-context search")
    parser.add_argument("--hbm-peak", type=float, help="peak memory bandwidth in GB/s (default: by device name)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; rehearse on CPU with --device cpu --tiny")
    if args.tiny and args.device == "cpu":
        torch.set_num_threads(1)  # tiny shapes gain nothing from threads; on a busy CPU spinning ones cost a lot
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    start = time.perf_counter()
    results = run(args)
    table = markdown(results, describe(args, time.perf_counter() - start))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.md").write_text(table)
    write_csv(long_rows(results), args.out / "gpu.csv")
    print(table)
    print(f"written: {args.out}/gpu.{{md,csv}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
