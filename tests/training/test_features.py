"""Reading feature shards one gated layer at a time: the same values as loading them whole, and a fit over them whose
peak memory is about one layer's features, not the whole set's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fastkvzip_press.training.shards import ShardSet, load_split


def write_synthetic_shards(folder: Path, n_shards: int, layers: int, tokens: int, hidden: int, heads: int = 2):
    """Shards in the layout ``write_shards`` writes (``hidden [L_g, n, D]`` bf16, ``scores [L_g, H, n]`` fp32, JSON
    header), with random values; one document per shard. Returns the paths in order."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(len(str(folder)))
    paths = []
    for k in range(n_shards):
        tensors = {
            "hidden": torch.randn(layers, tokens, hidden, generator=generator).to(torch.bfloat16),
            "scores": torch.rand(layers, heads, tokens, generator=generator),
        }
        meta = {"document": f"doc{k}", "window": 0, "tokens": tokens, "layer_ids": list(range(layers))}
        path = folder / f"shard_{k:06d}.safetensors"
        save_file(tensors, str(path), metadata={"fastkvzip_press": json.dumps(meta)})
        paths.append(path)
    return paths


def test_a_shard_set_reads_each_layer_as_loading_every_shard_would(tmp_path):
    paths = write_synthetic_shards(tmp_path, n_shards=3, layers=4, tokens=300, hidden=16)
    shards, whole = ShardSet(paths), load_split(paths)
    assert shards.num_tokens == whole.num_tokens == 900 and shards.documents == whole.documents
    assert shards.num_layers == 4
    for index in range(4):
        layer = shards.layer(index)
        assert layer.hidden.dtype == torch.bfloat16 and layer.hidden.shape == (900, 16)
        assert torch.equal(layer.hidden, whole.hidden[index]) and torch.equal(layer.scores, whole.scores[index])
        first = shards.layer(index, max_tokens=450)  # across a shard boundary
        assert torch.equal(first.hidden, whole.hidden[index, :450])
        assert torch.equal(first.scores, whole.scores[index, :, :450])
    with pytest.raises(IndexError, match="outside the shards' 4 gated layers"):
        shards.layer(4)


def test_a_shard_set_names_an_unreadable_shard(tmp_path):
    paths = write_synthetic_shards(tmp_path, n_shards=2, layers=2, tokens=300, hidden=8)
    paths[1].write_bytes(b"not a shard")
    with pytest.raises(ValueError, match=f"{paths[1].name} is unreadable"):
        ShardSet(paths)


# The fit in a fresh process: its growth at its peak (VmHWM, reset just before the fit) over its RSS before the fit.
PEAK_SCRIPT = """
import re, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from fastkvzip_press import ModelLayout
from fastkvzip_press.training import FitConfig, fit_gates
from fastkvzip_press.training.shards import ShardSet, load_split

def status(field):
    return int(re.search(field + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

folder, how = Path(sys.argv[1]), sys.argv[2]
train, val = sorted(folder.glob("train/shard_*")), sorted(folder.glob("val/shard_*"))
layout = ModelLayout(
    model_id="synthetic", num_layers=8, hidden_size=1024, num_attention_heads=8, num_kv_heads=2, head_dim=128,
    gated_layer_ids=tuple(range(8)),
)
config = FitConfig(steps=2, batch_tokens=500, rank=4, n_sink=4, eval_every=1)
source = ShardSet if how == "streamed" else load_split
Path("/proc/self/clear_refs").write_text("5")  # the peak so far (imports) is not the fit's
before = status("VmRSS")
fit_gates(layout, source(train), source(val), config, folder / how, progress=False)
print(status("VmHWM") - before)
"""


def peak_growth(folder: Path, how: str) -> int:
    """Bytes the fit's process grew by at its peak, fitting from ``how`` ('streamed' or 'in_memory') features."""
    # A fixed mmap threshold: glibc's adaptive one keeps some freed blocks in the heap, which would blur the figure.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    run = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(folder), how], env=env, capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return int(run.stdout.split()[-1])


def test_the_streamed_fit_holds_about_one_layer_in_memory(tmp_path):
    """8 gated layers of 4 training shards and one validation shard of 4,096 tokens each (D = 1024): 8 MiB per layer
    per shard, 40 MiB per layer, 320 MiB in all. The streamed fit grows by about one layer (plus one shard's piece,
    the validation sample in fp32 and the process's own first allocations), the in-memory load by all of them."""
    layers, tokens, hidden = 8, 4096, 1024
    write_synthetic_shards(tmp_path / "train", n_shards=4, layers=layers, tokens=tokens, hidden=hidden)
    write_synthetic_shards(tmp_path / "val", n_shards=1, layers=layers, tokens=tokens, hidden=hidden)
    one_layer = 5 * tokens * hidden * 2  # bytes of one layer's gate inputs, training and validation
    streamed, in_memory = peak_growth(tmp_path, "streamed"), peak_growth(tmp_path, "in_memory")
    assert streamed < 3 * one_layer, f"streamed fit grew by {streamed / one_layer:.1f} layers"
    assert in_memory > layers * one_layer, f"in-memory fit grew by {in_memory / one_layer:.1f} layers"
