"""OHIF Viewer v3 served on loopback in front of an Orthanc DICOMweb server, for the browser tests.

`scripts/test.sh` unpacks the built app that npm's ``@ohif/app`` package ships
(its ``dist/`` folder, version pinned in ``ohif-version.txt`` beside this file)
into ``~/.cache/sclc-risk-node-tests/ohif/VERSION/dist``.  `OhifServer` serves
that folder with Python's ``http.server``:

* ``/app-config.js`` is generated: one DICOMweb data source
  (``@ohif/extension-default.dataSourcesModule.dicomweb``) whose qidoRoot and
  wadoRoot are ``/dicom-web`` on this same origin;
* ``/dicom-web/...`` and ``/wado`` are forwarded to Orthanc, so the browser
  talks to one origin and Orthanc 1.10 (which sends no CORS headers) needs no
  CORS set-up;
* any other path that is not a file gets ``index.html`` (OHIF is a single
  page app: ``/viewer?StudyInstanceUIDs=...`` is a client-side route).

Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

VERSION_FILE = Path(__file__).with_name("ohif-version.txt")
LOOPBACK = "127.0.0.1"
#: Where scripts/test.sh unpacks the npm package; override with SCLC_OHIF_DIST (a dist/ folder).
CACHE_ROOT = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sclc-risk-node-tests" / "ohif"
PROXIED_PREFIXES = ("/dicom-web/", "/wado")
#: Headers that describe one hop, not the message (RFC 9110 §7.6.1); never forwarded.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
PROXY_TIMEOUT_S = 60.0


def ohif_version() -> str:
    return VERSION_FILE.read_text(encoding="utf-8").strip()


def ohif_dist_dir() -> Path:
    override = os.environ.get("SCLC_OHIF_DIST")
    return Path(override) if override else CACHE_ROOT / ohif_version() / "dist"


def app_config_js(origin: str) -> str:
    """OHIF's ``window.config`` for one Orthanc DICOMweb data source at ``origin``/dicom-web.

    Keys as in OHIF's data source docs: Orthanc's DICOMweb plugin answers
    QIDO-RS without ``includefield`` support for every attribute
    (``qidoSupportsIncludeField: false``), does no fuzzy name matching, but
    handles ``*`` wildcards.  Images and thumbnails are fetched by WADO-RS.
    The investigational-use dialog and the onboarding tour are switched off so
    that they do not cover the viewport in screenshots.
    """
    data_source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "orthanc",
        "configuration": {
            "friendlyName": "Orthanc DICOMweb (test)",
            "name": "orthanc",
            "wadoUriRoot": f"{origin}/wado",
            "qidoRoot": f"{origin}/dicom-web",
            "wadoRoot": f"{origin}/dicom-web",
            "qidoSupportsIncludeField": False,
            "supportsReject": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "omitQuotationForMultipartRequest": True,
            "bulkDataURI": {"enabled": True},
        },
    }
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        # No onboarding tour popping over the viewport (OHIF's `ohif.tours` customization).
        "customizationService": {"ohif.tours": {"$set": []}},
        "defaultDataSourceName": "orthanc",
        "dataSources": [data_source],
    }
    return "window.config = " + json.dumps(config, indent=2) + ";\n"


class _Handler(http.server.SimpleHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server's name
        # Requests go to the server's log file instead of stderr (pytest would show hundreds of lines).
        with self.server.lock:
            self.server.log.write(f"{self.log_date_time_string()} {format % args}\n")
            self.server.log.flush()

    def end_headers(self) -> None:
        # OHIF uses SharedArrayBuffer in its decoders when the page is cross-origin isolated.
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        super().end_headers()

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self._route()

    def do_HEAD(self) -> None:  # noqa: N802
        self._route()

    def do_POST(self) -> None:  # noqa: N802
        if self._proxied():
            self._forward()
        else:
            self.send_error(405)

    def _proxied(self) -> bool:
        return urlsplit(self.path).path.startswith(PROXIED_PREFIXES)

    def _route(self) -> None:
        path = urlsplit(self.path).path
        if self._proxied():
            self._forward()
            return
        if path == "/app-config.js":
            body = self.server.app_config.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/javascript; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            return
        local = Path(self.translate_path(path))
        if not local.is_file():
            # Single page app: client-side routes (/viewer, /) are index.html.
            self.path = "/index.html"
        super().do_GET() if self.command == "GET" else super().do_HEAD()

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        connection = http.client.HTTPConnection(LOOPBACK, self.server.orthanc_http_port, timeout=PROXY_TIMEOUT_S)
        try:
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            payload = response.read()
        except OSError as exc:
            self.send_error(502, f"Orthanc did not answer: {exc}")
            return
        finally:
            connection.close()
        self.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, dist: Path, orthanc_http_port: int, log_path: Path) -> None:
        super().__init__((LOOPBACK, 0), lambda *a: _Handler(*a, directory=str(dist)))
        self.orthanc_http_port = orthanc_http_port
        self.app_config = app_config_js(f"http://{LOOPBACK}:{self.server_address[1]}")
        self.lock = threading.Lock()
        self.log = open(log_path, "a", encoding="utf-8")


@dataclass
class OhifServer:
    """OHIF's dist/ plus a same-origin proxy to Orthanc's DICOMweb, on a free loopback port."""

    dist: Path
    orthanc_http_port: int
    log_path: Path
    _server: _Server | None = field(default=None, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def viewer_url(self, study_instance_uid: str) -> str:
        return f"{self.url}/viewer?StudyInstanceUIDs={study_instance_uid}"

    def start(self) -> OhifServer:
        if not (self.dist / "index.html").is_file():
            raise FileNotFoundError(f"OHIF dist folder {self.dist} has no index.html (run scripts/test.sh)")
        self._server = _Server(self.dist, self.orthanc_http_port, self.log_path)
        self._thread = threading.Thread(target=self._server.serve_forever, name="ohif-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server.log.close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> OhifServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def chromium_executable() -> Path | None:
    """Debian's Chromium binary (not the /usr/bin/chromium shell launcher, which Playwright cannot pass flags through reliably)."""
    for candidate in (Path("/usr/lib/chromium/chromium"), Path("/usr/bin/chromium")):
        if candidate.is_file():
            return candidate
    found = shutil.which("chromium")
    return Path(found) if found else None
