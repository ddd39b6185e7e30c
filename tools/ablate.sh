#!/usr/bin/env bash
# Fixed-step ablations (issue 15): the web-text corpus with its first 200 docs as val, STEPS (default 400) steps of
# 393,216 tokens on one GPU (8 micro-steps of 49,152), MAX_WALLCLOCK_SECONDS=0, live val at the last step only, no TTT;
# then EMA, GPTQ and the quantized diagnostic. One GPU is a proxy for the 8xH100 run: compare variants, not BPB levels.
# ttt_* variants score one artifact (ARTIFACT, default: this seed's default run) with phased TTT via EVAL_ONLY, on
# TTT_DATA_DIR (default: the same web-text val) and VAL_DOC_FRACTION (default 1). PARALLEL=1 runs the variants at once.
#   bash tools/ablate.sh CORPUS.jsonl[.xz] TOKENIZER.model OUT_DIR SEED VARIANT [VARIANT ...]
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
CORPUS=$1 TOKENIZER=$2 OUT=$3 SEED=$4; shift 4
WORK=${WORK:-/tmp/pg_ablate}
declare -A VARIANTS=(
  [default]=""
  [smear]="SMEAR_GATE_ENABLED=1"
  [sparse_gate]="SPARSE_ATTN_GATE_ENABLED=1 SPARSE_ATTN_GATE_SCALE=0.5"
  [polar]="MUON_POLAR_EXPRESS=1"
  [min_lr]="MIN_LR=0.1 WARMDOWN_FRAC=0.85"
  [beta2]="BETA2=0.99"
  [unfused_ce]="FUSED_CE_ENABLED=0"
  [compile_blocks]="COMPILE_MODEL=0"  # issue 16: the same maths, each block function its own graph (the default before 7ed6647)
  [fusion_uncapped]="FUSION_MAX_BUFFERS=0"  # issue 16: Inductor's fusion uncapped (x0 stays fp32)
  [set1855]="SMEAR_GATE_ENABLED=1 SPARSE_ATTN_GATE_ENABLED=1 SPARSE_ATTN_GATE_SCALE=0.5 MUON_POLAR_EXPRESS=1 MIN_LR=0.1
             WARMDOWN_FRAC=0.85 BETA2=0.99 MLP_CLIP_SIGMAS=11.5 EMBED_CLIP_SIGMAS=14.0"
  [ttt_default]=""  # #1855's TTT (rank 80, alpha 144, warm-start A, beta2 0.99); below: #1756's, then one at a time
  [ttt_1756]="TTT_LORA_RANK=96 TTT_LORA_ALPHA=0 TTT_WARM_START_A=0 TTT_BETA2=0.999"
  [ttt_rank96]="TTT_LORA_RANK=96"
  [ttt_no_alpha]="TTT_LORA_ALPHA=0"
  [ttt_fresh_a]="TTT_WARM_START_A=0"
  [ttt_beta2_999]="TTT_BETA2=0.999"
)
# The records' EMA (0.9965) spans 1/(1-0.9965) = 286 steps, 5.8% of a 4,950-step run; at 400 steps it would still hold
# 25% of the initial weights (0.9965^400). Keep the records' relative horizon instead: 1 - 1/(0.058 * STEPS).
EMA=${EMA_DECAY:-$(python3 -c "print(round(1 - 1 / (0.058 * ${STEPS:-400}), 4))")}
mkdir -p "$OUT" "$WORK"
[ -d "$WORK/data" ] || python3 "$REPO/prepare_caseops_data.py" --docs "$CORPUS" --out "$WORK/data" --tokenizer "$TOKENIZER" \
  --val-docs 200 --workers "$(nproc)" > "$OUT/ablate_prep.log" 2>&1 || { tail -5 "$OUT/ablate_prep.log"; exit 1; }
run() {  # run VARIANT: one training run, or one TTT scoring of ARTIFACT (ttt_*); prints its result line
  local V=$1 NAME=ablate_${1}_s${SEED} MODE KEY
  if [[ $V == ttt_* ]]; then
    MODE="DATA_DIR=${TTT_DATA_DIR:-$WORK/data} EVAL_ONLY=1 VAL_DOC_FRACTION=${VAL_DOC_FRACTION:-1}
          ARTIFACT=${ARTIFACT:-$WORK/ablate_default_s$SEED/final_model.int6.ptz}"
    KEY="val_set|quantized_ttt_phased|total_eval_time"
  else
    MODE="DATA_DIR=$WORK/data ITERATIONS=${STEPS:-400} MAX_WALLCLOCK_SECONDS=0 TRAIN_BATCH_TOKENS=393216 WARMUP_STEPS=5
          VAL_LOSS_EVERY=${STEPS:-400} TRAIN_LOG_EVERY=${LOG_EVERY:-50} TTT_ENABLED=0 EMA_DECAY=$EMA"
    KEY="^[0-9]+/[0-9]+ val|post-ema|diagnostic quantized|total_bytes|peak memory"
  fi
  env $MODE SEED=$SEED RUN_ID=$NAME ARTIFACT_DIR=$WORK/$NAME ${VARIANTS[$V]} python3 "$REPO/train_gpt.py" > "$OUT/$NAME.log" 2>&1
  echo "$NAME: $(grep -E "$KEY" "$OUT/$NAME.log" | tr '\n' ' ')"
}
for V in "$@"; do
  [ -n "${VARIANTS[$V]+x}" ] || { echo "unknown variant $V (${!VARIANTS[*]})"; exit 2; }
  [[ ${PARALLEL:-0} == 1 && $V == ttt_* && " $* " == *" default "* && -z ${ARTIFACT:-} ]] &&
    { echo "PARALLEL=1: $V would score the default run's artifact before it exists; run ttt_* variants afterwards"; exit 2; }
done
if [ "${PARALLEL:-0}" != 1 ]; then
  for V in "$@"; do run "$V"; done
  exit 0
fi
# PARALLEL=1: all variants at once, the k-th on GPU k mod GPUS (GPUS: the visible GPUs; on one GPU they share it,
# which costs ~8% of throughput but overlaps the compile and evaluation phases: docs/ABLATIONS.md)
GPUS=${GPUS:-$(nvidia-smi -L 2>/dev/null | grep -c ^GPU)}
k=0
for V in "$@"; do
  CUDA_VISIBLE_DEVICES=$((k % (GPUS > 0 ? GPUS : 1))) run "$V" & k=$((k + 1))
done
wait
