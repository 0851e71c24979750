"""FhirClient on its own: what it does with a configuration the config checks let through."""

from __future__ import annotations

import datetime as dt

import pytest

from sclc_risk_node.node.config import FhirConfig
from sclc_risk_node.node.fhir_client import FhirClient, FhirServerError

TODAY = dt.date(2026, 1, 1)


@pytest.mark.parametrize(
    ("auth", "message"),
    [("basic", 'FHIR auth "basic" needs a password_file'), ("bearer", 'FHIR auth "bearer" needs a token_file')],
)
def test_a_credentials_file_missing_from_the_config_is_a_fhir_error(auth, message):
    # The config checks credentials only when [fhir] is enabled; a client built from a disabled
    # section used to call .read_text() on None (an AttributeError) before any request.
    config = FhirConfig(base_url="http://127.0.0.1:9/fhir", auth=auth, username="user", timeout_s=1.0)
    with pytest.raises(FhirServerError, match=message):
        FhirClient(config).patient_resources("P1", since=TODAY, until=TODAY, identifier_system=None)
