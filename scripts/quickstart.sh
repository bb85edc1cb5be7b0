#!/usr/bin/env bash
# One command from a fresh clone: install LibTorch (the torch Python package) if missing, install
# and build, then run the main job (customdiff demo) on the embedded default model.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! node scripts/find-libtorch.js --json >/dev/null 2>&1; then
  echo "quickstart: installing the torch Python package (LibTorch)"
  python3 -m pip install --quiet torch
fi
JOBS=2 npm ci --no-audit --no-fund
npm run build:ts
node bin/customdiff.js doctor
# The main job: teach the embedded toy model (models/toy) two new concepts, then merge and compress
# them; prints where the HTML report is.
node bin/customdiff.js demo --output-dir customdiff-demo --overwrite
