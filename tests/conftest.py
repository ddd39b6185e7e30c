"""Shared test fixtures: the real FineWeb sample when ../shared/data exists, generated English otherwise."""
import json
import os
import pydoc
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
FINEWEB_SAMPLE = SHARED_DATA / "fineweb_sample_200.jsonl"
CASEOPS_TOKENIZER = SHARED_DATA / "tokenizers" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))  # record.py, bench.py


def generated_docs(n=200):
    """Real English without a download: docstrings of installed standard-library modules."""
    import importlib
    docs = []
    for name in sorted(sys.stdlib_module_names):
        if len(docs) >= n:
            break
        try:
            mod = importlib.import_module(name)
        except Exception:
            continue
        for obj in [mod] + [getattr(mod, a, None) for a in sorted(dir(mod))[:40]]:
            doc = pydoc.getdoc(obj) if obj is not None else ""
            if doc and len(doc) > 200:
                docs.append(doc)
            if len(docs) >= n:
                break
    seen, out = set(), []
    for d in docs:
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def load_docs():
    if FINEWEB_SAMPLE.exists():
        with open(FINEWEB_SAMPLE, encoding="utf-8") as f:
            return [json.loads(line)["text"] for line in f if line.strip()]
    return generated_docs()


@pytest.fixture(scope="session")
def docs():
    return load_docs()


@pytest.fixture(scope="session")
def have_shared():
    return FINEWEB_SAMPLE.exists() and CASEOPS_TOKENIZER.exists()


@pytest.fixture(autouse=True)
def trainer_ops_stay_ours():
    """A second load of train_gpt (a fresh import, an exec of the counted code) re-registers the pgolf:: custom ops,
    which destroys the first module's registrations: its op objects then call a freed operator (std::bad_alloc or
    worse, depending on the allocator). Such loads belong in a subprocess (run_python); this fails the test that
    forgot."""
    yield
    tg = sys.modules.get("train_gpt")
    if tg is not None:
        from torch._library.custom_ops import OPDEFS, CustomOpDef
        ours = [op for op in vars(tg).values() if isinstance(op, CustomOpDef)]
        assert ours, "train_gpt defines no custom ops any more: update this fixture"
        stale = [op._qualname for op in ours if OPDEFS.get(op._qualname) is not op]
        assert not stale, f"this test re-registered train_gpt's custom ops {stale} in the test process: load copies in run_python"


def run_python(code, timeout=300, **env):
    """Runs code in a fresh interpreter with the repo on the path; returns its stdout (asserting success)."""
    import subprocess
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]), **env)
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def make_h(**fields):
    """train_gpt.Hyperparameters: the defaults (not the env) with fields overridden, built through the same
    constructor as from_env (derived fields follow); list fields may be given as their env strings ("1,3,4")."""
    import dataclasses
    import train_gpt as tg
    defaults = {f.name: f.default for f in dataclasses.fields(tg.Hyperparameters) if f.init}
    for k, v in fields.items():
        assert k in defaults, k
        if isinstance(defaults[k], tuple) and isinstance(v, str):
            fields[k] = tg.parse_env(k.upper(), v, defaults[k])
    return tg.Hyperparameters(**fields)


def tiny_env(data_root, **over):
    """Env for a tiny CPU run of train_gpt.py on a prepared dataset (seconds per step on 2 cores); TTT at rank 4 with
    the default's adapter scale (alpha/rank = 144/80 = 1.8)."""
    env = dict(os.environ)
    env.update(DATA_DIR=str(data_root), VOCAB_SIZE=str(prepared_vocab(data_root)), NUM_LAYERS="4", MODEL_DIM="64",
               NUM_HEADS="4", NUM_KV_HEADS="2", LOOP_START="1", LOOP_END="2", PARALLEL_START_LAYER="3", XSA_LAST_N="4",
               TRAIN_BATCH_TOKENS="2048", GRAD_ACCUM_STEPS="1", TRAIN_SEQ_LEN="256", EVAL_SEQ_LEN="256",
               TTT_EVAL_SEQ_LEN="256", ITERATIONS="6", MAX_WALLCLOCK_SECONDS="0", WARMUP_STEPS="1", VAL_LOSS_EVERY="0",
               TRAIN_LOG_EVERY="1", GPTQ_CALIBRATION_BATCHES="1", GPTQ_CALIBRATION_SEQS="2", TTT_BATCH_SIZE="4",
               PHASED_TTT_PREFIX_DOCS="4", TTT_LORA_RANK="4", TTT_LORA_ALPHA="7.2", GLOBAL_TTT_CHUNK_TOKENS="512",
               COMPILE="0", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in over.items()})
    return env


def prepared_vocab(data_root):
    import sentencepiece as spm
    model = next((Path(data_root) / "tokenizers").glob("*.model"))
    return spm.SentencePieceProcessor(model_file=str(model)).vocab_size()


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory, docs):
    """A small CaseOps dataset made by the real prepare_caseops_data.py: 12 val docs, the rest train.
    Uses the public SP8192 CaseOps tokenizer when ../shared/data exists, else trains a 1024-piece one."""
    import subprocess
    root = tmp_path_factory.mktemp("data")
    docs_file = root / "docs.jsonl"
    with open(docs_file, "w", encoding="utf-8") as f:
        for d in docs[:120]:
            f.write(json.dumps({"text": d}) + "\n")
    tok = ["--tokenizer", str(CASEOPS_TOKENIZER)] if CASEOPS_TOKENIZER.exists() else ["--train-tokenizer", "--vocab-size", "1024"]
    subprocess.run([sys.executable, str(REPO / "prepare_caseops_data.py"), "--docs", str(docs_file), "--out", str(root / "out"),
                    "--val-docs", "12", "--shard-tokens", "60000", "--workers", "1", *tok], check=True, capture_output=True)
    return root / "out"


ARTIFACT_FIX = "re-copy it, or re-run quantization with RESUME_FROM=final_model.pt"


def assert_every_bit_flip_rejected(blob, name="a.ptz"):
    """Bits 0-7 (kind byte), 8-39 (CRC32), 40 and 200 random ones, each flipped alone: a one-line DataError naming
    `name` and the fix, and past the kind byte the checksum message (never a silent decode)."""
    import torch
    import train_gpt as tg

    rng = torch.Generator().manual_seed(1)
    bits = [0, 7, 8, 39, 40] + torch.randint(0, 8 * len(blob), (200,), generator=rng).tolist()
    for bit in bits:
        bad = bytearray(blob)
        bad[bit // 8] ^= 1 << bit % 8
        with pytest.raises(tg.DataError) as e:
            tg.unpack_artifact(bytes(bad), name)
        msg = str(e.value)
        assert msg.startswith(f"{name}: ") and ARTIFACT_FIX in msg and "\n" not in msg, (bit, msg)
        if bit >= 8:
            assert "checksum mismatch: the artifact is corrupt or truncated" in msg, (bit, msg)
