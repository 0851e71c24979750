"""node.config on pydantic: unknown keys anywhere, wrong types, and `config check` reporting every problem."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic.dataclasses import is_pydantic_dataclass

from sclc_risk_node.node.config import (
    CallerRule,
    ConfigError,
    DestinationConfig,
    DestinationTlsConfig,
    FhirConfig,
    HttpConfig,
    NodeConfig,
    ScpConfig,
    load_config,
)

ENV = {"STATE_DIRECTORY": "/var/lib/sclc-risk-node"}
DESTINATION = '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "10.0.0.9"\nport = 104\n'


def problems_of(tmp_path: Path, text: str) -> tuple[str, ...]:
    path = tmp_path / "node.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=ENV)
    return caught.value.problems


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("colour = 1", "colour: unknown key (known keys: scp, spool"),
        ("[scp]\nprot = 1", "scp.prot: unknown key (did you mean 'port'?)"),
        ("[scp.tls]\nverify = true", "scp.tls.verify: unknown key"),
        ('[[scp.allowed_callers]]\nae_title = "*"\nhost = "::1"\nport = 1', "scp.allowed_callers[0].port: unknown key"),
        (DESTINATION + "tls = { enabled = false, ca = 1 }", "destinations[0].tls.ca: unknown key"),
        ("[fhir]\nbase = 1", "fhir.base: unknown key (did you mean 'base_url'?)"),
        # set by the loader, never by a file
        ('state_directory = "/tmp"', "state_directory: unknown key"),
    ],
)
def test_an_unknown_key_anywhere_is_refused_with_its_dotted_path(tmp_path, text, expected):
    problems = problems_of(tmp_path, text + "\n")
    assert len(problems) == 1 and problems[0].startswith(expected), problems


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[fhir]\nlookback_days = "90"', "fhir.lookback_days: expected a number, got string '90'"),
        ("[fhir]\nenabled = 0", "fhir.enabled: expected a boolean, got integer 0"),
        ("[fhir]\nusername = 7", 'fhir.username: expected a string (or "" for none), got integer 7'),
        ("[fhir]\ntoken_file = 7", 'fhir.token_file: expected a path string (or "" for none), got integer 7'),
        (DESTINATION + "tls = 3", "destinations[0].tls: expected a table, got integer 3"),
        (DESTINATION + "objects = [1]", "destinations[0].objects[0]: expected a string, got integer 1"),
        ("scp = []", "scp: expected a table, got array"),
    ],
)
def test_a_wrong_type_names_the_key_and_the_value_received(tmp_path, text, expected):
    assert problems_of(tmp_path, text + "\n") == (expected,)


def test_problems_in_several_tables_are_all_reported_unknown_keys_first_within_a_table(tmp_path):
    problems = problems_of(
        tmp_path,
        '[scp]\nport = "x"\nprot = 1\n[http]\nport = -1\n' + DESTINATION + "tls = { enabled = 1, nope = 2 }\n",
    )
    assert [p.split(":")[0] for p in problems] == [
        "scp.prot",
        "scp.port",
        "http.port",
        "destinations[0].tls.nope",
        "destinations[0].tls.enabled",
    ]


def test_sections_are_frozen_pydantic_dataclasses_that_validate_on_replace():
    config = load_config(environ=ENV)
    for section in (NodeConfig, ScpConfig, CallerRule, HttpConfig, FhirConfig, DestinationConfig, DestinationTlsConfig):
        assert is_pydantic_dataclass(section), section
    with pytest.raises(ConfigError, match=r"^config error: port: 70000 is out of range"):
        dataclasses.replace(config.http, port=70000)
    with pytest.raises(ConfigError, match=r"enabled: expected a boolean, got string 'yes'"):
        dataclasses.replace(config.http, enabled="yes")
    with pytest.raises(ConfigError, match=r"^config error: port: 0 is out of range"):
        DestinationConfig("a", "P", "h", 0)  # positional arguments name their key too
    # a relative path is a TOML convenience only: in code it must be absolute
    with pytest.raises(ConfigError, match=r"token_file: expected an absolute path"):
        FhirConfig(token_file=Path("token"))
    assert dataclasses.replace(config.scp, port=104).port == 104


def test_config_check_reports_every_problem(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[scp]\nae_title = "THIS_IS_WAY_TOO_LONG_AE"\nport = "104"\nfoo = 1\n[scoring]\nworkers = 0\n'
        + DESTINATION
        + "tls = { enable = true }\n",
        encoding="utf-8",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "sclc_risk_node.node.cli", "config", "check", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    for key in ("scp.foo: unknown key", "scp.ae_title:", "scp.port: expected an integer, got string '104'"):
        assert key in proc.stderr
    assert "scoring.workers: 0 is out of range" in proc.stderr
    assert "destinations[0].tls.enable: unknown key (did you mean 'enabled'?)" in proc.stderr
    assert proc.stderr.index("scp.foo") < proc.stderr.index("scp.ae_title") < proc.stderr.index("scoring.workers")
