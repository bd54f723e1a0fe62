#!/usr/bin/env bash
# The main job on the embedded default model: segment held-out ShapesWorld scenes with T2M.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
OUT=${OUT:-demo}
attnseg shapes export "$OUT/scenes" --n 16 --seed 1
attnseg segment "$OUT/scenes/JPEGImages" --labels-file "$OUT/scenes/labels.json" --method t2m --out "$OUT/masks"
attnseg eval "$OUT/scenes" --method cross --method t2m --method iseg --out "$OUT/report"
echo "masks, overlays and scores in $OUT/masks; mIoU table in $OUT/report/report.md"
