"""Writing files so that a reader (or a resumed run) never sees a partial one, and removing what a killed writer left.

A temporary file is named ``.<name>.<pid>.<random>.tmp`` beside its target. A process killed between writing and
renaming leaves it behind; :func:`remove_stale_temporaries` removes those whose writing process is gone, and leaves
the files of live writers (another rank, a concurrent run) alone.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_TEMPORARY = re.compile(r"^\..+\.(\d+)\.[a-z0-9_]{8}\.tmp$")
_OLD_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # before writer ids


def new_file_mode() -> int:
    """The permissions the process's umask gives a new file (``mkstemp`` makes its files 0600 whatever the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    """Write through a temporary file in the same folder, then rename, so readers never see a partial file. The file
    gets the permissions of any new file (the umask's), not the temporary file's 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(tmp)
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return False
    return True


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary files of :func:`atomic_write` under ``folder`` (recursively) whose writer is dead.

    Returns the removed paths. Temporaries of the old naming (no writer id) are removed as well.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.rglob(".*.tmp"):
        match = _TEMPORARY.match(path.name)
        if (match is not None and _alive(int(match.group(1)))) or (
            match is None and not _OLD_TEMPORARY.match(path.name)
        ):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        logger.info("removed %d temporary files left by an interrupted run in %s", len(removed), folder)
    return removed
