#!/usr/bin/env bash
# Offline end-to-end check of an install (CPU is enough, no network):
#   prepare data -> train a tiny model -> GPTQ int6 + Brotli artifact -> phased score-first TTT eval.
# Data: the FineWeb sample ../shared/data/fineweb_sample_200.jsonl with the public CaseOps SP8192
# tokenizer when both exist, else English docstrings of installed Python modules with a freshly
# trained 1024-piece CaseOps tokenizer. Runs 2 ranks over gloo (SMOKE_NPROC=1 for one process).
# Exits non-zero unless the final `quantized_ttt_phased val_loss:... val_bpb:...` line appears.
#   bash tools/smoke.sh            env: SMOKE_DIR (work dir, kept; default a temp dir, removed on success),
#                            SMOKE_NPROC (2), PYTHON (python3)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
NPROC=${SMOKE_NPROC:-2}
WORK=${SMOKE_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/pg_smoke.XXXXXX")}  # a temp dir is removed after success
mkdir -p "$WORK"
SAMPLE="$REPO/../shared/data/fineweb_sample_200.jsonl"
TOKENIZER="$REPO/../shared/data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
T0=$(date +%s)
say() { echo "smoke [$(( $(date +%s) - T0 ))s] $*"; }

# 1. data: val = 8 short docs (TTT cost grows with doc length), train = all the others
if [ -f "$SAMPLE" ] && [ -f "$TOKENIZER" ]; then
    say "data: FineWeb sample + CaseOps SP8192 tokenizer"
    SRC=$SAMPLE
    TOK=(--tokenizer "$TOKENIZER")
else
    say "data: docstrings of installed Python modules + a trained 1024-piece tokenizer (no ../shared/data)"
    SRC=""
    TOK=(--train-tokenizer --vocab-size 1024)
fi
DOCS="$WORK/docs.jsonl"
"$PY" - "$REPO" "$SRC" "$DOCS" <<'PYEOF'
import json, sys
repo, src, out = sys.argv[1:]
if src:
    docs = [json.loads(line)["text"] for line in open(src, encoding="utf-8") if line.strip()]
else:
    sys.path.insert(0, repo + "/tests")
    from conftest import generated_docs
    docs = generated_docs(200)
val = [i for i, d in enumerate(docs) if 300 <= len(d) <= 1500][:8]
order = val + [i for i in range(len(docs)) if i not in val]
with open(out, "w", encoding="utf-8") as f:
    for i in order:
        f.write(json.dumps({"text": docs[i]}) + "\n")
PYEOF
"$PY" "$REPO/prepare_caseops_data.py" --docs "$DOCS" --out "$WORK/data" --val-docs 8 --shard-tokens 200000 \
    --workers 1 --overwrite "${TOK[@]}" > "$WORK/prepare.log" 2>&1 || { cat "$WORK/prepare.log"; exit 1; }
VOCAB=$("$PY" -c "import glob, sys, sentencepiece as s; print(s.SentencePieceProcessor(model_file=glob.glob(sys.argv[1] + '/tokenizers/*.model')[0]).vocab_size())" "$WORK/data")
say "prepared $WORK/data (vocab $VOCAB)"

# 2-4. train (tiny model, step-based schedule) -> quantize -> phased TTT eval, in one trainer run
export DATA_DIR="$WORK/data" VOCAB_SIZE="$VOCAB" ARTIFACT_DIR="$WORK/run" RUN_ID=smoke SEED=0 \
    NUM_LAYERS=4 MODEL_DIM=64 NUM_HEADS=4 NUM_KV_HEADS=2 LOOP_START=1 LOOP_END=2 PARALLEL_START_LAYER=3 XSA_LAST_N=4 \
    TRAIN_BATCH_TOKENS=$((2048 * NPROC)) GRAD_ACCUM_STEPS=1 EMA_DECAY=0.9 TRAIN_SEQ_LEN=256 EVAL_SEQ_LEN=256 VAL_BATCH_TOKENS=4096 \
    ITERATIONS=30 MAX_WALLCLOCK_SECONDS=0 WARMUP_STEPS=1 VAL_LOSS_EVERY=0 TRAIN_LOG_EVERY=10 COMPILE=0 \
    GPTQ_CALIBRATION_BATCHES=1 GPTQ_CALIBRATION_SEQS=2 \
    TTT_EVAL_SEQ_LEN=256 TTT_CHUNK_SIZE=64 TTT_BATCH_SIZE=4 TTT_LORA_RANK=4 TTT_LORA_ALPHA=7.2 PHASED_TTT_PREFIX_DOCS=4 \
    PHASED_TTT_NUM_PHASES=2 GLOBAL_TTT_CHUNK_TOKENS=512 \
    OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
unset RANK WORLD_SIZE LOCAL_RANK
mkdir -p "$ARTIFACT_DIR"
if [ "$NPROC" -gt 1 ]; then
    CMD=("$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" "$REPO/train_gpt.py")
else
    CMD=("$PY" "$REPO/train_gpt.py")
fi
say "train + quantize + TTT eval: ${CMD[*]}"
set +e
(cd "$ARTIFACT_DIR" && "${CMD[@]}") > "$WORK/train.log" 2>&1
RC=$?
set -e
grep -E "^(attn_backend|hardware|world_size|val_bpb:|val_tokens:|model_params|[0-9]+/[0-9]+ train_loss|diagnostic |Serialized model quantized|Total submission size|ttt_phased:|total_eval_time)" "$WORK/train.log" || true
FINAL=$(grep -E "^quantized_ttt_phased val_loss:[0-9.]+ val_bpb:[0-9.]+" "$WORK/train.log" | tail -n 1 || true)
if [ "$RC" -ne 0 ] || [ -z "$FINAL" ]; then
    tail -n 40 "$WORK/train.log"
    say "FAILED (exit $RC${FINAL:+, final line present}${FINAL:-, no quantized_ttt_phased line}); full log: $WORK/train.log"
    exit 1
fi
echo "$FINAL"
if [ -z "${SMOKE_DIR:-}" ]; then
    rm -rf "$WORK"
    say "OK in $(( $(date +%s) - T0 ))s"
else
    say "OK in $(( $(date +%s) - T0 ))s; work dir $WORK"
fi
