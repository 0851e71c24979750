"""A small FHIR R4 REST client: the two searches the node needs, over plain urllib.

``Patient?identifier=[system|]value`` finds the patient; then
``Observation?subject=Patient/<id>&code=<LOINC list>&date=ge..&date=le..``
fetches the candidates, following the Bundle's ``next`` links.  What the
resources mean is decided in `scoring.fhir_mapping`.

Every request has a timeout (``[fhir] timeout_s``) and the number of pages is
bounded, so a slow or broken server delays only the lookup job (a scheduler
job of its own), never the DICOM receiver or scoring.

The query string carries the patient identifier, which is PHI: no error text
raised here contains a URL or a query, only the resource type, the HTTP status
(the server's OperationOutcome is not quoted: servers echo the query there).  Credentials are read
from their files at each lookup (a rotated token needs no restart) and are
only sent to the configured base URL: a ``next`` link to another host is refused.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from sclc_risk_node.node.config import FhirConfig
from sclc_risk_node.scoring.errors import InputError
from sclc_risk_node.scoring.fhir_mapping import LOINC_ITEMS, LOINC_SYSTEM

FHIR_JSON = "application/fhir+json"
#: A patient's Observations for seven codes in a 90-day window fit in a few pages; more is a runaway server.
MAX_PAGES = 20
PAGE_SIZE = 100


class FhirServerError(InputError):
    """The FHIR server could not be asked (network, TLS, auth, HTTP error, not a Bundle)."""


@dataclass(frozen=True, slots=True)
class PatientSearch:
    """What the server holds for one patient: the Patient's reference and the Observation resources (JSON)."""

    patient_refs: frozenset[str]
    resources: tuple[dict[str, Any], ...]


class FhirClient:
    def __init__(self, config: FhirConfig):
        self.config = config
        self.base_url = config.base_url.rstrip("/")
        self._context = self._ssl_context() if self.base_url.startswith("https://") else None

    def _ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.config.ca_file) if self.config.ca_file else None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context

    def _authorization(self) -> str | None:
        config = self.config
        try:
            if config.auth == "basic":
                if config.password_file is None:
                    raise FhirServerError('FHIR auth "basic" needs a password_file')
                password = config.password_file.read_text(encoding="utf-8").strip()
                token = base64.b64encode(f"{config.username}:{password}".encode()).decode("ascii")
                return f"Basic {token}"
            if config.auth == "bearer":
                if config.token_file is None:
                    raise FhirServerError('FHIR auth "bearer" needs a token_file')
                return f"Bearer {config.token_file.read_text(encoding='utf-8').strip()}"
        except OSError as exc:
            raise FhirServerError(f"FHIR credentials file cannot be read: {exc.strerror or exc}") from None
        return None

    def search(self, resource_type: str, params: list[tuple[str, str]]) -> list[dict[str, Any]]:
        """Every resource of ``resource_type`` in the searchset, over all pages (``_include``d ones dropped)."""
        url = f"{self.base_url}/{resource_type}?" + urllib.parse.urlencode(params + [("_count", str(PAGE_SIZE))])
        authorization = self._authorization()
        found: list[dict[str, Any]] = []
        for _page in range(MAX_PAGES):
            bundle = self._get(url, resource_type, authorization)
            for entry in bundle.get("entry") or ():
                resource = entry.get("resource") if isinstance(entry, dict) else None
                if isinstance(resource, dict) and resource.get("resourceType") == resource_type:
                    found.append(resource)
            next_url = next(
                (
                    link.get("url")
                    for link in bundle.get("link") or ()
                    if isinstance(link, dict) and link.get("relation") == "next"
                ),
                None,
            )
            if not next_url:
                return found
            if not _same_origin(next_url, self.base_url):
                raise FhirServerError(
                    f"FHIR {resource_type} search: the server's next-page link points to another server"
                )
            url = next_url
        raise FhirServerError(f"FHIR {resource_type} search: more than {MAX_PAGES} pages of results")

    def _get(self, url: str, resource_type: str, authorization: str | None) -> dict[str, Any]:
        request = urllib.request.Request(url, headers={"Accept": FHIR_JSON})
        if authorization:
            request.add_header("Authorization", authorization)
        what = f"FHIR {resource_type} search"
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout_s, context=self._context) as response:
                body = response.read()
        except urllib.error.HTTPError as exc:
            raise FhirServerError(f"{what}: HTTP {exc.code} {exc.reason}") from None
        except urllib.error.URLError as exc:
            raise FhirServerError(f"{what}: server unreachable ({_reason(exc.reason)})") from None
        except (TimeoutError, OSError) as exc:
            raise FhirServerError(f"{what}: server unreachable ({_reason(exc)})") from None
        try:
            bundle = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise FhirServerError(f"{what}: the answer is not JSON") from None
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            raise FhirServerError(f"{what}: the answer is not a FHIR Bundle")
        return bundle

    def patient_resources(
        self, patient_id: str, *, since: dt.date, until: dt.date, identifier_system: str | None
    ) -> PatientSearch:
        """The patient found by identifier and their Observations of the LOINC codes read, dated since..until.

        Raises `FhirServerError` when the server cannot be asked, or when not
        exactly one Patient has the identifier (the message gives the count only).
        """
        token = f"{identifier_system}|{patient_id}" if identifier_system else patient_id
        patients = self.search("Patient", [("identifier", token)])
        ids = sorted({found for found in (p.get("id") for p in patients) if isinstance(found, str)})
        if len(ids) != 1:
            raise FhirServerError(
                f"FHIR Patient search by the study's PatientID found {len(ids)} patients (needed: exactly one)"
            )
        reference = f"Patient/{ids[0]}"
        codes = ",".join(f"{LOINC_SYSTEM}|{item.code}" for item in LOINC_ITEMS)
        # The date window is a hint to the server; scoring.fhir_mapping applies it again on local dates.
        observations = self.search(
            "Observation",
            [
                ("subject", reference),
                ("code", codes),
                ("date", f"ge{(since - dt.timedelta(days=1)).isoformat()}"),
                ("date", f"le{(until + dt.timedelta(days=1)).isoformat()}"),
            ],
        )
        return PatientSearch(frozenset({reference}), tuple(patients) + tuple(observations))


def _same_origin(url: str, base_url: str) -> bool:
    a, b = urllib.parse.urlsplit(url), urllib.parse.urlsplit(base_url)
    return (a.scheme, a.netloc) == (b.scheme, b.netloc)


def _reason(reason: object) -> str:
    text = " ".join(str(reason).split())
    return f"{type(reason).__name__}: {text}" if isinstance(reason, BaseException) else text
