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

Each section is a frozen, slotted pydantic dataclass (``extra="forbid"``, strict
scalars), so one built in code (e.g. in a test, or by `dataclasses.replace`) is
held to the same rules as one loaded from TOML.  Pydantic does the type checks
and the conversion; per-key checks are `AfterValidator`s in the field's
`Annotated` type, cross-key checks sit in `_cross_checks`, and `_problems`
turns pydantic's errors back into the ``dotted.key: why`` lines above.  They are
dataclasses rather than `BaseModel`s because callers rely on dataclass
behaviour (`dataclasses.replace`, `dataclasses.fields`, `FrozenInstanceError`).
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
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin, get_type_hints

from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Strict,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic.dataclasses import dataclass
from pydantic_core import PydanticCustomError

from sclc_risk_node.scoring.errors import InputError
from sclc_risk_node.scoring.validated import raising_on_invalid

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


def _unwrap_optional(annotation: Any) -> tuple[bool, Any]:
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(get_args(annotation)) == 2:
            return True, args[0]
    return False, annotation


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


# --- declaring keys: pydantic does the work, these annotate it ----------------------
#
# Each section is a pydantic dataclass (frozen, slotted, ``extra="forbid"``), so one
# built in code is validated exactly like one loaded from TOML, and callers keep
# what a dataclass gives them (`dataclasses.replace`, `fields`, equality, hashing).
# Scalars are strict (no "80" -> 80, no 1 -> true); a TOML integer is accepted where
# a number of seconds is expected.  A per-key check is an `AfterValidator` that
# raises our own problem text; `_problems` turns pydantic's errors back into
# ``dotted.key: why`` lines.

_PROBLEM = "config_problem"
_CROSS = "config_cross_checks"


def _problem(text: str) -> PydanticCustomError:
    return PydanticCustomError(_PROBLEM, "{problem}", {"problem": text})


def _checked(check: Check) -> AfterValidator:
    def validate(value: Any) -> Any:
        problem = check(value)
        if problem:
            raise _problem(problem)
        return value

    return AfterValidator(validate)


def _normalised(normalise: Callable[[str], str]) -> BeforeValidator:
    return BeforeValidator(lambda value: normalise(value) if isinstance(value, str) else value)


def _strip_padding(value: str) -> str:
    """Leading and trailing spaces are not significant in an AE title (PS3.5 table 6.2-1)."""
    return value.strip(" ") or value


def _toml_context(info: ValidationInfo) -> Mapping[str, Path] | None:
    """The path bases when the value comes from TOML (`load_config`); None when built in code."""
    context = info.context
    return context.get("bases") if isinstance(context, Mapping) else None


def _none_for_empty_string(value: Any, info: ValidationInfo) -> Any:
    # TOML has no null: "" means unset, for an optional key read from a file.
    return None if value == "" and _toml_context(info) is not None else value


def _toml_path(relative_to: str, *, optional: bool) -> BeforeValidator:
    def convert(value: Any, info: ValidationInfo) -> Any:
        bases = _toml_context(info)
        if bases is None:  # built in code: must already be an absolute Path
            return value
        if optional and value == "":
            return None
        if not isinstance(value, str):
            kind = 'a path string (or "" for none)' if optional else "a path string"
            raise _problem(f"expected {kind}, got {_describe_value(value)}")
        if not value.strip():
            raise _problem("must not be empty")
        path = Path(value).expanduser()
        return path if path.is_absolute() else bases[relative_to] / path

    return BeforeValidator(convert)


def _absolute(value: Path) -> Path:
    if not value.is_absolute():
        raise _problem(f"expected an absolute path, got {_describe_value(value)}")
    return value


_Path = Annotated[Path, Strict(), AfterValidator(_absolute)]
StatePath = Annotated[_Path, _toml_path("state", optional=False)]
OptionalConfigPath = Annotated[_Path | None, _toml_path("config", optional=True)]
Flag = Annotated[bool, Strict()]
Text = Annotated[str, Strict()]
OptionalText = Annotated[Text | None, BeforeValidator(_none_for_empty_string)]
AeTitle = Annotated[str, Strict(), _normalised(_strip_padding), _checked(_ae_title)]

#: Every section: unknown keys refused, scalars strict, instances frozen.
SECTION_CONFIG = ConfigDict(extra="forbid")
#: Fields of `NodeConfig` that the loader sets; a TOML file may not.
DERIVED_KEYS = ("state_directory", "source")

#: Direct construction (and `dataclasses.replace`) raises `ConfigError`, as loading does.
_config_errors = raising_on_invalid(lambda exc, cls: ConfigError(_problems(exc, cls)))


class _Section:
    """Base of every section: the cross-key checks run once every key is valid, all reported at once."""

    __slots__ = ()

    def _cross_checks(self) -> Iterator[tuple[str, str]]:
        return iter(())

    @model_validator(mode="after")
    def _cross_checked(self) -> Any:
        problems = tuple(self._cross_checks())
        if problems:
            raise PydanticCustomError(_CROSS, "{problems}", {"problems": problems})
        return self


# --- pydantic's errors -> "dotted.key: why" ---------------------------------------


def _dotted_loc(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _annotation_at(root: type, loc: tuple[int | str, ...]) -> tuple[Any, type | None]:
    """The declared type at ``loc`` and the section class that holds its last key."""
    annotation: Any = root
    holder: type | None = None
    for part in loc:
        _optional, inner = _unwrap_optional(annotation)
        if isinstance(part, int) and get_origin(inner) is tuple:
            annotation = get_args(inner)[0]
        elif isinstance(part, str) and dataclasses.is_dataclass(inner) and isinstance(inner, type):
            holder = inner
            annotation = get_type_hints(inner).get(part, Any)
        else:
            return Any, None
    return annotation, holder


def _toml_keys(section: type) -> list[str]:
    derived = DERIVED_KEYS if section is NodeConfig else ()
    return [f.name for f in dataclasses.fields(section) if f.name not in derived]


def _unknown_key_hint(name: str, section: type | None) -> str:
    if section is None:
        return ""
    keys = _toml_keys(section)
    close = difflib.get_close_matches(name, keys, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(keys)})"


_TYPE_ERRORS = frozenset(
    {
        "bool_type",
        "int_type",
        "float_type",
        "string_type",
        "tuple_type",
        "dataclass_type",
        "dataclass_exact_type",
        "is_instance_of",
        "path_type",
    }
)


def _problems(error: ValidationError, root: type) -> list[str]:
    """One ``dotted.key: why`` line per pydantic error.

    Pydantic reports a table's unknown keys after its known ones; they are moved
    first, as an operator reads a misspelt key before what follows from it.
    """
    found: list[tuple[list[tuple[int, int]], list[str]]] = []
    first_seen: dict[tuple[int | str, ...], int] = {}
    names = [f.name for f in dataclasses.fields(root)] if dataclasses.is_dataclass(root) else []
    for item in error.errors(include_url=False):
        loc = tuple(item["loc"])
        if loc and isinstance(loc[0], int) and loc[0] < len(names):  # a positional argument
            loc = (names[loc[0]], *loc[1:])
        where = _dotted_loc(loc)
        kind = item["type"]
        ctx = item.get("ctx") or {}
        unknown = kind in ("unexpected_keyword_argument", "extra_forbidden")
        order = [
            (0, 0)
            if unknown and depth == len(loc) - 1
            else (1, first_seen.setdefault(loc[: depth + 1], len(first_seen)))
            for depth in range(len(loc))
        ]
        if kind == _CROSS:
            found.append((order, [_dotted(where, f"{name}: {text}") for name, text in ctx["problems"]]))
            continue
        if kind == _PROBLEM:
            why = ctx["problem"]
        elif unknown:
            _annotation, section = _annotation_at(root, loc)
            why = "unknown key" + _unknown_key_hint(str(loc[-1]), section)
        elif kind in ("missing", "missing_keyword_argument"):
            why = "missing"
        elif kind in _TYPE_ERRORS:
            annotation, _section = _annotation_at(root, loc)
            why = f"expected {_describe_type(annotation)}, got {_describe_value(item['input'])}"
        else:  # anything else pydantic finds: its own words, still under the key
            why = item["msg"]
        found.append((order, [f"{where}: {why}" if where else why]))
    found.sort(key=lambda entry: entry[0])
    return [problem for _order, problems in found for problem in problems]


# --- sections ----------------------------------------------------------------------


@_config_errors
@dataclass(frozen=True, slots=True, config=SECTION_CONFIG)
class CallerRule(_Section):
    """One entry of `scp.allowed_callers`: a calling AE title ("*" = any) from a host or network."""

    ae_title: Annotated[str, Strict(), _normalised(_strip_padding), _checked(_ae_title_or_any)]
    host: Annotated[str, Strict(), _checked(_ip_network)]

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


@_config_errors
@dataclass(frozen=True, slots=True, config=SECTION_CONFIG)
class ScpTlsConfig(_Section):
    """`[scp.tls]`: DICOM TLS on the receiving port (PS3.15 B.1)."""

    enabled: Flag
    cert_file: OptionalConfigPath
    key_file: OptionalConfigPath
    ca_file: OptionalConfigPath
    require_client_cert: Flag

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


@_config_errors
@dataclass(frozen=True, slots=True, config=SECTION_CONFIG)
class ScpConfig(_Section):
    """`[scp]`: the storage SCP that receives CT and SEG from the PACS."""

    ae_title: AeTitle
    bind_address: Annotated[str, Strict(), _checked(_ip_address)]
    port: Annotated[int, Strict(), _checked(_port)]
    max_pdu_bytes: Annotated[int, Strict(), _checked(_pdu_bytes)]
    max_associations: Annotated[int, Strict(), _checked(_range(1, 1000))]
    acse_timeout_s: Annotated[float, Strict(), _checked(_positive)]
    dimse_timeout_s: Annotated[float, Strict(), _checked(_positive)]
    network_timeout_s: Annotated[float, Strict(), _checked(_positive)]
    check_called_ae: Flag
    allowed_callers: tuple[CallerRule, ...]
    tls: ScpTlsConfig
    # Connections that have not yet sent an A-ASSOCIATE-RQ ("pending"): they are
    # unauthenticated, so they get a short deadline and a budget of their own and
    # never count against max_associations (node.scp.ConnectionGate).
    #: Seconds from TCP accept (TLS handshake included) to a complete A-ASSOCIATE-RQ.
    preassociation_timeout_s: Annotated[float, Strict(), _checked(_range(0.5, 60))] = 5.0
    #: Pending connections allowed at once from one IP address.
    preassociation_per_ip: Annotated[int, Strict(), _checked(_range(1, 100))] = 4
    #: Pending connections allowed at once from all addresses together.
    preassociation_total: Annotated[int, Strict(), _checked(_range(1, 1000))] = 32
    #: One ``peer_refused`` log line per (IP, reason) per this many seconds.
    refused_log_interval_s: Annotated[float, Strict(), _checked(_range(0, 86400))] = 60.0
    #: Largest decoded pixel data of one instance (Rows × Columns × frames × samples × bytes).
    max_decoded_bytes: Annotated[int, Strict(), _checked(_range(MIN_INSTANCE_LIMIT_BYTES))] = 256 * 2**20
    #: Largest inflated data set of a Deflated Explicit VR Little Endian instance.
    max_inflated_bytes: Annotated[int, Strict(), _checked(_range(MIN_INSTANCE_LIMIT_BYTES))] = 32 * 2**20

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


@_config_errors
@dataclass(frozen=True, slots=True, config=SECTION_CONFIG)
class SpoolConfig(_Section):
    """`[spool]`: where received instances, SRs and the SQLite state live."""

    directory: StatePath
    database: StatePath
    min_free_bytes: Annotated[int, Strict(), _checked(_non_negative)]
    retention_after_delivery_s: Annotated[float, Strict(), _checked(_non_negative)]
    retention_failed_s: Annotated[float, Strict(), _checked(_non_negative)]


@_config_errors
@dataclass(frozen=True, slots=True, config=SECTION_CONFIG)
class CompletionConfig(_Section):
    """`[completion]`: when a study counts as complete, or is given up on."""

    grace_s: Annotated[float, Strict(), _checked(_positive)]
    study_expiry_s: Annotated[float, Strict(), _checked(_positive)]

    def _cross_checks(self) -> Iterator[tuple[str, str]]:
        if self.grace_s >= self.study_expiry_s:
            yield "grace_s", f"{self.grace_s} must be shorter than study_expiry_s ({self.study_expiry_s})"


@_config_errors
@dataclass(frozen=True, slots=True, config=SECTION_CONFIG)
class ClinicalConfig(_Section):
    """`[clinical]`: the folder clinical records (JSON/CSV) are dropped into."""

    inbox_directory: StatePath
    poll_interval_s: Annotated[float, Strict(), _checked(_positive)]
    #: A record no study uses (never matched, or superseded by a correction) is deleted this long after it arrived.
    unmatched_record_retention_s: Annotated[float, Strict(), _checked(_non_negative)] = 2592000.0


FHIR_AUTH_MODES = ("none", "basic", "bearer")


def _fhir_auth(value: str) -> str | None:
    return None if value in FHIR_AUTH_MODES else f"{value!r} is not one of {', '.join(FHIR_AUTH_MODES)}"


@_config_errors
@dataclass(frozen=True, slots=True, config=SECTION_CONFIG)
class FhirConfig(_Section):
    """`[fhir]`: look up missing clinical records on a FHIR R4 server (node.fhir_client, node.fhir_lookup)."""

    enabled: Flag = False
    #: e.g. "https://ehr.example.org/fhir"; required when enabled.
    base_url: Text = ""
    auth: Annotated[str, Strict(), _normalised(str.lower), _checked(_fhir_auth)] = "none"
    username: OptionalText = None
    #: Secrets are read from files (mode 0600), never written in this config.
    password_file: OptionalConfigPath = None
    token_file: OptionalConfigPath = None
    #: None: the system trust store.
    ca_file: OptionalConfigPath = None
    #: Patient.identifier system the DICOM PatientID belongs to; None: search by value alone.
    patient_identifier_system: OptionalText = None
    #: Observations older than this before the study date are not used.
    lookback_days: Annotated[float, Strict(), _checked(_positive)] = 90.0
    #: Per HTTP request (connect and each read).
    timeout_s: Annotated[float, Strict(), _checked(_positive)] = 10.0
    #: A study still waiting is looked up again after this long.
    retry_interval_s: Annotated[float, Strict(), _checked(_positive)] = 300.0

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


@_config_errors
@dataclass(frozen=True, slots=True, config=SECTION_CONFIG)
class ScoringConfig(_Section):
    """`[scoring]`: the model and the workers that run it."""

    #: None: the shipped demonstration model (`node.scoring_job.default_model_path()`).
    model_file: Annotated[Annotated[_Path, _checked(_readable_file)] | None, _toml_path("config", optional=True)]
    workers: Annotated[int, Strict(), _checked(_workers)]
    lease_s: Annotated[float, Strict(), _checked(_positive)]
    #: None: the segment whose property type is SCT Neoplasm.
    segment_label: Annotated[
        Annotated[str, Strict(), _checked(_not_blank)] | None, BeforeValidator(_none_for_empty_string)
    ]
    #: False: a lossy-compressed CT series fails scoring with a reason naming the transfer syntax.
    allow_lossy_ct: Flag = False
    #: RTSTRUCT input: regular expression (case-insensitive) for the tumour ROI's name; None: GTV-like
    #: names (`dicom_io.rtstruct.DEFAULT_ROI_NAME_PATTERN`), then RT ROI Interpreted Type GTV/TUMOR.
    rtstruct_roi_pattern: Annotated[
        Annotated[str, Strict(), _checked(_regex)] | None, BeforeValidator(_none_for_empty_string)
    ] = None
    #: False: an out-of-domain result withholds risk group and PFS (scoring.domain, docs/model-format.md).
    report_out_of_domain: Flag = False


@_config_errors
@dataclass(frozen=True, slots=True, config=SECTION_CONFIG)
class DestinationTlsConfig(_Section):
    """`destinations[].tls`: DICOM TLS when sending to that destination."""

    enabled: Flag = False
    #: None: the system trust store.
    ca_file: OptionalConfigPath = None
    #: Client certificate and key, for destinations that require one (both or neither).
    cert_file: OptionalConfigPath = None
    key_file: OptionalConfigPath = None

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


@_config_errors
@dataclass(frozen=True, slots=True, config=SECTION_CONFIG)
class DestinationConfig(_Section):
    """One `[[destinations]]` entry: a C-STORE SCP the node's objects are sent to."""

    name: Annotated[str, Strict(), _checked(_name)]
    ae_title: AeTitle
    host: Annotated[str, Strict(), _checked(_host)]
    port: Annotated[int, Strict(), _checked(_positive_port)]
    tls: DestinationTlsConfig = DestinationTlsConfig()
    #: Which of the study's objects this destination gets (default: all four).
    objects: Annotated[tuple[Text, ...], _checked(_object_kinds)] = RESULT_OBJECT_KINDS


@_config_errors
@dataclass(frozen=True, slots=True, config=SECTION_CONFIG)
class OutboxConfig(_Section):
    """`[outbox]`: retries of SR deliveries (exponential backoff with a cap)."""

    initial_backoff_s: Annotated[float, Strict(), _checked(_positive)]
    max_backoff_s: Annotated[float, Strict(), _checked(_positive)]
    #: 0: retry forever (the delivery stays visible as pending).
    max_attempts: Annotated[int, Strict(), _checked(_non_negative)]

    def _cross_checks(self) -> Iterator[tuple[str, str]]:
        if self.initial_backoff_s > self.max_backoff_s:
            yield "initial_backoff_s", f"{self.initial_backoff_s} is above max_backoff_s ({self.max_backoff_s})"


@_config_errors
@dataclass(frozen=True, slots=True, config=SECTION_CONFIG)
class HttpConfig(_Section):
    """`[http]`: /healthz and /metrics (see node.http_status)."""

    enabled: Flag
    bind_address: Annotated[str, Strict(), _checked(_ip_address)]
    port: Annotated[int, Strict(), _checked(_port)]


@_config_errors
@dataclass(frozen=True, slots=True, config=SECTION_CONFIG)
class LoggingConfig(_Section):
    """`[logging]`: JSON lines on stdout (journald)."""

    level: Annotated[str, Strict(), _normalised(str.upper), _checked(_log_level)]


@_config_errors
@dataclass(frozen=True, slots=True, config=SECTION_CONFIG)
class NodeConfig(_Section):
    scp: ScpConfig
    spool: SpoolConfig
    completion: CompletionConfig
    clinical: ClinicalConfig
    scoring: ScoringConfig
    outbox: OutboxConfig
    http: HttpConfig
    logging: LoggingConfig
    #: Base of relative writable paths (see module docstring); set by the loader, not a TOML key.
    state_directory: _Path
    #: The file loaded over the defaults; None when running on the embedded defaults.  Not a TOML key.
    source: _Path | None
    #: Empty: SRs are produced and kept in the spool but sent nowhere.
    destinations: tuple[DestinationConfig, ...] = ()
    fhir: FhirConfig = FhirConfig()

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
    return _validated(raw, bases, state_directory=state_directory, source=source)


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


_NODE_CONFIG = TypeAdapter(NodeConfig)


def _validated(
    raw: dict[str, Any], bases: Mapping[str, Path], *, state_directory: Path, source: Path | None
) -> NodeConfig:
    """Pydantic validates the merged TOML; every problem becomes one ``dotted.key: why`` line."""
    problems = [f"{name}: unknown key{_unknown_key_hint(name, NodeConfig)}" for name in DERIVED_KEYS if name in raw]
    values = {name: value for name, value in raw.items() if name not in DERIVED_KEYS}
    values.update(state_directory=state_directory, source=source)
    try:
        config = _NODE_CONFIG.validate_python(values, context={"bases": bases})
    except ValidationError as exc:
        problems += _problems(exc, NodeConfig)
    if problems:
        raise ConfigError(problems)
    return config
