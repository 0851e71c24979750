"""A recorded-response FHIR R4 server on loopback, for the FHIR client and lookup tests.

It serves FHIR JSON resources held in memory and honours exactly the search
parameters the node uses (docs/clinical-record.md, "From FHIR R4"):

* ``GET /Patient?identifier=[system|]value``
* ``GET /Observation?subject=Patient/<id>&code=<system|code,...>&date=ge<d>&date=le<d>``
* ``_count`` with ``next`` links (``_getpages``-style offsets), so paging is exercised.

Anything else is answered with a 400 OperationOutcome, as a real server would
for an unknown parameter.  It can require basic or bearer auth, and records
each request (path, query, Authorization header) for the tests to inspect.
The real-server check (HAPI FHIR) is described in docs/clinical-record.md.
"""

from __future__ import annotations

import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

KNOWN_PARAMETERS = {
    "Patient": {"identifier", "_count", "_offset"},
    "Observation": {"subject", "code", "date", "_count", "_offset"},
}


class RecordedFhirServer:
    def __init__(
        self, resources: list[dict[str, Any]] | None = None, *, authorization: str | None = None, delay_s: float = 0.0
    ):
        self.resources: list[dict[str, Any]] = list(resources or [])
        self.authorization = authorization
        self.delay_s = delay_s
        self.requests: list[dict[str, Any]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                server._handle(self)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/fhir"

    def __enter__(self) -> RecordedFhirServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    # --- request handling ---

    def _send(self, handler, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/fhir+json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def _handle(self, handler) -> None:
        import time

        if self.delay_s:
            time.sleep(self.delay_s)
        url = urllib.parse.urlsplit(handler.path)
        params = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        self.requests.append(
            {"path": url.path, "params": params, "authorization": handler.headers.get("Authorization")}
        )
        if self.authorization and handler.headers.get("Authorization") != self.authorization:
            self._send(handler, 401, _outcome("authentication required"))
            return
        resource_type = url.path.removeprefix("/fhir/").strip("/")
        if resource_type not in KNOWN_PARAMETERS:
            self._send(handler, 404, _outcome(f"unknown resource type {resource_type}"))
            return
        unknown = set(params) - KNOWN_PARAMETERS[resource_type]
        if unknown:
            self._send(handler, 400, _outcome(f"unknown search parameter(s) {sorted(unknown)}"))
            return
        matches = [r for r in self.resources if r.get("resourceType") == resource_type and _matches(r, params)]
        count = int(params.get("_count", ["100"])[0])
        offset = int(params.get("_offset", ["0"])[0])
        page = matches[offset : offset + count]
        bundle = {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(matches),
            "link": [{"relation": "self", "url": f"{self.base_url}/{resource_type}?{url.query}"}],
            "entry": [
                {"fullUrl": f"{self.base_url}/{resource_type}/{r['id']}", "resource": r, "search": {"mode": "match"}}
                for r in page
            ],
        }
        if offset + count < len(matches):
            following = {k: v for k, v in params.items() if k != "_offset"}
            following["_offset"] = [str(offset + count)]
            bundle["link"].append(
                {
                    "relation": "next",
                    "url": f"{self.base_url}/{resource_type}?{urllib.parse.urlencode(following, doseq=True)}",
                }
            )
        self._send(handler, 200, bundle)


def _outcome(text: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "processing", "diagnostics": text}],
    }


def _matches(resource: dict[str, Any], params: dict[str, list[str]]) -> bool:
    for name, values in params.items():
        if name.startswith("_"):
            continue
        for value in values:
            if not _matches_one(resource, name, value):
                return False
    return True


def _token_matches(codings: list[dict[str, Any]], token: str) -> bool:
    system, _, code = token.rpartition("|") if "|" in token else (None, "", token)
    return any(c.get("value", c.get("code")) == code and (system is None or c.get("system") == system) for c in codings)


def _matches_one(resource: dict[str, Any], name: str, value: str) -> bool:
    if name == "identifier":
        return _token_matches(resource.get("identifier", []), value)
    if name == "subject":
        return resource.get("subject", {}).get("reference") == value
    if name == "code":
        codings = resource.get("code", {}).get("coding", [])
        return any(_token_matches(codings, token) for token in value.split(","))
    if name == "date":
        prefix, day = value[:2], value[2:]
        effective = (resource.get("effectiveDateTime") or resource.get("issued") or "")[:10]
        if not effective:
            return False
        return {"ge": effective >= day, "le": effective <= day, "gt": effective > day, "lt": effective < day}.get(
            prefix, effective == value
        )
    raise AssertionError(f"unhandled parameter {name}")
