#!/usr/bin/env bash
# Rebuild the shipped DEMONSTRATION model with the paper's full method (docs/training.md,
# "How the demonstration model was made"): a simulated cohort of chest CT phantoms calibrated to
# Zhao et al. 2023, then `sclc-node train` with the committed spec, then the model card.
#   bash scripts/make_demo_model.sh [WORKDIR]
# Environment: SCALE (cohort size as a fraction of the paper's 436 patients; default 1.0),
# WORKERS (extraction processes; default: the CPU count).  Rerunning with the same WORKDIR
# resumes: a complete cohort (its cohort.csv) is reused and so are the features already cached.
# Needs the research commands: pip install -e '.[train]'.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d -t sclc-demo-model-XXXXXX)}"
scale="${SCALE:-1.0}"
spec="$repo/models/training/demo-integrated-cox.spec.toml"
version="$(python3 -c 'import sys,tomllib; print(tomllib.load(open(sys.argv[1],"rb"))["model"]["version"])' "$spec")"
workers=()
if [ -n "${WORKERS:-}" ]; then workers=(--workers "$WORKERS"); fi
if [ ! -f "$work/cohort/cohort.csv" ]; then
    rm -rf "$work/cohort"  # an interrupted simulation leaves no cohort.csv: start it again
    sclc-node simulate-cohort "$work/cohort" --seed 2023 --scale "$scale"
fi
sclc-node train --cohort "$work/cohort/cohort.csv" --spec "$spec" \
    --out "$repo/models/demo-integrated-cox-$version.json" \
    --report "$work/report" --cache "$work/feature-cache" --force "${workers[@]}"
cp "$work/report/model-card.md" "$repo/docs/model-card-demo.md"
echo "model: models/demo-integrated-cox-$version.json; report: $work/report/report.html"
