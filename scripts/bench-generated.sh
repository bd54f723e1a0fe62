#!/usr/bin/env bash
# Masks of generated images, measured two ways (docs/BENCHMARKS.md, "Generated images"):
#  1. oracle: CA, CA.SA and SeeDiff masks of the same generated images scored against the ShapesWorld
#     colour oracle (attnseg score-generated);
#  2. Protocol II: a small segmenter trained on each generated dataset, scored on 200 real held-out
#     ShapesWorld scenes (attnseg train-segmenter, attnseg eval --segmenter), with a segmenter trained on
#     real scenes with exact masks as the supervised reference.
# Every step is resumable: run the same command again after an interruption.
# Usage: bash scripts/bench-generated.sh [OUT] (env: PROMPTS=96 PER=2 STEPS=25 SEG_STEPS=2000 MODEL=)
set -euo pipefail
OUT=${1:-bench-generated}
PROMPTS=${PROMPTS:-96}
PER=${PER:-2}
STEPS=${STEPS:-25}
SEG_STEPS=${SEG_STEPS:-2000}
MODEL_ARGS=()
if [ -n "${MODEL:-}" ]; then MODEL_ARGS=(--model "$MODEL"); fi
mkdir -p "$OUT"
attnseg shapes prompts "$OUT/prompts.jsonl" --n "$PROMPTS" --seed 3
GENS=(ca ca-sa seediff seediff-code)
for g in "${GENS[@]}"; do
  m=${g%-code}; preset=(); [ "$g" = seediff-code ] && preset=(--preset code)
  attnseg generate --prompts "$OUT/prompts.jsonl" --per-class "$PER" --method "$m" "${preset[@]}" --steps "$STEPS" \
    --guidance 5 --seed 0 --block 4 "${MODEL_ARGS[@]}" --out "$OUT/gen-$g"
done
attnseg score-generated "${GENS[@]/#/$OUT/gen-}" --out "$OUT/oracle.json" | tee "$OUT/oracle.md"
# real scenes: seed 2 for the supervised reference, seed 1 (as every other evaluation) for the test
[ -d "$OUT/real-train" ] || attnseg shapes export "$OUT/real-train" --n $((PROMPTS * PER)) --seed 2 --split train
[ -d "$OUT/real-test" ] || attnseg shapes export "$OUT/real-test" --n 200 --seed 1
SEGS=()
for d in "${GENS[@]/#/gen-}" real-train; do
  attnseg train-segmenter "$OUT/$d" --out "$OUT/seg-$d" --steps "$SEG_STEPS" --threads 1
  SEGS+=(--segmenter "$OUT/seg-$d")
done
attnseg eval "$OUT/real-test" "${SEGS[@]}" --out "$OUT/protocol2" | tee "$OUT/protocol2.md"
