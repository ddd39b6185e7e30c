#!/usr/bin/env bash
# Trainer against trainer on one GPU (issue 16): our train_gpt.py and a record script (PR #1756's train_gpt.py, not
# shipped here) on the same prepared data, seed and config, at a fixed recurrence depth from step 0, 30 steps of
# 786,432 tokens (8 micro-steps of 98,304 tokens: the records' per-GPU micro-batch). FA3 is replaced by
# tools/fa3_stand_in (torch varlen_attn). Prints tok/s over steps 10-30 and the peak memory line of each; each run is
# stopped once it has logged its peak memory (the script then goes on to EMA, GPTQ and evaluation). BATCH=393216 gives
# issue 16's own setting (8 micro-steps of 49,152 tokens). Time on one H200: ours 1.5 / 2.6 min at depth 1 / 4, the
# script 4 / 8-9 min (its warm-up compiles one graph per cu_seqlens bucket: over 7 min at depth 4).
#   [BATCH=786432] bash tools/compare_script.sh RECORD_TRAIN_GPT.py DATA_DIR OUT_DIR [DEPTH]
#   DATA_DIR: prepare_caseops_data.py's --out (the script reads its shards through DATA_PATH)
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
SCRIPT=$(realpath "$1") DATA=$(realpath "$2") OUT=$(realpath -m "$3") DEPTH=${4:-4} BATCH=${BATCH:-786432}
SHARDS=$(dirname "$(ls "$DATA"/datasets/*/fineweb_train_*.bin | head -1)")
TOK=$(ls "$DATA"/tokenizers/*.model | head -1)
mkdir -p "$OUT/script_run/logs"
COMMON="ITERATIONS=30 MAX_WALLCLOCK_SECONDS=0 TRAIN_BATCH_TOKENS=$BATCH VAL_LOSS_EVERY=0 TRAIN_LOG_EVERY=5 TTT_ENABLED=0
        TRAIN_LOOP_PHASE_DEPTHS=$DEPTH EVAL_LOOP_DEPTH=$DEPTH SEED=42"
until_peak() {  # until_peak LOG CMD...: run CMD in its own process group until LOG shows the peak memory line
  local log=$1; shift
  setsid "$@" > "$log" 2>&1 & local pid=$!
  while kill -0 $pid 2>/dev/null; do grep -q "^peak memory" "$log" && { sleep 1; kill -- -$pid; break; }; sleep 2; done
  wait $pid 2>/dev/null
}
until_peak "$OUT/ours_d$DEPTH.log" env $COMMON DATA_DIR="$DATA" WARMUP_STEPS=2 TRAIN_LOOP_PREWARM_DEPTHS= \
  RUN_ID=ours_d$DEPTH ARTIFACT_DIR="$OUT/ours_run" python3 "$REPO/train_gpt.py"
(cd "$OUT/script_run" && until_peak "$OUT/script_d$DEPTH.log" env $COMMON PYTHONPATH="$REPO/tools/fa3_stand_in:${PYTHONPATH:-}" \
  CASEOPS_ENABLED=1 DATA_PATH="$SHARDS" TOKENIZER_PATH="$TOK" VAL_BATCH_TOKENS=131072 WARMUP_STEPS=1 \
  TRAIN_LOOP_PREWARM_DEPTHS=$DEPTH GATED_ATTN_ENABLED=1 GATED_ATTN_INIT_STD=0.005 GATED_ATTN_QUANT_GATE=1 \
  RUN_ID=script_d$DEPTH ARTIFACT_DIR="$OUT/script_run" python3 "$SCRIPT")
for run in ours script; do
  python3 - "$OUT/${run}_d$DEPTH.log" "$BATCH" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
rate = {int(s): float(r) for s, r in re.findall(r"^(\d+)/30 train_loss: \S+ train_time: \S+ tok/s: (\d+)", text, re.M)}
batch = int(sys.argv[2])
t = lambda s: s * batch / rate[s]  # the logged tok/s is a running mean since the warm-up
tps = 20 * batch / (t(30) - t(10)) if {10, 30} <= rate.keys() else float("nan")
print(f"{sys.argv[1]}: tok/s steps 10-30 {tps:,.0f}; {''.join(re.findall(r'peak memory.*', text)) or 'no peak line'}")
PY
done
