"""Real DICOM peers on loopback for tests: DCMTK ``storescp`` and Orthanc, started and stopped by PID.

Reusable by any test (outbox, end-to-end).  Every peer runs with
``TCP_NODELAY=1`` (see the field notes: without it each instance costs about
45 ms on loopback), on ports found free by binding port 0, and is stopped
with SIGTERM and waited for (SIGKILL only if it ignores SIGTERM).

    def test_x(peers, tmp_path):                      # the `peers` fixture stops everything at teardown
        scp = peers.storescp(tmp_path / "in", ae_title="PACS1")
        ...; scp.received_files()
        orthanc = peers.orthanc(tmp_path / "orthanc", modalities={"NODE": ("SCLC_NODE", "127.0.0.1", 11112)})
        orthanc.sop_instance_uids(); orthanc.stop(); orthanc.start()

Outside pytest use `start_storescp` / `start_orthanc` and call ``stop()``
(both handles are context managers too).  Orthanc has no bind-address
setting and listens on all interfaces; tests only ever talk to 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

STORESCP = Path("/usr/bin/storescp")  # DCMTK's; pynetdicom installs a same-named script in the venv
ORTHANC = Path("/usr/sbin/Orthanc")
LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 15.0

requires_storescp = pytest.mark.skipif(not STORESCP.is_file(), reason=f"DCMTK storescp not installed ({STORESCP})")
requires_orthanc = pytest.mark.skipif(not ORTHANC.is_file(), reason=f"Orthanc not installed ({ORTHANC})")


def free_port() -> int:
    """A TCP port nothing listens on right now (bind to port 0 and let the kernel choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def peer_environment() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def is_listening(port: int) -> bool:
    """Whether some socket is in LISTEN state on ``port`` (read from /proc, without connecting)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                return True
    return False


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop_process(process: subprocess.Popen | None, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM this one process (by PID) and wait; SIGKILL if it does not exit in time."""
    if process is None or process.poll() is not None:
        return
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout_s)


# --- DCMTK storescp ---------------------------------------------------------------------


@dataclass
class StoreScp:
    """A DCMTK ``storescp`` writing what it receives into ``directory``."""

    directory: Path
    port: int
    ae_title: str
    log_path: Path
    args: Sequence[str] = ()
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> StoreScp:
        if self.running:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [str(STORESCP), "-od", str(self.directory), "-aet", self.ae_title, *self.args, str(self.port)]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=peer_environment()
            )
        _wait_until(lambda: is_listening(self.port), self.process, self.log_path, f"storescp on port {self.port}")
        return self

    def stop(self) -> None:
        _stop_process(self.process)

    def received_files(self) -> list[Path]:
        """Files storescp wrote (its temp files excluded), sorted by name."""
        return sorted(p for p in self.directory.iterdir() if p.is_file() and not p.name.startswith("."))

    def __enter__(self) -> StoreScp:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def storescp_handle(
    directory: Path,
    *,
    port: int | None = None,
    ae_title: str = "STORESCP",
    bit_preserving: bool = True,
    extra_args: Sequence[str] = (),
    log_path: Path | None = None,
) -> StoreScp:
    """A not yet started ``storescp -od DIR [+B] -aet AET PORT`` on a free port (or ``port``)."""
    directory = Path(directory)
    return StoreScp(
        directory=directory,
        port=port or free_port(),
        ae_title=ae_title,
        log_path=log_path or directory.with_name(directory.name + "-storescp.log"),
        args=tuple((["+B"] if bit_preserving else []) + list(extra_args)),
    )


def start_storescp(directory: Path, **options: Any) -> StoreScp:
    """`storescp_handle` started: returns once storescp listens."""
    return storescp_handle(directory, **options).start()


# --- Orthanc --------------------------------------------------------------------------------


@dataclass
class Orthanc:
    """An Orthanc server with its own storage, index and config under ``root``."""

    root: Path
    dicom_port: int
    http_port: int
    ae_title: str
    config_path: Path
    log_path: Path
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def rest_url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> Orthanc:
        """Start (or restart, same ports and storage) and wait until ``GET /system`` answers."""
        if self.running:
            return self
        with open(self.log_path.with_suffix(".out"), "ab") as out:
            self.process = subprocess.Popen(
                [str(ORTHANC), f"--logfile={self.log_path}", str(self.config_path)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=peer_environment(),
            )
        _wait_until(self._answers, self.process, self.log_path, f"Orthanc on HTTP port {self.http_port}")
        _wait_until(
            lambda: is_listening(self.dicom_port), self.process, self.log_path, f"Orthanc DICOM port {self.dicom_port}"
        )
        return self

    def stop(self) -> None:
        """SIGTERM and wait (Orthanc takes 3-5 s to exit)."""
        _stop_process(self.process)

    def _answers(self) -> bool:
        try:
            self.get("/system", timeout_s=1.0)
            return True
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    # --- REST ---

    def get(self, path: str, *, timeout_s: float = 10.0) -> Any:
        with urllib.request.urlopen(self.rest_url + path, timeout=timeout_s) as response:
            body = response.read()
        return json.loads(body) if body else None

    def get_bytes(self, path: str, *, timeout_s: float = 10.0) -> bytes:
        with urllib.request.urlopen(self.rest_url + path, timeout=timeout_s) as response:
            return response.read()

    def post(self, path: str, body: Any, *, timeout_s: float = 60.0) -> Any:
        request = urllib.request.Request(
            self.rest_url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            data = response.read()
        return json.loads(data) if data else None

    def instance_ids(self) -> list[str]:
        return list(self.get("/instances"))

    def simplified_tags(self, instance_id: str) -> dict[str, Any]:
        return self.get(f"/instances/{instance_id}/simplified-tags")

    def instance_file(self, instance_id: str) -> bytes:
        return self.get_bytes(f"/instances/{instance_id}/file")

    def sop_instance_uids(self) -> list[str]:
        """The SOP Instance UID of every stored instance (one entry per stored instance)."""
        return [self.simplified_tags(i)["SOPInstanceUID"] for i in self.instance_ids()]

    def instances_with_sop_uid(self, sop_instance_uid: str) -> list[str]:
        return list(self.post("/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}}))

    def upload(self, dicom_bytes: bytes) -> dict[str, Any]:
        request = urllib.request.Request(
            self.rest_url + "/instances", data=dicom_bytes, headers={"Content-Type": "application/dicom"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def __enter__(self) -> Orthanc:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def orthanc_handle(
    root: Path,
    *,
    dicom_port: int | None = None,
    http_port: int | None = None,
    modalities: Mapping[str, tuple[str, str, int]] | None = None,
    ae_title: str = "ORTHANC",
    check_called_aet: bool = False,
    extra_config: Mapping[str, Any] | None = None,
) -> Orthanc:
    """Write an Orthanc config under ``root``; ``modalities``: name -> (AE title, host, port).  Not started yet.

    Stores are accepted from any AE (``DicomAlwaysAllowStore``); with
    ``check_called_aet`` an association calling another AE title than
    ``ae_title`` is rejected.
    """
    root = Path(root)
    (root / "storage").mkdir(parents=True, exist_ok=True)
    (root / "index").mkdir(parents=True, exist_ok=True)
    handle = Orthanc(
        root=root,
        dicom_port=dicom_port or free_port(),
        http_port=http_port or free_port(),
        ae_title=ae_title,
        config_path=root / "orthanc.json",
        log_path=root / "orthanc.log",
    )
    config = {
        "Name": f"test-{handle.dicom_port}",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "HttpPort": handle.http_port,
        "DicomPort": handle.dicom_port,
        "DicomAet": ae_title,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": check_called_aet,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowEcho": True,
        "OverwriteInstances": True,
        "DicomModalities": {name: list(entry) for name, entry in (modalities or {}).items()},
        "Plugins": [],
        **(extra_config or {}),
    }
    handle.config_path.write_text(json.dumps(config, indent=2))
    return handle


def start_orthanc(root: Path, **options: Any) -> Orthanc:
    """`orthanc_handle` started: returns once ``GET /system`` answers and the DICOM port listens."""
    return orthanc_handle(root, **options).start()


# --- shared ---------------------------------------------------------------------------------


def _wait_until(
    ready, process: subprocess.Popen, log_path: Path, what: str, timeout_s: float = START_TIMEOUT_S
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode} while starting:\n{_tail(log_path)}")
        if ready():
            return
        time.sleep(0.05)
    _stop_process(process)
    raise RuntimeError(f"{what} did not come up within {timeout_s:g} s:\n{_tail(log_path)}")


class Peers:
    """Starts peers and remembers them, so `stop_all` (the fixture's teardown) stops each by its PID."""

    def __init__(self) -> None:
        self._handles: list[StoreScp | Orthanc] = []

    def storescp(self, directory: Path, **kwargs: Any) -> StoreScp:
        if not STORESCP.is_file():
            pytest.skip(f"DCMTK storescp not installed ({STORESCP})")
        handle = storescp_handle(directory, **kwargs)
        self._handles.append(handle)  # registered before starting: a failed start is still cleaned up
        return handle.start()

    def orthanc(self, root: Path, **kwargs: Any) -> Orthanc:
        if not ORTHANC.is_file():
            pytest.skip(f"Orthanc not installed ({ORTHANC})")
        handle = orthanc_handle(root, **kwargs)
        self._handles.append(handle)
        return handle.start()

    def stop_all(self) -> None:
        for handle in reversed(self._handles):
            handle.stop()


@pytest.fixture
def peers():
    """`Peers` whose processes are all stopped (SIGTERM by PID, then wait) when the test ends."""
    registry = Peers()
    try:
        yield registry
    finally:
        registry.stop_all()
