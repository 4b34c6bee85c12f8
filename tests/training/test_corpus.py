"""Corpus streaming: parquet files and ``hf:`` datasets are read lazily, no further than the planned tokens."""

import itertools

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import CONTEXT

from fastkvzip_press.training import iter_documents
from fastkvzip_press.training.features import plan_windows


def write_parquet(path, texts, row_group_size=64):
    pq.write_table(pa.table({"text": texts, "id": list(range(len(texts)))}), path, row_group_size=row_group_size)


def test_a_parquet_file_gives_one_document_per_non_empty_row(tmp_path):
    texts = [f"row {i}: {CONTEXT}" if i % 7 else "" for i in range(3000)]  # more rows than one read batch
    write_parquet(tmp_path / "part.parquet", texts)
    documents = list(iter_documents(tmp_path / "part.parquet"))
    expected = [(f"part.parquet:{i}", text) for i, text in enumerate(texts) if text]
    assert [(d.name, d.text) for d in documents] == expected


def test_a_parquet_folder_is_read_in_path_order_and_no_further_than_needed(llama, tmp_path):
    _, tokenizer = llama
    folder = tmp_path / "shards"
    folder.mkdir()
    write_parquet(folder / "a.parquet", [" ".join([CONTEXT] * 4)] * 50)
    write_parquet(folder / "b.parquet", ["second file"])
    (folder / "c.parquet").write_bytes(b"not a parquet file: reading it would fail")
    names = [d.name for d in itertools.islice(iter_documents(folder), 51)]
    assert names[:2] == ["a.parquet:0", "a.parquet:1"] and names[-2:] == ["a.parquet:49", "b.parquet:0"]
    windows = plan_windows(tokenizer, iter_documents(folder), context_len=256, max_tokens=1024)
    assert sum(len(w.ids) for w in windows) >= 1024
    assert {w.document for w in windows} <= {f"a.parquet:{i}" for i in range(50)}  # c.parquet never opened
    with pytest.raises(ValueError, match="c.parquet is not a readable parquet file"):
        list(iter_documents(folder))  # the broken file is only met when the stream gets there


class FakeStream:
    """An endless streamed dataset, as ``datasets.load_dataset(..., streaming=True)`` returns for a large corpus."""

    def __init__(self):
        self.rows_read = 0

    def __iter__(self):
        for row in itertools.count():
            self.rows_read += 1
            yield {"text": "" if row == 1 else f"document {row}. " + " ".join([CONTEXT] * 3), "url": f"u{row}"}


def test_hub_datasets_are_streamed_and_read_only_as_far_as_the_plan(llama, monkeypatch):
    import datasets

    _, tokenizer = llama
    calls, stream = [], FakeStream()

    def load_dataset(name, config=None, **kwargs):
        calls.append((name, config, kwargs))
        return stream

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    windows = plan_windows(tokenizer, iter_documents("hf:someone/web-text:sample-10BT"), 256, max_tokens=2000)
    assert calls == [("someone/web-text", "sample-10BT", {"split": "train", "streaming": True})]
    assert sum(len(w.ids) for w in windows) >= 2000
    assert windows[0].document == "someone/web-text:0" and "someone/web-text:1" not in {w.document for w in windows}
    assert stream.rows_read == len({w.document for w in windows}) + 1  # the empty row, and nothing past the plan
    again = plan_windows(tokenizer, iter_documents("hf:someone/web-text:sample-10BT"), 256, max_tokens=2000)
    assert [(w.document, w.index, w.ids.tolist()) for w in again] == [
        (w.document, w.index, w.ids.tolist()) for w in windows
    ]  # every rank plans the same windows from the stream
