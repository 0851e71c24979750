"""Writing files so that a reader (or a crash) never sees half of one.

The one atomic writer of the node: the spool's instance files, the FHIR lookup's
pending list and the research reports all go through ``write_atomically``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_directory(directory: Path) -> None:
    """Make the folder's entries (a rename, a new file) survive a power loss."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(
    path: Path,
    data: str | bytes,
    *,
    mode: int | None = None,
    durable: bool = False,
    temp_suffix: str = ".tmp",
) -> None:
    """Make ``path`` hold exactly ``data`` (text as UTF-8), or leave it as it was.

    The data goes to a temporary file beside ``path`` (so the rename cannot
    cross file systems), is fdatasynced, and the file is renamed over ``path``.
    fdatasync writes the data and the metadata needed to read it back (the
    size), not the timestamps, which saves ~0.7 ms per spooled instance (ext4,
    issue 9).

    ``mode``: the file's permissions; by default what the process's umask gives
    a new file (a plain temporary file would stay 0600).  ``durable``: also
    fsync the folder after the rename, so the new name itself survives a power
    loss (the spool commits an index row right after).  ``temp_suffix`` names
    the temporary file (``.<name>.<random><suffix>``) for whoever sweeps
    leftovers after a crash.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=temp_suffix)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            handle.flush()
            os.fdatasync(handle.fileno())
        if mode != 0o600:  # mkstemp already created it 0600
            os.chmod(temp_name, (0o666 & ~_umask()) if mode is None else mode)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    if durable:
        fsync_directory(path.parent)
