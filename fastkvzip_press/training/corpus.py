"""Training text: local files and folders, parquet files, ``datasets`` datasets, or an offline built-in corpus.

Sources (``iter_documents(source)``):

- ``None`` or ``"builtin"``: the English reference documentation that ships with every CPython install
  (``pydoc_data.topics``: about 465k characters, ~110k tokens, 80+ topics). It needs no network and no download, but it
  is technical prose about Python, not the broad web text of the paper's fineweb-edu; gates trained on it are a
  starting point, and more varied text trains better gates.
- a ``.txt`` / ``.md`` file (one document) or a folder of them (one document per file, sorted by path);
- a ``.parquet`` file (one document per row of its ``text`` column, or ``text_column``, streamed in row batches) or
  a folder of them;
- ``hf:<dataset>[:<config>]`` (``datasets.load_dataset(..., split="train", streaming=True)``, the same column), for
  example ``hf:HuggingFaceFW/fineweb-edu:sample-10BT`` as in the paper, where a network allows.

Every source is read lazily: the extraction stops reading once it has planned ``max_tokens`` context tokens, so a
large dataset is never downloaded or loaded whole. Under torchrun every rank reads the same documents in the same
order and extracts its own share of their windows (:mod:`fastkvzip_press.training.distributed`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".md", ".rst")
BUILTIN = "builtin"
# Built-in topics shorter than this are merged with their neighbours, so every document has some length.
MIN_BUILTIN_CHARS = 4000


@dataclass(frozen=True)
class Document:
    """One training document; ``name`` identifies it in shard metadata (and the validation split)."""

    name: str
    text: str


def _builtin() -> Iterator[Document]:
    from pydoc_data.topics import topics

    merged, names = [], []
    for key in sorted(topics):
        merged.append(topics[key].strip())
        names.append(key)
        if sum(len(t) for t in merged) >= MIN_BUILTIN_CHARS:
            yield Document(f"{BUILTIN}:{names[0]}", "\n\n".join(merged))
            merged, names = [], []
    if merged:
        yield Document(f"{BUILTIN}:{names[0]}", "\n\n".join(merged))


def _parquet(path: Path, text_column: str = "text", batch_rows: int = 1024) -> Iterator[Document]:
    """Rows of the ``text_column`` column, read ``batch_rows`` at a time: a large file is streamed, not loaded whole,
    and reading stops where the extraction has enough tokens."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        columns = parquet.schema_arrow.names
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"corpus file {path} is not a readable parquet file: {error}") from None
    if text_column not in columns:
        raise ValueError(
            f"corpus file {path} has no column {text_column!r}; its columns are {columns}. Choose the text column "
            "with --text-column NAME (text_column= in TrainConfig)"
        )
    row = 0
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=[text_column]):
        for text in batch.column(text_column).to_pylist():
            if text:
                yield Document(f"{path.name}:{row}", text)
            row += 1


def _hub(spec: str, text_column: str = "text") -> Iterator[Document]:
    from datasets import load_dataset

    name, _, config = spec.partition(":")
    try:
        dataset = load_dataset(name, config or None, split="train", streaming=True)
        examples = iter(dataset)
        first = next(examples, None)
    except Exception as error:  # datasets raises connection, hub and file errors of many types
        raise ValueError(
            f"corpus hf:{spec} could not be read ({type(error).__name__}: {error}). Without network access give a "
            "local corpus (a text file or folder, a .parquet file) or 'builtin'"
        ) from None
    if first is not None and text_column not in first:
        raise ValueError(
            f"corpus hf:{spec} has no column {text_column!r}; its columns are {sorted(first)}. Choose the text "
            "column with --text-column NAME (text_column= in TrainConfig)"
        )
    if first is None:
        return
    for row, example in enumerate(itertools.chain([first], examples)):
        if example.get(text_column):
            yield Document(f"{name}:{row}", example[text_column])


def check_source(source: str | Path | None) -> None:
    """Raise ``FileNotFoundError`` when ``source`` names a local corpus path that does not exist."""
    if source is None or str(source) == BUILTIN or (isinstance(source, str) and source.startswith("hf:")):
        return
    if not Path(source).exists():
        raise FileNotFoundError(
            f"corpus {str(source)!r} not found: give a text file, a folder of .txt/.md files, a .parquet file, "
            "'hf:<dataset>[:<config>]' or 'builtin'"
        )


def iter_documents(source: str | Path | None = None, text_column: str = "text") -> Iterator[Document]:
    """Documents of ``source`` in a deterministic order (see the module docstring for the accepted sources);
    ``text_column`` names the text of parquet files and datasets."""
    check_source(source)
    if source is None or str(source) == BUILTIN:
        yield from _builtin()
        return
    if isinstance(source, str) and source.startswith("hf:"):
        yield from _hub(source[3:], text_column)
        return
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES or p.suffix == ".parquet")
        if not files:
            raise ValueError(f"corpus folder {path} holds no .txt, .md, .rst or .parquet files")
    else:
        files = [path]
    for file in files:
        if file.suffix == ".parquet":
            yield from _parquet(file, text_column)
        else:
            text = file.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield Document(str(file.relative_to(path) if path.is_dir() else file.name), text)
