"""Writing files so that a reader (or a resumed run) never sees a partial one, and removing what a killed writer left.

A temporary file is named ``.<name>.<pid>.<random>.tmp`` beside its target. A process killed between writing and
renaming leaves it behind; :func:`remove_stale_temporaries` removes those whose writing process is gone, and leaves
the files of live writers (another rank, a concurrent run) alone.
"""

from __future__ import annotations

import errno
import glob
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
    gets the permissions of any new file (the umask's), not the temporary file's 0600. A folder, device, pipe or
    socket at ``path`` is never replaced (``FileExistsError``)."""
    if path.exists() and not path.is_file():
        raise FileExistsError(errno.EEXIST, "not a regular file, so not replaced", str(path))
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


def remove_stale_temporaries_of(path: str | Path) -> list[Path]:
    """Remove the temporary files that killed :func:`atomic_write` calls for ``path`` left beside it (only those
    whose writer is dead). Returns the removed paths."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    removed = []
    own = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)\.[a-z0-9_]{{8}}\.tmp$")
    for candidate in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        match = own.match(candidate.name)
        if match is not None and not _alive(int(match.group(1))):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    if removed:
        logger.info("removed %d temporary files of %s left by an interrupted write", len(removed), path)
    return removed


def target_problem(path: str | Path) -> str | None:
    """Why :func:`atomic_write` could not or must not write ``path`` (said of the path: "is a folder", ...), or
    ``None``: checked before a long computation whose result goes there."""
    path = Path(path)
    if path.is_dir():
        return "is a folder"
    if path.exists() and not path.is_file():
        return "exists and is not a regular file (a device, pipe or socket), which writing would replace"
    return folder_problem(path.parent)


def folder_problem(folder: str | Path) -> str | None:
    """Why no new file can be written in ``folder`` (created first where it is missing), or ``None``: its nearest
    existing ancestor must be a folder where a file can be created."""
    existing = Path(folder)
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"cannot be written: {existing} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        return f"cannot be written: {error.strerror or error} in {existing}"
    return None
