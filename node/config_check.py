"""`sclc-node config check`: what `sclc-node serve` would refuse, found without starting it.

`load_config` already refuses bad keys and unreadable TLS files.  `serve`
then also refuses (`NodeService.__init__` / `start`):

* a writable path that cannot be written (`NodeConfig.prepare_directories`);
* a model file that does not load or whose sha256 does not match (tampered);
* an ``scp``/``http`` bind address that is not local, i.e. not an address
  of this machine: the kernel refuses to bind it (EADDRNOTAVAIL).  Wildcards
  ("0.0.0.0", "::") and loopback are always local.  This is the kernel's own
  test, so the check binds a socket on that address (port 0: nothing is
  taken from a running node);
* a port already in use, unless by the `serve` running on this spool;
* a spool already served by another running `serve` is fine for the check
  (it reports it), since checking a running node's config is normal.

Nothing lasting is written: a directory that does not exist yet is judged
by its nearest existing parent, and an existing one by creating and removing
one probe file.
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from sclc_risk_node.node.config import NodeConfig


@dataclass(frozen=True, slots=True)
class CheckReport:
    facts: tuple[tuple[str, str], ...]
    problems: tuple[str, ...]


def check_for_serve(config: NodeConfig) -> CheckReport:
    problems: list[str] = []
    facts: list[tuple[str, str]] = [
        ("state directory", str(config.state_directory)),
        ("spool", str(config.spool.directory)),
        ("database", str(config.spool.database)),
        ("clinical inbox", str(config.clinical.inbox_directory)),
    ]
    for key, directory in config.directories().items():
        problem = _writable_directory_problem(directory)
        if problem:
            problems.append(f"{key}: {str(directory)!r} {problem}")
    if config.spool.database.is_dir():
        problems.append(f"spool.database: {str(config.spool.database)!r} is a directory, not a database file")

    model_path, model_fact, model_problem = _model(config)
    facts.append(("model", model_fact))
    if model_problem:
        problems.append(f"scoring.model_file: {model_problem}")

    serving = _service_running(config)
    facts.append(("running service", serving or "none on this spool"))
    facts.append(("DICOM", f"AE {config.scp.ae_title} on {config.scp.bind_address}:{config.scp.port}"))
    problems += _listen_problems("scp", config.scp.bind_address, config.scp.port, serving)
    if config.http.enabled:
        facts.append(("HTTP", f"{config.http.bind_address}:{config.http.port}"))
        problems += _listen_problems("http", config.http.bind_address, config.http.port, serving)
    facts.append(("destinations", ", ".join(d.name for d in config.destinations) or "none (SRs stay in the spool)"))
    return CheckReport(tuple(facts), tuple(problems))


def _writable_directory_problem(directory: Path) -> str | None:
    existing = directory
    while not existing.exists():
        if existing.parent == existing:
            return "cannot be created (no existing parent)"
        existing = existing.parent
    if not existing.is_dir():
        return f"cannot be created: {str(existing)!r} is not a directory"
    if existing != directory:
        if not os.access(existing, os.W_OK | os.X_OK):
            return f"cannot be created: {str(existing)!r} is not writable"
        return None
    probe = directory / f".config-check-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        os.close(fd)
        probe.unlink()
    except OSError as exc:
        return f"is not a writable directory: {exc.strerror or exc}"
    return None


def _model(config: NodeConfig) -> tuple[Path, str, str | None]:
    from sclc_risk_node.node.scoring_job import default_model_path, load_model_file
    from sclc_risk_node.scoring.errors import InputError

    path = config.scoring.model_file or default_model_path()
    try:
        identity = load_model_file(path).identity
    except InputError as exc:
        return path, str(path), str(exc)
    demo = " (DEMONSTRATION model, not for clinical use)" if identity.demonstration else ""
    return path, f"{path}: {identity.name} {identity.version}, sha256 {identity.sha256[:12]}…{demo}", None


def _service_running(config: NodeConfig) -> str | None:
    from sclc_risk_node.node.spool import LOCKS_DIR, SERVICE_LOCK_FILENAME, Spool

    lock = config.spool.directory / LOCKS_DIR / SERVICE_LOCK_FILENAME
    if not lock.exists():
        return None
    probe = Spool(config.spool.directory, config.spool.database)  # no database access: only the lock file
    if not probe.service_running():
        return None
    try:
        return lock.read_text(encoding="utf-8").strip() or "a running `serve`"
    except OSError:
        return "a running `serve`"


def _listen_problems(section: str, address: str, port: int, serving: str | None) -> list[str]:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    problems: list[str] = []
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((address, 0))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                return [f"{section}.bind_address: {address} is not an address of this machine"]
            return [f"{section}.bind_address: cannot listen on {address}: {exc.strerror or exc}"]
    if port == 0 or serving:
        return problems  # any free port; or the running node holds it, as it should
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                problems.append(f"{section}.port: {address}:{port} is already in use (by another program)")
            elif exc.errno == errno.EACCES:
                problems.append(f"{section}.port: {port} needs privileges (use a port above 1023)")
            else:
                problems.append(f"{section}.port: cannot listen on {address}:{port}: {exc.strerror or exc}")
    return problems
