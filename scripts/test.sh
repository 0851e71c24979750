#!/usr/bin/env bash
# Fresh-machine set-up for the test suite, then the tests.  Idempotent.
#   Debian tools: Orthanc (test PACS), DCMTK (storescu, dsrdump, dcmcjpeg...),
#   dicom3tools (dciodvfy), PixelMed (SR template validator), GNU time (benchmarks: peak RSS); for the browser
#   tests (tests/viewer) Orthanc's DICOMweb plugin, Chromium and a font.
#   Python: the node itself (editable) plus the test extras (which include [train] and the
#   pinned quality-gate tools ruff and mypy; Playwright drives
#   Debian's Chromium, it never downloads a browser of its own).
#   npm: OHIF Viewer's built app (@ohif/app ships dist/), version pinned in
#   tests/viewer/ohif-version.txt, unpacked into the user's cache, not the repo.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(orthanc dcmtk dicom3tools libpixelmed-java default-jre-headless systemd openssl time
                 orthanc-dicomweb chromium fonts-dejavu-core)
command -v npm >/dev/null 2>&1 || DEBIAN_PACKAGES+=(npm)
missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

python3 -m pip install -q -e '.[test]'

# OHIF's dist/ only: `npm pack` fetches the one tarball (checked against the registry's integrity hash)
# without installing its hundreds of build-time dependencies.
OHIF_VERSION="$(tr -d '[:space:]' < tests/viewer/ohif-version.txt)"
OHIF_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/sclc-risk-node-tests/ohif/$OHIF_VERSION"
if [ ! -f "$OHIF_DIR/dist/index.html" ]; then
    download="$(mktemp -d)"
    (cd "$download" && npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null)
    mkdir -p "$OHIF_DIR"
    tar -xzf "$download"/ohif-app-"$OHIF_VERSION".tgz -C "$download"
    rm -rf "$OHIF_DIR/dist" && mv "$download/package/dist" "$OHIF_DIR/dist"
    rm -rf "$download"
fi

# The quality gate (ruff, mypy; docs/development.md) before any test: a red gate stops here.
bash scripts/quality.sh

exec python3 -m pytest "$@"
