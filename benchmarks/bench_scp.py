"""Receive throughput of the node's SCP against DCMTK's storescp, on loopback.

    python benchmarks/bench_scp.py [--slices 48] [--size 512] [--repeats 3] [--pdu 16384] [--spool DIR]

One synthetic CT series (default 48 slices of 512×512, ~25 MB) is sent with
DCMTK's ``storescu`` to each receiver in turn, ``--repeats`` times, and the
median MB/s (file bytes / wall time of the storescu run) is printed as JSON,
with the ratio to storescp.  All receivers run with ``TCP_NODELAY=1`` and the
same maximum PDU.  A ratio, not an absolute: before answering, the node syncs
every file (fdatasync) and its folder and commits a SQLite row
(``synchronous=NORMAL``: ``node.recovery.recover`` rebuilds it from the synced file),
while storescp only writes.  A diagnostic run of the node without the syncs
(not durable) shows what they cost per instance.  ``storescp +B`` also skips
re-encoding, as the node does.  ``--spool`` puts the node's spool on another
file system (the default is a temp folder, like storescp's output folder).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sclc_risk_node.dicom_io.synthetic import synthetic_chest_phantom, write_ct_series  # noqa: E402
from sclc_risk_node.node.config import CallerRule, ScpConfig, ScpTlsConfig  # noqa: E402
from sclc_risk_node.node.logs import configure_logging  # noqa: E402
from sclc_risk_node.node.scp import DicomReceiver  # noqa: E402
from sclc_risk_node.node.spool import Spool  # noqa: E402
from tests.node.dicom_tools import LOOPBACK, storescu  # noqa: E402
from tests.node.peers import start_storescp  # noqa: E402

NODE_AE = "SCLC_NODE"


def node_config(pdu_bytes: int) -> ScpConfig:
    return ScpConfig(
        ae_title=NODE_AE,
        bind_address=LOOPBACK,
        port=0,
        max_pdu_bytes=pdu_bytes,
        max_associations=4,
        acse_timeout_s=30.0,
        dimse_timeout_s=30.0,
        network_timeout_s=60.0,
        check_called_ae=True,
        allowed_callers=(CallerRule(ae_title="*", host="127.0.0.1"),),
        tls=ScpTlsConfig(enabled=False, cert_file=None, key_file=None, ca_file=None, require_client_cert=False),
    )


def timed_send(port: int, called_ae: str, series: Path) -> float:
    started = time.perf_counter()
    result = storescu(LOOPBACK, port, [series], called_ae=called_ae, calling_ae="BENCH", timeout_s=600)
    elapsed = time.perf_counter() - started
    if not result.ok or "Store Failed" in result.output or "Refused" in result.output:
        raise SystemExit(f"storescu failed:\n{result.output[-2000:]}")
    return elapsed


def bench_node(series: Path, spool_root: Path, pdu: int, repeats: int) -> list[float]:
    times = []
    for run in range(repeats):
        spool = Spool.open(spool_root / f"run{run}", min_free_bytes=0)
        receiver = DicomReceiver(node_config(pdu), spool)
        receiver.start()
        try:
            times.append(timed_send(receiver.port, NODE_AE, series))
        finally:
            receiver.stop()
            spool.close()
    return times


@contextlib.contextmanager
def without_fsync():
    """Diagnostic only: the node with its file and folder syncs switched off (NOT durable).

    The difference to the real node is what durability before the success
    status costs on this disk; the rest is pynetdicom and the node's parsing.
    """
    saved = os.fsync, os.fdatasync
    os.fsync = os.fdatasync = lambda fd: None
    try:
        yield
    finally:
        os.fsync, os.fdatasync = saved


def bench_storescp(series: Path, out_root: Path, pdu: int, repeats: int, *, bit_preserving: bool) -> list[float]:
    times = []
    for run in range(repeats):
        directory = out_root / f"storescp{'-B' if bit_preserving else ''}-{run}"
        with start_storescp(
            directory, ae_title="STORESCP", bit_preserving=bit_preserving, extra_args=["-pdu", str(pdu)]
        ) as peer:
            times.append(timed_send(peer.port, "STORESCP", series))
    return times


NODE = "sclc-node SCP (fsync + SQLite commit)"
STORESCP = "DCMTK storescp"
STORESCP_B = "DCMTK storescp +B (bit-preserving)"
NODE_NO_SYNC = "diagnostic: sclc-node SCP without file/folder sync (NOT durable)"


def _no_sync(series: Path, spool_root: Path, pdu: int, repeats: int) -> list[float]:
    with without_fsync():
        return bench_node(series, spool_root, pdu, repeats)


def run(*, slices: int = 48, size: int = 512, repeats: int = 3, pdu: int = 16384, spool: Path | None = None) -> dict:
    configure_logging("WARNING")  # per-instance debug lines would be part of the measurement
    with tempfile.TemporaryDirectory(prefix="bench-scp-") as temp:
        root = Path(temp)
        image, _mask = synthetic_chest_phantom(size=(size, size, slices))
        series = root / "series"
        write_ct_series(image, series)
        total_mb = sum(p.stat().st_size for p in series.glob("*.dcm")) / 1e6
        results = {
            NODE: bench_node(series, spool or root / "spool", pdu, repeats),
            NODE_NO_SYNC: _no_sync(series, spool or root / "spool-nosync", pdu, repeats),
            STORESCP: bench_storescp(series, root, pdu, repeats, bit_preserving=False),
            STORESCP_B: bench_storescp(series, root, pdu, repeats, bit_preserving=True),
        }
    rates = {name: total_mb / statistics.median(times) for name, times in results.items()}
    return {
        "series": f"{slices} slices of {size}x{size}, {total_mb:.1f} MB, Explicit VR LE",
        "max_pdu": pdu,
        "repeats": repeats,
        "mb_per_s": {name: round(rate, 1) for name, rate in rates.items()},
        "runs_mb_per_s": {name: [round(total_mb / t, 1) for t in times] for name, times in results.items()},
        "ratio_node_over_storescp": rates[NODE] / rates[STORESCP],
        "ratio_node_over_storescp_B": rates[NODE] / rates[STORESCP_B],
        "ratio_node_without_sync_over_storescp": rates[NODE_NO_SYNC] / rates[STORESCP],
        "sync_seconds_per_instance": (statistics.median(results[NODE]) - statistics.median(results[NODE_NO_SYNC]))
        / slices,
        "target_ratio": 0.8,
        "met": rates[NODE] / rates[STORESCP] >= 0.8,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=48)
    parser.add_argument("--size", type=int, default=512, help="rows = columns")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pdu", type=int, default=16384, help="maximum PDU of every receiver (node default: 16384)")
    parser.add_argument("--spool", type=Path, default=None, help="parent folder for the node's spool")
    args = parser.parse_args()
    print(
        json.dumps(
            run(slices=args.slices, size=args.size, repeats=args.repeats, pdu=args.pdu, spool=args.spool), indent=2
        )
    )


if __name__ == "__main__":
    main()
