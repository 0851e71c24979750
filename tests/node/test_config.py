"""node.config: the embedded defaults, site files merged over them, and every rejection naming its dotted key."""

from __future__ import annotations

import dataclasses
import shutil
import ssl
import stat
import subprocess
from pathlib import Path

import pytest

from sclc_risk_node.node.config import (
    CallerRule,
    ConfigError,
    DestinationConfig,
    HttpConfig,
    LoggingConfig,
    NodeConfig,
    ScpConfig,
    ScpTlsConfig,
    default_config_text,
    default_state_directory,
    load_config,
    usable_cpu_count,
)
from sclc_risk_node.scoring.errors import InputError

REPO = Path(__file__).resolve().parents[2]
ENV = {"STATE_DIRECTORY": "/var/lib/sclc-risk-node"}


def write(tmp_path: Path, text: str, name: str = "node.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(tmp_path: Path, text: str) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), environ=ENV)
    return caught.value.problems


# --- the embedded defaults -----------------------------------------------------------


def test_embedded_defaults_are_the_repository_file():
    assert default_config_text() == (REPO / "config" / "node.toml").read_text(encoding="utf-8")


def test_node_runs_on_embedded_defaults_alone():
    config = load_config(environ=ENV)
    state = Path("/var/lib/sclc-risk-node")
    assert config.source is None
    assert config.state_directory == state
    assert config.scp.ae_title == "SCLC_NODE"
    assert (config.scp.bind_address, config.scp.port) == ("127.0.0.1", 11112)
    assert config.scp.max_pdu_bytes == 16384 and config.scp.max_associations == 10
    assert config.scp.check_called_ae is True
    assert config.scp.tls.enabled is False
    assert (config.scp.preassociation_timeout_s, config.scp.preassociation_per_ip, config.scp.preassociation_total) == (
        5,
        4,
        32,
    )
    assert config.scp.refused_log_interval_s == 60
    assert (config.scp.max_decoded_bytes, config.scp.max_inflated_bytes) == (256 * 2**20, 32 * 2**20)
    assert config.spool.directory == state / "spool"
    assert config.spool.database == state / "node.sqlite3"
    assert config.spool.min_free_bytes == 2 * 1024**3
    assert config.spool.retention_after_delivery_s == 7 * 86400
    assert config.completion.grace_s == 10 and config.completion.study_expiry_s == 6 * 3600
    assert config.clinical.inbox_directory == state / "clinical-inbox"
    assert config.scoring.model_file is None  # the shipped demonstration model
    assert config.scoring.workers == 1 and config.scoring.segment_label is None
    assert config.destinations == ()
    assert config.outbox.max_attempts == 0
    assert (config.http.enabled, config.http.bind_address, config.http.port) == (True, "127.0.0.1", 8089)
    assert config.logging.level == "INFO"


def test_loading_writes_nothing(tmp_path):
    load_config(environ={"STATE_DIRECTORY": str(tmp_path / "state")})
    assert not (tmp_path / "state").exists()


def test_default_callers_are_loopback_only():
    scp = load_config(environ=ENV).scp
    for address in ("127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"):
        assert scp.caller_allowed("ANY_PACS", address), address
    for address in ("10.1.2.3", "192.168.0.5", "fe80::1", "::ffff:10.1.2.3"):
        assert not scp.caller_allowed("ANY_PACS", address), address


def test_address_allowed_checks_the_hosts_of_the_allowed_callers_whatever_the_ae_title():
    rules = (CallerRule(ae_title="PACS", host="10.20.0.0/16"),)
    scp = dataclasses.replace(load_config(environ=ENV).scp, allowed_callers=rules)
    assert scp.address_allowed("10.20.3.4") and scp.address_allowed("::ffff:10.20.3.4")
    assert not scp.address_allowed("10.21.0.1")
    assert not scp.address_allowed("not-an-address")


def test_every_destination_key_is_documented_in_the_defaults_file():
    text = default_config_text()
    for f in dataclasses.fields(DestinationConfig):
        assert f"#   {f.name} = " in text, f.name
    for name in ("ca_file", "cert_file", "key_file"):
        assert name in text


# --- state directory ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"STATE_DIRECTORY": "/var/lib/sclc-risk-node", "HOME": "/home/u"}, "/var/lib/sclc-risk-node"),
        ({"STATE_DIRECTORY": "/var/lib/a:/var/lib/b"}, "/var/lib/a"),
        ({"XDG_STATE_HOME": "/srv/state", "HOME": "/home/u"}, "/srv/state/sclc-risk-node"),
        ({"XDG_STATE_HOME": "relative/ignored", "HOME": "/home/u"}, "/home/u/.local/state/sclc-risk-node"),
        ({"HOME": "/home/u"}, "/home/u/.local/state/sclc-risk-node"),
    ],
)
def test_state_directory(environ, expected):
    assert default_state_directory(environ) == Path(expected)


# --- site files ---------------------------------------------------------------------------


def test_site_file_changes_only_the_keys_it_names(tmp_path):
    path = write(tmp_path, '[scp]\nbind_address = "0.0.0.0"\n[logging]\nlevel = "debug"\n')
    config = load_config(path, environ=ENV)
    assert config.source == path
    assert config.scp.bind_address == "0.0.0.0"
    assert config.scp.port == 11112  # from the defaults
    assert config.logging.level == "DEBUG"


def test_arrays_replace_the_defaults_and_callers_match_title_and_network(tmp_path):
    path = write(
        tmp_path,
        """
[[scp.allowed_callers]]
ae_title = "PACS_MAIN  "
host = "10.20.0.0/16"
""",
    )
    scp = load_config(path, environ=ENV).scp
    assert scp.allowed_callers == (CallerRule(ae_title="PACS_MAIN", host="10.20.0.0/16"),)
    assert scp.caller_allowed("PACS_MAIN", "10.20.3.4")
    assert scp.caller_allowed(" PACS_MAIN ", "::ffff:10.20.3.4")
    assert not scp.caller_allowed("OTHER", "10.20.3.4")
    assert not scp.caller_allowed("PACS_MAIN", "127.0.0.1")  # loopback default replaced


def test_paths_resolve_writable_against_state_and_readable_against_config_dir(tmp_path):
    (tmp_path / "models").mkdir()
    model = tmp_path / "models" / "site-model.json"
    model.write_text("{}")
    path = write(
        tmp_path,
        """
[spool]
directory = "incoming"
database = "/data/db/node.sqlite3"
[scoring]
model_file = "models/site-model.json"
""",
    )
    config = load_config(path, environ=ENV)
    assert config.spool.directory == Path("/var/lib/sclc-risk-node/incoming")
    assert config.spool.database == Path("/data/db/node.sqlite3")
    assert config.scoring.model_file == model


def test_destinations_with_default_and_explicit_tls(tmp_path):
    path = write(
        tmp_path,
        """
[[destinations]]
name = "pacs-main"
ae_title = "PACS_MAIN"
host = "pacs.hospital.local"
port = 104

[[destinations]]
name = "research"
ae_title = "RESEARCH"
host = "10.1.2.3"
port = 2762
tls = { enabled = true }
""",
    )
    first, second = load_config(path, environ=ENV).destinations
    assert (first.name, first.host, first.port, first.tls.enabled) == ("pacs-main", "pacs.hospital.local", 104, False)
    assert second.tls.enabled and second.tls.ca_file is None
    context = second.tls.client_context()  # system trust store
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


# --- rejections name the dotted key --------------------------------------------------------


def test_too_long_ae_title_message(tmp_path):
    path = write(tmp_path, '[scp]\nae_title = "THIS_IS_WAY_TOO_LONG_AE"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=ENV)
    assert str(caught.value) == "config error: scp.ae_title: 'THIS_IS_WAY_TOO_LONG_AE' is longer than 16 characters"
    assert isinstance(caught.value, InputError) and isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[scp]\nae_tittle = "X"', "scp.ae_tittle: unknown key (did you mean 'ae_title'?)"),
        ("[metrics]\nport = 1", "metrics: unknown key"),
        ('[scp]\nport = "11112"', "scp.port: expected an integer, got string '11112'"),
        ("[scp]\nport = 11112.0", "scp.port: expected an integer, got number 11112.0"),
        ("[scp]\nport = 70000", "scp.port: 70000 is out of range"),
        ("[scp]\ncheck_called_ae = 1", "scp.check_called_ae: expected a boolean, got integer 1"),
        ("[scp]\nacse_timeout_s = true", "scp.acse_timeout_s: expected a number, got boolean True"),
        ("[scp]\nacse_timeout_s = 0", "scp.acse_timeout_s: 0.0 must be a positive number"),
        ("[scp]\nmax_pdu_bytes = 100", "scp.max_pdu_bytes: 100 is out of range"),
        ("[scp]\nmax_associations = 0", "scp.max_associations: 0 is out of range"),
        ('[scp]\nae_title = "   "', "scp.ae_title: must not be empty or all spaces"),
        ('[scp]\nae_title = "A\\\\B"', "scp.ae_title: 'A\\\\B' contains a backslash"),
        ('[scp]\nae_title = "A\\tB"', "scp.ae_title: 'A\\tB' contains a control or non-ASCII character"),
        ('[scp]\nbind_address = "localhost"', "scp.bind_address: 'localhost' is not an IP address"),
        ("[scp]\nallowed_callers = []", "scp.allowed_callers: is empty, which would refuse every caller"),
        (
            '[[scp.allowed_callers]]\nae_title = "*"\nhost = "10.1.2.3/24"',
            "scp.allowed_callers[0].host: '10.1.2.3/24' is not",
        ),
        ('[[scp.allowed_callers]]\nae_title = "*"', "scp.allowed_callers[0].host: missing"),
        ("[scp.tls]\nenabled = true", "scp.tls.cert_file: required when enabled = true"),
        (
            "[scp]\npreassociation_timeout_s = 0.1",
            "scp.preassociation_timeout_s: 0.1 is out of range (must be between 0.5 and 60)",
        ),
        ("[scp]\npreassociation_per_ip = 0", "scp.preassociation_per_ip: 0 is out of range"),
        (
            "[scp]\npreassociation_per_ip = 8\npreassociation_total = 4",
            "scp.preassociation_per_ip: 8 is above preassociation_total (4)",
        ),
        ("[scp]\nrefused_log_interval_s = -1", "scp.refused_log_interval_s: -1.0 is out of range"),
        ("[scp]\nmax_decoded_bytes = 1000", "scp.max_decoded_bytes: 1000 is out of range (must be at least 1048576)"),
        ('[scp]\nmax_inflated_bytes = "32M"', "scp.max_inflated_bytes: expected an integer, got string '32M'"),
        ('[scp]\ntls = "yes"', "scp.tls: expected a table, got string 'yes'"),
        ("[spool]\nmin_free_bytes = -1", "spool.min_free_bytes: -1 is out of range"),
        ('[spool]\ndirectory = ""', "spool.directory: must not be empty"),
        ("[spool]\ndatabase = 3", "spool.database: expected a path string, got integer 3"),
        ("[completion]\ngrace_s = 30000", "completion.grace_s: 30000.0 must be shorter than study_expiry_s"),
        ("[clinical]\npoll_interval_s = -5", "clinical.poll_interval_s: -5.0 must be a positive number"),
        ('[scoring]\nmodel_file = "absent.json"', "scoring.model_file: "),
        ("[scoring]\nworkers = 0", "scoring.workers: 0 is out of range"),
        ('[scoring]\nsegment_label = "  "', "scoring.segment_label: must not be all spaces"),
        ("[scoring]\nsegment_label = 2", 'scoring.segment_label: expected a string (or "" for none), got integer 2'),
        ("[outbox]\ninitial_backoff_s = 7200", "outbox.initial_backoff_s: 7200.0 is above max_backoff_s"),
        ("[outbox]\nmax_attempts = -1", "outbox.max_attempts: -1 is out of range"),
        ('[http]\nbind_address = "::g"', "http.bind_address: '::g' is not an IP address"),
        ("[http]\nport = 11112", "http.port: 11112 is also scp.port"),
        ('[logging]\nlevel = "verbose"', "logging.level: 'VERBOSE' is not one of DEBUG, INFO"),
        ('destinations = "pacs"', "destinations: expected an array of tables, got string 'pacs'"),
        (
            '[[destinations]]\nname = "a b"\nae_title = "P"\nhost = "h"\nport = 104',
            "destinations[0].name: 'a b' must be",
        ),
        (
            '[[destinations]]\nname = "a"\nae_title = "P"\nhost = "pacs_x"\nport = 104',
            "destinations[0].host: 'pacs_x' is neither",
        ),
        (
            '[[destinations]]\nname = "a"\nae_title = "P"\nhost = "h"\nport = 0',
            "destinations[0].port: 0 is out of range",
        ),
        ('[[destinations]]\nname = "a"\nae_title = "P"\nhost = "h"', "destinations[0].port: missing"),
        (
            '[[destinations]]\nname = "a"\nae_title = "P"\nhost = "h"\nport = 104\ntls = { enabled = true, cert_file = "c.pem" }',
            "destinations[0].tls.key_file: cert_file and key_file go together",
        ),
        (
            '[[destinations]]\nname = "a"\nae_title = "P"\nhost = "h"\nport = 104\ntls = { enable = true }',
            "destinations[0].tls.enable: unknown key (did you mean 'enabled'?)",
        ),
        (
            '[[destinations]]\nname = "a"\nae_title = "P"\nhost = "h"\nport = 104\n'
            '[[destinations]]\nname = "a"\nae_title = "Q"\nhost = "h"\nport = 105',
            "destinations[1].name: 'a' is already used by destinations[0]",
        ),
    ],
)
def test_rejections_name_the_dotted_key(tmp_path, text, expected):
    problems = problems_of(tmp_path, text + "\n")
    assert any(p.startswith(expected) for p in problems), problems


def test_all_problems_are_reported_together(tmp_path):
    problems = problems_of(
        tmp_path,
        """
[scp]
ae_title = "THIS_IS_WAY_TOO_LONG_AE"
port = "104"
[scoring]
workers = 0
[logging]
level = "loud"
""",
    )
    assert [p.split(":")[0] for p in problems] == ["scp.ae_title", "scp.port", "scoring.workers", "logging.level"]


def test_workers_bounded_by_twice_the_usable_cpus(tmp_path):
    limit = 2 * usable_cpu_count()
    assert load_config(write(tmp_path, f"[scoring]\nworkers = {limit}\n"), environ=ENV).scoring.workers == limit
    assert problems_of(tmp_path, f"[scoring]\nworkers = {limit + 1}\n")[0].startswith("scoring.workers:")


def test_integer_seconds_become_floats(tmp_path):
    config = load_config(write(tmp_path, "[completion]\ngrace_s = 2.5\n[clinical]\npoll_interval_s = 1\n"), environ=ENV)
    assert config.completion.grace_s == 2.5
    assert isinstance(config.clinical.poll_interval_s, float)


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match=r"config error: .*absent\.toml: config file does not exist"):
        load_config(tmp_path / "absent.toml", environ=ENV)
    with pytest.raises(ConfigError, match=r"node\.toml: not valid TOML: .*line 2"):
        load_config(write(tmp_path, "[scp]\nport = = 1\n"), environ=ENV)


# --- built in code: same rules, frozen ------------------------------------------------------


def test_sections_built_in_code_are_validated_and_frozen():
    http = HttpConfig(enabled=True, bind_address="127.0.0.1", port=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        http.port = 1  # type: ignore[misc]
    with pytest.raises(ConfigError, match=r"config error: port: expected an integer, got string '80'"):
        HttpConfig(enabled=True, bind_address="127.0.0.1", port="80")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"level: 'LOUD' is not one of"):
        LoggingConfig(level="loud")
    assert LoggingConfig(level="warning").level == "WARNING"


def test_node_config_is_hashable_and_comparable():
    assert load_config(environ=ENV) == load_config(environ=ENV)
    assert hash(load_config(environ=ENV).scp) == hash(load_config(environ=ENV).scp)


# --- TLS with real certificates ----------------------------------------------------------------


def make_certificate(directory: Path, name: str) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl command not installed (Debian package openssl)")
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            key,
            "-out",
            cert,
            "-subj",
            f"/CN={name}",
            "-days",
            "2",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def test_scp_tls_loads_real_certificates_relative_to_the_config_file(tmp_path):
    (tmp_path / "tls").mkdir()
    make_certificate(tmp_path / "tls", "node")
    make_certificate(tmp_path / "tls", "pacs-ca")
    path = write(
        tmp_path,
        """
[scp.tls]
enabled = true
cert_file = "tls/node.crt"
key_file = "tls/node.key"
ca_file = "tls/pacs-ca.crt"
""",
    )
    tls = load_config(path, environ=ENV).scp.tls
    assert tls.cert_file == tmp_path / "tls" / "node.crt"
    context = tls.server_context()
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_scp_tls_rejects_a_key_that_does_not_match(tmp_path):
    cert, _ = make_certificate(tmp_path, "node")
    _, other_key = make_certificate(tmp_path, "other")
    with pytest.raises(ConfigError, match=r"config error: cert_file: cannot be loaded with key_file"):
        ScpTlsConfig(enabled=True, cert_file=cert, key_file=other_key, ca_file=None, require_client_cert=False)


def test_scp_tls_files_must_exist_only_when_enabled(tmp_path):
    absent = tmp_path / "absent.pem"
    assert not ScpTlsConfig(
        enabled=False, cert_file=absent, key_file=absent, ca_file=None, require_client_cert=True
    ).enabled
    with pytest.raises(ConfigError) as caught:
        ScpTlsConfig(enabled=True, cert_file=absent, key_file=absent, ca_file=absent, require_client_cert=True)
    assert [p.split(":")[0] for p in caught.value.problems] == ["cert_file", "key_file", "ca_file"]


# --- directories ---------------------------------------------------------------------------


def test_prepare_directories_creates_private_writable_directories(tmp_path):
    config = load_config(environ={"STATE_DIRECTORY": str(tmp_path / "state")})
    config.prepare_directories()
    for name, directory in config.directories().items():
        assert directory.is_dir(), name
        assert stat.S_IMODE(directory.stat().st_mode) & 0o077 == 0, name
        assert not list(directory.glob(".write-probe-*")), "the write probe must be removed"
    assert stat.S_IMODE(config.state_directory.stat().st_mode) == 0o700
    config.prepare_directories()  # idempotent


def test_prepare_directories_names_the_key_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    path = write(tmp_path, f'[clinical]\ninbox_directory = "{blocker}/inbox"\n')
    config = load_config(path, environ={"STATE_DIRECTORY": str(tmp_path / "state")})
    with pytest.raises(ConfigError) as caught:
        config.prepare_directories()
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith(
        f"clinical.inbox_directory: '{blocker}/inbox' is not a writable directory"
    )


def test_prepare_directories_rejects_a_database_path_that_is_a_directory(tmp_path):
    (tmp_path / "state" / "node.sqlite3").mkdir(parents=True)
    config = load_config(environ={"STATE_DIRECTORY": str(tmp_path / "state")})
    with pytest.raises(ConfigError, match=r"spool\.database: .* is a directory"):
        config.prepare_directories()


def test_scp_config_helpers_without_toml():
    rule = CallerRule(ae_title="*", host="::/0")
    assert rule.permits("X", "2001:db8::1") and not rule.permits("X", "10.0.0.1")
    with pytest.raises(ConfigError, match=r"host: 'pacs' is not an IP address or CIDR network"):
        CallerRule(ae_title="*", host="pacs")
    assert isinstance(load_config(environ=ENV), NodeConfig) and ScpConfig.__slots__
