#!/usr/bin/env bash
# Rebuild the shipped DEMONSTRATION model with the paper's full method (docs/training.md,
# "How the demonstration model was made"): a simulated cohort calibrated to Zhao et al. 2023,
# then `sclc-node train` with the committed spec.  About 10 minutes on 2 cores.
#   bash scripts/make_demo_model.sh [WORKDIR]
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d -t sclc-demo-model-XXXXXX)}"
version="$(python3 -c 'import sys,tomllib; print(tomllib.load(open(sys.argv[1],"rb"))["model"]["version"])' \
    "$repo/models/training/demo-integrated-cox.spec.toml")"
sclc-node simulate-cohort "$work/cohort" --seed 2023 --scale 1.0
sclc-node train --cohort "$work/cohort/cohort.csv" \
    --spec "$repo/models/training/demo-integrated-cox.spec.toml" \
    --out "$repo/models/demo-integrated-cox-$version.json" \
    --report "$work/report" --cache "$work/feature-cache" --force
cp "$work/report/model-card.md" "$repo/docs/model-card-demo.md"
echo "model: models/demo-integrated-cox-$version.json; report: $work/report/report.html"
