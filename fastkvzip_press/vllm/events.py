"""A JSON-lines record of what the integration did (compactions, scheduler steps), for tests and benchmarks."""

from __future__ import annotations

import json
import logging
import os
import time

logger = logging.getLogger("vllm.fastkvzip.events")


class EventLog:
    """Appends one JSON object per line to ``path`` (nothing when ``path`` is ``None``).

    The engine core and the worker are separate processes that may write the same file: each record is one
    ``write`` to a file opened with ``O_APPEND``, so lines never interleave.
    """

    def __init__(self, path: str | None):
        self.path = path

    def write(self, kind: str, **fields) -> None:
        """Append one record; a file that can no longer be written (a full disk, a removed folder) costs the records,
        never the engine: one warning, then none are written."""
        if self.path is None:
            return
        line = json.dumps({"event": kind, "pid": os.getpid(), "time": time.time(), **fields}) + "\n"
        try:
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(descriptor, line.encode())
            finally:
                os.close(descriptor)
        except OSError as error:
            logger.warning("Fast KVzip events file %s cannot be written (%s); no more records", self.path, error)
            self.path = None


def read_events(path: str | os.PathLike, kind: str | None = None, since: float = 0.0) -> list[dict]:
    """The records of ``path`` written at or after ``since``, of one ``kind`` or all."""
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    return [r for r in records if r["time"] >= since and (kind is None or r["event"] == kind)]
