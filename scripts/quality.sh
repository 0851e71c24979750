#!/usr/bin/env bash
# The quality gate (CI runs it before the tests; `pre-commit` runs the same tools):
#   ruff check, ruff format --check, mypy --strict on scoring/ and dicom_io/, mypy on node/ and research/.
#   --mypy-only: the mypy part alone (pre-commit runs ruff itself).
# Configuration: pyproject.toml ([tool.ruff], [tool.mypy]).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"

if [ "${1:-}" != "--mypy-only" ]; then
    ruff check .
    ruff format --check .
fi

# The folders install as sclc_risk_node.node etc. (package-dir), and mypy cannot follow
# setuptools' editable-install import hook, so mypy reads a view of the folders laid out
# as the installed namespace.  The view is symlinks only: mypy reports the real files.
view="$(mktemp -d)"
trap 'rm -rf "$view"' EXIT
mkdir "$view/sclc_risk_node"
for folder in node dicom_io scoring models config research; do
    ln -s "$repo/$folder" "$view/sclc_risk_node/$folder"
done
mypy_run() {
    (cd "$view" && MYPYPATH="$view" python3 -m mypy --config-file "$repo/pyproject.toml" \
        --cache-dir "$repo/.mypy_cache" "$@")
}
mypy_run --strict sclc_risk_node/scoring sclc_risk_node/dicom_io
# Modules imported from scoring/ and dicom_io/ were checked strictly above; here only node/ and research/.
mypy_run --follow-imports=silent sclc_risk_node/node sclc_risk_node/research
