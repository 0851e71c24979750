"""DCMTK's SCU tools (echoscu, storescu) run against a node on loopback, for tests and benchmarks.

Called by absolute path: pynetdicom installs same-named scripts into the
Python ``bin`` folder.  Every run gets ``TCP_NODELAY=1`` (field notes: without
it loopback transfers are ~10x slower) and a timeout, and is a child process
waited for by ``subprocess.run``, so nothing outlives a test.  For storescp
and Orthanc as peers see ``tests/node/peers.py``.

    result = storescu(LOOPBACK, port, [folder], called_ae="SCLC_NODE", calling_ae="PACS", propose="-xr")
    assert result.ok, result.output
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

DCMTK_BIN = Path("/usr/bin")
ECHOSCU = DCMTK_BIN / "echoscu"
STORESCU = DCMTK_BIN / "storescu"
LOOPBACK = "127.0.0.1"
DEFAULT_TIMEOUT_S = 60.0

requires_dcmtk = pytest.mark.skipif(
    not (ECHOSCU.is_file() and STORESCU.is_file()), reason=f"DCMTK echoscu/storescu not installed in {DCMTK_BIN}"
)

#: storescu options proposing one compressed transfer syntax (plus the uncompressed ones).
PROPOSE = {
    "1.2.840.10008.1.2.5": "-xr",  # RLE Lossless
    "1.2.840.10008.1.2.4.70": "-xs",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": "-xt",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": "-xu",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": "-xv",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": "-xw",  # JPEG 2000
    "1.2.840.10008.1.2.1.99": "-xd",  # Deflated Explicit VR Little Endian
}


def dcmtk_environment() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


@dataclass(frozen=True)
class ToolResult:
    """One finished DCMTK run: exit code and combined stdout + stderr."""

    args: tuple[str, ...]
    returncode: int
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def association_rejected(self) -> bool:
        return "Association Rejected" in self.output

    @property
    def no_presentation_context(self) -> bool:
        return bool(re.search(r"no (acceptable )?presentation context", self.output, re.IGNORECASE))

    def store_statuses(self) -> list[int]:
        """DIMSE statuses of failed stores as printed by storescu -v (successes are not printed)."""
        return [int(code, 16) for code in re.findall(r"0x([0-9A-Fa-f]{4})", self.output)]


def run_tool(tool: Path, args: Sequence[str], *, timeout_s: float = DEFAULT_TIMEOUT_S) -> ToolResult:
    command = [str(tool), *args]
    completed = subprocess.run(
        command,
        env=dcmtk_environment(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    return ToolResult(tuple(command), completed.returncode, completed.stdout)


def echoscu(
    host: str, port: int, *, called_ae: str, calling_ae: str = "ECHOSCU", timeout_s: float = DEFAULT_TIMEOUT_S
) -> ToolResult:
    return run_tool(ECHOSCU, ["-aet", calling_ae, "-aec", called_ae, host, str(port)], timeout_s=timeout_s)


def storescu(
    host: str,
    port: int,
    paths: Iterable[Path],
    *,
    called_ae: str,
    calling_ae: str = "STORESCU",
    propose: str | None = None,
    extra_args: Sequence[str] = (),
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> ToolResult:
    """``storescu -v -R -nh +sd +r`` over files and folders.

    ``-R`` proposes only the SOP classes present (required for SEG);
    ``propose`` adds a compressed transfer syntax (see `PROPOSE`), which
    storescu then uses for files already encoded in it, sending them as-is.
    ``-nh`` keeps going after a failed store, so one run reports them all.
    """
    args = ["-v", "-R", "-nh", "+sd", "+r", "-aet", calling_ae, "-aec", called_ae]
    if propose:
        args.append(propose)
    args += [*extra_args, host, str(port), *(str(p) for p in paths)]
    return run_tool(STORESCU, args, timeout_s=timeout_s)
