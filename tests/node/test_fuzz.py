"""Seeded fuzzing of the DICOM port: random and malformed PDUs against `sclc-node serve`, then a real study.

The node runs as a process (`tests.test_end_to_end.NodeProcess`, the harness
the end-to-end tests use).  For a bounded time and count, one connection at a
time from loopback, the fuzzer sends:

* random bytes;
* a valid A-ASSOCIATE-RQ cut short at a random byte;
* a valid A-ASSOCIATE-RQ with a random byte changed, or a wrong item length;
* PDU headers whose length field is huge or wrong for what follows;
* a valid association, then garbage P-DATA-TF (random PDVs, lengths that lie,
  a truncated DIMSE command), or another PDU type where none is allowed;
* the same from 127.0.0.2, an address outside the allow-list.

Afterwards the node must still be the same process, have no more threads than
before (nothing stuck), answer C-ECHO, and store and score the demo study.

The seed is printed and comes from ``SCLC_FUZZ_SEED`` when set, so a failure
replays with ``SCLC_FUZZ_SEED=<seed> pytest tests/node/test_fuzz.py``.  The
default run fuzzes for 15 s; the 60 s soak variant is marked ``soak`` and
deselected by default (``addopts`` in pyproject.toml): run it with
``pytest -m soak tests/node/test_fuzz.py``.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sclc_risk_node.node.demo_study import DEMO_CLINICAL, write_demo_study
from tests.node.dicom_tools import echoscu, requires_dcmtk, storescu
from tests.node.peers import free_port
from tests.test_end_to_end import NODE_AE, NodeProcess, wait_for

LOOPBACK = "127.0.0.1"
OUTSIDER = "127.0.0.2"  # not in NodeProcess's allow-list (127.0.0.1 only)
CALLING_AE = "ECHOSCU"  # allowed from 127.0.0.1 by NodeProcess's config
#: Upper bound on connections per run, whatever the duration.
MAX_CASES = 5000
#: Seconds the fuzzer waits for an answer before it closes its end.
READ_WINDOW_S = 0.15

VERIFICATION = b"1.2.840.10008.1.1"
IMPLICIT_VR_LE = b"1.2.840.10008.1.2"
APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"


# --- PDUs (PS3.8 9.3) ---------------------------------------------------------------


def item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def pdu(pdu_type: int, body: bytes, *, length: int | None = None) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body) if length is None else length) + body


def associate_rq(called: str = NODE_AE, calling: str = CALLING_AE) -> bytes:
    """A valid A-ASSOCIATE-RQ proposing Verification in Implicit VR Little Endian."""
    presentation = bytes([1, 0, 0, 0]) + item(0x30, VERIFICATION) + item(0x40, IMPLICIT_VR_LE)
    user_information = item(0x51, struct.pack(">I", 16384)) + item(0x52, b"1.2.3.4")
    body = (
        struct.pack(">HH", 1, 0)
        + called.ljust(16).encode()
        + calling.ljust(16).encode()
        + bytes(32)
        + item(0x10, APPLICATION_CONTEXT)
        + item(0x20, presentation)
        + item(0x50, user_information)
    )
    return pdu(0x01, body)


def p_data(pdvs: list[tuple[int, int, bytes]]) -> bytes:
    """P-DATA-TF from (presentation context id, message control header, fragment) triples."""
    return pdu(0x04, b"".join(struct.pack(">IBB", len(data) + 2, cx, header) + data for cx, header, data in pdvs))


def echo_command() -> bytes:
    """A C-ECHO-RQ command set, Implicit VR Little Endian (PS3.7 9.3.5)."""

    def element(group: int, elem: int, value: bytes) -> bytes:
        return struct.pack("<HHI", group, elem, len(value)) + value

    body = (
        element(0x0000, 0x0002, VERIFICATION + b"\0")
        + element(0x0000, 0x0100, struct.pack("<H", 0x0030))
        + element(0x0000, 0x0110, struct.pack("<H", 1))
        + element(0x0000, 0x0800, struct.pack("<H", 0x0101))
    )
    return element(0x0000, 0x0000, struct.pack("<I", len(body))) + body


# --- cases ----------------------------------------------------------------------------


@dataclass
class Tally:
    cases: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    associated: int = 0  # cases that got an A-ASSOCIATE-AC before sending garbage
    refused_connects: int = 0

    def count(self, kind: str) -> None:
        self.cases += 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1


def mutate(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


def garbage_case(rng: random.Random) -> tuple[str, bytes]:
    """(kind, bytes to send on a fresh connection)."""
    rq = associate_rq()
    kind = rng.choice(
        ["random", "truncated_rq", "mutated_rq", "bad_item_length", "huge_length", "wrong_length", "other_pdu"]
    )
    if kind == "random":
        return kind, rng.randbytes(rng.randint(0, 2048))
    if kind == "truncated_rq":
        return kind, rq[: rng.randrange(1, len(rq))]
    if kind == "mutated_rq":
        return kind, mutate(rng, rq)
    if kind == "bad_item_length":
        # The presentation context item (type 0x20) claims a random length.
        at = rq.index(b"\x20\x00", 74)
        return kind, rq[: at + 2] + struct.pack(">H", rng.randrange(65536)) + rq[at + 4 :]
    if kind == "huge_length":
        return kind, pdu(
            rng.randint(1, 7), rng.randbytes(rng.randint(0, 64)), length=rng.choice([0xFFFFFFFF, 0x7FFFFFFF, 2**24])
        )
    if kind == "wrong_length":
        body = rq[6:]
        return kind, pdu(0x01, body, length=max(0, len(body) + rng.choice([-50, -1, 1, 50, 4096])))
    return kind, pdu(rng.choice([0x00, 0x02, 0x03, 0x05, 0x06, 0x07, 0x08, 0xFF]), rng.randbytes(rng.randint(0, 64)))


def after_association_case(rng: random.Random) -> tuple[str, bytes]:
    kind = rng.choice(
        ["random_pdata", "lying_pdv_length", "truncated_command", "bad_context_id", "random_bytes", "second_rq"]
    )
    if kind == "random_pdata":
        return kind, p_data(
            [(1, rng.randrange(4), rng.randbytes(rng.randint(0, 512))) for _ in range(rng.randint(1, 3))]
        )
    if kind == "lying_pdv_length":
        data = rng.randbytes(rng.randint(0, 64))
        return kind, pdu(0x04, struct.pack(">IBB", rng.choice([0, 1, 2**31, len(data) + 100]), 1, 3) + data)
    if kind == "truncated_command":
        command = echo_command()
        return kind, p_data([(1, 0x03, command[: rng.randrange(1, len(command))])])
    if kind == "bad_context_id":
        return kind, p_data([(rng.choice([0, 2, 255]), 0x03, echo_command())])
    if kind == "random_bytes":
        return kind, rng.randbytes(rng.randint(1, 1024))
    return kind, associate_rq()


def connect(port: int, source: str) -> socket.socket:
    conn = socket.create_connection((LOOPBACK, port), timeout=2, source_address=(source, 0))
    conn.settimeout(READ_WINDOW_S)
    return conn


def drain(conn: socket.socket) -> bytes:
    try:
        return conn.recv(65536)
    except (TimeoutError, OSError):
        return b""


def close(conn: socket.socket, rng: random.Random) -> None:
    if rng.random() < 0.3:  # sometimes a reset instead of an orderly close
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def run_case(port: int, rng: random.Random, tally: Tally) -> None:
    source = OUTSIDER if rng.random() < 0.1 else LOOPBACK
    associate_first = source == LOOPBACK and rng.random() < 0.4
    try:
        conn = connect(port, source)
    except OSError:
        tally.refused_connects += 1
        return
    try:
        if associate_first:
            conn.sendall(associate_rq())
            conn.settimeout(2.0)
            answer = drain(conn)
            conn.settimeout(READ_WINDOW_S)
            if answer[:1] == b"\x02":  # A-ASSOCIATE-AC
                tally.associated += 1
            kind, payload = after_association_case(rng)
            kind = "associated+" + kind
        else:
            kind, payload = garbage_case(rng)
        tally.count(("outsider:" if source == OUTSIDER else "") + kind)
        if payload:
            conn.sendall(payload)
        drain(conn)
    except OSError:
        pass  # the node closed or reset: fine, it decides
    finally:
        close(conn, rng)


def fuzz(port: int, seed: int, duration_s: float) -> Tally:
    rng = random.Random(seed)
    tally = Tally()
    deadline = time.monotonic() + duration_s
    while time.monotonic() < deadline and tally.cases < MAX_CASES:
        run_case(port, rng, tally)
    return tally


# --- the test ---------------------------------------------------------------------------


def thread_count(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError(f"no Threads line for pid {pid}")


def fuzz_seed() -> int:
    value = os.environ.get("SCLC_FUZZ_SEED")
    return int(value) if value else random.SystemRandom().randrange(2**32)


@pytest.mark.external
@requires_dcmtk
@pytest.mark.parametrize(
    "duration_s",
    [15, pytest.param(60, marks=[pytest.mark.soak, pytest.mark.slow])],
    ids=["15s", "soak-60s"],
)
def test_fuzzed_dicom_port_then_the_node_still_echoes_stores_and_scores(tmp_path, duration_s):
    seed = fuzz_seed()
    print(f"fuzz seed: {seed} (replay: SCLC_FUZZ_SEED={seed})")
    demo = write_demo_study(tmp_path / "demo")
    # Nothing listens on the destination port: the SR waits in the outbox, the study stays "scored".
    node = NodeProcess(tmp_path / "node", orthanc_dicom_port=free_port())
    node.start()
    try:
        pid = node.process.pid
        assert echoscu(LOOPBACK, node.dicom_port, called_ae=NODE_AE).ok
        threads_before = thread_count(pid)

        tally = fuzz(node.dicom_port, seed, duration_s)
        print(f"fuzz seed {seed}: {tally}")
        assert tally.cases >= 50 and tally.associated > 0, f"seed {seed}: the fuzzer hardly ran: {tally}"

        assert node.process.poll() is None, f"seed {seed}: the node exited:\n{node.log_tail()}"
        # Everything the fuzz opened ends within preassociation_timeout_s (5 s)
        # or, once associated, when the fuzzer's close is noticed.
        wait_for(
            lambda: thread_count(pid) <= threads_before + 1, 30, f"threads back to {threads_before} (seed {seed})", node
        )

        echo = echoscu(LOOPBACK, node.dicom_port, called_ae=NODE_AE)
        assert echo.ok, f"seed {seed}: {echo.output}"
        sent = storescu(
            LOOPBACK, node.dicom_port, [demo.ct_dir, demo.seg_path], called_ae=NODE_AE, calling_ae="STORESCU"
        )
        assert sent.ok, f"seed {seed}: {sent.output}"
        node.drop_clinical_record(DEMO_CLINICAL)
        study_uid = DEMO_CLINICAL["study_instance_uid"]
        study = wait_for(
            lambda: (s := node.study(study_uid)) and s["state"] in ("scored", "delivered", "failed") and s,
            240,
            f"the demo study to be scored (seed {seed})",
            node,
        )
        assert study["state"] == "scored", f"seed {seed}: {study}"
        log = node.log_path.read_text(errors="replace")
        assert '"peer_refused"' in log  # the outsider's connections were logged
        for phi in ("DEMO-0001", "Demo^Phantom", "19600101"):
            assert phi not in log, f"{phi} leaked into the log"
    finally:
        node.stop()
