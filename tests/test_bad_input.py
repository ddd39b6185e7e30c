"""Issue 13: bad input never costs a run. Settings, shards, tokenizer and artifact are checked before the model is
built, and every failure is one line `error: ...` naming the variable or file and the fix (rank 0 only, also in the
run log, no traceback)."""
import json
import os
import re
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import sentencepiece as spm

import train_gpt as tg
from conftest import REPO, SHARED_DATA, make_h, prepared_vocab, run_python, tiny_env

TRAIN_GPT = str(REPO / "train_gpt.py")
PLAIN_8192 = SHARED_DATA / "tokenizers" / "fineweb_8192_bpe.model"
OUR_FRAMES = 'train_gpt.py", line'  # a traceback through our code


def write_shard(path, n, drop=0):
    header = np.zeros(tg.HEADER_INTS, dtype="<i4")
    header[:3] = tg.SHARD_MAGIC, tg.SHARD_VERSION, n
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.ones(n, dtype="<u2").tobytes()[: 2 * n - drop])
    return str(path)


def run_script(env, cwd, nproc=1):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   f"--nproc_per_node={nproc}"]
    return subprocess.run(launch + [TRAIN_GPT], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize("default,raw,want", [
    (True, "1", True), (True, "TRUE", True), (False, " Yes ", True), (True, "no", False), (True, "0", False),
    (True, "False", False), (True, "", True), (False, "on", None), (False, "2", None), (True, "y", None),
    (11, "12", 12), (11, "abc", None), (11, "1.5", None), (0.35, "0.5", 0.5), (0.35, "1e-3", 1e-3), (0.35, "x", None),
    ("brotli", "lzma", "lzma"), ((1, 3, 4), "1, 4", (1, 4)), ((1, 3, 4), "", ()), ((), "1,0.5", (1.0, 0.5)),
    ((3, 4), "3,x", None)])
def test_env_values_parse_strictly(default, raw, want):
    """Booleans are exactly 1/0/true/false/yes/no (any case): `on` or `2` used to be silently false. Lists are
    parsed once, by their items' type; an empty list is a value (TRAIN_LOOP_PHASE_DEPTHS= turns the curriculum off)."""
    if want is None:
        what = {bool: "a boolean (1/0/true/false/yes/no)", int: "an integer", float: "a number",
                tuple: "a comma-separated list of numbers"}[type(default)]
        with pytest.raises(tg.ConfigError) as e:
            tg.parse_env("PG_TEST_VAR", raw, default)
        assert str(e.value) == f"PG_TEST_VAR={raw!r} is not {what}; fix or unset PG_TEST_VAR (default {default})"
    else:
        got = tg.parse_env("PG_TEST_VAR", raw, default)
        assert got == want and type(got) is type(want)


def test_bad_env_is_one_line(tmp_path, monkeypatch):
    """Hyperparameters.from_env() names every bad variable in one error; importing never fails, and the script
    prints that one line before anything is written."""
    monkeypatch.setenv("NUM_LAYERS", "abc")
    monkeypatch.setenv("TTT_ENABLED", "on")
    out = run_python(textwrap.dedent("""
        import train_gpt as tg  # a fresh import under the bad env
        try:
            tg.Hyperparameters.from_env()
        except tg.ConfigError as e:
            print(e)"""))
    assert re.match(r"^NUM_LAYERS='abc' is not an integer; .*; TTT_ENABLED='on'", out), out
    r = run_script(dict(os.environ, ARTIFACT_DIR=str(tmp_path)), tmp_path)
    assert r.stderr.strip() == ("error: NUM_LAYERS='abc' is not an integer; fix or unset NUM_LAYERS (default 11); "
                                "TTT_ENABLED='on' is not a boolean (1/0/true/false/yes/no); fix or unset TTT_ENABLED "
                                "(default True)"), r.stderr[-3000:]
    assert r.returncode == 1 and not list(tmp_path.iterdir())


def test_batch_tokens_must_split_into_whole_sequences(monkeypatch):
    """TRAIN_BATCH_TOKENS not a multiple of WORLD_SIZE*GRAD_ACCUM_STEPS*TRAIN_SEQ_LEN used to drop the remainder of
    every step silently (floor division)."""
    with pytest.raises(tg.ConfigError) as e:
        make_h(train_batch_tokens=393000)
    assert str(e.value) == ("TRAIN_BATCH_TOKENS=393000 is not a multiple of WORLD_SIZE*GRAD_ACCUM_STEPS*TRAIN_SEQ_LEN"
                            " = 1*8*2048 = 16384; nearest valid: 393216 or 376832")
    with pytest.raises(tg.ConfigError, match=r"= 1\*8\*2048 = 16384; nearest valid: 16384$"):
        make_h(train_batch_tokens=1000)
    want = r"TRAIN_BATCH_TOKENS=2304 .* = 2\*1\*256 = 512; nearest valid: 2560 or 2048$"
    with pytest.raises(tg.ConfigError, match=want):
        make_h(world_size=2, train_batch_tokens=2304, grad_accum_steps=1, train_seq_len=256)
    for world in (1, 2, 3, 4, 6, 8):  # the record batch on the usual GPU counts, and the tiny test/smoke.sh configs
        monkeypatch.setenv("WORLD_SIZE", str(world))
        h = tg.Hyperparameters.from_env()
        assert h.micro_batch_tokens * world * h.grad_accum_steps == h.train_batch_tokens == 786432
        make_h(world_size=world, train_batch_tokens=2048 * world, grad_accum_steps=1, train_seq_len=256)


@pytest.mark.parametrize("fields,match", [
    (dict(compressor="zstd"), "COMPRESSOR='zstd' is not one of brotli, lzma"),
    (dict(parallel_final_lane="sum"), "PARALLEL_FINAL_LANE='sum' is not one of mean, attn, mlp"),
    (dict(train_loop_phase_depths="1,x"), "TRAIN_LOOP_PHASE_DEPTHS='1,x' is not a comma-separated list of numbers"),
    (dict(train_loop_phase_fractions="0.5,a"), "TRAIN_LOOP_PHASE_FRACTIONS='0.5,a' is not a comma-separated list"),
    (dict(train_loop_phase_fractions="1,2"), "TRAIN_LOOP_PHASE_FRACTIONS has 2 entries for 3 TRAIN_LOOP_PHASE_DEPTHS"),
    (dict(attn_backend="cudnn"), "ATTN_BACKEND='cudnn' is not available here"),
    (dict(prequant_ttt_enabled=True), "PREQUANT_TTT_ENABLED=1 refused")])
def test_settings_that_fail_after_training_are_refused_at_startup(fields, match):
    """Each of these used to surface only at packaging, at the first forward or at a loop phase change."""
    with pytest.raises(tg.ConfigError, match=re.escape(match)):
        make_h(**fields)


# ----------------------------------------------------------------------------- shards


def test_every_shard_header_and_size_is_checked(tmp_path):
    files = [write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", 100) for i in range(3)]
    assert tg.check_shards(str(tmp_path / "fineweb_train_*.bin"), "training") == files
    write_shard(files[2], 100, drop=2)
    with pytest.raises(tg.DataError, match=re.escape(files[2]) + ": header says 100 tokens but the file holds 99"):
        tg.check_shards(str(tmp_path / "fineweb_train_*.bin"), "training")


def test_shard_check_reads_headers_only(tmp_path):
    """80 shards of 100M tokens (sparse files): headers and sizes in well under 2 s, contents never read."""
    n = 100_000_000
    header = np.zeros(tg.HEADER_INTS, dtype="<i4")
    header[:3] = tg.SHARD_MAGIC, tg.SHARD_VERSION, n
    for i in range(80):
        with open(tmp_path / f"fineweb_train_{i:06d}.bin", "wb") as f:
            f.write(header.tobytes())
            f.truncate(tg.HEADER_INTS * 4 + 2 * n)
    t0 = time.perf_counter()
    assert len(tg.check_shards(str(tmp_path / "fineweb_train_*.bin"), "training")) == 80
    assert time.perf_counter() - t0 < 2.0


# ----------------------------------------------------------------------------- tokenizer and dataset


@pytest.fixture(scope="module")
def plain_tokenizer(prepared_data, docs, tmp_path_factory):
    """A SentencePiece model without the CaseOps operators: the shared SP8192 one, or a small one trained here."""
    if PLAIN_8192.exists() and prepared_vocab(prepared_data) == 8192:
        return PLAIN_8192
    work = tmp_path_factory.mktemp("plain_tok")
    (work / "docs.txt").write_text("\n".join(docs[20:80]), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(work / "docs.txt"), model_prefix=str(work / "plain"), vocab_size=300,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=3, pad_id=0, minloglevel=2)
    return work / "plain.model"


def test_plain_tokenizer_on_caseops_data_is_refused(prepared_data, plain_tokenizer):
    """It used to run and log `data_transform: caseops`."""
    vocab = prepared_vocab(prepared_data)
    sp = spm.SentencePieceProcessor(model_file=str(plain_tokenizer))
    assert not tg.is_caseops_tokenizer(sp)
    h = make_h(data_dir=str(prepared_data), vocab_size=vocab, tokenizer_path=str(plain_tokenizer))
    with pytest.raises(tg.DataError) as e:
        tg.data_transform_line(h, sp)
    assert str(e.value).startswith(f"tokenizer {plain_tokenizer} lacks the CaseOps operator pieces but "
                                   f"{h.datasets_dir} holds caseops data (manifest.json transform: caseops); "
                                   "set TOKENIZER_PATH to the tokenizer that made it (")
    caseops = next((prepared_data / "tokenizers").glob("*.model"))
    good = make_h(data_dir=str(prepared_data), vocab_size=vocab)
    assert good.tokenizer_path == str(caseops)
    caseops_sp = spm.SentencePieceProcessor(model_file=str(caseops))
    assert tg.data_transform_line(good, caseops_sp) == "data_transform: caseops"


def test_caseops_tokenizer_on_plain_data_is_refused(prepared_data, tmp_path):
    caseops = next((prepared_data / "tokenizers").glob("*.model"))
    sp = spm.SentencePieceProcessor(model_file=str(caseops))
    ds = tmp_path / "plain_ds"
    ds.mkdir()
    (ds / "manifest.json").write_text(json.dumps({"transform": "none", "tokenizer": {"file": "plain.model"}}))
    h = make_h(data_path=str(ds), tokenizer_path=str(caseops), vocab_size=sp.vocab_size())
    want = f"tokenizer {caseops} has the CaseOps operator pieces but {ds} holds none data"
    with pytest.raises(tg.DataError, match=re.escape(want) + r".*\(plain.model\)$"):
        tg.data_transform_line(h, sp)
    # data that this very tokenizer made without the transform (prepare only warns) is fine
    (ds / "manifest.json").write_text(json.dumps({"transform": "none", "tokenizer": {"file": caseops.name}}))
    assert tg.data_transform_line(h, sp) == "data_transform: none"
    (ds / "manifest.json").write_text("{not json")
    with pytest.raises(tg.DataError, match="manifest.json is not valid JSON"):
        tg.data_transform_line(h, sp)


# ----------------------------------------------------------------------------- one error line under torchrun


def one_error_line(r, log_file=None):
    """The run failed with exactly one `error:` line on stderr (also the run log's last line), no traceback of ours."""
    assert r.returncode != 0, r.stdout[-2000:]
    errors = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1, r.stderr[-4000:]
    assert OUR_FRAMES not in r.stderr + r.stdout, r.stderr[-4000:]
    if log_file is not None:
        assert log_file.read_text().splitlines()[-1] == errors[0]
    return errors[0]


def dataset_copy(prepared_data, root):
    """prepared_data with every file linked, so that a test can add or replace one."""
    root.mkdir()
    (root / "tokenizers").symlink_to(prepared_data / "tokenizers", target_is_directory=True)
    src = next((prepared_data / "datasets").iterdir())
    dst = root / "datasets" / src.name
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).symlink_to(f)
    return dst


def test_truncated_later_train_shard_fails_at_startup_two_ranks(prepared_data, tmp_path):
    """A truncated train shard after the first used to cost a run (training died when it reached it): now the run
    stops before the model is built, rank 0 prints one line naming the file, and the run log ends with it."""
    ds = dataset_copy(prepared_data, tmp_path / "data")
    first = np.asarray(tg.read_shard(str(sorted(ds.glob("fineweb_train_*.bin"))[0])))
    bad = write_shard(ds / "fineweb_train_000099.bin", len(first), drop=2)
    env = tiny_env(tmp_path / "data", ARTIFACT_DIR=tmp_path / "run", RUN_ID="trunc")
    r = run_script(env, tmp_path, nproc=2)
    line = one_error_line(r, tmp_path / "run" / "logs" / "trunc.txt")
    assert line == (f"error: {bad}: header says {len(first)} tokens but the file holds {len(first) - 1}; "
                    "the shard is truncated, re-run prepare_caseops_data.py")
    assert "hardware: cpu x2" in r.stdout
    assert "model_params:" not in r.stdout and "warmup_step:" not in r.stdout


def test_corrupt_artifact_eval_only_two_ranks(prepared_data, tmp_path):
    """EVAL_ONLY on a damaged artifact used to print a ValueError traceback from every rank."""
    art = tmp_path / "final_model.int6.ptz"
    art.write_bytes(b"B" + np.random.default_rng(0).bytes(4000))
    env = tiny_env(prepared_data, EVAL_ONLY=1, ARTIFACT=art, ARTIFACT_DIR=tmp_path / "run", RUN_ID="corrupt")
    r = run_script(env, tmp_path, nproc=2)
    line = one_error_line(r, tmp_path / "run" / "logs" / "corrupt.txt")
    assert line == (f"error: {art}: checksum mismatch: the artifact is corrupt or truncated; re-copy it, or re-run "
                    "quantization with RESUME_FROM=final_model.pt")
