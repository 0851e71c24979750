#!/usr/bin/env bash
# Fresh-machine set-up for the test suite, then the tests.  Idempotent.
#   Debian tools: Orthanc (test PACS), DCMTK (storescu, dsrdump, dcmcjpeg...),
#   dicom3tools (dciodvfy), PixelMed (SR template validator), GNU time (benchmarks: peak RSS).
#   Python: the node itself (editable) plus the test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(orthanc dcmtk dicom3tools libpixelmed-java default-jre-headless systemd openssl time)
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

exec python3 -m pytest "$@"
