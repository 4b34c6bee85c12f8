"""Host reads of device data (each one a GPU synchronisation) in the decoding loop: once per step, not per layer.

On CPU nothing synchronises, so :func:`stand_ins.host_reads` records every read of tensor data the package's own code
makes (``item``, ``tolist``, ``bool(tensor)``, ...), which is what would synchronise with a GPU.
"""

import torch
from helpers import CONTEXT
from stand_ins import host_reads
from transformers import DynamicCache

from fastkvzip_press import FastKVzipDecodingPress, FastKVzipPress, GateBank, ModelLayout, RaggedLayer
from fastkvzip_press.eviction import Protection, RatioBudget, decide


def padded_batch(tokenizer):
    tokenizer.padding_side = "left"
    return tokenizer([CONTEXT, CONTEXT[:200]], return_tensors="pt", padding=True)


def test_a_decoding_step_of_a_padded_batch_reads_the_mask_once(llama, monkeypatch):
    model, tokenizer = llama
    press = FastKVzipDecodingPress(
        gates=GateBank.random(ModelLayout.from_model(model)), compression_interval=64, target_size=40, window_size=8
    )
    batch = padded_batch(tokenizer)
    cache, mask = DynamicCache(), batch.attention_mask
    with torch.no_grad(), press(model):
        next_ids = model(**batch, past_key_values=cache).logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(2):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            with host_reads(monkeypatch) as reads:
                next_ids = model(next_ids, attention_mask=mask, past_key_values=cache).logits[:, -1].argmax(-1)[:, None]
            assert len(reads) <= 1, reads  # was one per gated layer (4)


def test_reordering_beams_reads_the_index_once_for_every_layer(llama, monkeypatch):
    model, tokenizer = llama
    press = FastKVzipPress(0.5, gates=GateBank.random(ModelLayout.from_model(model)), window_size=4)
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model(**padded_batch(tokenizer), past_key_values=cache)
    assert all(isinstance(layer, RaggedLayer) for layer in cache.layers)
    before = [layer.head_lengths for layer in cache.layers]
    beam_idx = torch.tensor([1, 0, 1])
    with host_reads(monkeypatch) as reads:
        cache.reorder_cache(beam_idx)
    assert len(reads) == 1, reads  # was six per layer
    assert [layer.head_lengths for layer in cache.layers] == [b[2:] + b[:2] + b[2:] for b in before]


def test_a_decision_reads_its_counts_in_one_go(monkeypatch):
    scores = torch.rand(4, 3, 2, 50, generator=torch.Generator().manual_seed(0))
    for layerwise in (False, True):
        with host_reads(monkeypatch) as reads:
            decision = decide(scores, RatioBudget(0.5, layerwise=layerwise), Protection(2, 4))
        assert [read for read in reads if read.startswith("decision.py")] == [reads[0]]  # was two per group
        assert decision.evicted_per_sequence == decision.evicted.sum(dim=(0, 2, 3)).tolist()
