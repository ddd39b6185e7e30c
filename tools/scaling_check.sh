#!/usr/bin/env bash
# Multi-GPU check (issue 7): the same 786,432-token global batch and the same tokens per step on 1 GPU (8 micro-steps)
# and on 2 GPUs over NCCL (4 micro-steps each); prints both loss curves and the scaling efficiency.
#   bash tools/scaling_check.sh CORPUS.jsonl[.xz] TOKENIZER.model [OUT_DIR=logs]      (needs 2 GPUs, about 7 minutes)
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
CORPUS=$1 TOKENIZER=$2 OUT=${3:-logs} WORK=${WORK:-/tmp/pg_scaling}
mkdir -p "$OUT" "$WORK"
python3 "$REPO/prepare_caseops_data.py" --docs "$CORPUS" --max-docs 8000 --out "$WORK/data" --tokenizer "$TOKENIZER" --val-docs 50 \
  --shard-tokens 10000000 --overwrite > "$OUT/scale_prep.log" 2>&1 || { tail -5 "$OUT/scale_prep.log"; exit 1; }
export DATA_DIR=$WORK/data ITERATIONS=30 MAX_WALLCLOCK_SECONDS=0 TRAIN_LOG_EVERY=1 VAL_LOSS_EVERY=0 TTT_ENABLED=0 \
  WARMUP_STEPS=3 GPTQ_CALIBRATION_BATCHES=2 SEED=0
RUN_ID=scale_1gpu ARTIFACT_DIR=$WORK/s1 CUDA_VISIBLE_DEVICES=0 torchrun --standalone --nproc_per_node=1 "$REPO/train_gpt.py" > "$OUT/scale_1gpu.log" 2>&1
RUN_ID=scale_2gpu ARTIFACT_DIR=$WORK/s2 torchrun --standalone --nproc_per_node=2 "$REPO/train_gpt.py" > "$OUT/scale_2gpu.log" 2>&1
python3 - "$OUT" <<'PY'
import re, sys
def parse(name):
    text = open(f"{sys.argv[1]}/{name}").read()
    return {int(a): (float(b), float(c)) for a, b, c in re.findall(r"^(\d+)/30 train_loss: ([\d.]+) train_time: \S+ tok/s: (\d+)", text, re.M)}
one, two = parse("scale_1gpu.log"), parse("scale_2gpu.log")
for s in sorted(one):
    print(s, one[s][0], two.get(s, (None,))[0])
gaps = [abs(one[s][0] - two[s][0]) for s in one if s in two]
print("steps compared", len(gaps), "max |loss diff|", max(gaps) if gaps else None)
print("tok/s 1 GPU", one[max(one)][1], "2 GPUs", two[max(two)][1], "efficiency", two[max(two)][1] / (2 * one[max(one)][1]))
PY
