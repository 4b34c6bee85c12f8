"""The measurements of benchmarks/gpu.py, one function per section: timed prefill and decode, longest context,
compaction bandwidth, selection."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator

import torch
from device_timing import time_ms
from gpu_setup import (
    FULL_CACHE,
    GIB,
    KVPRESS,
    MIB,
    NO_PRESS,
    OURS,
    OURS_CHUNKED,
    Budget,
    Scale,
    allocated,
    free_memory,
    is_out_of_memory,
    kernels,
    kv_watch,
    make_press,
    random_ids,
    sync,
)


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
    budget = Budget(scale.timed_s)
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
            budget = Budget(scale.longest_s / 2)
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
