"""The node's configuration: one TOML file loaded into a frozen `NodeConfig`.

`load_config(path)` merges the file over the embedded defaults
(`config/node.toml`, shipped as package `sclc_risk_node.config`, which also
documents every key), so a site file only needs the keys it changes; with no
path the node runs on the defaults alone.  Tables merge key by key; arrays
(`destinations`, `scp.allowed_callers`) replace the default array whole.

Validation happens here, once, at startup (no hot reload: restart the unit).
Unknown keys, wrong types and out-of-range values are all collected and raised
together as one `ConfigError` whose problems each name the full dotted key:
``config error: scp.ae_title: 'THIS_IS_WAY_TOO_LONG_AE' is longer than 16 characters``.
Files the node must read (TLS certificates when TLS is on, a model file when
one is named) are opened at load; directories are created and checked by
`NodeConfig.prepare_directories()`, which the service calls at startup, so
loading a config never writes anything.

Paths.  TOML has no null, so an optional path or string is "" when unset.
Relative paths resolve:

* paths the node writes (`spool.*`, `clinical.inbox_directory`) against the
  state directory: ``$STATE_DIRECTORY`` (set by systemd's StateDirectory=,
  i.e. /var/lib/sclc-risk-node), else ``$XDG_STATE_HOME/sclc-risk-node``,
  else ``~/.local/state/sclc-risk-node``;
* paths the node only reads (certificates, model file) against the directory
  of the config file (the working directory when running on the defaults).

Each section is a frozen, slotted dataclass that validates in `__post_init__`,
so one built in code (e.g. in a test) is held to the same rules as one loaded
from TOML.  Field types drive the TOML conversion; per-key checks sit in the
field metadata, cross-key checks in `_cross_checks`.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import ipaddress
import math
import os
import re
import ssl
import tomllib
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from sclc_risk_node.scoring.errors import InputError

DEFAULTS_PACKAGE = "sclc_risk_node.config"
DEFAULTS_FILENAME = "node.toml"
#: Directory name under $XDG_STATE_HOME / ~/.local/state when not run by systemd.
STATE_DIRECTORY_NAME = "sclc-risk-node"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: Largest value of the 32-bit Maximum Length field (PS3.8 D.1.1).
MAX_PDU_LIMIT = 2**32 - 1
#: Below this a receiver only slows transfers down; 0 means unlimited.
MIN_PDU_BYTES = 4096
AE_TITLE_MAX_CHARS = 16
#: Smallest instance size limit: below 1 MiB a single 512×512 CT slice would be refused.
MIN_INSTANCE_LIMIT_BYTES = 2**20
ANY_AE_TITLE = "*"


class ConfigError(InputError):
    """The configuration is unusable; ``problems`` lists each one as ``"dotted.key: why"``."""

    def __init__(self, problems: list[str] | tuple[str, ...]):
        self.problems = tuple(problems)
        super().__init__("config error: " + "; ".join(self.problems))


# --- per-key checks: value -> problem text or None ---------------------------------

Check = Callable[[Any], "str | None"]


def _ae_title(value: str) -> str | None:
    """AE VR (PS3.5 table 6.2-1): ≤16 characters of the default repertoire, no backslash, not all spaces."""
    if not value.strip(" "):
        return "must not be empty or all spaces"
    if len(value) > AE_TITLE_MAX_CHARS:
        return f"{value!r} is longer than {AE_TITLE_MAX_CHARS} characters"
    if "\\" in value:
        return f"{value!r} contains a backslash"
    if any(not 0x20 <= ord(c) <= 0x7E for c in value):
        return f"{value!r} contains a control or non-ASCII character"
    return None


def _ae_title_or_any(value: str) -> str | None:
    return None if value == ANY_AE_TITLE else _ae_title(value)


def _ip_address(value: str) -> str | None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return f'{value!r} is not an IP address (use "0.0.0.0" or "::" for all interfaces)'
    return None


def _ip_network(value: str) -> str | None:
    try:
        ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        return f"{value!r} is not an IP address or CIDR network ({exc})"
    return None


_HOSTNAME = re.compile(
    r"(?=.{1,253}\.?$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)


def _host(value: str) -> str | None:
    if _ip_address(value) is None or _HOSTNAME.fullmatch(value):
        return None
    return f"{value!r} is neither an IP address nor a host name"


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _name(value: str) -> str | None:
    if _NAME.fullmatch(value):
        return None
    return f"{value!r} must be 1-64 characters of A-Z a-z 0-9 _ . - (it labels metrics and outbox rows)"


def _range(low: float, high: float | None = None, *, what: str = "") -> Check:
    def check(value: float) -> str | None:
        if isinstance(value, float) and not math.isfinite(value):
            return f"{value} is not a finite number"
        if value < low or (high is not None and value > high):
            bound = f"at least {low}" if high is None else f"between {low} and {high}"
            return f"{value} is out of range (must be {bound}{what})"
        return None

    return check


_port = _range(0, 65535, what="; 0 picks any free port")
_positive_port = _range(1, 65535)
_non_negative = _range(0)


def _positive(value: float) -> str | None:
    if not math.isfinite(value) or value <= 0:
        return f"{value} must be a positive number"
    return None


def _pdu_bytes(value: int) -> str | None:
    if value == 0 or MIN_PDU_BYTES <= value <= MAX_PDU_LIMIT:
        return None
    return f"{value} is out of range (0 for unlimited, or {MIN_PDU_BYTES}..{MAX_PDU_LIMIT})"


def _readable_file(value: Path) -> str | None:
    try:
        with open(value, "rb") as handle:
            handle.read(1)
    except FileNotFoundError:
        return f"{str(value)!r} does not exist"
    except IsADirectoryError:
        return f"{str(value)!r} is a directory, not a file"
    except OSError as exc:
        return f"{str(value)!r} cannot be read: {exc.strerror or exc}"
    return None


def _not_blank(value: str) -> str | None:
    return 'must not be all spaces (use "" for none)' if not value.strip() else None


def usable_cpu_count() -> int:
    """CPUs this process may run on (honours affinity masks and systemd CPUAffinity=)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _regex(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        re.compile(value)
    except re.error as exc:
        return f"{value!r} is not a regular expression ({exc})"
    return None


def _workers(value: int) -> str | None:
    limit = 2 * usable_cpu_count()
    if 1 <= value <= limit:
        return None
    return f"{value} is out of range (must be between 1 and {limit}, twice the usable CPUs)"


def _log_level(value: str) -> str | None:
    return None if value.upper() in LOG_LEVELS else f"{value!r} is not one of {', '.join(LOG_LEVELS)}"


# --- typing helpers ----------------------------------------------------------------


@cache
def _type_hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _unwrap_optional(annotation: Any) -> tuple[bool, Any]:
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(get_args(annotation)) == 2:
            return True, args[0]
    return False, annotation


def _is_instance(value: Any, annotation: Any) -> bool:
    optional, inner = _unwrap_optional(annotation)
    if value is None:
        return optional
    if get_origin(inner) is tuple:
        (item_type, _ellipsis) = get_args(inner)
        return isinstance(value, tuple) and all(_is_instance(v, item_type) for v in value)
    if inner is Path:
        return isinstance(value, Path) and value.is_absolute()
    if inner in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, inner)


_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", Path: "an absolute path"}


def _describe_type(annotation: Any) -> str:
    optional, inner = _unwrap_optional(annotation)
    if get_origin(inner) is tuple:
        text = "an array of tables"
    elif dataclasses.is_dataclass(inner):
        text = "a table"
    else:
        text = _TYPE_NAMES.get(inner, getattr(inner, "__name__", str(inner)))
    return f'{text} (or "" for none)' if optional else text


def _describe_value(value: Any) -> str:
    kinds = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "table"}
    kind = next((name for typ, name in kinds.items() if type(value) is typ), type(value).__name__)
    shown = repr(value) if not isinstance(value, (list, dict)) else ""
    return f"{kind} {shown}".strip()


# --- declaring keys ----------------------------------------------------------------


def _key(
    check: Check | None = None,
    *,
    relative_to: str | None = None,
    normalise: Callable[[str], str] | None = None,
    default: Any = dataclasses.MISSING,
) -> Any:
    """A config key.

    ``check`` returns a problem text or None; ``normalise`` canonicalises a string
    before it is checked and stored; ``relative_to`` ("state" or "config") is the
    base of a relative path.  Keys without a default are required.
    """
    return field(default=default, metadata={"check": check, "relative_to": relative_to, "normalise": normalise})


def _derived(default: Any = dataclasses.MISSING) -> Any:
    """A field that is not read from TOML (set by the loader)."""
    return field(default=default, metadata={"toml": False})


class _Validated:
    """Mixin: run every key's type and value check, then the cross-key checks."""

    __slots__ = ()

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            object.__setattr__(self, f.name, _normalised(f, getattr(self, f.name)))
        problems: list[str] = []
        hints = _type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            problem = _field_problem(f, getattr(self, f.name), hints[f.name])
            if problem:
                problems.append(f"{f.name}: {problem}")
        if not problems:
            problems += [f"{name}: {problem}" for name, problem in self._cross_checks()]
        if problems:
            raise ConfigError(problems)

    def _cross_checks(self) -> Iterator[tuple[str, str]]:
        return iter(())


def _field_problem(f: dataclasses.Field, value: Any, annotation: Any) -> str | None:
    if not _is_instance(value, annotation):
        return f"expected {_describe_type(annotation)}, got {_describe_value(value)}"
    check = f.metadata.get("check")
    return check(value) if check and value is not None else None


def _normalised(f: dataclasses.Field, value: Any) -> Any:
    normalise = f.metadata.get("normalise")
    return normalise(value) if normalise and isinstance(value, str) else value


def _strip_padding(value: str) -> str:
    """Leading and trailing spaces are not significant in an AE title (PS3.5 table 6.2-1)."""
    return value.strip(" ") or value


# --- sections ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CallerRule(_Validated):
    """One entry of `scp.allowed_callers`: a calling AE title ("*" = any) from a host or network."""

    ae_title: str = _key(_ae_title_or_any, normalise=_strip_padding)
    host: str = _key(_ip_network)

    @property
    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        return ipaddress.ip_network(self.host, strict=True)

    def permits(self, calling_ae_title: str, address: str) -> bool:
        if self.ae_title != ANY_AE_TITLE and self.ae_title != calling_ae_title.strip(" "):
            return False
        return client_address(address) in self.network


def client_address(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The peer address as seen by a dual-stack socket, IPv4-mapped IPv6 turned back into IPv4."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@dataclass(frozen=True, slots=True)
class ScpTlsConfig(_Validated):
    """`[scp.tls]`: DICOM TLS on the receiving port (PS3.15 B.1)."""

    enabled: bool = _key()
    cert_file: Path | None = _key(relative_to="config")
    key_file: Path | None = _key(relative_to="config")
    ca_file: Path | None = _key(relative_to="config")
    require_client_cert: bool = _key()

    def _cross_checks(self) -> Iterator[tuple[str, str]]:
        if not self.enabled:
            return
        missing = False
        for name in ("cert_file", "key_file"):
            if getattr(self, name) is None:
                missing = True
                yield name, "required when enabled = true"
        if self.require_client_cert and self.ca_file is None:
            missing = True
            yield "ca_file", "required when require_client_cert = true (the CAs that sign PACS certificates)"
        unreadable = False
        for name in ("cert_file", "key_file", "ca_file"):
            path = getattr(self, name)
            problem = _readable_file(path) if path is not None else None
            if problem:
                unreadable = True
                yield name, problem
        if not (missing or unreadable):
            try:
                self.server_context()
            except (ssl.SSLError, OSError) as exc:
                yield "cert_file", f"cannot be loaded with key_file/ca_file: {exc}"

    def server_context(self) -> ssl.SSLContext:
        """A fresh server context (TLS ≥ 1.2) for pynetdicom's ``AE.start_server(ssl_context=...)``."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(self.cert_file), str(self.key_file))
        if self.ca_file is not None:
            context.load_verify_locations(cafile=str(self.ca_file))
        context.verify_mode = ssl.CERT_REQUIRED if self.require_client_cert else ssl.CERT_NONE
        return context


@dataclass(frozen=True, slots=True)
class ScpConfig(_Validated):
    """`[scp]`: the storage SCP that receives CT and SEG from the PACS."""

    ae_title: str = _key(_ae_title, normalise=_strip_padding)
    bind_address: str = _key(_ip_address)
    port: int = _key(_port)
    max_pdu_bytes: int = _key(_pdu_bytes)
    max_associations: int = _key(_range(1, 1000))
    acse_timeout_s: float = _key(_positive)
    dimse_timeout_s: float = _key(_positive)
    network_timeout_s: float = _key(_positive)
    check_called_ae: bool = _key()
    allowed_callers: tuple[CallerRule, ...] = _key()
    tls: ScpTlsConfig = _key()
    # Connections that have not yet sent an A-ASSOCIATE-RQ ("pending"): they are
    # unauthenticated, so they get a short deadline and a budget of their own and
    # never count against max_associations (node.scp.ConnectionGate).
    #: Seconds from TCP accept (TLS handshake included) to a complete A-ASSOCIATE-RQ.
    preassociation_timeout_s: float = _key(_range(0.5, 60), default=5.0)
    #: Pending connections allowed at once from one IP address.
    preassociation_per_ip: int = _key(_range(1, 100), default=4)
    #: Pending connections allowed at once from all addresses together.
    preassociation_total: int = _key(_range(1, 1000), default=32)
    #: One ``peer_refused`` log line per (IP, reason) per this many seconds.
    refused_log_interval_s: float = _key(_range(0, 86400), default=60.0)
    #: Largest decoded pixel data of one instance (Rows × Columns × frames × samples × bytes).
    max_decoded_bytes: int = _key(_range(MIN_INSTANCE_LIMIT_BYTES), default=256 * 2**20)
    #: Largest inflated data set of a Deflated Explicit VR Little Endian instance.
    max_inflated_bytes: int = _key(_range(MIN_INSTANCE_LIMIT_BYTES), default=32 * 2**20)

    def _cross_checks(self) -> Iterator[tuple[str, str]]:
        if not self.allowed_callers:
            yield (
                "allowed_callers",
                (
                    "is empty, which would refuse every caller; list the PACS "
                    '(or ae_title = "*", host = "0.0.0.0/0" to accept anyone)'
                ),
            )
        if self.preassociation_per_ip > self.preassociation_total:
            yield (
                "preassociation_per_ip",
                f"{self.preassociation_per_ip} is above preassociation_total ({self.preassociation_total})",
            )

    def caller_allowed(self, calling_ae_title: str, address: str) -> bool:
        """Whether an association from ``calling_ae_title`` at IP ``address`` may proceed."""
        return any(rule.permits(calling_ae_title, address) for rule in self.allowed_callers)

    def address_allowed(self, address: str) -> bool:
        """Whether some `allowed_callers` rule admits IP ``address`` (whatever its AE title): the check at TCP accept."""
        try:
            ip = client_address(address)
        except ValueError:
            return False
        return any(ip in rule.network for rule in self.allowed_callers)


@dataclass(frozen=True, slots=True)
class SpoolConfig(_Validated):
    """`[spool]`: where received instances, SRs and the SQLite state live."""

    directory: Path = _key(relative_to="state")
    database: Path = _key(relative_to="state")
    min_free_bytes: int = _key(_non_negative)
    retention_after_delivery_s: float = _key(_non_negative)
    retention_failed_s: float = _key(_non_negative)


@dataclass(frozen=True, slots=True)
class CompletionConfig(_Validated):
    """`[completion]`: when a study counts as complete, or is given up on."""

    grace_s: float = _key(_positive)
    study_expiry_s: float = _key(_positive)

    def _cross_checks(self) -> Iterator[tuple[str, str]]:
        if self.grace_s >= self.study_expiry_s:
            yield "grace_s", f"{self.grace_s} must be shorter than study_expiry_s ({self.study_expiry_s})"


@dataclass(frozen=True, slots=True)
class ClinicalConfig(_Validated):
    """`[clinical]`: the folder clinical records (JSON/CSV) are dropped into."""

    inbox_directory: Path = _key(relative_to="state")
    poll_interval_s: float = _key(_positive)
    #: A record no study uses (never matched, or superseded by a correction) is deleted this long after it arrived.
    unmatched_record_retention_s: float = _key(_non_negative, default=2592000.0)


FHIR_AUTH_MODES = ("none", "basic", "bearer")


def _fhir_auth(value: str) -> str | None:
    return None if value in FHIR_AUTH_MODES else f"{value!r} is not one of {', '.join(FHIR_AUTH_MODES)}"


@dataclass(frozen=True, slots=True)
class FhirConfig(_Validated):
    """`[fhir]`: look up missing clinical records on a FHIR R4 server (node.fhir_client, node.fhir_lookup)."""

    enabled: bool = _key(default=False)
    #: e.g. "https://ehr.example.org/fhir"; required when enabled.
    base_url: str = _key(default="")
    auth: str = _key(_fhir_auth, normalise=str.lower, default="none")
    username: str | None = _key(default=None)
    #: Secrets are read from files (mode 0600), never written in this config.
    password_file: Path | None = _key(relative_to="config", default=None)
    token_file: Path | None = _key(relative_to="config", default=None)
    #: None: the system trust store.
    ca_file: Path | None = _key(relative_to="config", default=None)
    #: Patient.identifier system the DICOM PatientID belongs to; None: search by value alone.
    patient_identifier_system: str | None = _key(default=None)
    #: Observations older than this before the study date are not used.
    lookback_days: float = _key(_positive, default=90.0)
    #: Per HTTP request (connect and each read).
    timeout_s: float = _key(_positive, default=10.0)
    #: A study still waiting is looked up again after this long.
    retry_interval_s: float = _key(_positive, default=300.0)

    def _cross_checks(self) -> Iterator[tuple[str, str]]:
        if not self.enabled:
            return
        if not re.match(r"^https?://[^/\s]+", self.base_url):
            yield "base_url", f"{self.base_url!r} is not an http:// or https:// URL (required when enabled)"
        if self.auth == "basic":
            if not self.username:
                yield "username", 'required when auth = "basic"'
            if self.password_file is None:
                yield "password_file", 'required when auth = "basic"'
        if self.auth == "bearer" and self.token_file is None:
            yield "token_file", 'required when auth = "bearer"'
        for name in ("password_file", "token_file", "ca_file"):
            path = getattr(self, name)
            problem = _readable_file(path) if path is not None else None
            if problem:
                yield name, problem


@dataclass(frozen=True, slots=True)
class ScoringConfig(_Validated):
    """`[scoring]`: the model and the workers that run it."""

    #: None: the shipped demonstration model (`node.scoring_job.default_model_path()`).
    model_file: Path | None = _key(_readable_file, relative_to="config")
    workers: int = _key(_workers)
    lease_s: float = _key(_positive)
    #: None: the segment whose property type is SCT Neoplasm.
    segment_label: str | None = _key(_not_blank)
    #: False: a lossy-compressed CT series fails scoring with a reason naming the transfer syntax.
    allow_lossy_ct: bool = _key(default=False)
    #: RTSTRUCT input: regular expression (case-insensitive) for the tumour ROI's name; None: GTV-like
    #: names (`dicom_io.rtstruct.DEFAULT_ROI_NAME_PATTERN`), then RT ROI Interpreted Type GTV/TUMOR.
    rtstruct_roi_pattern: str | None = _key(_regex, default=None)
    #: False: an out-of-domain result withholds risk group and PFS (scoring.domain, docs/model-format.md).
    report_out_of_domain: bool = _key(default=False)


@dataclass(frozen=True, slots=True)
class DestinationTlsConfig(_Validated):
    """`destinations[].tls`: DICOM TLS when sending to that destination."""

    enabled: bool = _key(default=False)
    #: None: the system trust store.
    ca_file: Path | None = _key(relative_to="config", default=None)
    #: Client certificate and key, for destinations that require one (both or neither).
    cert_file: Path | None = _key(relative_to="config", default=None)
    key_file: Path | None = _key(relative_to="config", default=None)

    def _cross_checks(self) -> Iterator[tuple[str, str]]:
        if not self.enabled:
            return
        problems = False
        if (self.cert_file is None) != (self.key_file is None):
            problems = True
            yield "key_file" if self.key_file is None else "cert_file", "cert_file and key_file go together"
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, name)
            problem = _readable_file(path) if path is not None else None
            if problem:
                problems = True
                yield name, problem
        if not problems:
            try:
                self.client_context()
            except (ssl.SSLError, OSError) as exc:
                yield "cert_file" if self.cert_file else "ca_file", f"cannot be loaded: {exc}"

    def client_context(self) -> ssl.SSLContext:
        """A fresh client context (TLS ≥ 1.2, host name checked) for pynetdicom's ``tls_args=(ctx, host)``."""
        context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file is not None:
            context.load_cert_chain(str(self.cert_file), str(self.key_file))
        return context


#: The objects the node writes per study (`dicom_io.result_objects.OBJECT_KINDS`): sr = the TID 1500 SR,
#: kos = Key Object Selection of the key slice, pdf = Encapsulated PDF summary, sc = Secondary Capture of it.
RESULT_OBJECT_KINDS = ("sr", "kos", "pdf", "sc")


def _object_kinds(value: tuple[str, ...]) -> str | None:
    unknown = [kind for kind in value if kind not in RESULT_OBJECT_KINDS]
    if unknown:
        return f"unknown object(s) {', '.join(map(repr, unknown))}; choose from {', '.join(RESULT_OBJECT_KINDS)}"
    if not value:
        return "is empty; list at least one of " + ", ".join(RESULT_OBJECT_KINDS)
    if len(set(value)) != len(value):
        return "lists an object twice"
    return None


@dataclass(frozen=True, slots=True)
class DestinationConfig(_Validated):
    """One `[[destinations]]` entry: a C-STORE SCP the node's objects are sent to."""

    name: str = _key(_name)
    ae_title: str = _key(_ae_title, normalise=_strip_padding)
    host: str = _key(_host)
    port: int = _key(_positive_port)
    tls: DestinationTlsConfig = _key(default=DestinationTlsConfig())
    #: Which of the study's objects this destination gets (default: all four).
    objects: tuple[str, ...] = _key(_object_kinds, default=RESULT_OBJECT_KINDS)


@dataclass(frozen=True, slots=True)
class OutboxConfig(_Validated):
    """`[outbox]`: retries of SR deliveries (exponential backoff with a cap)."""

    initial_backoff_s: float = _key(_positive)
    max_backoff_s: float = _key(_positive)
    #: 0: retry forever (the delivery stays visible as pending).
    max_attempts: int = _key(_non_negative)

    def _cross_checks(self) -> Iterator[tuple[str, str]]:
        if self.initial_backoff_s > self.max_backoff_s:
            yield "initial_backoff_s", f"{self.initial_backoff_s} is above max_backoff_s ({self.max_backoff_s})"


@dataclass(frozen=True, slots=True)
class HttpConfig(_Validated):
    """`[http]`: /healthz and /metrics (see node.http_status)."""

    enabled: bool = _key()
    bind_address: str = _key(_ip_address)
    port: int = _key(_port)


@dataclass(frozen=True, slots=True)
class LoggingConfig(_Validated):
    """`[logging]`: JSON lines on stdout (journald)."""

    level: str = _key(_log_level, normalise=str.upper)


@dataclass(frozen=True, slots=True)
class NodeConfig(_Validated):
    scp: ScpConfig = _key()
    spool: SpoolConfig = _key()
    completion: CompletionConfig = _key()
    clinical: ClinicalConfig = _key()
    scoring: ScoringConfig = _key()
    outbox: OutboxConfig = _key()
    http: HttpConfig = _key()
    logging: LoggingConfig = _key()
    #: Base of relative writable paths (see module docstring).
    state_directory: Path = _derived()
    #: The file loaded over the defaults; None when running on the embedded defaults.
    source: Path | None = _derived()
    #: Empty: SRs are produced and kept in the spool but sent nowhere.
    destinations: tuple[DestinationConfig, ...] = _key(default=())
    fhir: FhirConfig = _key(default=FhirConfig())

    def _cross_checks(self) -> Iterator[tuple[str, str]]:
        seen: dict[str, int] = {}
        for index, destination in enumerate(self.destinations):
            if destination.name in seen:
                yield (
                    f"destinations[{index}].name",
                    f"{destination.name!r} is already used by destinations[{seen[destination.name]}]",
                )
            seen.setdefault(destination.name, index)
        if self.http.enabled and self.http.port and self.http.port == self.scp.port:
            yield "http.port", f"{self.http.port} is also scp.port"

    def directories(self) -> dict[str, Path]:
        """Every directory the node writes to, keyed by the config key that names it."""
        return {
            "spool.directory": self.spool.directory,
            "spool.database": self.spool.database.parent,
            "clinical.inbox_directory": self.clinical.inbox_directory,
        }

    def prepare_directories(self) -> None:
        """Create the writable directories (mode 0700) and prove each one takes a file; raise ConfigError naming the key."""
        problems = []
        for name, directory in self.directories().items():
            try:
                _make_private_directory(directory)
                probe = directory / f".write-probe-{os.getpid()}"
                fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                os.close(fd)
                probe.unlink()
            except OSError as exc:
                problems.append(f"{name}: {str(directory)!r} is not a writable directory: {exc.strerror or exc}")
        if self.spool.database.is_dir():
            problems.append(f"spool.database: {str(self.spool.database)!r} is a directory, not a database file")
        if problems:
            raise ConfigError(problems)


def _make_private_directory(directory: Path) -> None:
    """mkdir -p, but every directory it creates gets mode 0700 (Path.mkdir gives parents the default mode)."""
    missing = []
    ancestor = directory
    while not ancestor.exists() and ancestor.parent != ancestor:
        missing.append(ancestor)
        ancestor = ancestor.parent
    for path in reversed(missing):
        path.mkdir(mode=0o700, exist_ok=True)
    if not directory.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(directory))


# --- loading -----------------------------------------------------------------------


def default_config_text() -> str:
    """The embedded defaults, i.e. the documented `config/node.toml`."""
    return files(DEFAULTS_PACKAGE).joinpath(DEFAULTS_FILENAME).read_text(encoding="utf-8")


def default_state_directory(environ: Mapping[str, str] | None = None) -> Path:
    """$STATE_DIRECTORY (systemd), else $XDG_STATE_HOME/sclc-risk-node, else ~/.local/state/sclc-risk-node."""
    environ = os.environ if environ is None else environ
    systemd_dirs = environ.get("STATE_DIRECTORY", "")
    if systemd_dirs:
        # systemd joins several StateDirectory= entries with ":"; ours is the first.
        return Path(systemd_dirs.split(":", 1)[0]).absolute()
    xdg = environ.get("XDG_STATE_HOME", "")
    if xdg and Path(xdg).is_absolute():  # the XDG spec says to ignore relative values
        return Path(xdg) / STATE_DIRECTORY_NAME
    home = environ.get("HOME") or str(Path.home())
    return Path(home) / ".local" / "state" / STATE_DIRECTORY_NAME


def load_config(path: Path | None = None, *, environ: Mapping[str, str] | None = None) -> NodeConfig:
    """The validated configuration: ``path`` merged over the embedded defaults (or the defaults alone)."""
    raw = _parse_toml(default_config_text(), "embedded defaults")
    source = None
    config_directory = Path.cwd()
    if path is not None:
        source = Path(path).expanduser().absolute()
        try:
            text = source.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError([f"{source}: config file does not exist"]) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError([f"{source}: config file cannot be read: {exc}"]) from None
        raw = _merge(raw, _parse_toml(text, str(source)))
        config_directory = source.parent
    state_directory = default_state_directory(environ)
    bases = {"state": state_directory, "config": config_directory}
    return _build(NodeConfig, raw, "", bases, {"state_directory": state_directory, "source": source})


def _parse_toml(text: str, where: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{where}: not valid TOML: {exc}"]) from None


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for name, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(name), dict):
            merged[name] = _merge(base[name], value)
        else:
            merged[name] = value
    return merged


def _dotted(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _build(cls: type, raw: Any, where: str, bases: Mapping[str, Path], derived_values: Mapping[str, Any] | None = None):
    if not isinstance(raw, dict):
        raise ConfigError([f"{where}: expected a table, got {_describe_value(raw)}"])
    hints = _type_hints(cls)
    keys = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("toml", True)}
    problems = []
    for name in raw:
        if name not in keys:
            close = difflib.get_close_matches(name, keys, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(keys)})"
            problems.append(f"{_dotted(where, name)}: unknown key{hint}")
    values: dict[str, Any] = dict(derived_values or {})
    for name, f in keys.items():
        if name not in raw:
            if f.default is dataclasses.MISSING:
                problems.append(f"{_dotted(where, name)}: missing")
            continue
        try:
            values[name] = _convert(raw[name], hints[name], _dotted(where, name), f.metadata.get("relative_to"), bases)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        # Check each key now, so one bad key does not hide the others' problems;
        # the constructor below repeats this and adds the cross-key checks.
        problem = _field_problem(f, _normalised(f, values[name]), hints[name])
        if problem:
            problems.append(f"{_dotted(where, name)}: {problem}")
    if problems:
        raise ConfigError(problems)
    try:
        return cls(**values)
    except ConfigError as exc:
        raise ConfigError([_dotted(where, problem) for problem in exc.problems]) from None


def _convert(raw: Any, annotation: Any, where: str, relative_to: str | None, bases: Mapping[str, Path]) -> Any:
    declared = annotation
    optional, annotation = _unwrap_optional(annotation)
    if optional and raw == "":
        return None
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, raw, where, bases)
    if get_origin(annotation) is tuple:
        if not isinstance(raw, list):
            raise ConfigError([f"{where}: expected an array of tables, got {_describe_value(raw)}"])
        (item_type, _ellipsis) = get_args(annotation)
        items, problems = [], []
        for index, item in enumerate(raw):
            try:
                items.append(_convert(item, item_type, f"{where}[{index}]", relative_to, bases))
            except ConfigError as exc:
                problems.extend(exc.problems)
        if problems:
            raise ConfigError(problems)
        return tuple(items)
    if annotation is Path:
        if not isinstance(raw, str):
            kind = 'a path string (or "" for none)' if optional else "a path string"
            raise ConfigError([f"{where}: expected {kind}, got {_describe_value(raw)}"])
        if not raw.strip():
            raise ConfigError([f"{where}: must not be empty"])
        path = Path(raw).expanduser()
        return path if path.is_absolute() else bases[relative_to or "config"] / path
    if annotation is float and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    if not _is_instance(raw, annotation):
        raise ConfigError([f"{where}: expected {_describe_type(declared)}, got {_describe_value(raw)}"])
    return raw
