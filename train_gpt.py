"""Parameter Golf CaseOps record stack: train, quantize (GPTQ int6 + Brotli) and score (phased score-first TTT).

Launch: torchrun --standalone --nproc_per_node=8 train_gpt.py   (every setting is an env var; see Hyperparameters)

The pipeline (main), section by section:
  CONFIG      Hyperparameters.from_env(): every knob, typed and checked before anything runs
  DATA        shards checked (headers, sizes), val tokens + per-target original bytes, a document-packing loader
  MODEL       11x512 GPT: U-Net skips, layers 3-5 looped (depth curriculum 1 -> 3 -> 4), parallel lanes from layer 8,
              gated attention; each caller passes a Fwd (depth, block functions, TTT adapters, GPTQ hook)
  OPTIMIZER   banked Muon (matrices) + AdamW (embedding, scalars), WD taper, EMA
  TRAINING    compile warm-up (undone), then steps until MAX_WALLCLOCK_SECONDS - GPTQ_RESERVE_SECONDS; EMA applied
  QUANTIZATION  GPTQ int6/int7 with Hessians from training data, Brotli artifact + code wrapper <= 16,000,000 bytes
  EVALUATION  the artifact reloaded and scored (BPB over original UTF-8 bytes), then
  TEST-TIME TRAINING  phased score-first TTT: per-document LoRA + global SGD on scored documents (the reported score)
"""
import base64, copy, functools, glob, inspect, io, json, lzma, math, os, queue, sys, threading, time, uuid, zlib
from datetime import timedelta
from dataclasses import dataclass, fields
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

# ----------------------------------------------------------------------------- CONFIG


class DataError(RuntimeError):
    """Bad input (data, tokenizer, artifact, settings): main prints it as one `error:` line, no traceback."""


class ConfigError(DataError):
    pass


BOOLS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
# Env names of the record scripts that this one does not read (README says why each): set, they would silently
# change nothing, so they are warned about.
RECORD_ENV_NOT_READ = ("PHASED_TTT_ENABLED GLOBAL_TTT_BATCH_SEQS GLOBAL_TTT_WARMUP_START_LR GLOBAL_TTT_WARMUP_CHUNKS "
                       "GLOBAL_TTT_RESPECT_DOC_BOUNDARIES TTT_OPTIMIZER TIE_EMBEDDINGS SKIP_GATES_ENABLED ROPE_YARN "
                       "ROPE_TRAIN_SEQ_LEN ATTN_OUT_GATE_ENABLED TRAIN_LOOP_DEPTH_DIST").split()
# RECIPE=<PR>: a record's run command in one word, as its differences from our defaults (C's run with the WD taper,
# #1855's TTT and compressor); explicit env vars win. tests/test_recipes.py checks each against the record's command
# line on its code defaults.
_B = dict(train_loop_phase_depths=(), train_loop_prewarm_depths=(), eval_loop_depth=3, wd_taper_final_mult=1.0)
_PRE_1855 = dict(compressor="brotli", ttt_lora_rank=96, ttt_lora_alpha=0.0, ttt_warm_start_a=False, ttt_beta2=0.999)
RECIPES = {"1736": dict(_B, **_PRE_1855), "1756": dict(_PRE_1855, wd_taper_final_mult=1.0),
           "1855": dict(_B, gated_attn_enabled=False, sparse_attn_gate_enabled=True, sparse_attn_gate_scale=0.5,
                        smear_gate_enabled=True, muon_polar_express=True, min_lr=0.1, warmdown_frac=0.85, beta2=0.99,
                        mlp_clip_sigmas=11.5, embed_clip_sigmas=14.0, gptq_reserve_seconds=0.5, val_loss_every=0,
                        phased_ttt_prefix_docs=2500, lqer_enabled=True)}


def parse_env(name, raw, default):
    """`raw` (an env string) as the type of `default`; tuples are comma-separated lists of their items' type. Empty
    gives the default, except for a list (TRAIN_LOOP_PHASE_DEPTHS= turns the curriculum off)."""
    kind = type(default)
    if raw == "" and kind is not tuple:
        return default
    try:
        if kind is bool:
            return BOOLS[raw.strip().lower()]
        if kind is tuple:
            item = type(default[0]) if default else float
            return tuple(item(t) for t in raw.replace(" ", "").split(",") if t)
        return raw if kind is str else kind(raw)
    except (KeyError, ValueError):
        what = {bool: "a boolean (1/0/true/false/yes/no)", int: "an integer", float: "a number",
                tuple: "a comma-separated list of numbers"}[kind]
        raise ConfigError(f"{name}={raw!r} is not {what}; fix or unset {name} (default {default})") from None


@dataclass(frozen=True)
class Hyperparameters:
    """Every setting, read once from env vars by from_env() (name = the field name in capitals).
    Defaults are PR #1756's run configuration except the Muon WD taper (PR #1729), PR #1855's TTT settings and
    per-group compression (measured better here: docs/ABLATIONS.md); RECIPE picks a record's."""

    recipe: str = ""  # 1736, 1756 or 1855: that record's run settings become the defaults (RECIPES; from_env)
    # paths and run control
    data_dir: str = "./data/"  # root with datasets/ and tokenizers/ (prepare_caseops_data.py --out)
    data_path: str = ""  # dataset dir; default: our layout under DATA_DIR, then the records' hub layout
    tokenizer_path: str = ""  # SentencePiece model; default: the dataset's tokenizer under DATA_DIR
    caseops_enabled: bool = True  # CaseOps data with byte sidecars; 0: plain SentencePiece data
    artifact_dir: str = ""  # where logs/, final_model.pt and final_model.int6.ptz go (default: cwd)
    run_id: str = ""  # log name logs/<RUN_ID>.txt (default: random)
    seed: int = 1337  # python/numpy/torch seeds, TTT adapter init
    iterations: int = 20000  # step budget; the schedules run on it when MAX_WALLCLOCK_SECONDS=0
    max_wallclock_seconds: float = 600.0  # training time cap, schedules run on its fraction (0: steps)
    gptq_reserve_seconds: float = 4.0  # cut from the cap for GPTQ calibration, which reads training data
    train_log_every: int = 500  # train_loss line period (steps 1-5 always)
    val_loss_every: int = 4000  # in-loop validation period (and the last step) at EVAL_LOOP_DEPTH; 0: none
    compile: bool = torch.cuda.is_available()  # torch.compile the block functions (fixed shapes)
    compile_model: bool = torch.cuda.is_available()  # with COMPILE: a training step's forward+backward as one graph
    # COMPILE_MODEL: below 1, the partitioner recomputes cheap ops in the backward to keep this share of activations
    activation_memory_budget: float = 1.0
    # COMPILE_MODEL: most buffers one fused kernel may read and write (0: no cap). 16 is 5% faster at depth 4: no kernel
    # has to hold the ~20 virtual layers' x0 gradients at once; x0 is fp32, so the split sum stays fp32 (equal loss)
    fusion_max_buffers: int = 16
    ttt_compile: bool = torch.cuda.is_available()  # compile TTT's block functions (symbolic rows/width)
    ttt_compile_model: bool = True  # with TTT_COMPILE: the TTT forward+backward as one graph (1.7-2.1x the row tok/s)
    ttt_cuda_graphs: bool = True  # replay a long document's TTT tail steps as CUDA graphs (ChunkGraph)
    # attention kernel: fa3, fa4, flex, varlen or sdpa (default: fa3, else fa4 if importable, else flex on CUDA, sdpa)
    attn_backend: str = ""
    eval_only: bool = False  # only score ARTIFACT (no training)
    artifact: str = ""  # artifact scored by EVAL_ONLY (default: ARTIFACT_DIR's final_model.int6.ptz)
    resume_from: str = ""  # final_model.pt to quantize and score instead of training
    prequant_ttt_enabled: bool = False  # refused: PR #1911's pre-quant TTT trains on unscored val tokens
    dist_timeout_seconds: int = 600  # collective timeout: a failed rank ends the run instead of hanging
    rank: int = 0  # set by torchrun
    world_size: int = 1  # set by torchrun
    local_rank: int = 0  # set by torchrun
    # model (PR #1729: 11x512, loop, parallel lanes; #1736: gated attention; #1756: depth curriculum)
    vocab_size: int = 8192  # must equal the tokenizer's piece count
    num_layers: int = 11  # physical layers
    model_dim: int = 512  # residual width
    num_heads: int = 8  # query heads
    num_kv_heads: int = 4  # key/value heads (GQA)
    mlp_mult: float = 4.0  # MLP hidden = MLP_MULT x MODEL_DIM
    tied_embed_init_std: float = 0.005  # init std of the tied embedding / head
    logit_softcap: float = 30.0  # logits = c*tanh(z/c)
    rope_base: float = 10000.0  # RoPE base
    rope_dims: int = 16  # rotated dims per head (partial RoPE)
    ln_scale: bool = True  # block i's norms scaled by 1/sqrt(i+1)
    qk_gain_init: float = 5.0  # init of the per-head query gain after QK RMS norm
    xsa_last_n: int = 11  # the last N layers remove each head's own-value component (XSA)
    # extra passes of layers LOOP_START..LOOP_END: sizes the skips (depth NUM_LOOPS+1) and is the depth of PR #1736's
    # switch (TRAIN_LOOP_PHASE_DEPTHS empty)
    num_loops: int = 2
    loop_start: int = 3  # first looped layer
    loop_end: int = 5  # last looped layer
    enable_looping_at: float = 0.35  # PR #1736's switch to depth NUM_LOOPS+1 (TRAIN_LOOP_PHASE_DEPTHS empty)
    train_loop_phase_depths: tuple = (1, 3, 4)  # PR #1756's depth curriculum; empty: PR #1736's switch
    train_loop_phase_fractions: tuple = ()  # shares of the run per curriculum phase (empty: equal)
    train_loop_prewarm_depths: tuple = (3, 4)  # depths compiled in the warm-up besides the curriculum's
    eval_loop_depth: int = 4  # depth of every evaluation, GPTQ calibration and TTT
    parallel_start_layer: int = 8  # layers from here on run attention and MLP as parallel lanes
    parallel_final_lane: str = "mean"  # final hidden: mean of the lanes, or attn / mlp lane
    gated_attn_enabled: bool = True  # per-head sigmoid gate on the attention output (PR #1736)
    gated_attn_init_std: float = 0.005  # gate weight init std
    gated_attn_quant_gate: bool = True  # gate weights int8 per row instead of fp16
    # sparse attention output gate (PR #1855), replacing the dense one: sigmoid(scale * a[:GATE_WINDOW] W^T) per head
    sparse_attn_gate_enabled: bool = False
    sparse_attn_gate_init_std: float = 0.0  # 0: zero init (gates start at 0.5)
    sparse_attn_gate_scale: float = 1.0  # kappa: a softer gate below 1 (#1855 ran 0.5)
    smear_gate_enabled: bool = False  # BOS-masked SmearGate on the token embedding (PR #1797, BOS fix #1851)
    gate_window: int = 12  # input dims the SmearGate and the sparse attention gate read
    # optimisation and data
    train_batch_tokens: int = 786432  # global tokens per step; a multiple of WORLD_SIZE*accum*TRAIN_SEQ_LEN
    train_seq_len: int = 2048  # longest attention segment in training (documents are packed)
    grad_accum_steps: int = 0  # micro-steps per step (0: 8 / WORLD_SIZE)
    warmup_steps: int = 20  # compile warm-up steps before the timer; their updates are undone
    warmdown_frac: float = 0.75  # LR decays linearly to MIN_LR over this last fraction
    min_lr: float = 0.0  # LR floor of the warmdown, as a fraction of each LR
    matrix_lr: float = 0.026  # Muon LR (banked matrices)
    scalar_lr: float = 0.02  # AdamW LR of scales, gates and lambdas
    tied_embed_lr: float = 0.03  # AdamW LR of the tied embedding
    muon_momentum: float = 0.97  # Muon momentum after its warm-up
    muon_momentum_warmup_start: float = 0.92  # Muon momentum at step 0
    muon_momentum_warmup_steps: int = 1500  # steps of the linear momentum warm-up
    muon_backend_steps: int = 5  # Newton-Schulz iterations
    muon_row_normalize: bool = True  # normalise update rows before Newton-Schulz
    muon_polar_express: bool = False  # Polar Express coefficients, one tuple per iteration (PR #1855's Muon)
    muon_wd: float = 0.095  # decoupled weight decay of the matrices
    wd_taper_start_frac: float = 0.70  # Muon WD taper starts here (PR #1729)
    wd_taper_final_mult: float = 0.50  # Muon WD multiplier at the end; 1: no taper (PR #1736/#1756)
    embed_wd: float = 0.085  # AdamW weight decay of the embedding
    adam_wd: float = 0.02  # AdamW weight decay of the scalars
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    adam_eps: float = 1e-8  # AdamW eps
    grad_clip_norm: float = 0.3  # global grad-norm clip (each rank's local gradients, as the records)
    ema_decay: float = 0.9965  # EMA of the weights, applied after training
    # quantisation and packaging
    matrix_bits: int = 6  # GPTQ bits of the block matrices
    embed_bits: int = 7  # GPTQ bits of the tied embedding
    matrix_clip_sigmas: float = 12.85  # row clip in std units, matrices outside attn/mlp
    attn_clip_sigmas: float = 13.0  # row clip in std units, attention matrices
    mlp_clip_sigmas: float = 12.0  # row clip in std units, MLP matrices
    embed_clip_sigmas: float = 15.0  # row clip in std units, embedding
    gptq_calibration_batches: int = 16  # calibration batches (of training data), shared by the ranks
    gptq_calibration_seqs: int = 48  # sequences per calibration batch
    # artifact compressor: pergroup: each matrix role's codes in one bzip3 stream, lossless and 147-174 KB smaller than
    # brotli on trained weights (docs/BENCHMARKS.md); brotli or lzma: the whole payload, byte-shuffled (the records')
    compressor: str = "pergroup"
    # LQER (PR #1797): after GPTQ, the LQER_TOP_K tensors with the largest ||W - Q*s||_F also ship a quantised rank-r
    # SVD of that error, added back at load
    lqer_enabled: bool = False  # off until measured
    lqer_rank: int = 4  # r: each rank costs rows + cols factor codes per tensor (PR #1855: 4)
    lqer_top_k: int = 3  # the largest errors by Frobenius norm: tok_emb and two mlp.fc in PR #1855's runs
    lqer_factor_bits: int = 4  # per-row bits of both factors on the symmetric path
    lqer_asym_enabled: bool = True  # A int2 with one scale, B int4 in groups (PR #1797): fewer bits than symmetric
    lqer_asym_group: int = 64  # B's group size; the symmetric path when it does not divide numel(B)
    # kernels (CUDA with Triton; elsewhere the plain expressions run)
    fused_ce_enabled: bool = True  # softcap + cross-entropy in one Triton pass over the bf16 logits (PR #1787)
    # the MLP's LeakyReLU(0.5)^2 in the epilogues of two Triton matmuls (PR #1530's idea), for calls of
    # FUSED_MLP_MIN_ROWS rows or more without adapters: depth-4 steps 2% faster and 7 GiB smaller on an H200
    fused_mlp: bool = True
    # with FUSED_MLP: quack's CuTe DSL GEMMs (quack-kernels, installed with flash-attn-4) apply the activation instead,
    # where importable on Hopper: on an H200, training +2.4% at depth 1 (49,152 rows: over the plain MLP) and +1.3% at
    # depth 4 (98,304 rows: over our Triton kernels)
    quack_mlp: bool = True
    # evaluation and TTT (PR #1626's phased score-first TTT)
    eval_seq_len: int = 2048  # scoring window of the plain and sliding evaluations
    val_batch_tokens: int = 524288  # tokens per plain-evaluation batch, all ranks together
    eval_stride: int = 64  # sliding evaluation: new targets per window
    sliding_window_enabled: bool = False  # add a sliding-window diagnostic before TTT
    ttt_enabled: bool = True  # phased TTT evaluation (the reported score)
    phased_ttt_prefix_docs: int = 2000  # documents whose scores feed the global-SGD phases
    phased_ttt_num_phases: int = 3  # global-SGD phases over the prefix documents
    ttt_lora_rank: int = 80  # per-document LoRA rank (PR #1855; #1756: 96)
    ttt_lora_lr: float = 1e-4  # LoRA AdamW LR
    ttt_chunk_size: int = 48  # tokens scored per chunk, then trained on
    ttt_eval_seq_len: int = 2048  # TTT scoring window
    ttt_batch_size: int = 64  # documents per TTT batch
    ttt_grad_steps: int = 1  # LoRA steps per chunk
    ttt_weight_decay: float = 0.5  # LoRA AdamW weight decay
    ttt_beta1: float = 0.0  # LoRA AdamW beta1
    ttt_beta2: float = 0.99  # LoRA AdamW beta2 (PR #1855; #1756: 0.999)
    ttt_k_lora: bool = True  # LoRA on K
    ttt_mlp_lora: bool = True  # LoRA beside the MLP
    ttt_o_lora: bool = True  # LoRA beside the attention output
    ttt_lora_alpha: float = 144.0  # adapter outputs x ALPHA/RANK (PR #1767, #1855: 1.8 at rank 80); 0: unscaled
    # PR #1855's warm start: a batch of the previous one's size (same phase) reuses its A; B and AdamW state reset
    ttt_warm_start_a: bool = True
    val_doc_fraction: float = 1.0  # score a random subset of the val docs (quick checks only)
    global_ttt_lr: float = 0.001  # global-SGD peak LR (cosine over the phase's chunks)
    global_ttt_momentum: float = 0.9  # global-SGD momentum
    global_ttt_epochs: int = 1  # global-SGD epochs per phase
    global_ttt_chunk_tokens: int = 32768  # global-SGD tokens per step
    global_ttt_grad_clip: float = 1.0  # global-SGD grad-norm clip

    def __post_init__(self):
        """Derived values (distributed, is_main_process, micro_batch_tokens, paths, depth_schedule: the whole depth
        curriculum as ((start fraction, depth), ...)), computed once; the dataclass is frozen after this."""
        accum = self.grad_accum_steps or max(1, 8 // self.world_size)
        out, run_id = self.artifact_dir or ".", self.run_id or uuid.uuid4().hex[:12]
        backend = attention_backend(self.attn_backend)
        datasets_dir, tokenizer = resolve_data_paths(self)
        for k, v in dict(
            run_id=run_id,
            grad_accum_steps=accum,
            distributed=self.world_size > 1,
            is_main_process=self.rank == 0,
            tokenizer_path=tokenizer,
            datasets_dir=datasets_dir,
            micro_batch_tokens=self.train_batch_tokens // (self.world_size * accum),
            logfile=os.path.join(out, "logs", f"{run_id}.txt"),
            model_path=os.path.join(out, "final_model.pt"),
            quantized_model_path=os.path.join(out, "final_model.int6.ptz"),
            train_files=os.path.join(datasets_dir, "fineweb_train_*.bin"),
            val_files=os.path.join(datasets_dir, "fineweb_val_[0-9][0-9][0-9][0-9][0-9][0-9].bin"),
            val_bytes_files=os.path.join(datasets_dir, "fineweb_val_bytes_*.bin"),
            depth_schedule=depth_schedule(self),
            attn_backend=backend,
            # FA4 takes cu_seqlens unpadded, its length symbolic in compiled graphs (GPT.attn_args): each padding
            # entry would add 128 rows to its backward's fp32 accumulators, which it zero-fills
            cu_bucket=1 if backend == "fa4" else 256,
        ).items():
            object.__setattr__(self, k, v)
        check_config(self)

    @classmethod
    def from_env(cls, **overrides):
        """Every field from its env var, parsed by the field's type (booleans strict, lists once; unset or empty:
        the default, except that an empty list is a value), over RECIPE's values; `overrides` (tools, tests) win."""
        values, errors = {}, []
        for f in fields(cls):
            raw = os.environ.get(f.name.upper()) if f.init else None
            if raw is None:
                continue
            try:
                values[f.name] = parse_env(f.name.upper(), raw, f.default)
            except ConfigError as e:
                errors.append(str(e))
        if errors:
            raise ConfigError("; ".join(errors))
        recipe = RECIPES.get({**values, **overrides}.get("recipe", ""), {})
        return cls(**{**recipe, **values, **overrides})

    def public(self):
        return vars(self)  # the settings and the values derived from them


def record_env_warnings():
    """Record-script env vars that are set but mean nothing here: a record's command line would silently differ."""
    return [f"warning: {k} is set but not read (see README)" for k in RECORD_ENV_NOT_READ if k in os.environ]


def depth_schedule(h):
    """The recurrence-depth curriculum as one table of (start fraction of training, depth): PR #1756's phases
    (TRAIN_LOOP_PHASE_DEPTHS, equal shares unless TRAIN_LOOP_PHASE_FRACTIONS) or, with no phases, PR #1736's
    switch from depth 1 to NUM_LOOPS+1 at ENABLE_LOOPING_AT."""
    depths = h.train_loop_phase_depths
    if not depths:
        return (0.0, 1), (h.enable_looping_at, h.num_loops + 1)
    shares = h.train_loop_phase_fractions or (1.0,) * len(depths)
    if len(shares) != len(depths):
        raise ConfigError(f"TRAIN_LOOP_PHASE_FRACTIONS has {len(shares)} entries for {len(depths)} "
                          "TRAIN_LOOP_PHASE_DEPTHS: one share per phase")
    starts = np.concatenate([[0.0], np.cumsum(shares)[:-1] / sum(shares)])
    return tuple(zip(starts.tolist(), depths))


def check_config(h):
    """Settings that would otherwise fail, or quietly change the run, after training has started."""
    if h.prequant_ttt_enabled:
        raise ConfigError("PREQUANT_TTT_ENABLED=1 refused: training on validation tokens before they are scored breaks "
                          "score-before-update (challenge Issue #1017, condition 3), "
                          "so PR #1911's pre-quant TTT is not a legal score")
    if h.recipe not in ("", *RECIPES):
        raise ConfigError(f"RECIPE={h.recipe!r} is not a record here: one of {', '.join(RECIPES)}, or unset")
    unit = h.world_size * h.grad_accum_steps * h.train_seq_len
    if h.train_batch_tokens % unit:  # the loader would drop the remainder of every step
        lo = h.train_batch_tokens // unit * unit
        raise ConfigError(f"TRAIN_BATCH_TOKENS={h.train_batch_tokens} is not a multiple of "
                          f"WORLD_SIZE*GRAD_ACCUM_STEPS*TRAIN_SEQ_LEN = {h.world_size}*{h.grad_accum_steps}*"
                          f"{h.train_seq_len} = {unit}; nearest valid: {lo + unit}" + (f" or {lo}" if lo else ""))
    for name, value, ok in (("COMPRESSOR", h.compressor, ("brotli", "lzma", "pergroup")),
                            ("PARALLEL_FINAL_LANE", h.parallel_final_lane, ("mean", "attn", "mlp"))):
        if value not in ok:
            raise ConfigError(f"{name}={value!r} is not one of {', '.join(ok)}")
    if not 0 < h.activation_memory_budget <= 1:
        raise ConfigError(f"ACTIVATION_MEMORY_BUDGET={h.activation_memory_budget} must be in (0, 1]: the share of the "
                          "training graph's activations to keep for the backward (1: as many as the partitioner likes)")
    if h.fusion_max_buffers < 0:
        raise ConfigError(f"FUSION_MAX_BUFFERS={h.fusion_max_buffers} must be >= 0 (0: no cap)")
    if h.compressor == "pergroup":
        pergroup_codec()  # a missing package fails now, not after training
    if h.lqer_enabled and not (h.lqer_rank >= 1 and h.lqer_asym_group >= 1 and 2 <= h.lqer_factor_bits <= 8):
        raise ConfigError(f"LQER_RANK={h.lqer_rank} and LQER_ASYM_GROUP={h.lqer_asym_group} must be >= 1, "
                          f"LQER_FACTOR_BITS={h.lqer_factor_bits} in 2..8")
    check_windows(h, h.sliding_window_enabled, h.ttt_enabled)


def check_windows(h, sliding=True, ttt=True):
    """Scoring windows that would leave targets unscored: refused at startup and by the evaluations themselves."""
    if sliding and not 0 < h.eval_stride <= h.eval_seq_len:
        raise ConfigError(f"EVAL_STRIDE={h.eval_stride} must be in 1..EVAL_SEQ_LEN={h.eval_seq_len}: "
                          "a longer stride leaves targets unscored")
    if ttt and not 0 < h.ttt_chunk_size <= h.ttt_eval_seq_len:
        raise ConfigError(f"TTT_CHUNK_SIZE={h.ttt_chunk_size} must be in 1..TTT_EVAL_SEQ_LEN={h.ttt_eval_seq_len}: "
                          "a chunk wider than the scoring window leaves targets unscored")


def resolve_data_paths(h):
    """Our prepare script's layout first, then the B-D records' hub layout, so record run commands work unchanged."""
    caseops = f"fineweb10B_sp{h.vocab_size}_lossless_caps_caseops_v1_reserved"
    tok_name = f"fineweb_{h.vocab_size}_bpe_lossless_caps_caseops_v1_reserved.model"
    if h.caseops_enabled:
        hub = os.path.join(h.data_dir, "datasets", f"fineweb10B_sp{h.vocab_size}_caseops", "datasets")
        dirs = [os.path.join(h.data_dir, "datasets", caseops), os.path.join(hub, "datasets", caseops)]
        toks = [os.path.join(h.data_dir, "tokenizers", tok_name), os.path.join(hub, "tokenizers", tok_name)]
    else:
        dirs = [os.path.join(h.data_dir, "datasets", f"fineweb10B_sp{h.vocab_size}")]
        toks = [os.path.join(h.data_dir, "tokenizers", f"fineweb_{h.vocab_size}_bpe.model")]
    data = h.data_path or next((d for d in dirs if os.path.isdir(d)), dirs[0])
    tok = h.tokenizer_path or next((t for t in toks if os.path.isfile(t)), toks[0])
    return data, tok


# ----------------------------------------------------------------------------- RUNTIME


# Every line tools/record.py reads from a run log, in one table: the trainer writes them only through record_line,
# and a test fills each format and parses it back with record.py, so the two cannot drift apart.
RECORD_LINES = dict(
    score="{name} val_loss:{loss:.8f} val_bpb:{bpb:.8f} eval_time:{ms:.0f}ms val_tokens:{tokens} val_bytes:{nbytes}",
    train_step="{step}/{iterations} train_loss: {loss:.4f} train_time: {minutes:.1f}m tok/s: {tok_s:.0f}",
    val_step="{step}/{iterations} val_loss: {loss:.4f} val_bpb: {bpb:.4f}",
    stop="stopping_early: wallclock_cap train_time: {ms:.0f}ms step: {step}/{iterations}",
    model_bytes="Serialized model quantized+{compressor}: {nbytes} bytes",
    total_bytes="Total submission size quantized+{compressor}: {nbytes} bytes",
    code_bytes="Code size (compressed): {nbytes} bytes ({minified})",
    peak="peak memory allocated: {alloc} MiB reserved: {reserved} MiB",
    eval_total="total_eval_time:{s:.1f}s",
    eval_wall="eval_wall_time:{s:.1f}s (deserialisation, diagnostics, warm-up and TTT)",
    torch="torch_version: {} python {} numpy {} cuda {} triton {}",
    transform="data_transform: {transform}",
    hardware="hardware: {name} x{world_size}",
    world="world_size:{world_size} grad_accum_steps:{accum} micro_batch_tokens:{micro}",
    val_set="val_tokens:{tokens} val_bytes:{nbytes} val_docs:{docs}",
)


def record_line(kind, *args, **values):
    return RECORD_LINES[kind].format(*args, **values)


def autocast(device, cache=True):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda", cache_enabled=cache)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_seed(seed):
    import random
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def all_reduce_mean_(tensors, ws):
    """Average replicated gradients: big tensors one by one, small ones packed into one buffer."""
    if ws == 1:
        return
    small = [t for t in tensors if t.numel() <= 32768]
    for t in tensors:
        if t.numel() > 32768:
            dist.all_reduce(t)
            t.div_(ws)
    if small:
        flat = torch.cat([t.flatten().float() for t in small])
        dist.all_reduce(flat)
        flat.div_(ws)
        for t, chunk in zip(small, flat.split([t.numel() for t in small])):
            t.copy_(chunk.view_as(t))


def reduce_sums(h, sums):
    if h.distributed:
        dist.all_reduce(sums)
    return sums


def compiled_graphs():
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


class Logger:
    file = None  # this process's open run log, for the error line of a DataError raised after it was opened

    def __init__(self, h):
        self.main = h.is_main_process
        if self.main:
            os.makedirs(os.path.dirname(h.logfile), exist_ok=True)
            self.f = Logger.file = open(h.logfile, "a", encoding="utf-8")

    def __call__(self, msg=""):
        if self.main:
            print(msg, flush=True)
            self.file_only(msg)

    def file_only(self, msg):
        if self.main:
            self.f.write(msg + "\n")
            self.f.flush()


# ----------------------------------------------------------------------------- DATA

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS, BOS_ID = 20240520, 1, 256, 1


def shard_tokens(path):
    """Token count of a token/sidecar shard from its header, checked against the file size (reads 1 KB)."""
    size = os.path.getsize(path)
    if size < HEADER_INTS * 4:
        raise DataError(
            f"{path}: {size} bytes is shorter than the 1024-byte shard header; re-run prepare_caseops_data.py"
        )
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise DataError(
            f"{path}: bad shard header (magic {header[0]}, version {header[1]}; expected {SHARD_MAGIC}, "
            f"{SHARD_VERSION}); not a token shard"
        )
    n = int(header[2])
    if size != HEADER_INTS * 4 + 2 * n:
        raise DataError(
            f"{path}: header says {n} tokens but the file holds {(size - HEADER_INTS * 4) // 2}; the shard is "
            f"truncated, re-run prepare_caseops_data.py"
        )
    return n


def read_shard(path):
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_INTS * 4, shape=(shard_tokens(path),))


def list_shards(pattern, what):
    files = sorted(glob.glob(pattern))
    if not files:
        raise DataError(f"no {what} shards match {pattern}; prepare data with prepare_caseops_data.py or set DATA_PATH")
    return files


def check_shards(pattern, what):
    """Header and size of every shard, at startup: a bad last shard fails now, not at the step that reaches it."""
    files = list_shards(pattern, what)
    for f in files:
        shard_tokens(f)
    return files


class ValData(NamedTuple):
    tokens: torch.Tensor  # int64 [N+1]
    bytes: torch.Tensor  # int32 [N+1], bytes of each token as a target
    source: str


def load_tokenizer(h):
    import sentencepiece as spm
    if not os.path.isfile(h.tokenizer_path):
        raise DataError(f"tokenizer {h.tokenizer_path} not found; set TOKENIZER_PATH")
    sp = spm.SentencePieceProcessor(model_file=h.tokenizer_path)
    if sp.vocab_size() != h.vocab_size:
        raise DataError(
            f"tokenizer {h.tokenizer_path} has {sp.vocab_size()} pieces but VOCAB_SIZE={h.vocab_size}; set "
            f"VOCAB_SIZE or TOKENIZER_PATH"
        )
    return sp


def is_caseops_tokenizer(sp):
    return sp.vocab_size() > 7 and sp.id_to_piece(4) == "\ue001"


def piece_byte_lut(sp):
    """Baseline byte accounting for plain SentencePiece data: bytes of a target = its piece's bytes (+1 for a
    leading space unless the previous token is a control token). Wrong for CaseOps, hence never used there."""
    n = sp.vocab_size()
    base, space, boundary = np.zeros(n, np.int32), np.zeros(n, bool), np.zeros(n, bool)
    for i in range(n):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            boundary[i] = True
        elif sp.is_byte(i):
            base[i] = 1
        else:
            piece = sp.id_to_piece(i)
            space[i] = piece.startswith("\u2581")
            base[i] = len(piece.lstrip("\u2581").encode("utf-8"))
    return base, space, boundary


def load_val(h, sp):
    """Validation tokens truncated to whole EVAL_SEQ_LEN sequences (+1), with per-target byte counts."""
    files = list_shards(h.val_files, "validation")
    tokens = np.concatenate([np.asarray(read_shard(f)) for f in files])
    side_files = sorted(glob.glob(h.val_bytes_files))
    if side_files:
        if len(side_files) != len(files):
            raise DataError(
                f"{len(files)} val shards but {len(side_files)} sidecars ({h.val_bytes_files}); re-run "
                f"prepare_caseops_data.py"
            )
        for f, s in zip(files, side_files):
            if read_shard(f).shape != read_shard(s).shape:
                raise DataError(
                    f"sidecar {s} has {read_shard(s).shape[0]} entries but {f} has {read_shard(f).shape[0]} "
                    f"tokens; re-run prepare_caseops_data.py"
                )
        nbytes, source = (
            np.concatenate([np.asarray(read_shard(s)) for s in side_files]).astype(np.int32),
            "byte_sidecar",
        )
    elif is_caseops_tokenizer(sp):
        raise DataError(
            f"CaseOps tokenizer but no byte sidecars match {h.val_bytes_files}: BPB needs the original byte counts "
            "(the piece LUT over-counts operators); re-run prepare_caseops_data.py"
        )
    else:
        base, space, boundary = piece_byte_lut(sp)
        prev = np.concatenate([[BOS_ID], tokens[:-1]])
        nbytes, source = base[tokens] + (space[tokens] & ~boundary[prev]), "piece_lut"
    if tokens.max(initial=0) >= h.vocab_size:
        raise DataError(f"val token id {tokens.max()} >= VOCAB_SIZE={h.vocab_size}; shards and tokenizer do not match")
    usable = (len(tokens) - 1) // h.eval_seq_len * h.eval_seq_len
    if usable == 0:
        raise DataError(f"validation set has {len(tokens)} tokens, fewer than EVAL_SEQ_LEN+1={h.eval_seq_len + 1}")
    if (tokens[:usable] == BOS_ID).sum() == 0:
        raise DataError(f"no BOS (id 1) in {files[0]}: documents must start with BOS; re-run prepare_caseops_data.py")
    return ValData(
        torch.from_numpy(tokens[: usable + 1].astype(np.int64)), torch.from_numpy(nbytes[: usable + 1]), source
    )


def cu_seqlens_for(tokens, max_len, bucket=256, extra_starts=()):
    """Segment starts at row start, every BOS and extra_starts, segments split at max_len; padded with the row
    length to a multiple of `bucket` entries (h.cu_bucket) so that compiled kernels see few distinct shapes."""
    n = len(tokens)
    starts = np.flatnonzero(np.asarray(tokens) == BOS_ID)
    bounds = np.unique(np.concatenate([[0], starts, np.asarray(extra_starts, dtype=np.int64), [n]]))
    pieces = [np.arange(a, b, max_len) for a, b in zip(bounds[:-1], bounds[1:])]
    cu = np.concatenate(pieces + [[n]]).astype(np.int32)
    padded = np.full(-(-len(cu) // bucket) * bucket, n, np.int32)
    padded[: len(cu)] = cu
    return torch.from_numpy(padded)


class TrainLoader:
    """Document-packing loader: each step reads one global span of world*(tokens+1) from the current shard, rank r
    takes slice r. Batches are built on a background thread one step ahead."""

    def __init__(self, h, device, files=None):
        self.files = files or list_shards(h.train_files, "training")
        self.h, self.device = h, device
        self.row = h.micro_batch_tokens + 1
        self.span = h.world_size * self.row
        self.shard_idx, self.tokens, self.cursor = -1, None, 0
        self._next_shard()
        self.q = queue.Queue(maxsize=2)
        threading.Thread(target=self._worker, daemon=True).start()

    def _next_shard(self):
        for _ in range(len(self.files) + 1):
            self.shard_idx = (self.shard_idx + 1) % len(self.files)
            self.tokens = read_shard(self.files[self.shard_idx])
            bos = np.flatnonzero(np.asarray(self.tokens[: 1 << 20]) == BOS_ID)
            self.cursor = int(bos[0]) if len(bos) else 0
            if len(self.tokens) - self.cursor >= self.span:
                return
        raise DataError(
            f"no training shard holds {self.span} tokens (one step's span); use more data or a smaller "
            f"TRAIN_BATCH_TOKENS"
        )

    def _make(self):
        if self.cursor + self.span > len(self.tokens):
            self._next_shard()
        a = self.cursor + self.h.rank * self.row
        piece = np.asarray(self.tokens[a : a + self.row]).astype(np.int64)
        self.cursor += self.span
        x = torch.from_numpy(piece[:-1])
        cu = cu_seqlens_for(piece[:-1], self.h.train_seq_len, self.h.cu_bucket)
        y = torch.from_numpy(piece[1:])
        if self.device.type == "cuda":
            x, y, cu = x.pin_memory(), y.pin_memory(), cu.pin_memory()
        return x, y, cu

    def _worker(self):
        while True:
            try:
                self.q.put(self._make())
            except Exception as e:  # surface loader errors in the training thread
                self.q.put(e)
                return

    def next_batch(self):
        item = self.q.get()
        if isinstance(item, Exception):
            raise item
        return tuple(t.to(self.device, non_blocking=True) for t in item)


def data_transform_line(h, sp):
    """The dataset's transform (manifest.json, else the tokenizer's kind); refuses a tokenizer of the other kind."""
    path = os.path.join(h.datasets_dir, "manifest.json")
    try:
        manifest = json.load(open(path, encoding="utf-8")) if os.path.isfile(path) else {}
    except ValueError as e:
        raise DataError(f"{path} is not valid JSON ({e}); re-run prepare_caseops_data.py") from None
    transform, caseops = manifest.get("transform"), is_caseops_tokenizer(sp)
    made_with = (manifest.get("tokenizer") or {}).get("file")  # a CaseOps tokenizer may have made plain data on purpose
    mismatch = transform is not None and (transform == "caseops") != caseops
    if mismatch and (not caseops or made_with != os.path.basename(h.tokenizer_path)):
        raise DataError(f"tokenizer {h.tokenizer_path} {'has' if caseops else 'lacks'} the CaseOps operator pieces but "
                        f"{h.datasets_dir} holds {transform} data (manifest.json transform: {transform}); "
                        "set TOKENIZER_PATH to the tokenizer that made it" + (f" ({made_with})" if made_with else ""))
    transform = transform or ("caseops" if caseops else "none")
    lossy = " (LOSSY: legality never ruled on; not a record)" if transform == "casefold" else ""
    return record_line("transform", transform=transform + lossy)


# ----------------------------------------------------------------------------- KERNELS
# Two fused Triton kernels for CUDA training and eval, each behind torch.library custom ops (opaque to
# torch.compile, with fake impls and autograd) whose torch paths run off CUDA and state the math:
#   mlp: the MLP with LeakyReLU(0.5)^2 in the epilogues of two matmuls: the up projection writes hid and one sign bit
#   per hidden unit instead of the pre-activation; the backward's dhid = g @ down is multiplied by f'(pre) (rebuilt
#   from hid and the sign) before it leaves the kernel. Neither the pre-activation nor dhid reaches memory;
#   softcap_ce: softcap*tanh + logsumexp + target NLL per row of bf16 logits, and d logits written directly in
#   the logits' dtype (no fp32 [tokens, vocab] tensor). FUSED_MLP=0 / FUSED_CE_ENABLED=0: the plain expressions.
# Where quack-kernels is importable (it comes with flash-attn-4), its CuTe DSL GEMMs take the MLP instead (QUACK_MLP):
# the same epilogues at near cuBLAS speed, keeping the pre-activation rather than hid and sign bits.
# Fused MLP calls pay off only where the GPU, not the host, sets the pace (H200: training 15% slower at 24,576 rows
# per call with the Triton kernels; quack +2.4% at 49,152, +1.3% at 98,304): fewer rows, and TTT's calls, run plain.
FUSED_MLP_MIN_ROWS = 49152

try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    triton = None
KERNELS_ON = torch.cuda.is_available() and triton is not None


def kernel_ok(x):
    """Where the call sites take the fused ops: CUDA bf16 activations (tests patch this to run the torch paths)."""
    return x.is_cuda and (x.dtype == torch.bfloat16 or torch.is_autocast_enabled())


def pack_signs(neg):
    """[M, N] bool -> [M, N/8] uint8, the kernel's layout: in each group of 128 columns, bit i of byte j = column 16i+j
    (the kernel packs these 8% faster than 8 adjacent columns on an H200)."""
    shift = torch.arange(8, dtype=torch.uint8, device=neg.device)[:, None]
    return (neg.view(neg.size(0), -1, 8, 16).to(torch.uint8) << shift).sum(-2, dtype=torch.uint8).flatten(-2)


def unpack_signs(bits):
    s = bits.view(bits.size(0), -1, 1, 16) >> torch.arange(8, dtype=torch.uint8, device=bits.device)[:, None]
    return (s & 1).bool().flatten(-3)


if triton is not None:
    def _boxes(nargs):  # TMA boxes follow the config's tile (the descriptors are built with a dummy box)
        BM, BN, BK = nargs["BM"], nargs["BN"], nargs["BK"]
        boxes = dict(a=[BM, BK], b=[BN, BK], out=[BM, BN], hid=[BM, BN], signs=[BM, BN // 8])
        for name, box in boxes.items():
            nargs[name].block_shape = box

    # Persistent, TMA-fed tiles: one program per SM walks the tiles with the K loop flattened into the tile loop, so
    # the next tile's loads overlap this tile's epilogue (K = 512 is only 8 steps of 64). Keyed on N, K and the
    # direction only: rows change from call to call (evaluation batches) and must not re-tune each time. The configs:
    # the fastest of each direction in tools/mlp_mm_sweep.py on an H200 (forward: 0.454 -> 0.410 ms per 98,304 rows).
    @triton.autotune(
        [triton.Config({"BM": m, "BN": n, "BK": k}, num_warps=nw, num_stages=ns, pre_hook=_boxes)
         for m, n, k, nw, ns in ((128, 128, 64, 4, 5), (128, 128, 64, 8, 5), (128, 256, 64, 8, 3),
                                 (128, 128, 64, 4, 4))],
        key=["N", "K", "FWD"],
    )
    @triton.jit
    def _mlp_mm_kernel(a, b, out, hid, signs, M, N, K, FWD: tl.constexpr, SMS: tl.constexpr, BM: tl.constexpr,
                       BN: tl.constexpr, BK: tl.constexpr):
        """acc = a @ b.T per [BM, BN] tile. FWD: out = leaky_relu(acc, 0.5)^2 and signs = bit-packed acc < 0; else
        out = acc * f'(pre) with f'(pre) = 2 sqrt(hid) where pre > 0, -sqrt(hid) where pre < 0."""
        nb = tl.cdiv(N, BN)
        for t in tl.range(tl.program_id(0), tl.cdiv(M, BM) * nb, SMS, flatten=True):
            om, on = (t // nb) * BM, (t % nb) * BN  # neighbouring programs share a's rows; b stays in L2
            acc = tl.zeros((BM, BN), tl.float32)
            for k in range(0, K, BK):
                acc = tl.dot(a.load([om, k]), b.load([on, k]).T, acc)
            shift = tl.arange(0, 8)[None, None, :, None]
            if FWD:
                act = tl.where(acc > 0, acc, 0.5 * acc)
                out.store([om, on], (act * act).to(out.dtype))
                neg = tl.reshape((acc < 0).to(tl.int32), (BM, BN // 128, 8, 16))
                signs.store([om, on // 8], tl.reshape(tl.sum(neg << shift, 2), (BM, BN // 8)).to(tl.uint8))
            else:
                s = tl.reshape(signs.load([om, on // 8]).to(tl.int32), (BM, BN // 128, 1, 16))
                neg = tl.reshape((s >> shift) & 1, (BM, BN))
                root = tl.sqrt(hid.load([om, on]).to(tl.float32))
                out.store([om, on], (acc * tl.where(neg != 0, -root, 2 * root)).to(out.dtype))

    @triton.jit
    def _tanh(u):
        return 2 * tl.sigmoid(2 * u) - 1

    @triton.autotune([triton.Config({}, num_warps=nw) for nw in (4, 8, 16)], key=["V"])
    @triton.jit
    def _ce_fwd_kernel(z, tgt, loss, lse, V, cap, BV: tl.constexpr):
        row, c, inv = tl.program_id(0).to(tl.int64), tl.arange(0, BV), 1 / cap  # a row per program, in registers
        zc = cap * _tanh(tl.load(z + row * V + c, mask=c < V, other=0.0).to(tl.float32) * inv)
        zc = tl.where(c < V, zc, -float("inf"))
        m = tl.max(zc, 0)
        s = m + tl.log(tl.sum(tl.exp(zc - m), 0))
        zt = tl.load(z + row * V + tl.load(tgt + row)).to(tl.float32)
        tl.store(loss + row, s - cap * _tanh(zt * inv))
        tl.store(lse + row, s)

    @triton.autotune([triton.Config({}, num_warps=nw) for nw in (4, 8, 16)], key=["V"])
    @triton.jit
    def _ce_bwd_kernel(z, tgt, lse, g, dz, V, cap, BV: tl.constexpr):
        row, c = tl.program_id(0).to(tl.int64), tl.arange(0, BV)
        t = _tanh(tl.load(z + row * V + c, mask=c < V, other=0.0).to(tl.float32) * (1 / cap))
        p = tl.exp(cap * t - tl.load(lse + row))  # softmax, recomputed from the logits and the saved logsumexp
        d = (p - (c == tl.load(tgt + row)).to(tl.float32)) * tl.load(g + row) * (1 - t * t)
        tl.store(dz + row * V + c, d.to(dz.dtype.element_ty), mask=c < V)


def _ce_fwd_triton(z, targets, softcap):
    z = z.contiguous()
    loss, lse = (torch.empty(z.size(0), dtype=torch.float32, device=z.device) for _ in range(2))
    _ce_fwd_kernel[(z.size(0),)](
        z, targets.contiguous(), loss, lse, z.size(1), softcap, triton.next_power_of_2(z.size(1))
    )
    return loss, lse


def _ce_bwd_triton(z, targets, lse, g, softcap):
    z, dz = z.contiguous(), torch.empty_like(z, memory_format=torch.contiguous_format)
    _ce_bwd_kernel[(z.size(0),)](z, targets.contiguous(), lse, g.float().contiguous(), dz, z.size(1), softcap,
                                 triton.next_power_of_2(z.size(1)))
    return dz


def mlp_mm_ok(x, w):
    """The Triton MLP kernels take bf16 rows on a GPU with TMA (Hopper on) and TMA-aligned widths (hidden a multiple
    of 128, model dim of 8); the ops' torch paths run everywhere else."""
    return triton is not None and x.is_cuda and _sms(x.device) > 0 and x.dtype == w.dtype == torch.bfloat16 \
        and w.size(0) % 128 == 0 and w.size(1) % 8 == 0


@functools.cache
def _sms(device):
    """The persistent grid: one program per SM; 0 below Hopper (no TMA)."""
    p = torch.cuda.get_device_properties(device)
    return p.multi_processor_count if p.major >= 9 else 0


def _mlp_mm(a, b, hid=None, signs=None):
    """a @ b.T with the forward epilogue (returns hid, signs) or, given hid and signs, the backward one (dpre)."""
    a, b = a.contiguous(), b.contiguous()
    (M, K), N, fwd = a.shape, b.size(0), hid is None
    out = a.new_empty(M, N)
    if fwd:
        hid, signs = out, torch.empty(M, N // 8, dtype=torch.uint8, device=a.device)
    desc = lambda t: TensorDescriptor.from_tensor(t, [1] * t.dim())
    sms = _sms(a.device)
    _mlp_mm_kernel[lambda c: (min(sms, triton.cdiv(M, c["BM"]) * triton.cdiv(N, c["BN"])),)](
        desc(a), desc(b), desc(out), desc(hid), desc(signs), M, N, K, fwd, sms)
    return (out, signs) if fwd else out


# Explicit schemas: the ops' functions carry no type annotations for custom_op to infer them from.
@torch.library.custom_op("pgolf::mlp", mutates_args=(),
                         schema="(Tensor x, Tensor up, Tensor down) -> (Tensor, Tensor, Tensor)")
def fused_mlp(x, up, down):
    """(hid @ down.T, hid, signs) for x [M, d], up [N, d], down [d, N]: hid = leaky_relu(x @ up.T, 0.5)^2 and signs =
    pack_signs(x @ up.T < 0). hid, which the down projection's gradient needs anyway, and one bit per hidden unit are
    all the backward keeps: |pre| = sqrt(hid) (x2 where pre < 0)."""
    if mlp_mm_ok(x, up):
        hid, signs = _mlp_mm(x, up)
    else:
        pre = F.linear(x, up)
        hid, signs = F.leaky_relu(pre, 0.5).square(), pack_signs(pre < 0)
    return F.linear(hid, down), hid, signs


@fused_mlp.register_fake
def _(x, up, down):
    M, N = x.size(0), up.size(0)
    return x.new_empty(M, down.size(0)), x.new_empty(M, N), x.new_empty(M, N // 8, dtype=torch.uint8)


@torch.library.custom_op("pgolf::mlp_dpre", mutates_args=(),
                         schema="(Tensor g, Tensor down, Tensor hid, Tensor signs) -> Tensor")
def mlp_dpre(g, down, hid, signs):
    """d loss / d pre = (g @ down) * f'(pre); f(p) = p^2 (p > 0), p^2/4 (p < 0): f' = 2 sqrt(f), -sqrt(f)."""
    if mlp_mm_ok(g, down.t()):
        return _mlp_mm(g, down.t(), hid.contiguous(), signs.contiguous())
    f = torch.promote_types(g.dtype, torch.float32)
    root = hid.to(f).sqrt()
    return ((g @ down).to(f) * torch.where(unpack_signs(signs), -root, 2 * root)).to(g.dtype)


@mlp_dpre.register_fake
def _(g, down, hid, signs):
    return torch.empty_like(hid)


def _mlp_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*inputs, *output[1:])


def _mlp_bwd(ctx, g, _, __):
    x, up, down, hid, signs = ctx.saved_tensors
    d = mlp_dpre(g, down, hid, signs)
    return d @ up, d.t() @ x, g.t() @ hid


fused_mlp.register_autograd(_mlp_bwd, setup_context=_mlp_setup)


def _quack_gemms():
    """quack-kernels (installed with flash-attn-4): CuTe DSL GEMMs whose epilogue applies LeakyReLU(0.5)^2 (forward:
    pre and hid) or its derivative (backward: dpre, and hid again), near cuBLAS's pace on Hopper. None where absent or
    not on Hopper (its sm90 kernels, the ones checked here), so that FUSED_MLP keeps our Triton kernels there."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        return None
    try:
        import cutlass.cute as cute
        from quack import activation
        from quack.gemm_interface import gemm_act, gemm_dact
    except Exception:
        return None

    # Plain functions over modules only: quack keys its kernel cache on what an epilogue's code references.
    def act(x):  # m^2 with m = leaky_relu(x, 0.5) = (x + relu(x)) / 2; (x, y) pairs are packed f32x2 lanes
        if isinstance(x, tuple):
            m = cute.arch.mul_packed_f32x2((0.5, 0.5), cute.arch.add_packed_f32x2(x, activation.relu(x)))
            return cute.arch.mul_packed_f32x2(m, m)
        m = 0.5 * (x + activation.relu(x))
        return m * m

    def dact(x, dout):  # (dout * f'(x), f(x)): f'(x) = 2x or x/2 = m + relu(x)
        r = activation.relu(x)
        if isinstance(x, tuple):
            m = cute.arch.mul_packed_f32x2((0.5, 0.5), cute.arch.add_packed_f32x2(x, r))
            return cute.arch.mul_packed_f32x2(dout, cute.arch.add_packed_f32x2(m, r)), cute.arch.mul_packed_f32x2(m, m)
        m = 0.5 * (x + r)
        return dout * (m + r), m * m

    activation.act_fn_map[QUACK_ACT], activation.dact_fn_map[QUACK_ACT] = act, dact
    return gemm_act, gemm_dact


QUACK_ACT = "pgolf_leaky_relu_sq"  # the name it is registered under in quack's activation tables
_QUACK = _quack_gemms()


def quack_ok(x, w):
    """quack's GEMMs take bf16 on Hopper (its sm90 kernels, the ones checked here); the torch expressions run elsewhere."""
    return _QUACK is not None and x.is_cuda and _capability(x.device)[0] == 9 \
        and x.dtype == w.dtype == torch.bfloat16 and w.size(0) % 8 == 0 and w.size(1) % 8 == 0


@functools.cache
def _capability(device):
    return torch.cuda.get_device_capability(device)


def guarded(name, way_out):
    """kernel(*args) for a kernel library that compiles on first use: a GPU, CUDA or torch it does not support fails
    in the compile warm-up, before the timer, with the way to run without it."""
    def call(kernel, *args, **kw):
        try:
            return kernel(*args, **kw)
        except Exception as e:
            raise RuntimeError(f"{name} failed: {type(e).__name__}: {e}; {way_out}") from e
    return call


_quack_call = guarded("quack (quack-kernels, the MLP's GEMMs)", "QUACK_MLP=0 runs our Triton kernels instead")


@torch.library.custom_op("pgolf::quack_mlp", mutates_args=(), schema="(Tensor x, Tensor up, Tensor down) -> (Tensor, Tensor)")
def quack_mlp(x, up, down):
    """(hid @ down.T, pre) for x [M, d], up [N, d], down [d, N]: pre = x @ up.T and hid = leaky_relu(pre, 0.5)^2 leave
    one quack GEMM together; the backward keeps only pre (its GEMM rebuilds hid)."""
    if quack_ok(x, up):  # tuned=False: quack's sm90 default tile (128x192, ping-pong, 2x1 cluster), the fastest of
        # five at both training shapes on an H200; autotuning would compile ~40 kernels in the warm-up
        pre, hid = _quack_call(_QUACK[0], x.contiguous(), up.t(), activation=QUACK_ACT, tuned=False)
    else:
        pre = F.linear(x, up)
        hid = F.leaky_relu(pre, 0.5).square()
    return F.linear(hid, down), pre


@quack_mlp.register_fake
def _(x, up, down):
    return x.new_empty(x.size(0), down.size(0)), x.new_empty(x.size(0), up.size(0))


@torch.library.custom_op("pgolf::quack_mlp_bwd", mutates_args=(),
                         schema="(Tensor g, Tensor down, Tensor pre) -> (Tensor, Tensor)")
def quack_mlp_bwd(g, down, pre):
    """(dpre, hid): dpre = (g @ down) * f'(pre) and hid = f(pre) from one GEMM's epilogue."""
    if quack_ok(g, down):
        return _quack_call(_QUACK[1], g.contiguous(), down.contiguous(), pre, activation=QUACK_ACT, tuned=False)
    f = torch.promote_types(g.dtype, torch.float32)
    p = pre.to(f)
    return ((g @ down).to(f) * torch.where(p > 0, 2 * p, 0.5 * p)).to(g.dtype), F.leaky_relu(pre, 0.5).square()


@quack_mlp_bwd.register_fake
def _(g, down, pre):
    return torch.empty_like(pre), torch.empty_like(pre)


def _quack_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(*inputs, output[1])


def _quack_bwd(ctx, g, _):
    x, up, down, pre = ctx.saved_tensors
    d, hid = quack_mlp_bwd(g, down, pre)
    return d @ up, d.t() @ x, g.t() @ hid


quack_mlp.register_autograd(_quack_bwd, setup_context=_quack_setup)


@torch.library.custom_op("pgolf::softcap_ce", mutates_args=(),
                         schema="(Tensor z, Tensor targets, float softcap) -> (Tensor, Tensor)")
def softcap_ce(z, targets, softcap):
    """(NLL, logsumexp) per row of the softcapped logits softcap*tanh(z/softcap), z [M, V] in any float dtype,
    targets [M]; both fp32."""
    if z.is_cuda and triton is not None:
        return _ce_fwd_triton(z, targets, softcap)
    zc = softcap * torch.tanh(z.float() / softcap)
    return F.cross_entropy(zc, targets, reduction="none"), zc.logsumexp(-1)


@softcap_ce.register_fake
def _(z, targets, softcap):
    return tuple(z.new_empty(z.size(0), dtype=torch.float32) for _ in range(2))


@torch.library.custom_op("pgolf::softcap_ce_bwd", mutates_args=(),
                         schema="(Tensor z, Tensor targets, Tensor lse, Tensor g, float softcap) -> Tensor")
def softcap_ce_bwd(z, targets, lse, g, softcap):
    """d loss / d z = (softmax - onehot) * (1 - tanh^2) * g per row, in z's dtype."""
    if z.is_cuda and triton is not None:
        return _ce_bwd_triton(z, targets, lse, g, softcap)
    t = torch.tanh(z.float() / softcap)
    p = torch.exp(softcap * t - lse[:, None]) - F.one_hot(targets, z.size(1))
    return (p * g[:, None] * (1 - t * t)).to(z.dtype)


@softcap_ce_bwd.register_fake
def _(z, targets, lse, g, softcap):
    return torch.empty_like(z)


def _softcap_ce_setup(ctx, inputs, output):
    ctx.softcap = inputs[2]
    ctx.save_for_backward(inputs[0], inputs[1], output[1])


def _softcap_ce_bwd(ctx, g, _):
    z, targets, lse = ctx.saved_tensors
    return softcap_ce_bwd(z, targets, lse, g, ctx.softcap), None, None


softcap_ce.register_autograd(_softcap_ce_bwd, setup_context=_softcap_ce_setup)


# ----------------------------------------------------------------------------- MODEL


def _fast_attention_kernels():
    """On CUDA: FA3 (flash_attn_interface), FA4 (flash-attn-4's CuTe DSL kernels) and torch's varlen_attn (FA2),
    each where importable; the CPU runs SDPA only."""
    if not torch.cuda.is_available():
        return None, None, None, ""
    fa3 = fa4 = varlen = None
    fa4_error = ""
    try:
        from flash_attn_interface import flash_attn_func, flash_attn_varlen_func
        fa3 = flash_attn_func, flash_attn_varlen_func
    except ImportError:
        pass
    try:
        from flash_attn.cute import interface as fa4
    except Exception as e:  # absent (flash-attn 2 has no .cute), or installed but broken: kept, to say why it is unused
        if getattr(e, "name", None) not in ("flash_attn", "flash_attn.cute"):
            fa4_error = f"{type(e).__name__}: {e}"
    try:
        from torch.nn.attention.varlen import varlen_attn as varlen
    except ImportError:
        pass
    return fa3, fa4, varlen, fa4_error


_FA3, _FA4, _VARLEN, _FA4_ERROR = _fast_attention_kernels()
if _VARLEN is not None:
    _VARLEN_PARAMS = inspect.signature(_VARLEN).parameters
    _VARLEN_CAUSAL = {"is_causal": True} if "is_causal" in _VARLEN_PARAMS else {"window_size": (-1, 0)}
FLEX_BLOCK = 128
_flex = torch.compile(flex_attention, dynamic=False)  # eager flex would materialise [T, T] scores
_FLEX_SEGMENTS = {}  # row length -> (segment-id buffer, mask_mod): one mask_mod object per length, so graphs stay valid


def packed_block_mask(cu, n):
    """flex_attention BlockMask: causal attention within the segments of cu (padded cu_seqlens of a packed row of n
    tokens, n a multiple of FLEX_BLOCK). Blocks inside one segment skip the mask; blocks of two segments are skipped."""
    if n not in _FLEX_SEGMENTS:
        seg = torch.zeros(n, dtype=torch.int32, device=cu.device)
        _FLEX_SEGMENTS[n] = seg, lambda b, h, q, k: (seg[q] == seg[k]) & (q >= k)
    seg, mask_mod = _FLEX_SEGMENTS[n]
    starts = torch.zeros(n + 1, dtype=torch.int32, device=cu.device).index_add_(0, cu.long(), torch.ones_like(cu))
    seg.copy_(starts[:n].cumsum(0) - 1)  # in place: the mask_mod reads this buffer (padding entries land at n)
    blocks = seg.view(-1, FLEX_BLOCK)
    first, last = blocks[:, 0], blocks[:, -1]
    i = torch.arange(len(first), device=cu.device)
    below = i[:, None] > i[None]  # [query block, key block]
    full = below & (first[None] == last[:, None])
    partial = (below & (last[None] == first[:, None]) & ~full) | (i[:, None] == i[None])

    def kv_lists(m):
        m = m.int()
        return (
            m.sum(-1, dtype=torch.int32)[None, None],
            torch.argsort(m, dim=-1, descending=True, stable=True).int()[None, None],
        )

    return BlockMask.from_kv_blocks(
        *kv_lists(partial), *kv_lists(full), BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod, seq_lengths=(n, n)
    )


_fa4_call = guarded("FA4 (flash-attn-4)", "ATTN_BACKEND=flex runs without it")


@torch.library.custom_op("pgolf::fa4_varlen", mutates_args=(),
                         schema="(Tensor q, Tensor k, Tensor v, Tensor cu, int max_len) -> (Tensor, Tensor)")
def fa4_varlen(q, k, v, cu, max_len):
    """FA4 causal attention within the segments of cu, q [T,H,D], k/v [T,KV,D] contiguous: (out, lse [H,T] fp32).
    A custom op: compiled blocks see one opaque call instead of tracing into the CuTe DSL."""
    return _fa4_call(_FA4._flash_attn_fwd, q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len,
                     max_seqlen_k=max_len, causal=True, return_lse=True)[:2]


@fa4_varlen.register_fake
def _(q, k, v, cu, max_len):
    return q.new_empty(q.shape), q.new_empty(q.size(1), q.size(0), dtype=torch.float32)


@torch.library.custom_op("pgolf::fa4_varlen_bwd", mutates_args=(), schema=(
    "(Tensor g, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu, int max_len) -> (Tensor, Tensor, Tensor)"))
def fa4_varlen_bwd(g, q, k, v, out, lse, cu, max_len):
    return tuple(_fa4_call(_FA4._flash_attn_bwd, q, k, v, out, g.contiguous(), lse, None, True, cu_seqlens_q=cu,
                           cu_seqlens_k=cu, max_seqlen_q=max_len, max_seqlen_k=max_len)[:3])


@fa4_varlen_bwd.register_fake
def _(g, q, k, v, out, lse, cu, max_len):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fa4_setup(ctx, inputs, output):
    ctx.max_len = inputs[4]
    ctx.save_for_backward(*inputs[:4], *output)


def _fa4_bwd(ctx, g, _):
    q, k, v, cu, out, lse = ctx.saved_tensors
    return *fa4_varlen_bwd(g, q, k, v, out, lse, cu, ctx.max_len), None, None


fa4_varlen.register_autograd(_fa4_bwd, setup_context=_fa4_setup)


def attention_backend(asked):
    """The attention kernel for packed rows, chosen once by the config: FA3, else FA4 when importable, else
    flex_attention with a document block mask on CUDA, else SDPA (CPU: one call per document). varlen = torch's
    varlen_attn (FA2). FA4 runs the training step 10% faster than flex on an H200 (docs/BENCHMARKS.md)."""
    default = "fa3" if _FA3 else "fa4" if _FA4 else "flex" if torch.cuda.is_available() else "sdpa"
    if asked and (asked not in ("fa3", "fa4", "flex", "varlen", "sdpa") or asked == "fa3" and not _FA3
                  or asked == "fa4" and not _FA4 or asked == "varlen" and not _VARLEN):
        raise ConfigError(f"ATTN_BACKEND={asked!r} is not available here; unset it for {default}"
                          + (f" ({fa4_unusable()})" if asked == "fa4" and _FA4_ERROR else ""))
    return asked or default


def mlp_op(h):
    """FUSED_MLP's op: quack's GEMMs where QUACK_MLP and importable, else our Triton kernels; None: the plain path."""
    return (quack_mlp if h.quack_mlp and _QUACK else fused_mlp) if h.fused_mlp else None


def kernels_line(h):
    op = mlp_op(h)
    mlp_kernels = "quack" if op is quack_mlp else "triton" if op is not None and KERNELS_ON else "0"
    line = (f"attn_backend:{h.attn_backend} fused_mlp:{mlp_kernels} "
            f"fused_ce:{int(h.fused_ce_enabled and KERNELS_ON)}")
    fallback = _FA4_ERROR and h.attn_backend == "flex"
    return line + (f"\nWARNING: attention runs flex, not fa4: {fa4_unusable()}" if fallback else "")


def fa4_unusable():
    """flash-attn-4 is installed but does not import (e.g. a CuTe DSL wheel missing): a silent fallback to flex would
    cost a paid run ~13% of its steps."""
    return (f"flash-attn-4 is installed but does not import ({_FA4_ERROR}); "
            "pip install 'flash-attn-4[cu13]' (cu12: no [cu13])")


class AttnArgs(NamedTuple):
    """How a forward attends, the same for every layer: RoPE tables, packing and kernel."""
    rope: tuple  # (cos, sin, rotated dims)
    mask: object  # None: dense causal rows; packed row: cu_seqlens (padded per h.cu_bucket), or a flex BlockMask
    max_len: int  # bound on any packed segment (varlen kernels)
    backend: str  # attention_backend()


def _repeat_kv(k, groups):
    return k if groups == 1 else k.repeat_interleave(groups, dim=-2)


def attend(q, k, v, cu, max_len, backend="sdpa"):
    """Causal attention. q [B,T,H,D], k/v [B,T,KV,D]. cu given: one packed row (B=1) attending within segments,
    as cu_seqlens (padded per h.cu_bucket) or as a BlockMask from packed_block_mask."""
    groups = q.size(-2) // k.size(-2)
    if isinstance(cu, BlockMask):
        t = lambda z: z.transpose(1, 2)
        return t(_flex(t(q), t(k), t(v), block_mask=cu, enable_gqa=groups > 1))
    if backend == "fa3":
        if cu is None:
            return _FA3[0](q, k, v, causal=True)
        return _FA3[1](q[0], k[0], v[0], cu, cu, max_len, max_len, causal=True)[None]
    if backend == "fa4" and cu is not None:  # FA4's own GQA: k/v repeated to 8 heads held 2.9 GiB more at depth 4
        return fa4_varlen(*(t[0].contiguous() for t in (q, k, v)), cu, max_len)[0][None]
    if backend == "varlen" and cu is not None:
        kw = dict(_VARLEN_CAUSAL)
        if "enable_gqa" in _VARLEN_PARAMS:
            kw["enable_gqa"] = True
        else:
            k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
        return _VARLEN(q[0], k[0], v[0], cu, cu, max_len, max_len, **kw)[None]
    q, k, v = q.transpose(1, 2), _repeat_kv(k, groups).transpose(1, 2), _repeat_kv(v, groups).transpose(1, 2)
    if cu is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    bounds = torch.unique_consecutive(cu).tolist()  # CPU fallback: one causal call per segment, O(sum L^2)
    outs = [
        F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True)
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(outs, dim=2).transpose(1, 2)


def rms(x):
    # outside autocast: torch >= 2.12's runs rms_norm on an fp32 copy of x (kept for the backward) and returns fp32,
    # so x0 and the residual stream would turn fp32 and FA3/FA4 would get fp32 q/k. rms_norm computes in fp32 anyway
    # and returns x's dtype: torch <= 2.11's values
    with torch.autocast(x.device.type, enabled=False):
        return F.rms_norm(x, (x.size(-1),))


class BlockWeights(NamedTuple):
    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    wo: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    attn_scale: torch.Tensor
    mlp_scale: torch.Tensor
    resid_mix: torch.Tensor
    q_gain: torch.Tensor
    gate_w: torch.Tensor | None
    ln_s: torch.Tensor  # 0-d tensor, not a float: a Python constant would recompile the block per layer
    xsa: bool
    mlp_op: object  # mlp_op(h): the MLP's custom op for the calls that take one; None: the plain expressions
    gate_scale: float = 1.0


class Lora(NamedTuple):
    """Per-document adapters of one virtual layer: (A [B,r,in], B [B,out,r]) or, with TTT_LORA_ALPHA, (A, B, output
    scale); None = no adapter there."""
    q: tuple | None
    k: tuple | None
    v: tuple | None
    o: tuple | None
    mlp: tuple | None


def lora_delta(x, ab):
    d = torch.bmm(torch.bmm(x, ab[0].transpose(1, 2)), ab[1].transpose(1, 2))
    return d * ab[2] if len(ab) > 2 else d


def linear(x, w, ab=None, cap=None, name=None):
    if cap is not None:
        cap(name, x)
    y = F.linear(x, w.to(x.dtype))
    return y if ab is None else y + lora_delta(x, ab).to(y.dtype)


def apply_rope(x, cos, sin, dims):
    half = dims // 2
    x1, x2, rest = x[..., :half], x[..., half:dims], x[..., dims:]
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos, rest], dim=-1)


def attention(a, w: BlockWeights, attn: AttnArgs, lora, cap):
    B, T, _ = a.shape
    H, KV = w.q_gain.numel(), w.wk.size(0) // (w.wq.size(0) // w.q_gain.numel())
    D = w.wq.size(0) // H
    if cap is not None:
        cap("attn.c_q", a)
    q = linear(a, w.wq, lora and lora.q).view(B, T, H, D)
    k = linear(a, w.wk, lora and lora.k).view(B, T, KV, D)
    v = linear(a, w.wv, lora and lora.v).view(B, T, KV, D)
    cos, sin, dims = attn.rope
    q, k = apply_rope(rms(q), cos, sin, dims), apply_rope(rms(k), cos, sin, dims)
    q = q * w.q_gain.to(q.dtype)[:, None]
    y = attend(q, k, v, attn.mask, attn.max_len, attn.backend)
    if w.xsa:  # remove each head's component along its own token's value direction
        vn = F.normalize(v, dim=-1).unsqueeze(-2)
        y5 = y.view(B, T, KV, H // KV, D)
        y = (y5 - (y5 * vn).sum(-1, keepdim=True) * vn).view(B, T, H, D)
    if w.gate_w is not None:  # per-head output gate on the first gate_w.size(1) input dims (all of them: dense)
        y = y * torch.sigmoid(w.gate_scale * F.linear(a[..., : w.gate_w.size(1)], w.gate_w.to(a.dtype))).unsqueeze(-1)
    y = y.reshape(B, T, H * D)
    # attn_scale (mlp_scale in mlp) scales the output matrix's rows: its gradient then comes from that d x d matrix's
    # gradient instead of a reduction over every token, and the projection's output is not kept for it
    out = linear(y, w.wo * w.attn_scale[:, None], None, cap, "attn.proj")
    if lora is not None and lora.o is not None:
        out = out + (w.attn_scale * lora_delta(a, lora.o)).to(out.dtype)
    return out


def mlp(a, w: BlockWeights, lora, cap):
    down = w.down * w.mlp_scale[:, None]
    if w.mlp_op is not None and cap is None and lora is None and kernel_ok(a) and w.up.size(0) % 128 == 0 \
            and a.numel() >= FUSED_MLP_MIN_ROWS * a.size(-1):  # (the GPTQ hook sees mlp.fc's input on the plain path)
        dt = torch.bfloat16 if torch.is_autocast_enabled() else a.dtype
        out = w.mlp_op(a.flatten(0, -2).to(dt), w.up.to(dt), down.to(dt))[0].view_as(a)
    else:
        out = linear(F.leaky_relu(linear(a, w.up, None, cap, "mlp.fc"), 0.5).square(), down, None, cap, "mlp.proj")
    if lora is not None and lora.mlp is not None:
        out = out + (w.mlp_scale * lora_delta(a, lora.mlp)).to(out.dtype)
    return out


def mixed_with_x0(x, x0, mix):
    """A block's input: the stream mixed with x0 (fp32), rounded once to the stream's dtype."""
    return (mix[0].to(x.dtype) * x + mix[1].to(x.dtype) * x0).to(x.dtype)


def sequential_block(x, x0, w: BlockWeights, attn: AttnArgs, lora=None, cap=None):
    x_in = mixed_with_x0(x, x0, w.resid_mix)
    x_mid = x_in + attention(rms(x_in) * w.ln_s, w, attn, lora, cap)
    return x_mid + mlp(rms(x_mid) * w.ln_s, w, lora, cap)


def parallel_block(lane0, lane1, x0, w: BlockWeights, r, P, attn: AttnArgs, lora=None, cap=None):
    """Attention reads lane0, the MLP reads lane1 (before this layer's update); both write both lanes."""
    x_in = mixed_with_x0(lane0, x0, w.resid_mix)
    a = attention(rms(x_in) * w.ln_s, w, attn, lora, cap)
    m = mlp(rms(lane1) * w.ln_s, w, lora, cap)
    r, P = r.to(lane0.dtype), P.to(lane0.dtype)
    return r[0] * lane0 + P[0, 0] * a + P[1, 0] * m, r[1] * lane1 + P[0, 1] * a + P[1, 1] * m


class Block(nn.Module):
    """Control tensors of one physical layer; its matrices live in the GPT's banks."""

    def __init__(self, h):
        super().__init__()
        d = h.model_dim
        self.attn_scale = nn.Parameter(torch.ones(d))
        self.mlp_scale = nn.Parameter(torch.ones(d))
        self.resid_mix = nn.Parameter(torch.stack([torch.ones(d), torch.zeros(d)]))
        self.q_gain = nn.Parameter(torch.full((h.num_heads,), h.qk_gain_init))
        self.attn_gate_w = None  # the sparse gate replaces the dense one
        if h.sparse_attn_gate_enabled:
            self.attn_gate_w = nn.Parameter(torch.randn(h.num_heads, h.gate_window) * h.sparse_attn_gate_init_std)
        elif h.gated_attn_enabled:
            self.attn_gate_w = nn.Parameter(torch.randn(h.num_heads, d) * h.gated_attn_init_std)


def layer_plan(h, depth):
    """Virtual layer list at a recurrence depth, split into encoder/decoder halves."""
    layers = (
        list(range(h.loop_start))
        + list(range(h.loop_start, h.loop_end + 1)) * depth
        + list(range(h.loop_end + 1, h.num_layers))
    )
    n_enc = len(layers) // 2
    return layers[:n_enc], layers[n_enc:]


def loop_depth_at(h, frac):
    """Recurrence depth at a fraction of training: the last row of the depth schedule that has started."""
    return [depth for start, depth in h.depth_schedule if frac >= start][-1]


def smear(e, ids, w, lam):
    """SmearGate: e_t + lam*sigmoid(w . e_t[:window]) * e_{t-1}, never at a row's first position nor at a BOS (the
    previous token then belongs to another document: #1797's leak, fixed in #1851)."""
    g = lam.to(e.dtype) * torch.sigmoid(e[..., : w.numel()] @ w.to(e.dtype))[..., None]
    prev = F.pad(e[:, :-1], (0, 0, 1, 0))
    return e + g * (ids != BOS_ID)[..., None].to(e.dtype) * prev


def head_logits(hid, emb, head_lora):
    n = rms(hid)
    z = F.linear(n, emb.to(n.dtype))
    return z if head_lora is None else z + lora_delta(n, head_lora).to(z.dtype)


def softcap_logits(hid, emb, head_lora, softcap):
    return softcap * torch.tanh(head_logits(hid, emb, head_lora).float() / softcap)


def head_losses(hid, emb, targets, head_lora, softcap, fused=False):
    """Tied head, softcap and cross-entropy in one function so that compile fuses the [tokens, vocab] temporaries;
    fused (FUSED_CE_ENABLED, CUDA): one Triton pass over the bf16 logits instead."""
    if fused and kernel_ok(hid):
        z = head_logits(hid, emb, head_lora).flatten(0, -2)
        return softcap_ce(z, targets.flatten(), softcap)[0].view(targets.shape)
    z = softcap_logits(hid, emb, head_lora, softcap)
    return F.cross_entropy(z.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


def _named(cap, i):
    return lambda name, x: cap(f"blocks.{i}.{name}.weight", x)


class BlockFns(NamedTuple):
    """The block functions of one run mode, built once: eager, compiled for fixed shapes (training, evaluation),
    or compiled with symbolic rows and width (TTT, see ttt_block_fns)."""
    seq: Callable
    par: Callable
    head: Callable
    model: Callable = None  # GPT.losses compiled whole, for training steps (COMPILE_MODEL) or TTT (TTT_COMPILE_MODEL)


EAGER = BlockFns(sequential_block, parallel_block, head_losses)


def compiled_block_fns(h):
    if not h.compile:
        return EAGER
    blocks = (torch.compile(f, dynamic=False, fullgraph=True) for f in EAGER[:3])
    if not h.compile_model:
        return BlockFns(*blocks)
    fusion = {"max_fusion_unique_io_buffers": h.fusion_max_buffers or None}
    whole = torch.compile(GPT.losses, dynamic=False, fullgraph=True, options=fusion)
    return BlockFns(*blocks, within_memory_budget(whole, h))


def within_memory_budget(compiled, h):
    """The compiled function, partitioned (at its first call per shape) under ACTIVATION_MEMORY_BUDGET; at 1, torch's
    default, the function itself (no config patch per step)."""
    if h.activation_memory_budget == 1:
        return compiled

    def call(*args):
        with torch._functorch.config.patch(activation_memory_budget=h.activation_memory_budget):
            return compiled(*args)
    return call


class Fwd(NamedTuple):
    """What one forward does, built by its caller (train step, evaluation, calibration, TTT, global SGD) and passed
    down: the recurrence depth, the block functions, per-document adapters (TTT) and an activation hook (GPTQ)."""
    depth: int
    fns: BlockFns = EAGER
    loras: list = None  # one Lora per virtual layer, [B]-batched
    head_lora: tuple = None
    cap: Callable = None  # cap(name, x) sees the input of every quantized matrix


class GPT(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.h = h
        L, d, H, KV = h.num_layers, h.model_dim, h.num_heads, h.num_kv_heads
        hd, hid = d // H, int(h.mlp_mult * d)
        self.tok_emb = nn.Embedding(h.vocab_size, d)
        self.qo_bank = nn.Parameter(torch.empty(2 * L, d, d))
        self.kv_bank = nn.Parameter(torch.empty(2 * L, KV * hd, d))
        self.mlp_up_bank = nn.Parameter(torch.empty(L, hid, d))
        self.mlp_down_bank = nn.Parameter(torch.zeros(L, d, hid))
        self.blocks = nn.ModuleList(Block(h) for _ in range(L))
        self.num_skips = min(len(p) for p in layer_plan(h, h.num_loops + 1))
        self.skip_weights = nn.Parameter(torch.ones(self.num_skips, d))
        self.skip_gates = nn.Parameter(torch.zeros(self.num_skips, d))
        self.parallel_resid_lambdas = nn.Parameter(torch.full((L, 2), 1.1))
        self.parallel_post_lambdas = nn.Parameter(torch.ones(L, 2, 2))
        if h.smear_gate_enabled:  # zero init: the identity until smear_lambda moves
            self.smear_gate_w = nn.Parameter(torch.zeros(h.gate_window))
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        with torch.no_grad():
            nn.init.normal_(self.tok_emb.weight, std=h.tied_embed_init_std)
            for i in range(L):
                nn.init.orthogonal_(self.qo_bank[i])
                nn.init.orthogonal_(self.kv_bank[i])
                nn.init.orthogonal_(self.kv_bank[L + i])
                nn.init.orthogonal_(self.mlp_up_bank[i])
            self.qo_bank[L:].zero_()
        self.register_buffer(
            "ln_scales", torch.tensor([1 / math.sqrt(i + 1) if h.ln_scale else 1.0 for i in range(L)]), persistent=False
        )
        self._rope = {}  # (length, device) -> cos/sin tables

    def layer_weights(self):
        """Every layer's BlockWeights, the matrices as unbind views: bank[i] per use would make each use's backward
        write a bank-sized zero tensor and add it into the bank's gradient; unbind's backward stacks once."""
        h, L = self.h, self.h.num_layers
        qo, kv, up, down = (b.unbind(0) for b in (self.qo_bank, self.kv_bank, self.mlp_up_bank, self.mlp_down_bank))
        gate_scale = h.sparse_attn_gate_scale if h.sparse_attn_gate_enabled else 1.0
        return [BlockWeights(qo[i], kv[i], kv[L + i], qo[L + i], up[i], down[i], b.attn_scale, b.mlp_scale,
                             b.resid_mix, b.q_gain, b.attn_gate_w, self.ln_scales[i], i >= L - h.xsa_last_n,
                             mlp_op(h), gate_scale) for i, b in enumerate(self.blocks)]

    def rope(self, T, device):
        key = (T, str(device))
        if key not in self._rope:
            dims = self.h.rope_dims
            inv = 1.0 / self.h.rope_base ** (torch.arange(0, dims, 2, device=device, dtype=torch.float32) / dims)
            ang = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv)
            self._rope[key] = (ang.cos()[None, :, None, :], ang.sin()[None, :, None, :], dims)
        cos, sin, dims = self._rope[key]
        dt = torch.bfloat16 if torch.is_autocast_enabled() else self.qo_bank.dtype
        return cos.to(dt), sin.to(dt), dims

    def attn_args(self, ids, cu=None):
        """The ids (padded to whole flex blocks when packed) and how every layer attends. Built outside compiled code:
        the flex block mask is host work."""
        h = self.h
        if cu is not None and h.attn_backend == "flex":  # padded to whole blocks; the padding is its own segment
            ids = F.pad(ids, (0, -ids.size(1) % FLEX_BLOCK))  # (cu's padding entries are T)
            cu = packed_block_mask(cu, ids.size(1))
        elif cu is not None and h.cu_bucket == 1:  # unpadded (FA4): one graph for every length
            torch._dynamo.mark_dynamic(cu, 0)
        max_len = max(h.train_seq_len, h.eval_seq_len, h.ttt_eval_seq_len)  # bound on any segment cu_seqlens may hold
        return ids, AttnArgs(self.rope(ids.size(1), ids.device), cu, max_len, h.attn_backend)

    def hidden(self, ids, fwd: Fwd, cu=None):
        """Final hidden state [B,T,d]. cu: the segments of one packed row (cu_seqlens_for); fwd: depth, block
        functions, TTT adapters and GPTQ hook."""
        return self.trunk(*self.attn_args(ids, cu), fwd)[:, : ids.size(1)]

    def trunk(self, ids, attn: AttnArgs, fwd: Fwd):
        h, fns = self.h, fwd.fns
        e = self.tok_emb(ids)
        x0 = rms(smear(e, ids, self.smear_gate_w, self.smear_lambda) if h.smear_gate_enabled else e)
        x = x0.clone()  # not x0 itself: an aliased input would give layer 0 its own compiled graph
        # x0 in fp32 (its values unchanged): every layer's share of x0's gradient, and any partial sum of them that
        # Inductor stores between kernels (FUSION_MAX_BUFFERS splits the sum), stays fp32; the stream keeps x's dtype.
        # Also uncapped: bf16 x0 there is 1.2% faster at depth 1 but ended 200 equal steps 0.004 BPB worse
        x0 = x0.float()
        if fwd.loras and fns is not EAGER:  # every block input then requires grad: layer 0 shares the others' graph
            x.requires_grad_()
        lora = lambda slot: fwd.loras and fwd.loras[slot]
        cap = lambda i: fwd.cap and _named(fwd.cap, i)
        enc, dec = layer_plan(h, fwd.depth)
        ws, skips, lane1 = self.layer_weights(), [], None
        for slot, i in enumerate(enc):
            x = fns.seq(x, x0, ws[i], attn, lora(slot), cap(i))
            skips.append(x)
        for j, i in enumerate(dec):
            if i >= h.parallel_start_layer and lane1 is None:  # lane 1 starts before the skip: skips feed lane 0 only
                lane1 = x.clone()  # a copy, for the reason x0 is one
            if j < self.num_skips and skips:
                g = torch.sigmoid(self.skip_gates[j]).to(x.dtype)
                x = g * x + (1 - g) * (self.skip_weights[j].to(x.dtype) * skips.pop())
            if i >= h.parallel_start_layer:
                x, lane1 = fns.par(x, lane1, x0, ws[i], self.parallel_resid_lambdas[i],
                                   self.parallel_post_lambdas[i], attn, lora(len(enc) + j), cap(i))
            else:
                x = fns.seq(x, x0, ws[i], attn, lora(len(enc) + j), cap(i))
        if lane1 is not None:
            x = {"mean": 0.5 * (x + lane1), "attn": x, "mlp": lane1}[h.parallel_final_lane]
        return x

    def logits(self, hid, fwd: Fwd):
        if fwd.cap is not None:
            fwd.cap("tok_emb.weight", rms(hid))
        return softcap_logits(hid, self.tok_emb.weight, fwd.head_lora, self.h.logit_softcap)

    def losses(self, ids, attn: AttnArgs, targets, fwd: Fwd, cols=None):
        """Per-target NLL [B,T] in fp32 from a full-vocabulary softmax, ids and attn from attn_args; cols [B,C]: only
        those columns (TTT scores 48 of up to 2048 per row, so the vocabulary projection runs on the chunk alone)."""
        hid = self.trunk(ids, attn, fwd)[:, : targets.size(1)]
        if cols is not None:
            hid, targets = hid.gather(1, cols[..., None].expand(-1, -1, hid.size(-1))), targets.gather(1, cols)
        return fwd.fns.head(
            hid, self.tok_emb.weight, targets, fwd.head_lora, self.h.logit_softcap, self.h.fused_ce_enabled
        )

    def token_losses(self, ids, targets, fwd: Fwd, cu=None, cols=None):
        """losses() through the caller's block functions (eager, or one compiled graph per block function)."""
        return self.losses(*self.attn_args(ids, cu), targets, fwd, cols)

    def whole(self, ids, targets, fwd: Fwd, cu=None, cols=None):
        """losses() as one compiled graph, fwd.fns.model (COMPILE_MODEL: training steps; TTT_COMPILE_MODEL: TTT)."""
        return fwd.fns.model(self, *self.attn_args(ids, cu), targets, fwd._replace(fns=EAGER), cols)

    def forward(self, ids, targets, fwd: Fwd, cu=None):
        """Mean training loss; with COMPILE_MODEL the forward (and so its backward) runs as one compiled graph."""
        return (self.token_losses if fwd.fns.model is None else self.whole)(ids, targets, fwd, cu).mean()

    # banks <-> per-matrix names used by GPTQ and the artifact
    def unbanked_state_dict(self):
        out = {}
        for k, v in self.state_dict().items():
            if k.endswith("_bank"):
                continue
            out[k] = v.detach()
        for i, w in enumerate(self.layer_weights()):
            for name, t in (("attn.c_q", w.wq), ("attn.c_k", w.wk), ("attn.c_v", w.wv), ("attn.proj", w.wo),
                            ("mlp.fc", w.up), ("mlp.proj", w.down)):
                out[f"blocks.{i}.{name}.weight"] = t.detach()
        return out

    @torch.no_grad()
    def load_unbanked(self, sd):
        L = self.h.num_layers
        sd = dict(sd)
        for i in range(L):
            for bank, idx, name in (
                (self.qo_bank, i, "attn.c_q"),
                (self.kv_bank, i, "attn.c_k"),
                (self.kv_bank, L + i, "attn.c_v"),
                (self.qo_bank, L + i, "attn.proj"),
                (self.mlp_up_bank, i, "mlp.fc"),
                (self.mlp_down_bank, i, "mlp.proj"),
            ):
                bank[idx].copy_(sd.pop(f"blocks.{i}.{name}.weight"))
        missing, unexpected = self.load_state_dict(sd, strict=False)
        missing = [m for m in missing if not m.endswith("_bank")]
        if missing or unexpected:
            raise RuntimeError(
                f"artifact does not match the model config: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )


def build_model(h, device):
    model = GPT(h).to(device)
    if device.type == "cuda":
        model.tok_emb.weight.data = model.tok_emb.weight.data.to(torch.bfloat16)
    return model


def param_groups(model):
    banks = [model.qo_bank, model.kv_bank, model.mlp_up_bank, model.mlp_down_bank]
    ids = {id(p) for p in banks} | {id(model.tok_emb.weight)}
    scalars = [p for p in model.parameters() if id(p) not in ids]
    return banks, [model.tok_emb.weight], scalars


# ----------------------------------------------------------------------------- OPTIMIZER

NS_COEFFS = (3.4445, -4.7750, 2.0315)
# Polar Express (PR #1344, in #1787/#1855): one (a, b, c) per iteration; only these five run, whatever the steps.
POLAR_EXPRESS = ((8.156554524902461, -22.48329292557795, 15.878769915207462),
                 (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                 (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                 (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                 (2.3465413258596377, -1.7097828382687081, 0.42323551169305323))


def newton_schulz(g, steps, polar=False):
    """Approximate orthogonalisation of a batch of matrices [B, r, c] in bf16 (sigma -> a s + b s^3 + c s^5)."""
    x = g.to(torch.bfloat16)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.transpose(-2, -1)
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for a, b, c in POLAR_EXPRESS[:steps] if polar else (NS_COEFFS,) * steps:
        A = x @ x.transpose(-2, -1)
        x = a * x + (b * A + c * (A @ A)) @ x
    return x.transpose(-2, -1) if tall else x


def muon_momentum_at(h, step):
    return h.muon_momentum_warmup_start + (h.muon_momentum - h.muon_momentum_warmup_start) * min(
        step / max(h.muon_momentum_warmup_steps, 1), 1.0
    )


def lr_mult_at(h, frac):
    if frac < 1 - h.warmdown_frac:
        return 1.0
    return max((1 - frac) / h.warmdown_frac, h.min_lr)


def muon_wd_mult_at(h, frac):
    if frac <= h.wd_taper_start_frac:
        return 1.0
    t = min((frac - h.wd_taper_start_frac) / max(1 - h.wd_taper_start_frac, 1e-9), 1.0)
    return 1.0 - (1.0 - h.wd_taper_final_mult) * t


class Muon:
    """Banked Muon: gradients are reduce-scattered over the bank dimension, each rank orthogonalises its slices,
    updates are all-gathered. Bank b's all-gather overlaps bank b+1's Newton-Schulz."""

    def __init__(self, h, banks):
        self.banks = sorted(banks, key=lambda p: -p.numel())
        self.h, self.ws, self.rank = h, h.world_size, h.rank
        self.per_rank = [-(-p.size(0) // self.ws) for p in self.banks]
        self.mom = [
            torch.zeros(n, *p.shape[1:], device=p.device, dtype=torch.float32)
            for n, p in zip(self.per_rank, self.banks)
        ]

    def state_dict(self):
        return [m.clone() for m in self.mom]

    def load_state_dict(self, s):
        for m, v in zip(self.mom, s):
            m.copy_(v)

    def _padded(self, t, n):
        pad = n * self.ws - t.size(0)
        return torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) if pad else t

    @torch.no_grad()
    def step(self, lr, momentum, wd):
        grads = []
        for p, n in zip(self.banks, self.per_rank):
            full = self._padded(p.grad.to(torch.bfloat16), n)
            if self.ws > 1:
                shard = full.new_empty(n, *full.shape[1:])
                grads.append((shard, dist.reduce_scatter_tensor(shard, full, async_op=True)))
            else:
                grads.append((full, None))
        pending = None
        for p, n, m, (g, work) in zip(self.banks, self.per_rank, self.mom, grads):
            if work is not None:
                work.wait()
                g = g.float() / self.ws
            else:
                g = g.float()
            m.mul_(momentum).add_(g)
            u = g + momentum * m
            if self.h.muon_row_normalize:
                u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-7)
            u = newton_schulz(u, self.h.muon_backend_steps, self.h.muon_polar_express).to(torch.bfloat16)
            if self.ws > 1:
                full = u.new_empty(n * self.ws, *u.shape[1:])
                work = dist.all_gather_into_tensor(full, u, async_op=True)
            else:
                full, work = u, None
            if pending is not None:
                self._apply(*pending, lr, wd)
            pending = (p, full, work)
        self._apply(*pending, lr, wd)

    def _apply(self, p, full, work, lr, wd):
        if work is not None:
            work.wait()
        scale = math.sqrt(max(1.0, p.size(1) / p.size(2)))
        p.mul_(1 - lr * wd)
        p.add_(full[: p.size(0)].to(p.dtype), alpha=-lr * scale)


class Optimizers:
    def __init__(self, h, model):
        banks, embed, scalars = param_groups(model)
        self.h, self.params = h, list(model.parameters())
        fused = dict(fused=True) if banks[0].is_cuda else {}
        ab = dict(betas=(h.beta1, h.beta2), eps=h.adam_eps, **fused)
        self.adam = torch.optim.AdamW(
            [
                dict(params=embed, lr=h.tied_embed_lr, weight_decay=h.embed_wd, base_lr=h.tied_embed_lr),
                dict(params=scalars, lr=h.scalar_lr, weight_decay=h.adam_wd, base_lr=h.scalar_lr),
            ],
            **ab,
        )
        self.muon = Muon(h, banks)
        self.replicated = embed + scalars

    def step(self, step, frac):
        h, mult = self.h, lr_mult_at(self.h, frac)
        torch.nn.utils.clip_grad_norm_(self.params, h.grad_clip_norm)  # local, unaveraged grads (as the records)
        all_reduce_mean_([p.grad for p in self.replicated if p.grad is not None], h.world_size)
        for g in self.adam.param_groups:
            g["lr"] = g["base_lr"] * mult
        self.adam.step()
        self.muon.step(h.matrix_lr * mult, muon_momentum_at(h, step), h.muon_wd * muon_wd_mult_at(h, frac))
        for p in self.params:
            p.grad = None

    def state_dict(self):
        return copy.deepcopy(self.adam.state_dict()), self.muon.state_dict()

    def load_state_dict(self, s):
        self.adam.load_state_dict(s[0])
        self.muon.load_state_dict(s[1])


class EMA:
    def __init__(self, model, decay):
        self.decay, self.params = decay, [p for p in model.parameters()]
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self):
        torch._foreach_lerp_(self.shadow, [p.float() for p in self.params], 1 - self.decay)

    @torch.no_grad()
    def apply(self):
        for p, s in zip(self.params, self.shadow):
            p.copy_(s.to(p.dtype))


# ----------------------------------------------------------------------------- QUANTIZATION
# GPTQ (act-order, Cholesky error feedback) with SDClip row scales, k*std(row)/(2^(bits-1)-1) (PR #1729); int8 rows
# for the attention gates (PR #1736); fp16 passthrough for small tensors; a byte-shuffled Brotli/LZMA artifact with a
# CRC32; the self-extracting code wrapper whose bytes count against the 16,000,000-byte cap with the artifact's.

PASSTHROUGH_MAX_NUMEL = 65536
GATE_NUMEL_RANGE = (32, 8192)  # the dense [8, 512] and the sparse [8, 12] gates
SIZE_CAP_BYTES = 16_000_000
FP16_TINY = 2.0**-24  # smallest positive fp16: the records' 1e-10 floor rounds to 0 in fp16 and gives 0/0 rows


def fp16_row_scale(x):
    return x.clamp_min(FP16_TINY).to(torch.float16)


def round_rows(w, scale, clip_range):
    return (w.float() / scale.float()[:, None]).round().clamp(-clip_range, clip_range).to(torch.int8)


def sdclip_scale(w, bits, clip_sigmas):
    """Row scale clip_sigmas*std(row)/clip_range: clipping at k sigma ignores rare outliers."""
    clip_range = 2 ** (bits - 1) - 1
    return fp16_row_scale(clip_sigmas * w.float().std(dim=1) / clip_range), clip_range


def rtn_quantize(w, bits, clip_sigmas):
    scale, clip_range = sdclip_scale(w, bits, clip_sigmas)
    return round_rows(w, scale, clip_range), scale


@torch.no_grad()
def gptq_quantize(w, H, bits, clip_sigmas, block_size=128):
    """Quantise columns in act-order, pushing each column's error onto the not-yet-quantised ones
    through the upper Cholesky factor of H^-1 so that tr(E H E^T) stays small."""
    rows, cols = w.shape
    if H.shape != (cols, cols):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match weight {tuple(w.shape)}")
    H = H.detach().to(w.device, torch.float32).clone()
    dead = H.diagonal() == 0  # input never active: the weight column is irrelevant, 1 keeps H invertible
    H.diagonal()[dead] = 1
    H.diagonal().add_(0.01 * H.diagonal().mean())
    perm = H.diagonal().argsort(descending=True)
    W = w.detach().float()[:, perm]
    W[:, dead[perm]] = 0
    H = H[perm][:, perm]
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    scale, clip_range = sdclip_scale(w, bits, clip_sigmas)
    s = scale.float()[:, None]
    Q = torch.empty(rows, cols, dtype=torch.int8, device=w.device)
    for b in range(0, cols, block_size):
        e = min(b + block_size, cols)
        Wb, Hb = W[:, b:e], Hinv[b:e, b:e]  # views: updates land in W
        err = torch.empty_like(Wb)
        for j in range(e - b):
            col = Wb[:, j : j + 1]
            q = (col / s).round().clamp(-clip_range, clip_range)
            Q[:, b + j] = q[:, 0].to(torch.int8)
            err[:, j : j + 1] = (col - q * s) / Hb[j, j]
            Wb[:, j:] -= err[:, j : j + 1] * Hb[j : j + 1, j:]
        W[:, e:] -= err @ Hinv[b:e, e:]
    return Q[:, perm.argsort()], scale


def gptq_bits_and_clip(h, name):
    if "tok_emb" in name:
        return h.embed_bits, h.embed_clip_sigmas
    clip = h.mlp_clip_sigmas if ".mlp." in name else h.attn_clip_sigmas if ".attn." in name else h.matrix_clip_sigmas
    return h.matrix_bits, clip


def is_quant_gate(h, name, t):
    lo, hi = GATE_NUMEL_RANGE
    return h.gated_attn_quant_gate and name.endswith(".attn_gate_w") and t.ndim == 2 and lo <= t.numel() <= hi


def collapse_layer_index(name):
    """blocks.3.attn.c_q.weight -> blocks.attn.c_q.weight, so the log lists each kind once."""
    p = name.split(".")
    return ".".join(x for i, x in enumerate(p) if not (i and p[i - 1] == "blocks" and x.isdigit()))


def quant_summary_lines(meta):
    """The indented lines logged under "Quantized weights:", one per tag."""
    groups = {}
    for name, tag in meta.items():
        groups.setdefault(tag, set()).add(collapse_layer_index(name))
    return [f"  {tag}: {', '.join(sorted(names))}" for tag, names in sorted(groups.items())]


def lqer_factors(h, A, B):
    """LQER's factors of the GPTQ error (A = U_r S_r, B = V_r^T), quantised. Asym: A int2 in [-2, 1] with one scale
    max|A|/1.5, B int4 in [-8, 7] with a scale per LQER_ASYM_GROUP values of B flattened; else both per-row
    int(LQER_FACTOR_BITS). Returns the payload entries (key suffix: tensor) and the tag suffix."""
    if h.lqer_asym_enabled and B.numel() % h.lqer_asym_group == 0:
        sa = fp16_row_scale(A.abs().max() / 1.5)  # +max rounds to 2, clamped to 1: the positive side saturates
        sb = fp16_row_scale(B.reshape(-1, h.lqer_asym_group).abs().amax(1) / 7.5)
        qa = (A / sa.float()).round().clamp(-2, 1).to(torch.int8)
        qb = (B.reshape(sb.numel(), -1) / sb.float()[:, None]).round().clamp(-8, 7).to(torch.int8).view(B.shape)
        return {"lqA_a": qa, "lqAs_a": sa, "lqB_a": qb, "lqBs_a": sb}, "+lqer_asym"
    n = 2 ** (h.lqer_factor_bits - 1) - 1
    sa, sb = (fp16_row_scale(x.abs().amax(1) / n) for x in (A, B))
    return {"lqA": round_rows(A, sa, n), "lqAs": sa, "lqB": round_rows(B, sb, n), "lqBs": sb}, "+lqer"


def lqer_delta(w, name, tag):
    """The dequantised factor product A @ B (A: one scale or one per row; B: one per group or per row)."""
    k = "_a" if "lqer_asym" in tag else ""
    qa, sa, qb, sb = (w[f"{name}.{x}{k}"] for x in ("lqA", "lqAs", "lqB", "lqBs"))
    b = (qb.float().reshape(sb.numel(), -1) * sb.float()[:, None]).view(qb.shape)
    return (qa.float() * sa.float().reshape(-1, 1)) @ b


def quantize_state_dict(h, sd, hessians):
    w, m = {}, {}
    for name, t in sd.items():
        t = t.detach()
        if is_quant_gate(h, name, t):
            scale = fp16_row_scale(t.float().abs().amax(dim=1) / 127)
            w[name + ".gq"], w[name + ".gs"], m[name] = round_rows(t, scale, 127).cpu(), scale.cpu(), "gate_int8_row"
        elif name in hessians:
            bits, clip_sigmas = gptq_bits_and_clip(h, name)
            q, scale = gptq_quantize(t, hessians[name], bits, clip_sigmas)
            w[name + ".q"], w[name + ".scale"], m[name] = q.cpu(), scale.cpu(), f"gptq (int{bits})"
        elif not t.is_floating_point() or t.numel() <= PASSTHROUGH_MAX_NUMEL:
            # clone: torch.save writes a view's whole storage (e.g. a bank slice)
            w[name], m[name] = (t.half() if t.is_floating_point() else t).cpu().clone(), "passthrough (float16)"
        else:
            raise ValueError(f"{name}: float tensor with {t.numel()} elements has no Hessian; "
                             "refusing to ship it unquantised (missing calibration hook?)")
    if h.lqer_enabled:
        err = lambda n: sd[n].detach().float().cpu() - w[n + ".q"].float() * w[n + ".scale"].float()[:, None]
        for n in sorted((n for n in m if m[n].startswith("gptq")), key=lambda n: -err(n).norm().item())[: h.lqer_top_k]:
            U, S, Vh = torch.linalg.svd(err(n), full_matrices=False)
            factors, suffix = lqer_factors(h, U[:, : h.lqer_rank] * S[: h.lqer_rank], Vh[: h.lqer_rank])
            w.update({f"{n}.{k}": v for k, v in factors.items()})
            m[n] += suffix
    return {"w": w, "m": m}, quant_summary_lines(m)


def dequantize_state_dict(payload, template):
    w, m = payload["w"], payload["m"]
    if set(m) != set(template):
        raise ValueError(f"artifact keys do not match the model: missing {sorted(set(template) - set(m))[:5]}, "
                         f"unexpected {sorted(set(m) - set(template))[:5]}")
    out = {}
    for name, t in template.items():
        tag = m[name]
        if tag.startswith("gptq") or tag == "gate_int8_row":
            q, s = (
                (w[name + ".q"], w[name + ".scale"]) if tag.startswith("gptq") else (w[name + ".gq"], w[name + ".gs"])
            )
            d = q.float() * s.float()[:, None]
            out[name] = (d + lqer_delta(w, name, tag) if "lqer" in tag else d).to(t.dtype)
        elif tag == "passthrough (float16)":
            out[name] = w[name].to(t.dtype)
        else:
            raise ValueError(f"{name}: unknown quantisation tag {tag!r}")
        if out[name].shape != t.shape:
            raise ValueError(f"{name}: artifact shape {tuple(out[name].shape)} != model shape {tuple(t.shape)}")
    return out


def byte_shuffle(data, stride=2):
    """Group byte k of every fp16/int8 pair together: high bytes are low-entropy and compress far better."""
    return b"BSHF" + bytes([stride]) + b"".join(data[i::stride] for i in range(stride))


def byte_unshuffle(data):
    if data[:4] != b"BSHF" or len(data) < 5 or data[4] == 0:
        raise ValueError("not a byte-shuffled stream (missing BSHF header)")
    stride, body = data[4], data[5:]
    out, pos = bytearray(len(body)), 0
    for i in range(stride):
        n = len(range(i, len(body), stride))
        out[i::stride] = body[pos : pos + n]
        pos += n
    return bytes(out)


def shuffled_bytes(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return byte_shuffle(buf.getvalue())


def load_shuffled(raw):
    return torch.load(io.BytesIO(byte_unshuffle(raw)), map_location="cpu", weights_only=True)


def brotli_max(raw):
    import brotli

    return brotli.compress(raw, quality=11, lgwin=24)


def pack_artifact(payload, compressor):
    if compressor == "pergroup":
        return pack_pergroup(payload)
    raw = shuffled_bytes(payload)
    if compressor == "brotli":
        return seal(b"B", brotli_max(raw))
    if compressor == "lzma":
        return seal(b"L", lzma.compress(raw, preset=6))
    raise ValueError(f"unknown compressor {compressor!r} (brotli, lzma or pergroup)")


def seal(kind, body):
    """Compressor byte, CRC32 of the compressed body, body: a flipped bit or a cut file is caught before decoding
    (CRC32 detects every single-bit error; most of them would otherwise decode and score silently)."""
    return kind + zlib.crc32(body).to_bytes(4, "little") + body


def unpack_artifact(blob, name="artifact"):
    """The first byte names the compressor, so loading needs no COMPRESSOR setting. Bad bytes: DataError naming name."""
    fix = "re-copy it, or re-run quantization with RESUME_FROM=final_model.pt"
    kind, crc, body = blob[:1], blob[1:5], blob[5:]
    if len(blob) < 5:
        raise DataError(f"{name}: {len(blob)} bytes, not a model artifact (empty or truncated); {fix}")
    if kind not in (b"B", b"L", b"P"):
        raise DataError(f"{name}: not a model artifact (first byte {kind!r}, expected b'B' brotli, b'L' lzma or "
                        f"b'P' pergroup); check ARTIFACT, or {fix}")
    if zlib.crc32(body) != int.from_bytes(crc, "little"):
        raise DataError(f"{name}: checksum mismatch: the artifact is corrupt or truncated; {fix}")
    codec = pergroup_codec() if kind == b"P" else None  # a missing package: its own message, not "corrupt"
    try:
        if kind == b"P":
            return unpack_pergroup(body, codec)
        if kind == b"B":
            import brotli

            raw = brotli.decompress(body)
        else:
            raw = lzma.decompress(body)
        return load_shuffled(raw)
    except Exception as e:  # checksum fine: written corrupt, or by an incompatible version
        first = (str(e).splitlines() or [""])[0]
        raise DataError(f"{name}: corrupt model artifact ({type(e).__name__}: {first}); {fix}") from e


# COMPRESSOR=pergroup (PR #1855): the int8 GPTQ codes of each matrix role, all layers in order, form one stream; every
# matrix is stored column-major (neighbouring bytes: one column in neighbouring rows) and tok_emb's rows are chained by
# L1 similarity first. The rest (scales, gates, passthrough, LQER factors, tags, manifest, permutation) is one Brotli
# stream. tools/compress_bench.py chose the codec and the sorted set on trained weights (README: per-group compression).
PERGROUP_ROLES = ("tok_emb.weight", "attn.c_k.weight", "attn.c_q.weight", "attn.c_v.weight", "attn.proj.weight",
                  "mlp.fc.weight", "mlp.proj.weight")
PERGROUP_SORTED = ("tok_emb.weight",)  # sorting c_q and mlp.fc (PR #1855) cost more permutation bytes than it saved


def pergroup_codec():
    """bzip3 (BWT + context mixing; one 16 MiB block per stream): 18-48 KB under Brotli on the same streams, decoded
    in 6 s on one core. Imported only for pergroup artifacts: (compress, decompress)."""
    try:
        import bz3
    except ImportError:
        raise DataError("COMPRESSOR=pergroup artifacts need the bzip3 package: pip install bzip3==0.1.10") from None
    return (lambda b: bz3.compress(b, block_size=16 << 20)), bz3.decompress


def pergroup_split(w):
    """Role -> the keys of its GPTQ codes in payload (= layer) order."""
    groups = {r: [] for r in PERGROUP_ROLES}
    for k in w:
        role = collapse_layer_index(k[:-2]).removeprefix("blocks.")
        if k.endswith(".q") and w[k].dtype == torch.int8 and w[k].ndim == 2 and role in groups:
            groups[role].append(k)
    return groups


def l1_row_order(q, chunk=128):
    """Greedy nearest-neighbour chain from row 0: next is the unused row at the smallest L1 distance from the last
    (ties: the lowest index). Exact: int16 sums over 128 columns (<= 128 * 255), then int32; one thread (the steps
    are too small to share), used rows dropped every 512 steps."""
    n, threads = q.size(0), torch.get_num_threads()
    x = F.pad(q.to(torch.int16), (0, -q.size(1) % chunk)).view(n, -1, chunk)
    idx, rest, used, order = torch.arange(n), x, torch.zeros(n, dtype=torch.bool), [0]
    used[0] = True
    torch.set_num_threads(1)
    try:
        for step in range(1, n):
            if step % 512 == 0:
                keep = ~used[idx]
                idx, rest = idx[keep], rest[keep]
            d = (rest - x[order[-1]]).abs_().sum(2, dtype=torch.int16).sum(1, dtype=torch.int32)
            order.append(int(idx[d.masked_fill_(used[idx], 2**31 - 1).argmin()]))
            used[order[-1]] = True
    finally:
        torch.set_num_threads(threads)
    return torch.tensor(order)


def frame(streams):
    return b"".join(len(s).to_bytes(4, "little") + s for s in streams)


def unframe(body):
    out, i = [], 0
    while i < len(body):
        n = int.from_bytes(body[i : i + 4], "little")
        out.append(body[i + 4 : i + 4 + n])
        i += 4 + n
    if i != len(body):
        raise ValueError("stream lengths do not add up to the body")
    return out


def pack_pergroup(payload):
    compress, w = pergroup_codec()[0], payload["w"]
    groups, streams, perms = pergroup_split(w), [], {}
    for role, keys in groups.items():
        parts = []
        for k in keys:
            if role in PERGROUP_SORTED:
                if w[k].size(0) > 65536:
                    raise ValueError(f"{k}: {w[k].size(0)} rows do not fit the uint16 permutation")
                perms[k] = l1_row_order(w[k]).to(torch.uint16)
            parts.append((w[k][perms[k].int()] if k in perms else w[k]).T.contiguous().numpy().tobytes())
        streams.append(compress(b"".join(parts)) if parts else b"")
    grouped = {k for keys in groups.values() for k in keys}
    rest = {"w": {k: t for k, t in w.items() if k not in grouped}, "m": payload["m"], "p": perms,
            "g": {r: [(k, *w[k].shape) for k in keys] for r, keys in groups.items()}}
    return seal(b"P", frame([brotli_max(shuffled_bytes(rest))] + streams))


def unpack_pergroup(body, codec):
    import brotli

    first, *streams = unframe(body)
    rest = load_shuffled(brotli.decompress(first))
    w = rest["w"]
    for members, stream in zip(rest["g"].values(), streams, strict=True):
        data, pos = bytearray(codec[1](stream) if stream else b""), 0
        for k, rows, cols in members:
            q = torch.frombuffer(data, dtype=torch.int8, offset=pos, count=rows * cols).view(cols, rows).T
            w[k], pos = (q[rest["p"][k].int().argsort()] if k in rest["p"] else q).contiguous(), pos + rows * cols
        if pos != len(data):
            raise ValueError(f"a code stream holds {len(data)} bytes, its manifest {pos}")
    return {"w": w, "m": rest["m"]}


def code_wrapper(source_text):
    """Counted code = this two-line self-extracting stub (minified source, LZMA, Base85), not the raw file. The
    source also goes into linecache under a file name: Triton's @jit reads its kernels' source (inspect)."""
    try:
        import python_minifier

        keep_args = python_minifier.RemoveAnnotationsOptions(remove_argument_annotations=False)  # Triton's tl.constexpr
        text = python_minifier.minify(source_text, remove_annotations=keep_args, remove_literal_statements=True,
                                      rename_locals=False, hoist_literals=False)
        minified = True
    except ImportError:
        text, minified = source_text, False
    blob = base64.b85encode(lzma.compress(text.encode())).decode()
    return (f'import lzma as L,base64 as B,linecache as C\ns=L.decompress(B.b85decode("{blob}")).decode();'
            'f="train_gpt.py";C.cache[f]=(len(s),None,s.splitlines(1),f);exec(compile(s,f,"exec"))\n', minified)


def submission_size_lines(model_bytes, code_bytes, compressor, cap=SIZE_CAP_BYTES):
    total = model_bytes + code_bytes
    lines = [record_line("model_bytes", compressor=compressor, nbytes=model_bytes),
             record_line("total_bytes", compressor=compressor, nbytes=total)]
    if total > cap:
        lines.append(f"WARNING: total submission size {total} bytes exceeds the {cap:,}-byte cap "
                     f"by {total - cap} bytes: this run is NOT A VALID RECORD")
    return lines, total <= cap


@torch.no_grad()
def collect_hessians(h, model, device, files):
    """X^T X of every GPTQ matrix's input over random training windows (looped, dense causal, eager).
    Reads training data, so it runs inside the training time budget (GPTQ_RESERVE_SECONDS)."""
    hs = {}

    def cap(name, x):
        x = x.detach().flatten(0, -2).float()
        if name not in hs:
            hs[name] = torch.zeros(x.size(1), x.size(1), device=x.device)
        hs[name].addmm_(x.T, x)

    rng = np.random.Generator(np.random.PCG64(h.seed + h.rank))
    seq, n = h.train_seq_len, h.gptq_calibration_seqs
    shards = [read_shard(f) for f in files[h.rank :: h.world_size] or files]
    n_batches = -(-h.gptq_calibration_batches // h.world_size)  # ranks share the batches; Hessians are all-reduced
    for _ in range(n_batches):
        rows = []
        for _ in range(n):
            s = shards[rng.integers(len(shards))]
            a = int(rng.integers(0, len(s) - seq))
            rows.append(np.asarray(s[a : a + seq]).astype(np.int64))
        ids = torch.from_numpy(np.stack(rows)).to(device)
        with autocast(device):
            fwd = Fwd(h.eval_loop_depth, cap=cap)  # eager: the hook runs Python per matrix
            model.logits(model.hidden(ids, fwd), fwd)
    for k in list(hs):
        if h.distributed:
            dist.all_reduce(hs[k])
        hs[k] /= n_batches * h.world_size
        if k.endswith("attn.c_q.weight"):  # q, k and v read the same input
            hs[k.replace("c_q", "c_k")] = hs[k.replace("c_q", "c_v")] = hs[k]
    return hs


def quantize_and_save(h, model, device, log, train_ms):
    t0 = time.perf_counter()
    log("GPTQ:collecting Hessians from calibration data...")
    hessians = collect_hessians(h, model, device, list_shards(h.train_files, "training"))
    sync(device)
    calib = time.perf_counter() - t0
    log(f"GPTQ:collected {len(hessians)} Hessians in {calib:.1f}s")
    if train_ms and h.max_wallclock_seconds > 0:
        total = train_ms + 1000 * calib
        log(f"train_time_with_gptq_calibration: {total:.0f}ms" + ("" if total <= 1000 * h.max_wallclock_seconds else
            f"  WARNING: over MAX_WALLCLOCK_SECONDS={h.max_wallclock_seconds:g}; raise GPTQ_RESERVE_SECONDS"))
    if h.is_main_process:
        payload, lines = quantize_state_dict(h, model.unbanked_state_dict(), hessians)
        log("Quantized weights:")
        for line in lines:
            log(line)
        blob = pack_artifact(payload, h.compressor)
        with open(h.quantized_model_path, "wb") as f:
            f.write(blob)
        wrapper, minified = code_wrapper(open(__file__, encoding="utf-8").read())
        log(f"Code size (uncompressed): {os.path.getsize(__file__)} bytes")
        log(record_line("code_bytes", nbytes=len(wrapper.encode()),
                        minified="minified" if minified else "not minified: python-minifier absent"))
        lines, ok = submission_size_lines(os.path.getsize(h.quantized_model_path), len(wrapper.encode()), h.compressor)
        for line in lines:
            log(line)
    if h.distributed:
        dist.barrier()


# ----------------------------------------------------------------------------- EVALUATION


class Score(NamedTuple):
    loss: float
    bpb: float
    tokens: int  # targets scored
    bytes: int  # their original bytes


def bpb_from_sums(sums):
    nll, ntok, nbytes = sums.tolist()[:3]
    return Score(nll / max(ntok, 1), nll / (math.log(2) * max(nbytes, 1)), round(ntok), round(nbytes))


def val_totals(val, docs=None):
    """(targets, bytes) an evaluation must score: the whole set, or these documents (TTT with VAL_DOC_FRACTION < 1)."""
    if docs is None:
        return len(val.tokens) - 1, int(val.bytes[1:].sum())
    return sum(d.length - 1 for d in docs), sum(int(val.bytes[d.start + 1 : d.start + d.length].sum()) for d in docs)


def log_score(name, s, ms, expect, log):
    """The result line, with the targets and bytes scored; a score that skipped or repeated targets is refused."""
    log(record_line("score", name=name, loss=s.loss, bpb=s.bpb, ms=ms, tokens=s.tokens, nbytes=s.bytes))
    if (s.tokens, s.bytes) != expect:
        raise RuntimeError(f"{name} scored {s.tokens} targets / {s.bytes} bytes but the set holds {expect[0]} / "
                           f"{expect[1]}: targets were skipped or scored twice; this score is invalid (a scorer bug)")


def timed_eval(name, fn, log, expect):
    t0 = time.perf_counter()
    s = fn()
    log_score(name, s, 1000 * (time.perf_counter() - t0), expect, log)
    return s


@torch.no_grad()
def eval_val(h, model, val, device, fwd):
    """Non-overlapping, doc-packed scoring: rows of EVAL_SEQ_LEN sequences, attention within documents."""
    seq, dev_tokens = h.eval_seq_len, val.tokens.to(device)
    n = (len(val.tokens) - 1) // seq
    a, b = n * h.rank // h.world_size, n * (h.rank + 1) // h.world_size
    per_batch = max(1, h.val_batch_tokens // (h.world_size * seq))
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for s in range(a, b, per_batch):
        lo, hi = s * seq, min(s + per_batch, b) * seq
        x, y = dev_tokens[lo:hi], dev_tokens[lo + 1 : hi + 1]
        cu = cu_seqlens_for(val.tokens[lo:hi].numpy(), seq, h.cu_bucket).to(device)
        with autocast(device):
            loss = model.token_losses(x[None], y[None], fwd, cu)
        sums += torch.stack(
            [
                loss.double().sum(),
                torch.tensor(float(hi - lo), device=device),
                val.bytes[lo + 1 : hi + 1].double().sum().to(device),
            ]
        )
    return bpb_from_sums(reduce_sums(h, sums))


@torch.no_grad()
def eval_sliding(h, model, val, device, log, fwd):
    """Windows of EVAL_SEQ_LEN every EVAL_STRIDE targets, each scoring only its last stride targets (first: all)."""
    check_windows(h, ttt=False)
    W, S, N = h.eval_seq_len, h.eval_stride, len(val.tokens) - 1
    ends = list(range(W, N, S)) + [N] if N > W else [N]
    mine = ends[len(ends) * h.rank // h.world_size : len(ends) * (h.rank + 1) // h.world_size]
    first = ends.index(mine[0]) if mine else 0
    per_fwd, sums, t0 = 32, torch.zeros(3, dtype=torch.float64, device=device), time.perf_counter()
    for bi in range(0, len(mine), per_fwd):
        xs, ys, bs, masks, starts = [], [], [], [], [0]
        for k, e in enumerate(mine[bi : bi + per_fwd]):
            prev = ends[first + bi + k - 1] if first + bi + k > 0 else 0
            s = max(0, e - W)
            xs.append(val.tokens[s:e])
            ys.append(val.tokens[s + 1 : e + 1])
            bs.append(val.bytes[s + 1 : e + 1])
            masks.append(torch.arange(s + 1, e + 1) > prev)
            starts.append(starts[-1] + e - s)
        x, y, m = torch.cat(xs), torch.cat(ys), torch.cat(masks)
        cu = cu_seqlens_for(x.numpy(), W, h.cu_bucket, starts[:-1]).to(device)
        with autocast(device):
            loss = model.token_losses(x[None].to(device), y[None].to(device), fwd, cu)[0]
        m_dev = m.to(device)
        nb = torch.cat(bs).double().to(device)
        sums += torch.stack([(loss.double() * m_dev).sum(), m_dev.double().sum(), (nb * m_dev).sum()])
        if h.is_main_process and (bi // per_fwd) % 50 == 0:
            rl, rb = bpb_from_sums(sums)[:2]
            log(
                f"sliding_progress: batch {bi // per_fwd + 1}/{-(-len(mine) // per_fwd)} tokens:{int(sums[1])} "
                f"running_loss:{rl:.4f} running_bpb:{rb:.4f} elapsed:{time.perf_counter() - t0:.1f}s"
            )
    return bpb_from_sums(reduce_sums(h, sums))


def read_artifact(path):
    with open(path, "rb") as f:
        return unpack_artifact(f.read(), path)


def load_artifact_model(h, device, path):
    payload = read_artifact(path)  # before building anything: a bad file fails at once
    model = build_model(h, device)
    template = {k: v.cpu() for k, v in model.unbanked_state_dict().items()}
    try:
        sd = dequantize_state_dict(payload, template)
    except ValueError as e:
        raise DataError(f"{path} does not fit this model ({e}); set the model settings (NUM_LAYERS, MODEL_DIM, ...) "
                        "of the run that made it") from None
    model.load_unbanked(sd)
    return model


# ----------------------------------------------------------------------------- TEST-TIME TRAINING


class Doc(NamedTuple):
    start: int
    length: int  # tokens from its BOS up to and including the next doc's BOS (its last target)


def find_docs(tokens):
    bos = torch.nonzero(tokens == BOS_ID).flatten().tolist()
    if not bos or bos[0] != 0:
        bos = [0] + bos  # a leading fragment is still scored exactly once
    ends = bos[1:] + [len(tokens) - 1]
    return [Doc(s, e - s + 1) for s, e in zip(bos, ends) if e > s]


def ttt_schedule(h, docs):
    """Batches of TTT_BATCH_SIZE docs sorted by length, processed longest first; phase p ends after the batch that
    holds prefix doc boundary_p. Returns (queue of doc-index lists, boundaries, batches per phase end)."""
    order = sorted(range(len(docs)), key=lambda i: (docs[i].length, i))
    batches = [order[i : i + h.ttt_batch_size] for i in range(0, len(order), h.ttt_batch_size)][::-1]
    P = h.phased_ttt_num_phases if h.phased_ttt_prefix_docs > 0 else 0
    prefix = min(h.phased_ttt_prefix_docs, len(docs))
    bounds = [prefix * k // P for k in range(1, P + 1)]
    done = np.cumsum([len(b) for b in batches])
    ends = [int(np.searchsorted(done, b)) + 1 if b else 0 for b in bounds]
    return batches, bounds, ends


class WorkClaimer:
    """Hands out queue indices to ranks first-come first-served through the torchrun TCP store (multi-node safe)."""

    def __init__(self, h):
        self.h, self.local = h, {}
        self.store = dist.distributed_c10d._get_default_store() if h.distributed else None
        if self.store is not None:  # one namespace per evaluation, agreed by all ranks (RUN_ID may differ per rank)
            ns = [uuid.uuid4().hex]
            dist.broadcast_object_list(ns, src=0)
            self.ns = ns[0]

    def claim(self, key):
        if self.store is not None:
            return self.store.add(f"ttt/{self.ns}/{key}", 1) - 1
        self.local[key] = self.local.get(key, -1) + 1
        return self.local[key]


def mark_rows(dims, *tensors):
    """Mark row (0) / width (1) dimensions symbolic for ttt_block_fns' graphs; eager calls ignore it."""
    for t in tensors:
        for d in dims:
            torch._dynamo.maybe_mark_dynamic(t, d)


def mark_block_inputs(attn, lora, *acts):
    """A block's activations [rows, width, d], RoPE tables [1, width, 1, k] and LoRA factors [rows, ...]."""
    mark_rows((0, 1), *acts), mark_rows((1,), *attn.rope[:2])
    mark_rows((0,), *(t for ab in lora or () if ab is not None for t in ab[:2]))


def ttt_block_fns(h):
    """TTT rows change count and width every chunk: one compiled graph per block function serves them all, with only
    the row count and width symbolic (all-symbolic dynamic=True compiles several times slower). Duck sizing is off,
    or a row count that happens to equal a weight dimension would specialise the graph. Eager with TTT_COMPILE=0."""
    if not h.ttt_compile:
        return EAGER
    torch.fx.experimental._config.use_duck_shape = False
    seq, par, head = (torch.compile(f) for f in EAGER[:3])

    def seq_fn(x, x0, w, attn, lora, cap):
        mark_block_inputs(attn, lora, x, x0)
        return seq(x, x0, w, attn, lora, cap)

    def par_fn(lane0, lane1, x0, w, r, P, attn, lora, cap):
        mark_block_inputs(attn, lora, lane0, lane1, x0)
        return par(lane0, lane1, x0, w, r, P, attn, lora, cap)

    def head_fn(hid, emb, targets, head_lora, softcap, fused):
        mark_rows((0,), hid, targets, *(head_lora or ())[:2])
        return head(hid, emb, targets, head_lora, softcap, fused)

    if not h.ttt_compile_model:
        return BlockFns(seq_fn, par_fn, head_fn)
    whole = torch.compile(GPT.losses, fullgraph=True)

    def whole_fn(model, ids, attn, targets, fwd, cols):
        mark_block_inputs(attn, None, ids, targets)
        mark_rows((0,), cols, *fwd.head_lora[:2], *(t for lora in fwd.loras for ab in lora if ab is not None for t in ab[:2]))
        return whole(model, ids, attn, targets, fwd, cols)

    return BlockFns(seq_fn, par_fn, head_fn, whole_fn)


def new_adapters(h, model, bsz, device, gen, keep=None):
    """Fresh per-document LoRA: A ~ U(+-1/sqrt(in)), B = 0, one slot per virtual layer plus the LM head. With `keep`
    (TTT_WARM_START_A: [size, set], emptied after each phase) a batch of the last set's size gets that set back with
    B, the AdamW moments and step zeroed but A kept (trained on documents already scored): PR #1855's batch reset."""
    if keep and keep[0] == bsz:
        loras, head, opt = keep[1]
        state = [t for s in opt.state.values() for t in s.values()]
        for t in [ab[1] for l in loras for ab in l if ab is not None] + [head[1], *state]:
            t.detach().zero_()
        return keep[1]
    d, kvd, V, r = h.model_dim, model.kv_bank.size(1), h.vocab_size, h.ttt_lora_rank
    scale = (h.ttt_lora_alpha / r,) if h.ttt_lora_alpha else ()

    def ab(i, o):
        A = ((torch.rand(bsz, r, i, device=device, generator=gen) * 2 - 1) / math.sqrt(i)).requires_grad_()
        return A, torch.zeros(bsz, o, r, device=device, requires_grad=True), *scale

    slots = sum(len(p) for p in layer_plan(h, h.eval_loop_depth))
    loras = [Lora(ab(d, d), ab(d, kvd) if h.ttt_k_lora else None, ab(d, kvd), ab(d, d) if h.ttt_o_lora else None,
                  ab(d, d) if h.ttt_mlp_lora else None) for _ in range(slots)]
    head = ab(d, V)
    params = [t for l in loras for ab_ in l if ab_ is not None for t in ab_[:2]] + list(head[:2])
    opt = torch.optim.AdamW(params, lr=h.ttt_lora_lr, betas=(h.ttt_beta1, h.ttt_beta2), eps=1e-10,
                            weight_decay=h.ttt_weight_decay, fused=device.type == "cuda")
    if keep is not None:
        keep[:] = bsz, (loras, head, opt)
    return loras, head, opt


def _rows(loras, head, rows):
    """The adapters of the documents still being scored (an indexed copy that back-propagates into the full set)."""
    pick = lambda ab: ab and (ab[0][rows], ab[1][rows], *ab[2:])
    return [Lora(*(pick(ab) for ab in l)) for l in loras], pick(head)


# A chunk step replays as a CUDA graph once a batch's rows and width stay fixed for this many chunks, with at most
# this many rows: a long document's tail (one live row and its padding row, width TTT_EVAL_SEQ_LEN) is host-bound
TTT_GRAPH_MIN_CHUNKS, TTT_GRAPH_MAX_ROWS = 8, 16


class ChunkGraph:
    """One TTT chunk step (row gather, forward, backward, AdamW) as a CUDA graph whose one input is the row table:
    the first call is a real step on the capture stream (lazy workspaces), the second captures, then each replays.
    Off CUDA the step just runs, through the same static row table (what the CPU tests check)."""

    def __init__(self, step, meta, opt):
        self.step, self.meta, self.opt, self.graph, self.stream = step, meta.clone(), opt, None, None

    def __call__(self, meta):
        self.meta.copy_(meta, non_blocking=True)
        if not self.meta.is_cuda:
            return self.step(self.meta)
        if self.stream is None:
            self.stream = torch.cuda.Stream()
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                out = self.step(self.meta)
            torch.cuda.current_stream().wait_stream(self.stream)
            return out
        if self.graph is None:  # (fused AdamW's math ignores `capturable`; left on, eager steps would warn)
            self.graph = torch.cuda.CUDAGraph()
            self.opt.param_groups[0]["capturable"] = True
            with torch.cuda.graph(self.graph, stream=self.stream):
                self.out = self.step(self.meta)
            self.opt.param_groups[0]["capturable"] = False
        self.graph.replay()
        return self.out


def ttt_batch(h, model, fns, val_dev, bytes_dev, docs, device, gen, per_doc=None, keep=None):
    """Score a batch of documents chunk by chunk; after scoring chunk c, AdamW steps on exactly those tokens.
    Documents that have run out of chunks leave the batch, so long documents do not drag padding rows along.
    Row bookkeeping stays on the CPU (no device syncs); the scored columns are always among a row's last C."""
    C, W = h.ttt_chunk_size, h.ttt_eval_seq_len
    starts = torch.tensor([d.start for d in docs])
    pred = torch.tensor([d.length - 1 for d in docs])
    n_chunks = (pred + C - 1) // C
    loras, head, opt = new_adapters(h, model, len(docs), device, gen, keep)
    run = model.token_losses if fns.model is None else model.whole

    def step(meta, rows, width, train):
        """meta [4, rows] on the device: per row the token offset of column 0, row length, first scored column and
        update flag. Returns the per-target losses [rows, C], which are scored, and (nll, targets, bytes, row tokens)."""
        base, lim, first, upd = meta
        col = torch.arange(width, device=device)
        valid = col < lim[:, None]
        pos = torch.where(valid, base[:, None] + col, 0)
        x, y = val_dev[pos] * valid, val_dev[pos + 1] * valid
        cols = lim[:, None] - C + torch.arange(C, device=device)
        scored = cols >= first[:, None]
        cols = cols.clamp_min(0)
        nbytes = bytes_dev[base[:, None] + cols + 1].double()
        sub_loras, sub_head = (loras, head) if rows is None else _rows(loras, head, rows)
        with autocast(device, cache=False):  # (a cached cast would outlive a CUDA graph's capture)
            loss = run(x, y, Fwd(h.eval_loop_depth, fns, sub_loras, sub_head), cols=cols)
        if train:
            per_doc_mean = (loss * scored).sum(1) / scored.sum(1).clamp_min(1)
            (per_doc_mean * upd).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        loss, m = loss.detach(), scored.double()
        return loss, scored, torch.stack([(loss.double() * m).sum(), m.sum(), (nbytes * m).sum(), m.new_full((), x.numel())])

    sums = torch.zeros(4, dtype=torch.float64, device=device)  # nll, targets, bytes, row tokens computed
    graph, graph_rows = None, None
    for c in range(int(n_chunks.max())):
        rows = torch.nonzero(n_chunks > c).flatten()
        end = torch.where(n_chunks[rows] - 1 == c, pred[rows], C * (c + 1))
        ws = (end - W).clamp_min(0)
        update = n_chunks[rows] - 1 > c  # a document's last chunk is scored, never trained on
        width = min(C * (c + 1), W)
        meta = torch.stack([starts[rows] + ws, end - ws, C * c - ws, update.long()])
        live = len(rows)
        if live == 1:  # a padding row rides along, nothing scored or trained: one row would need its own graphs
            rows = torch.cat([rows, (rows + 1) % len(docs)])
            meta = torch.cat([meta, torch.tensor([[0], [1], [C + 1], [0]])], 1)
        train = bool(update.any())
        sub = None if len(rows) == live == len(docs) else rows.to(device)
        if width == W and rows.tolist() != graph_rows:  # these rows and width now stay until one of them finishes
            graph, graph_rows = None, rows.tolist()
            if h.ttt_cuda_graphs and int(n_chunks[rows[:live]].min()) - c >= TTT_GRAPH_MIN_CHUNKS \
                    and len(rows) <= TTT_GRAPH_MAX_ROWS:
                graph = ChunkGraph(functools.partial(step, rows=sub, width=W, train=True), meta.to(device), opt)
        for k in range(h.ttt_grad_steps if train else 1):
            if graph is not None and train:
                loss, scored, part = graph(meta)
            else:
                loss, scored, part = step(meta.to(device, non_blocking=True), sub, width, train)
            if k == 0:
                sums += part
                if per_doc is not None:
                    for i, d in enumerate(rows[:live].tolist()):
                        per_doc[docs[d].start].append(loss[i][scored[i]].cpu())
    return sums


def global_sgd_loss(h, model, chunk, device):
    """This rank's share of one global-SGD chunk (CPU tokens, targets included): its whole TTT_EVAL_SEQ_LEN
    sequences, each its own segment (same math on any rank count); None when it has none. Scaled so that the
    rank average of the gradients is the chunk's token mean."""
    seq = h.ttt_eval_seq_len
    nseq = (len(chunk) - 1) // seq
    a, b = nseq * h.rank // h.world_size * seq, nseq * (h.rank + 1) // h.world_size * seq
    if b <= a:
        return None
    x, y = chunk[a:b], chunk[a + 1 : b + 1]
    with autocast(device):
        cu = cu_seqlens_for(x.numpy(), seq, h.cu_bucket, range(0, b - a, seq)).to(device)
        # eager: its packed rows would need their own graphs, compiled inside the timed loop
        nll = model.token_losses(x[None].to(device), y[None].to(device), Fwd(h.eval_loop_depth), cu).sum()
    return nll * h.world_size / (nseq * seq)


def global_sgd_docs(docs, scored_batches, boundary):
    """A phase's global-SGD data, as in the records: of the scored documents, the first `boundary` in batch order
    with batches numbered shortest first (the queue runs them longest first), i.e. the shortest scored documents."""
    return [docs[i] for b in reversed(scored_batches) for i in b][:boundary]


def global_sgd(h, model, val, docs, device, log, phase):
    """Phase step of PR #1626's phased TTT: plain SGD on the base model over already-scored documents only."""
    if not docs:  # boundary 0 (PHASED_TTT_PREFIX_DOCS < phases): nothing scored to train on yet
        return
    toks = torch.cat([val.tokens[d.start : d.start + d.length - 1] for d in docs])
    n = -(-len(toks) // h.global_ttt_chunk_tokens)
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=h.global_ttt_lr, momentum=h.global_ttt_momentum)
    t0 = time.perf_counter()
    for _ in range(h.global_ttt_epochs):
        for c in range(n - 1):  # the last (partial) chunk is skipped: its cosine LR is 0
            lr = h.global_ttt_lr * 0.5 * (1 + math.cos(math.pi * c / max(n - 1, 1)))
            for g in opt.param_groups:
                g["lr"] = lr
            loss = global_sgd_loss(
                h, model, toks[c * h.global_ttt_chunk_tokens : (c + 1) * h.global_ttt_chunk_tokens + 1], device
            )
            if loss is not None:
                loss.backward()
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            all_reduce_mean_([p.grad for p in params], h.world_size)
            torch.nn.utils.clip_grad_norm_(params, h.global_ttt_grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if h.is_main_process:
                log(f"tttg: c{c + 1}/{n - 1} lr:{lr:.6f} t:{time.perf_counter() - t0:.1f}s")
    for p in params:
        p.requires_grad_(False)


def ttt_warmup(h, model, fns, device, log):
    """Compile before the eval timer, on random tokens (no validation data): the LoRA forward for a full batch of short
    documents and one long one (many rows, the padded lone row, rows past the window, a CUDA-graphed tail), then one
    global-SGD forward/backward at this rank's row length (flex_attention's graphs). The weights are left untouched."""
    t0, g0 = time.perf_counter(), compiled_graphs()
    log("ttt_lora:warming up compile (random tokens, no val data)")
    model.requires_grad_(False)  # as in evaluation: graphs are specialised on which inputs need gradients
    C, W = h.ttt_chunk_size, h.ttt_eval_seq_len
    lens = [3 * C + 1] * (h.ttt_batch_size - 1) + [W + (TTT_GRAPH_MIN_CHUNKS + 3) * C + 1]  # its tail: a ChunkGraph
    starts = np.cumsum([0] + lens[:-1])
    toks = torch.randint(8, h.vocab_size, (sum(lens) + 1,), device=device)
    toks[torch.from_numpy(starts).to(device)] = BOS_ID
    docs, gen = [Doc(int(s), n) for s, n in zip(starts, lens)], torch.Generator(device=device).manual_seed(0)
    ttt_batch(h, model, fns, toks, torch.ones_like(toks), docs, device, gen)
    if h.phased_ttt_prefix_docs > 0:
        model.requires_grad_(True)
        loss = global_sgd_loss(h, model, torch.randint(8, h.vocab_size, (h.global_ttt_chunk_tokens + 1,)), device)
        if loss is not None:
            loss.backward()
        model.zero_grad(set_to_none=True)
        model.requires_grad_(False)
    log(f"ttt_lora:compile warmup done ({time.perf_counter() - t0:.1f}s, {compiled_graphs() - g0} graphs)")


def ttt_docs(h, val):
    """The documents phased TTT scores: all of them, or a seeded VAL_DOC_FRACTION sample (a quick partial score)."""
    docs = find_docs(val.tokens)
    if h.val_doc_fraction < 1:
        keep = np.random.default_rng(h.seed).random(len(docs)) < h.val_doc_fraction
        docs = [d for d, k in zip(docs, keep) if k]
    return docs


def eval_ttt_phased(h, model, fns, val, device, log, per_doc=None):
    """Phased score-first TTT (PR #1626): every target is scored once, before any update that could see it."""
    check_windows(h, sliding=False)
    docs = ttt_docs(h, val)
    batches, bounds, ends = ttt_schedule(h, docs)
    log(
        f"ttt_phased: total_docs:{len(docs)} prefix_docs:{bounds[-1] if bounds else 0} "
        f"suffix_docs:{len(docs) - (bounds[-1] if bounds else 0)} num_phases:{len(bounds)} boundaries:{bounds}"
    )
    for p in model.parameters():
        p.requires_grad_(False)
    val_dev, bytes_dev = val.tokens.to(device), val.bytes.to(device)
    claimer, sums, t0 = WorkClaimer(h), torch.zeros(4, dtype=torch.float64, device=device), time.perf_counter()
    keep = [] if h.ttt_warm_start_a else None  # the adapters the next batch of their size reuses (new after each SGD)
    segments = list(zip([0] + ends, ends + [len(batches)]))
    for phase, (lo, hi) in enumerate(segments):
        while (q := lo + claimer.claim(f"seg{phase}")) < hi:
            gen = torch.Generator(device=device).manual_seed(h.seed * 1000003 + q)
            bs = ttt_batch(h, model, fns, val_dev, bytes_dev, [docs[i] for i in batches[q]], device, gen, per_doc, keep)
            sums += bs
            if h.is_main_process:
                bl, bb = bpb_from_sums(bs)[:2]
                rl, rb = bpb_from_sums(sums)[:2]
                lens = [docs[i].length for i in batches[q]]
                log(
                    f"ttp: b{len(batches) - q}/{len(batches)} bl:{bl:.4f} bb:{bb:.4f} rl:{rl:.4f} rb:{rb:.4f} "
                    f"dl:{min(lens)}-{max(lens)} gd:{min(phase, len(bounds))}"
                )
        if phase < len(bounds):
            prefix = global_sgd_docs(docs, batches[:hi], bounds[phase])
            log(
                f"ttpp: phase:{phase + 1}/{len(bounds)} pd:{sum(len(b) for b in batches[:hi])} gd:{len(prefix)} "
                f"t:{time.perf_counter() - t0:.1f}s"
            )
            if keep:
                keep.clear()
            global_sgd(h, model, val, prefix, device, log, phase)
            log(f"ttpr: phase:{phase + 1}/{len(bounds)} t:{time.perf_counter() - t0:.1f}s")
    sums = reduce_sums(h, sums)
    t = time.perf_counter() - t0
    log(
        f"ttt_throughput: row_tokens:{int(sums[3])} scored_tokens:{int(sums[1])} "
        f"row_tok/s_per_gpu:{sums[3].item() / t / h.world_size:.0f}"
    )
    return bpb_from_sums(sums)


# ----------------------------------------------------------------------------- TRAINING


def training_step(h, model, opt, loader, device, step, frac, fwd):
    total = 0.0
    for _ in range(h.grad_accum_steps):
        x, y, cu = loader.next_batch()
        with autocast(device):
            loss = model(x[None], y[None], fwd, cu)
        (loss / h.grad_accum_steps).backward()
        total = total + loss.detach()
    opt.step(step, frac)
    return total / h.grad_accum_steps


def warmup(h, model, opt, device, log, fns):
    """Compile every graph the run will need (each depth of the schedule and TRAIN_LOOP_PREWARM_DEPTHS) before the
    timer starts, then restore the initial state."""
    if h.warmup_steps <= 0:
        return
    model_state, opt_state = copy.deepcopy(model.state_dict()), opt.state_dict()
    loader = TrainLoader(h, device)
    depths = sorted({*(d for _, d in h.depth_schedule), *h.train_loop_prewarm_depths} - {0})
    t0 = time.perf_counter()
    for s in range(h.warmup_steps):
        depth = depths[s % len(depths)]
        try:
            training_step(h, model, opt, loader, device, s, 0.0, Fwd(depth, fns))
        except torch._dynamo.exc.TorchDynamoException as e:  # a torch build that cannot compile the graph: say the way out
            raise RuntimeError(f"torch.compile failed in the warm-up ({type(e).__name__}); COMPILE_MODEL=0 compiles "
                               "one graph per block function instead, COMPILE=0 runs eagerly") from e
        if s < 6 or s + 1 in (10, h.warmup_steps):
            sync(device)
            log(f"warmup_step: {s + 1}/{h.warmup_steps} depth:{depth} t:{time.perf_counter() - t0:.1f}s")
    model.load_state_dict(model_state)
    opt.load_state_dict(opt_state)


def train(h, model, device, log, val, fns):
    opt = Optimizers(h, model)
    warmup(h, model, opt, device, log, fns)
    torch.manual_seed(h.seed)
    ema, loader = EMA(model, h.ema_decay), TrainLoader(h, device)
    cap_ms = 1000 * (h.max_wallclock_seconds - h.gptq_reserve_seconds) if h.max_wallclock_seconds > 0 else 0
    if cap_ms:
        log(f"gptq:reserving {h.gptq_reserve_seconds:g}s, effective={cap_ms:.0f}ms")
    log(f"loop_depth_schedule: {h.depth_schedule} prewarm={h.train_loop_prewarm_depths} eval_depth={h.eval_loop_depth}")
    fwd = Fwd(1, fns)
    step, train_ms, stop = 0, 0.0, False
    sync(device)
    t0 = time.perf_counter()
    while True:
        last = step == h.iterations or stop
        if h.val_loss_every > 0 and (step % h.val_loss_every == 0 or last):
            sync(device)
            train_ms += 1000 * (time.perf_counter() - t0)
            vl, vb = eval_val(h, model, val, device, Fwd(h.eval_loop_depth, fns))[:2]  # the records' depth
            log(record_line("val_step", step=step, iterations=h.iterations, loss=vl, bpb=vb))
            sync(device)
            t0 = time.perf_counter()
        if last:
            break
        elapsed = train_ms + 1000 * (time.perf_counter() - t0)
        frac = elapsed / cap_ms if cap_ms else step / h.iterations
        depth = loop_depth_at(h, frac)
        if depth != fwd.depth:
            enc, dec = layer_plan(h, depth)
            log(f"layer_loop:phase step:{step} frac:{frac:.3f} depth:{depth} encoder:{enc} decoder:{dec}")
            fwd = Fwd(depth, fns)
        loss = training_step(h, model, opt, loader, device, step, frac, fwd)
        ema.update()
        step += 1
        sync(device)
        elapsed = train_ms + 1000 * (time.perf_counter() - t0)
        stats = torch.stack([loss.float(), torch.tensor(float(cap_ms > 0 and elapsed >= cap_ms), device=device)])
        if h.distributed:  # summed: the logged loss is the global batch's mean; any rank past the cap stops all
            dist.all_reduce(stats)
        loss, stop = stats.tolist()
        if step <= 5 or step % h.train_log_every == 0:
            log(record_line("train_step", step=step, iterations=h.iterations, loss=loss / h.world_size,
                            minutes=elapsed / 60000, tok_s=step * h.train_batch_tokens / (elapsed / 1000)))
        stop = stop > 0
    train_ms += 1000 * (time.perf_counter() - t0) if h.val_loss_every <= 0 else 0
    if stop:
        log(record_line("stop", ms=train_ms, step=step, iterations=h.iterations))
    if device.type == "cuda":
        log(record_line("peak", alloc=torch.cuda.max_memory_allocated() // 2**20,
                        reserved=torch.cuda.max_memory_reserved() // 2**20))
    log("ema:applying EMA weights")
    ema.apply()
    return train_ms


# ----------------------------------------------------------------------------- MAIN


def evaluate_artifact(h, device, log, val, path, t_start, fns):
    model, fwd = load_artifact_model(h, device, path), Fwd(h.eval_loop_depth, fns)
    timed_eval("diagnostic quantized", lambda: eval_val(h, model, val, device, fwd), log, val_totals(val))
    if h.sliding_window_enabled:
        timed_eval("diagnostic quantized_sliding_window", lambda: eval_sliding(h, model, val, device, log, fwd), log,
                   val_totals(val))
    if not h.ttt_enabled:
        return
    ttt_fns = ttt_block_fns(h)
    try:
        if h.ttt_compile or h.ttt_cuda_graphs and device.type == "cuda":
            ttt_warmup(h, model, ttt_fns, device, log)
    except RuntimeError as e:  # compile or graph capture; after training: the saved artifact need not be lost
        raise RuntimeError(f"the TTT warm-up failed ({type(e).__name__}); EVAL_ONLY=1 ARTIFACT={path} scores the saved "
                           "artifact, with TTT_CUDA_GRAPHS=0, TTT_COMPILE_MODEL=0 (per-block graphs) or TTT_COMPILE=0") from e
    log("")
    log("beginning TTT eval timer")
    t0, g0 = time.perf_counter(), compiled_graphs()
    score = eval_ttt_phased(h, model, ttt_fns, val, device, log)
    sync(device)
    t = time.perf_counter() - t0
    if h.ttt_compile:
        log(f"ttt_lora:graphs compiled inside the timer: {compiled_graphs() - g0}")
    subset = ttt_docs(h, val) if h.val_doc_fraction < 1 else None  # else the whole set, not find_docs' idea of it
    log_score("quantized_ttt_phased", score, 1000 * t, val_totals(val, subset), log)
    log(record_line("eval_total", s=t))
    log(record_line("eval_wall", s=time.perf_counter() - t_start))


def main():
    h = Hyperparameters.from_env()
    device = torch.device("cuda", h.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if h.distributed:
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=timedelta(seconds=h.dist_timeout_seconds),
            device_id=device if device.type == "cuda" else None,
        )
    torch._dynamo.config.cache_size_limit = 32
    random_seed(h.seed)
    t_start = time.perf_counter()
    log = Logger(h)
    log.file_only(open(__file__, encoding="utf-8").read())  # the run log carries the code that made it
    log("Hyperparameters:")
    for k, v in sorted(h.public().items()):
        log(f"  {k}: {v}")
    for line in record_env_warnings():
        log(line)
    log(record_line("torch", torch.__version__, sys.version.split()[0], np.__version__, torch.version.cuda,
                    getattr(triton, "__version__", None)))
    log(kernels_line(h))
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    log(record_line("hardware", name=gpu, world_size=h.world_size))
    log(record_line("world", world_size=h.world_size, accum=h.grad_accum_steps, micro=h.micro_batch_tokens))
    sp = load_tokenizer(h)
    log(data_transform_line(h, sp))
    val = load_val(h, sp)
    log(f"val_bpb:{val.source}:enabled")
    tokens, nbytes = val_totals(val)
    log(record_line("val_set", tokens=tokens, nbytes=nbytes, docs=len(find_docs(val.tokens))))
    if h.eval_only:
        path = h.artifact or h.quantized_model_path
        if not os.path.isfile(path):
            raise DataError(
                f"EVAL_ONLY=1 but artifact {path} does not exist; set ARTIFACT=path/to/final_model.int6.ptz"
            )
        evaluate_artifact(h, device, log, val, path, t_start, compiled_block_fns(h))
        return
    # every train shard's header and size now, not when training reaches it
    log(f"train_shards: {len(check_shards(h.train_files, 'training'))}")
    model, fns = build_model(h, device), compiled_block_fns(h)
    log(f"model_params:{sum(p.numel() for p in model.parameters())}")
    train_ms = 0.0
    if h.resume_from:
        log(f"resume_from:{h.resume_from} (skipping training)")
        model.load_state_dict(torch.load(h.resume_from, map_location=device))
    else:
        train_ms = train(h, model, device, log, val, fns)
        if h.is_main_process:
            torch.save(model.state_dict(), h.model_path)
            log(f"Serialized model: {os.path.getsize(h.model_path)} bytes")
    timed_eval(
        "diagnostic pre-quantization post-ema",
        lambda: eval_val(h, model, val, device, Fwd(h.eval_loop_depth, fns)),
        log,
        val_totals(val),
    )
    quantize_and_save(h, model, device, log, train_ms)
    del model
    evaluate_artifact(h, device, log, val, h.quantized_model_path, time.perf_counter(), fns)


def exit_on_data_error(e, grace_s=10):
    """Bad input: one line `error: ...` on stderr and in the run log, no traceback, exit 1. Rank 0 prints it; the
    other ranks as a rule hit the same error and are ended by torchrun when rank 0 exits, so they print only if
    still alive after grace_s (an error that rank 0 did not see)."""
    line = "error: " + str(e).replace("\n", " ")
    if os.environ.get("RANK", "0") != "0":
        time.sleep(grace_s)
    print(line, file=sys.stderr, flush=True)
    if Logger.file is not None:
        Logger.file.write(line + "\n")
        Logger.file.flush()
    sys.exit(1)


if __name__ == "__main__":
    try:
        main()
    except DataError as e:  # the message names the file and the fix; a torch traceback would bury it
        exit_on_data_error(e)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
