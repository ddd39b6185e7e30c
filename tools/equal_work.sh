#!/usr/bin/env bash
# Equal-work fidelity run (issue 12): the web-text corpus with its first 200 docs as val, 240 steps of 393,216 tokens
# on one GPU (8 micro-steps of 49,152), in-loop val every 80 steps at EVAL_LOOP_DEPTH, then EMA, GPTQ and the
# quantized diagnostic (no TTT). Compare the post-EMA line with the PR #1756 script's on the same data and seed.
#   bash tools/equal_work.sh CORPUS.jsonl[.xz] TOKENIZER.model OUT_DIR SEED [SEED ...]
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
CORPUS=$1 TOKENIZER=$2 OUT=$3; shift 3
WORK=${WORK:-/tmp/pg_equal_work}
mkdir -p "$OUT" "$WORK"
[ -d "$WORK/data" ] || python3 "$REPO/prepare_caseops_data.py" --docs "$CORPUS" --out "$WORK/data" --tokenizer "$TOKENIZER" \
  --val-docs 200 --workers "$(nproc)" > "$OUT/equal_work_prep.log" 2>&1 || { tail -5 "$OUT/equal_work_prep.log"; exit 1; }
export DATA_DIR=$WORK/data ITERATIONS=240 MAX_WALLCLOCK_SECONDS=0 TRAIN_BATCH_TOKENS=393216 WARMUP_STEPS=5 \
  VAL_LOSS_EVERY=80 WD_TAPER_FINAL_MULT=1 TRAIN_LOG_EVERY=20 TTT_ENABLED=0
for SEED in "$@"; do
  SEED=$SEED RUN_ID=equal_work_seed$SEED ARTIFACT_DIR=$WORK/s$SEED python3 "$REPO/train_gpt.py" > "$OUT/equal_work_seed$SEED.log" 2>&1
  grep -E "^240/240 val|post-ema|diagnostic quantized|peak memory" "$OUT/equal_work_seed$SEED.log"
done
