"""RECIPE=1736|1756|1855 (train_gpt.RECIPES): each resolves to that record's configuration, i.e. the record's run
command (its env string, copied below as data) parsed by parse_env on top of the record's code defaults (written here
as our fields); explicit env vars and from_env's overrides win over it; an unknown recipe is refused."""
import dataclasses
import os
import re
import subprocess
import sys

import pytest
import torch

import train_gpt as tg
from conftest import REPO

FIELDS = {f.name: f for f in dataclasses.fields(tg.Hyperparameters) if f.init}

# The records' run commands. B and C: SPEC.md 9, "B/C run environment" (C adds the curriculum); D: SPEC_FRONTIER 8's
# "D run" column, every value that is not D's code default (SPEC_FRONTIER gives no literal command line).
B_RUN = ("NCCL_NET=Socket DATA_DIR=./data CASEOPS_ENABLED=1 PHASED_TTT_PREFIX_DOCS=2000 PHASED_TTT_NUM_PHASES=3 "
         "MLP_CLIP_SIGMAS=12.0 ATTN_CLIP_SIGMAS=13.0 EMBED_BITS=7 EMBED_CLIP_SIGMAS=15.0 MATRIX_LR=0.026 "
         "GPTQ_RESERVE_SECONDS=4 GPTQ_CALIBRATION_BATCHES=16 GATED_ATTN_ENABLED=1 GATED_ATTN_INIT_STD=0.005 "
         "GATED_ATTN_QUANT_GATE=1")
C_RUN = B_RUN + " TRAIN_LOOP_PHASE_DEPTHS=1,3,4 TRAIN_LOOP_PREWARM_DEPTHS=3,4 EVAL_LOOP_DEPTH=4"
D_RUN = ("DATA_DIR=./data CASEOPS_ENABLED=1 PHASED_TTT_PREFIX_DOCS=2500 PHASED_TTT_NUM_PHASES=3 MLP_CLIP_SIGMAS=11.5 "
         "EMBED_CLIP_SIGMAS=14.0 EMBED_BITS=7 WARMDOWN_FRAC=0.85 BETA2=0.99 TTT_BETA2=0.99 TTT_WEIGHT_DECAY=0.5 "
         "TTT_LORA_RANK=80 SPARSE_ATTN_GATE_ENABLED=1 SPARSE_ATTN_GATE_SCALE=0.5 SMEAR_GATE_ENABLED=1 "
         "GATED_ATTN_ENABLED=0 GATED_ATTN_QUANT_GATE=1 MIN_LR=0.1 GPTQ_RESERVE_SECONDS=0.5 VAL_LOSS_EVERY=0 "
         "COMPRESSOR=pergroup")
PATHS = {"DATA_DIR"}  # where the data lies on the user's machine: not part of a record's configuration

# The records' code defaults where they differ from ours (SPEC.md 9's Default column, SPEC_FRONTIER 8's code columns).
# B: no depth curriculum (C's, SPEC 4.10: B switches to depth NUM_LOOPS+1 = 3 at ENABLE_LOOPING_AT and evaluates at
# 3), no Muon WD taper (A's), TTT before #1767/#1855 (rank 96, no output scaling, A re-drawn, beta2 0.999). Kernel
# choices with the same maths (FUSED_CE_ENABLED, FUSED_MLP, ATTN_BACKEND) are not configuration.
B_CODE = dict(caseops_enabled=False, gated_attn_enabled=False, gated_attn_init_std=0.01, gated_attn_quant_gate=False,
              mlp_clip_sigmas=10.0, embed_clip_sigmas=20.0, embed_bits=8, phased_ttt_num_phases=1,
              train_loop_phase_depths=(), train_loop_prewarm_depths=(), eval_loop_depth=3, wd_taper_final_mult=1.0,
              compressor="brotli", ttt_lora_rank=96, ttt_lora_alpha=0.0, ttt_warm_start_a=False, ttt_beta2=0.999)
C_CODE = B_CODE  # C's curriculum variables default to off (TRAIN_LOOP_* empty, EVAL_LOOP_DEPTH = NUM_LOOPS+1)
# D: B's lineage (no curriculum, no taper), Polar Express always on, #1767's TTT (alpha 144, warm A, TTT WD 1.0), LQER
D_CODE = dict(B_CODE, muon_polar_express=True, ttt_weight_decay=1.0, ttt_lora_alpha=144.0, ttt_warm_start_a=True,
              lqer_enabled=True, lqer_rank=4, lqer_top_k=3, lqer_factor_bits=4, lqer_asym_enabled=True,
              lqer_asym_group=64)
RECORDS = {"1736": (B_CODE, B_RUN), "1756": (C_CODE, C_RUN), "1855": (D_CODE, D_RUN)}
# Unused under the record's own settings: D's dense gate is off (the sparse gate replaces it), so its init std is moot.
INERT = {"1855": {"gated_attn_init_std"}}


def record_config(code, run):
    """The record's configuration in our fields: its code defaults, then its command line through parse_env."""
    want = {k: v for k, v in code.items() if k in FIELDS}
    for item in run.split():
        name, raw = item.split("=", 1)
        if name.lower() in FIELDS and name not in PATHS:
            want[name.lower()] = tg.parse_env(name, raw, FIELDS[name.lower()].default)
    return want


@pytest.fixture
def clean_env(monkeypatch):
    """No setting from the calling shell: only what each test sets."""
    for name in list(FIELDS) + ["recipe"]:
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch


@pytest.mark.parametrize("recipe", sorted(RECORDS))
def test_recipe_is_the_records_run_command(clean_env, recipe):
    clean_env.setenv("RECIPE", recipe)
    h = tg.Hyperparameters.from_env()
    assert h.recipe == recipe
    want = record_config(*RECORDS[recipe])
    ref = tg.Hyperparameters(**{**want, "run_id": h.run_id, "recipe": recipe})  # derived values alike
    skip = INERT.get(recipe, set())
    diff = {k: (v, getattr(ref, k)) for k, v in vars(h).items() if k not in skip and v != getattr(ref, k)}
    assert not diff, f"RECIPE={recipe}: field: (resolved, record) {diff}"
    # the recipe holds only differences from our defaults, each one needed
    assert all(v != FIELDS[k].default for k, v in tg.RECIPES[recipe].items())


def test_inert_fields_are_really_unused(clean_env):
    clean_env.setenv("RECIPE", "1855")
    h = tg.Hyperparameters.from_env()
    assert h.sparse_attn_gate_enabled and not h.gated_attn_enabled


def test_no_recipe_is_our_defaults(clean_env):
    h = tg.Hyperparameters.from_env()
    assert h.recipe == "" and vars(h) == vars(tg.Hyperparameters(run_id=h.run_id))


def test_explicit_env_and_overrides_win_over_the_recipe(clean_env):
    clean_env.setenv("RECIPE", "1855")
    clean_env.setenv("TTT_LORA_RANK", "96")
    clean_env.setenv("TRAIN_LOOP_PHASE_DEPTHS", "1,3,4")  # equal to our default: still explicit, still wins
    clean_env.setenv("EVAL_LOOP_DEPTH", "4")
    h = tg.Hyperparameters.from_env()
    assert (h.ttt_lora_rank, h.train_loop_phase_depths, h.eval_loop_depth) == (96, (1, 3, 4), 4)
    assert h.ttt_lora_alpha == 144.0 and h.min_lr == 0.1  # the rest of the recipe stays
    h = tg.Hyperparameters.from_env(min_lr=0.0, ttt_lora_rank=64)
    assert (h.min_lr, h.ttt_lora_rank, h.warmdown_frac) == (0.0, 64, 0.85)
    for name in ("RECIPE", "TTT_LORA_RANK", "TRAIN_LOOP_PHASE_DEPTHS", "EVAL_LOOP_DEPTH"):
        clean_env.delenv(name)
    h = tg.Hyperparameters.from_env(recipe="1736")  # an override may pick the recipe too
    assert h.recipe == "1736" and h.train_loop_phase_depths == () and h.ttt_lora_rank == 96


@pytest.mark.parametrize("bad", ["1797", "B", " 1855"])
def test_unknown_recipe_names_the_valid_ones(clean_env, bad):
    clean_env.setenv("RECIPE", bad)
    with pytest.raises(tg.ConfigError, match=r"^RECIPE=.* is not a record here: one of 1736, 1756, 1855, or unset$"):
        tg.Hyperparameters.from_env()
    with pytest.raises(tg.ConfigError, match="one of 1736, 1756, 1855"):
        tg.Hyperparameters(recipe=bad)


@pytest.mark.parametrize("recipe,params", [("1736", 35_989_658), ("1756", 35_989_658), ("1855", 35_945_671)])
def test_recipe_builds_the_records_model(clean_env, recipe, params):
    """Full size on the meta device: PR #1855's sparse gates and SmearGate give its 35,945,671 parameters."""
    clean_env.setenv("RECIPE", recipe)
    with torch.device("meta"):
        model = tg.GPT(tg.Hyperparameters.from_env())
    assert sum(p.numel() for p in model.parameters()) == params


def test_run_log_shows_the_recipe_and_resolved_values(tmp_path):
    """The Hyperparameters dump at the start of a run names the recipe and the values it resolved to (the run then
    stops at the missing tokenizer: no data needed)."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in FIELDS}
    env.update(RECIPE="1855", TTT_LORA_RANK="96", DATA_DIR=str(tmp_path), ARTIFACT_DIR=str(tmp_path), RUN_ID="r")
    r = subprocess.run([sys.executable, str(REPO / "train_gpt.py")], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.strip().startswith("error: "), r.stderr[-2000:]
    dump = r.stdout.split("Hyperparameters:")[1]
    for line in ("recipe: 1855", "ttt_lora_rank: 96", "ttt_lora_alpha: 144.0", "ttt_warm_start_a: True",
                 "sparse_attn_gate_scale: 0.5", "train_loop_phase_depths: ()", "eval_loop_depth: 3"):
        assert f"\n  {line}\n" in dump, line


def test_ablation_variants_set_real_fields():
    """tools/ablate.sh's variants: every NAME=value is a field and parses (a typo would silently ablate nothing)."""
    text = open(os.path.join(REPO, "tools", "ablate.sh")).read()
    body = text[text.index("declare -A VARIANTS=(") : text.index("\n)\n")]
    variants = dict(re.findall(r'\[(\w+)\]="([^"]*)"', body))
    assert {"default", "set1855", "smear", "sparse_gate", "polar", "min_lr", "beta2"} <= set(variants)
    for name, env in variants.items():
        for item in env.split():
            key, raw = item.split("=", 1)
            assert key.lower() in FIELDS, f"ablate.sh variant {name}: {key} is not a setting"
            tg.parse_env(key, raw, FIELDS[key.lower()].default)


def run_ablate(tmp_path, variants, **env):
    """tools/ablate.sh with a stand-in python3 on PATH (inline -c snippets go to the real one): each run logs its start,
    GPU and end, and echoes one variant setting; WORK already holds data, so nothing is prepared."""
    (tmp_path / "work" / "data").mkdir(parents=True)
    stub = tmp_path / "bin" / "python3"
    stub.parent.mkdir()
    stub.write_text(f'#!/bin/bash\n[ "$1" = -c ] && exec {sys.executable} "$@"\n'
                    'echo "start $RUN_ID ${CUDA_VISIBLE_DEVICES:-none} $(date +%s.%N)" >> "$STUB_LOG"\n'
                    'echo "polar=${MUON_POLAR_EXPRESS:-} eval_only=${EVAL_ONLY:-}"; sleep 1\n'
                    'echo "end $RUN_ID $(date +%s.%N)" >> "$STUB_LOG"\n')
    stub.chmod(0o755)
    full = dict(os.environ, PATH=f"{stub.parent}:{os.environ['PATH']}", WORK=str(tmp_path / "work"),
                STUB_LOG=str(tmp_path / "stub.log"), **env)
    r = subprocess.run(["bash", os.path.join(REPO, "tools", "ablate.sh"), "corpus", "tok", str(tmp_path / "out"), "42",
                        *variants], env=full, capture_output=True, text=True, timeout=60)
    events = [line.split() for line in (tmp_path / "stub.log").read_text().splitlines()] if r.returncode == 0 else []
    return r, events


def test_ablate_parallel_runs_the_variants_at_once_round_robin_over_gpus(tmp_path):
    r, events = run_ablate(tmp_path, ["default", "polar", "smear"], PARALLEL="1", GPUS="2")
    assert r.returncode == 0, r.stdout + r.stderr
    starts = {e[1]: (e[2], float(e[3])) for e in events if e[0] == "start"}
    ends = [float(e[2]) for e in events if e[0] == "end"]
    assert sorted(starts) == ["ablate_default_s42", "ablate_polar_s42", "ablate_smear_s42"]
    assert max(t for _, t in starts.values()) < min(ends)  # all three were running at the same time
    assert sorted(g for g, _ in starts.values()) == ["0", "0", "1"]
    assert "polar=1" in (tmp_path / "out" / "ablate_polar_s42.log").read_text()
    assert "polar= " in (tmp_path / "out" / "ablate_default_s42.log").read_text()


def test_ablate_runs_one_after_another_by_default_and_refuses_a_ttt_race(tmp_path):
    r, events = run_ablate(tmp_path / "seq", ["default", "ttt_default"], ARTIFACT="")
    assert r.returncode == 0, r.stdout + r.stderr
    assert [e[:2] for e in events] == [["start", "ablate_default_s42"], ["end", "ablate_default_s42"],
                                       ["start", "ablate_ttt_default_s42"], ["end", "ablate_ttt_default_s42"]]
    assert "eval_only=1" in (tmp_path / "seq" / "out" / "ablate_ttt_default_s42.log").read_text()
    r, _ = run_ablate(tmp_path / "par", ["default", "ttt_default"], PARALLEL="1", ARTIFACT="")
    assert r.returncode == 2 and "run ttt_* variants afterwards" in r.stdout
