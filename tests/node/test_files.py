"""The node's one atomic writer, and its three users: research files, the spool, the FHIR waiting list."""

from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sclc_risk_node.node.durable_files import TEMP_SUFFIX, place_file_atomically
from sclc_risk_node.node.errors import SpoolFull, SpoolIOError
from sclc_risk_node.node.fhir_lookup import WaitingReasons
from sclc_risk_node.node.files import write_atomically


@dataclass
class SyncLog:
    """What was synced, in order, by the path each descriptor was open on."""

    events: list[tuple[str, Path]] = field(default_factory=list)

    def synced(self, kind: str) -> list[Path]:
        return [path for k, path in self.events if k == kind]


@pytest.fixture
def syncs(monkeypatch) -> SyncLog:
    log = SyncLog()
    real_fsync, real_fdatasync, real_replace = os.fsync, os.fdatasync, os.replace

    def recorder(kind, real):
        def record(fd):
            log.events.append((kind, Path(os.readlink(f"/proc/self/fd/{fd}"))))
            return real(fd)

        return record

    def replace(source, destination):
        log.events.append(("rename", Path(destination)))
        return real_replace(source, destination)

    monkeypatch.setattr(os, "fsync", recorder("fsync", real_fsync))
    monkeypatch.setattr(os, "fdatasync", recorder("fdatasync", real_fdatasync))
    monkeypatch.setattr(os, "replace", replace)
    return log


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_plain_write_syncs_the_data_renames_and_leaves_the_folder_alone(syncs, tmp_path):
    path = tmp_path / "sub" / "report.json"
    old_umask = os.umask(0o027)
    try:
        write_atomically(path, "ünïcode")
    finally:
        os.umask(old_umask)

    assert path.read_bytes() == "ünïcode".encode()
    assert mode_of(path) == 0o640  # what the umask gives a new file, not mkstemp's 0600
    [(kind, temp), rename] = syncs.events
    assert kind == "fdatasync" and temp.parent == path.parent and temp.name.startswith(".report.json.")
    assert rename == ("rename", path)
    assert syncs.synced("fsync") == []
    assert leftovers(path.parent) == []


def test_durable_write_fsyncs_the_folder_after_the_rename(syncs, tmp_path):
    path = tmp_path / "instance.dcm"
    path.write_bytes(b"old")

    write_atomically(path, b"new", mode=0o600, durable=True, temp_suffix=".partial")

    assert path.read_bytes() == b"new" and mode_of(path) == 0o600
    kinds = [kind for kind, _ in syncs.events]
    assert kinds == ["fdatasync", "rename", "fsync"]
    assert syncs.synced("fdatasync")[0].name.endswith(".partial")
    assert syncs.synced("fsync") == [tmp_path]


def test_failed_write_leaves_the_old_file_and_no_temporary(monkeypatch, tmp_path):
    path = tmp_path / "pending.json"
    path.write_text("old")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdatasync", full_disk)
    with pytest.raises(OSError, match="No space"):
        write_atomically(path, "new", durable=True)

    assert path.read_text() == "old"
    assert leftovers(tmp_path) == []


def test_spool_places_instances_through_the_durable_writer(syncs, tmp_path):
    root = tmp_path / "spool"
    final = root / "studies" / "1.2" / "1.2.3" / "1.2.3.4.dcm"
    root.mkdir()

    place_file_atomically(final, b"DICM bytes", root=root)

    assert final.read_bytes() == b"DICM bytes" and mode_of(final) == 0o600
    assert syncs.synced("fdatasync")[-1].name.endswith(TEMP_SUFFIX)
    # Each new folder's parent when it was made, then the instance's folder after the rename.
    assert syncs.synced("fsync") == [root, root / "studies", root / "studies" / "1.2", final.parent]
    assert [kind for kind, _ in syncs.events][-3:] == ["fdatasync", "rename", "fsync"]
    assert leftovers(final.parent) == []


@pytest.mark.parametrize(("error", "refusal"), [(errno.ENOSPC, SpoolFull), (errno.EIO, SpoolIOError)])
def test_spool_write_errors_keep_their_meaning(monkeypatch, error, refusal, tmp_path):
    final = tmp_path / "series" / "1.2.3.dcm"

    def failing(fd):
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(os, "fdatasync", failing)
    with pytest.raises(refusal, match="1.2.3.dcm"):
        place_file_atomically(final, b"data", root=tmp_path)

    assert not final.exists() and leftovers(final.parent) == []


def test_fhir_waiting_reasons_are_written_atomically_and_private(syncs, tmp_path):
    reasons = WaitingReasons(tmp_path)

    reasons.update({"1.2.3": {"reason": "no FHIR answer yet"}})

    assert json.loads(reasons.path.read_text()) == {"1.2.3": {"reason": "no FHIR answer yet"}}
    assert mode_of(reasons.path) == 0o600
    assert [kind for kind, _ in syncs.events] == ["fdatasync", "rename"]
    assert [p.name for p in tmp_path.iterdir()] == [reasons.path.name]
