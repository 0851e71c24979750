"""The spool's files on disk: placed durably, removed durably, errors in the spool's terms.

A received instance is acknowledged only once its bytes and its folder entry
are on disk, so every folder a file goes into is made, and every rename or
removal in it is followed, by an fsync of the folder that changed.  The
atomic write itself is `node.files.write_atomically`.
"""

from __future__ import annotations

import errno
from pathlib import Path

from sclc_risk_node.node.errors import SpoolFull, SpoolIOError
from sclc_risk_node.node.files import fsync_directory, write_atomically

#: Temp files are hidden and carry this suffix so recovery can tell them from spooled files.
TEMP_SUFFIX = ".partial"


def make_directories_durably(directory: Path, root: Path) -> None:
    """Create ``directory`` (under ``root``) and fsync each parent that gained an entry.

    Without the parent fsync a new folder can vanish in a power loss, taking
    the fsynced file inside it along.
    """
    if directory.is_dir():
        return
    missing = []
    current = directory
    while not current.is_dir():
        missing.append(current)
        if current == root or current.parent == current:
            break
        current = current.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            continue
        fsync_directory(path.parent)


def os_error(exc: OSError, what: str) -> Exception:
    """``exc`` as the spool reports it: `SpoolFull` when the disk or quota is full, else `SpoolIOError`."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return SpoolFull(f"{what}: {exc.strerror}")
    return SpoolIOError(f"{what}: {exc}")


def place_file_atomically(final_path: Path, data: bytes, *, root: Path) -> None:
    """Make ``final_path`` hold exactly ``data``, durably, or leave it as it was.

    Temp file in the same folder (so the rename cannot cross file systems),
    fdatasync, atomic rename, fsync of the folder.  fdatasync writes the data
    and the metadata needed to read it back (the size), not the timestamps,
    which saves ~0.7 ms per instance (ext4, issue 9).  Files are created 0600:
    they hold patient data.
    """
    directory = final_path.parent
    try:
        make_directories_durably(directory, root)
    except OSError as exc:
        raise os_error(exc, f"cannot create a file in {directory}") from exc
    try:
        write_atomically(final_path, data, mode=0o600, durable=True, temp_suffix=TEMP_SUFFIX)
    except OSError as exc:
        raise os_error(exc, f"cannot write {final_path.name}") from exc


def remove_empty_directories(directory: Path, stop_at: Path) -> None:
    """Remove ``directory`` and its parents below ``stop_at`` while they are empty, fsyncing each parent."""
    while directory != stop_at and stop_at in directory.parents:
        try:
            directory.rmdir()
        except OSError:
            return
        fsync_directory(directory.parent)
        directory = directory.parent
