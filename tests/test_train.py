"""CPU tests of train_gpt.py's CONFIG, DATA, OPTIMIZER and TRAINING sections: Muon and Newton-Schulz, the LR /
weight-decay / momentum schedules, shard and tokenizer validation, cu_seqlens, the packing loader, and end-to-end runs
(2-process gloo, seed reproducibility) on a small real CaseOps dataset."""
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import REPO, make_h, prepared_vocab, run_python, tiny_env

TRAIN_GPT = str(REPO / "train_gpt.py")



# ----------------------------------------------------------------------------- CONFIG


def test_empty_train_loop_phase_depths_env_selects_enable_looping_at():
    """TRAIN_LOOP_PHASE_DEPTHS= (empty) must switch the curriculum off (records A/B: looping on at
    ENABLE_LOOPING_AT), not silently fall back to the default 1,3,4."""
    code = ("import train_gpt as tg; h = tg.Hyperparameters.from_env(); "
            "print(list(h.train_loop_phase_depths), [tg.loop_depth_at(h, f) for f in (0.3, 0.5)], "
            "list(h.train_loop_prewarm_depths))")
    out = run_python(code, 120, TRAIN_LOOP_PHASE_DEPTHS="", TRAIN_LOOP_PREWARM_DEPTHS="", ENABLE_LOOPING_AT="0.4")
    assert out.strip() == "[] [1, 3] []"
    assert run_python(code, 120, TRAIN_LOOP_PHASE_DEPTHS="1,4", ENABLE_LOOPING_AT="0.4").strip() == "[1, 4] [1, 4] [3, 4]"


def test_record_env_names_we_do_not_read_are_warned_about(monkeypatch):
    """A record's command line sets e.g. PHASED_TTT_ENABLED=1, which this script does not read: say so."""
    monkeypatch.setenv("PHASED_TTT_ENABLED", "1")
    monkeypatch.delenv("SMEAR_GATE_ENABLED", raising=False)
    lines = tg.record_env_warnings()
    assert any(l.startswith("warning: PHASED_TTT_ENABLED is set but not read") for l in lines)
    assert not any("SMEAR_GATE_ENABLED" in l for l in lines)


def test_config_is_one_frozen_documented_object():
    """Every field has its one-line doc; nothing changes after construction; from_env's overrides win."""
    import dataclasses
    import inspect
    fields = [f.name for f in dataclasses.fields(tg.Hyperparameters) if f.init]
    src = inspect.getsource(tg.Hyperparameters).splitlines()
    undocumented = [n for n in fields if not any(l.lstrip().startswith(f"{n}: ") and ("  # " in l or src[i - 1].lstrip()
                                                 .startswith("# ")) for i, l in enumerate(src))]
    assert len(fields) > 100 and not undocumented, undocumented
    h = tg.Hyperparameters.from_env(num_layers=5)
    assert h.num_layers == 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        h.num_layers = 6


# ----------------------------------------------------------------------------- Newton-Schulz and Muon


@pytest.mark.parametrize("shape", [(4, 128, 32), (4, 32, 128), (2, 96, 192), (3, 48, 80)], ids=str)
def test_newton_schulz_singular_values_near_one(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3.0
    x = tg.newton_schulz(g, 5)
    assert x.shape == g.shape and x.dtype == torch.bfloat16
    s = torch.linalg.svdvals(x.float())
    assert s.min() > 0.5 and s.max() < 1.5, (s.min().item(), s.max().item())
    # tall inputs are orthogonalised through their transpose
    torch.testing.assert_close(tg.newton_schulz(g.transpose(-2, -1), 5).float(), x.float().transpose(-2, -1), atol=0.02, rtol=0.02)
    # the polar factor keeps the singular vectors: X^T G is symmetric positive definite-ish, so <X, G> > 0 per matrix
    assert ((x.float() * g).sum((-2, -1)) > 0).all()


def test_newton_schulz_matches_fp64_quintic_iteration():
    """SPEC 5.2: X <- X/(|X|_F + 1e-7), then `steps` x {A = XX^T; X <- aX + (bA + cA^2)X}, (a,b,c) = (3.4445, -4.7750, 2.0315),
    on the wide orientation. Catches wrong coefficients, step counts and normalisation (the band test alone would not)."""
    g = torch.randn(3, 24, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for steps in (1, 3, 5):
        x = g / (g.norm(dim=(-2, -1), keepdim=True) + 1e-7)
        for _ in range(steps):
            A = x @ x.transpose(-2, -1)
            x = 3.4445 * x + (-4.7750 * A + 2.0315 * A @ A) @ x
        rel = lambda y, ref: ((y.double() - ref).norm() / ref.norm()).item()
        assert rel(tg.newton_schulz(g, steps), x) < 0.08, steps  # bf16 drift ~0.03 at 5 steps; one step more/less ~0.35
        assert rel(tg.newton_schulz(g.transpose(-2, -1), steps), x.transpose(-2, -1)) < 0.08, steps


def ref_muon_update(g, m, momentum, row_normalize=True, steps=5):
    """Independent re-statement of SPEC 5.2 on one process: returns (new momentum, orthogonalised update)."""
    g = g.to(torch.bfloat16).float()
    m = momentum * m + g
    u = g + momentum * m
    if row_normalize:
        u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-7)
    return m, tg.newton_schulz(u, steps).to(torch.bfloat16).float()


def test_muon_step_is_scaled_orthogonal_update_with_decoupled_wd():
    h = make_h()
    assert h.world_size == 1
    torch.manual_seed(0)
    wide = torch.nn.Parameter(torch.randn(3, 16, 64))  # rows <= cols: scale 1
    tall = torch.nn.Parameter(torch.randn(2, 64, 16))  # rows/cols = 4: scale 2 (the up bank's factor)
    muon = tg.Muon(h, [tall, wide])  # given smallest-first: Muon sorts, momentum buffers must follow their bank
    lr, mom, wd = 0.05, 0.9, 0.1
    moms = {id(wide): torch.zeros_like(wide), id(tall): torch.zeros_like(tall)}
    for step in range(2):
        before = {id(p): p.detach().clone() for p in (wide, tall)}
        for p in (wide, tall):
            p.grad = torch.randn_like(p)
        expected = {}
        for p in (wide, tall):
            moms[id(p)], u = ref_muon_update(p.grad, moms[id(p)], mom)
            scale = max(1.0, p.size(1) / p.size(2)) ** 0.5
            expected[id(p)] = (before[id(p)] * (1 - lr * wd) - lr * scale * u, scale)
        muon.step(lr, mom, wd)
        for p in (wide, tall):
            want, scale = expected[id(p)]
            torch.testing.assert_close(p.detach(), want, atol=1e-5, rtol=1e-5)
            # shape/scale check independent of the reference: the step minus weight decay is lr*scale*(~orthogonal)
            delta = (before[id(p)] * (1 - lr * wd) - p.detach()) / (lr * scale)
            s = torch.linalg.svdvals(delta)
            assert s.min() > 0.5 and s.max() < 1.5, (p.shape, s.min().item(), s.max().item())
            assert torch.linalg.matrix_rank(delta).min() == min(p.shape[1:])


def test_muon_weight_decay_is_decoupled():
    """Zero gradient: the update is exactly zero, only p <- p * (1 - lr * wd) remains."""
    h = make_h()
    p = torch.nn.Parameter(torch.randn(2, 8, 8))
    p0 = p.detach().clone()
    p.grad = torch.zeros_like(p)
    tg.Muon(h, [p]).step(0.1, 0.95, 0.5)
    torch.testing.assert_close(p.detach(), p0 * (1 - 0.1 * 0.5), atol=1e-7, rtol=1e-6)
    q = torch.nn.Parameter(p0.clone())
    q.grad = torch.zeros_like(q)
    tg.Muon(h, [q]).step(0.1, 0.95, 0.0)
    assert torch.equal(q.detach(), p0)


# ----------------------------------------------------------------------------- schedules


def test_lr_mult_no_warmup_warmdown_and_floor():
    h = make_h(warmdown_frac=0.75, min_lr=0.0)
    for frac, want in [(0.0, 1.0), (0.1, 1.0), (0.25, 1.0), (0.5, 2 / 3), (0.625, 0.5), (0.85, 0.2), (1.0, 0.0)]:
        assert tg.lr_mult_at(h, frac) == pytest.approx(want), frac
    h = make_h(warmdown_frac=0.25, min_lr=0.0)  # record A's value: flat until 0.75
    assert [tg.lr_mult_at(h, f) for f in (0.7, 0.75, 0.875, 1.0)] == pytest.approx([1.0, 1.0, 0.5, 0.0])
    h = make_h(warmdown_frac=0.85, min_lr=0.1)  # D's run: floor at MIN_LR
    assert [tg.lr_mult_at(h, f) for f in (0.1, 0.575, 0.95, 1.0)] == pytest.approx([1.0, 0.5, 0.1, 0.1])


def test_muon_wd_taper():
    h = make_h()
    assert (h.wd_taper_start_frac, h.wd_taper_final_mult) == (0.70, 0.50)
    for frac, want in [(0.0, 1.0), (0.5, 1.0), (0.70, 1.0), (0.775, 0.875), (0.85, 0.75), (1.0, 0.5), (1.1, 0.5)]:
        assert tg.muon_wd_mult_at(h, frac) == pytest.approx(want), frac


def test_muon_momentum_warmup():
    h = make_h()
    for step, want in [(0, 0.92), (750, 0.945), (1500, 0.97), (1499, 0.92 + 0.05 * 1499 / 1500), (5000, 0.97)]:
        assert tg.muon_momentum_at(h, step) == pytest.approx(want), step


# ----------------------------------------------------------------------------- shard and tokenizer validation


def write_shard(path, tokens, magic=tg.SHARD_MAGIC, version=tg.SHARD_VERSION, drop=0):
    tokens = np.asarray(tokens, dtype="<u2")
    header = np.zeros(tg.HEADER_INTS, dtype="<i4")
    header[:3] = magic, version, len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.tobytes()[: len(tokens) * 2 - drop])
    return str(path)


def docs_tokens(n_docs=20, doc_len=30, vocab=64, seed=0):
    rng = np.random.default_rng(seed)
    docs = [np.concatenate([[tg.BOS_ID], rng.integers(8, vocab, doc_len - 1)]) for _ in range(n_docs)]
    return np.concatenate(docs)


@pytest.fixture(scope="module")
def caseops_sp(prepared_data):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(next((prepared_data / "tokenizers").glob("*.model"))))
    assert tg.is_caseops_tokenizer(sp)
    return sp


def val_h(tmp_path, sp, **over):
    return make_h(data_path=str(tmp_path), vocab_size=sp.vocab_size(), eval_seq_len=64, **over)


def test_list_shards_missing_glob(tmp_path):
    pattern = str(tmp_path / "nowhere" / "fineweb_train_*.bin")
    with pytest.raises(tg.DataError, match=r"no training shards match .*nowhere/fineweb_train_\*\.bin"):
        tg.list_shards(pattern, "training")
    write_shard(tmp_path / "fineweb_val_000000.bin", [1, 2, 3])  # a val shard does not satisfy the train glob
    with pytest.raises(tg.DataError, match="no training shards match"):
        tg.list_shards(str(tmp_path / "fineweb_train_*.bin"), "training")


def test_read_shard_roundtrip_and_header_errors(tmp_path):
    good = write_shard(tmp_path / "good.bin", [1, 5, 65535])
    assert np.asarray(tg.read_shard(good)).tolist() == [1, 5, 65535]
    bad = write_shard(tmp_path / "bad_magic.bin", [1, 2, 3], magic=12345)
    with pytest.raises(tg.DataError, match=re.escape(bad) + ".*bad shard header"):
        tg.read_shard(bad)
    badv = write_shard(tmp_path / "bad_version.bin", [1, 2, 3], version=2)
    with pytest.raises(tg.DataError, match=re.escape(badv) + ".*bad shard header"):
        tg.read_shard(badv)
    trunc = write_shard(tmp_path / "trunc.bin", [1, 2, 3, 4], drop=2)
    with pytest.raises(tg.DataError, match=re.escape(trunc) + ".*header says 4 tokens but the file holds 3.*truncated"):
        tg.read_shard(trunc)
    short = tmp_path / "short.bin"
    short.write_bytes(b"\0" * 100)
    with pytest.raises(tg.DataError, match=re.escape(str(short)) + ".*shorter than the 1024-byte shard header"):
        tg.read_shard(str(short))


def test_load_val_with_sidecar(tmp_path, caseops_sp):
    toks = docs_tokens()
    write_shard(tmp_path / "fineweb_val_000000.bin", toks)
    side = np.where(toks == tg.BOS_ID, 0, 3)
    write_shard(tmp_path / "fineweb_val_bytes_000000.bin", side)
    val = tg.load_val(val_h(tmp_path, caseops_sp), caseops_sp)
    assert val.source == "byte_sidecar"
    usable = (len(toks) - 1) // 64 * 64
    assert val.tokens.tolist() == toks[: usable + 1].tolist() and val.bytes.tolist() == side[: usable + 1].tolist()


def test_load_val_sidecar_length_mismatch(tmp_path, caseops_sp):
    toks = docs_tokens()
    f = write_shard(tmp_path / "fineweb_val_000000.bin", toks)
    s = write_shard(tmp_path / "fineweb_val_bytes_000000.bin", np.ones(len(toks) - 1))
    with pytest.raises(tg.DataError, match=f"sidecar {re.escape(s)} has {len(toks) - 1} entries but {re.escape(f)} has {len(toks)} tokens"):
        tg.load_val(val_h(tmp_path, caseops_sp), caseops_sp)


def test_load_val_sidecar_count_mismatch(tmp_path, caseops_sp):
    toks = docs_tokens()
    for i in range(2):
        write_shard(tmp_path / f"fineweb_val_{i:06d}.bin", toks)
    write_shard(tmp_path / "fineweb_val_bytes_000000.bin", np.ones(len(toks)))
    with pytest.raises(tg.DataError, match="2 val shards but 1 sidecars"):
        tg.load_val(val_h(tmp_path, caseops_sp), caseops_sp)


def test_caseops_tokenizer_without_sidecars_refuses(tmp_path, caseops_sp):
    write_shard(tmp_path / "fineweb_val_000000.bin", docs_tokens())
    with pytest.raises(tg.DataError, match=r"CaseOps tokenizer but no byte sidecars match .*fineweb_val_bytes_\*\.bin"):
        tg.load_val(val_h(tmp_path, caseops_sp), caseops_sp)


def test_val_without_bos_refuses(tmp_path, caseops_sp):
    toks = docs_tokens()
    toks[toks == tg.BOS_ID] = 9
    f = write_shard(tmp_path / "fineweb_val_000000.bin", toks)
    write_shard(tmp_path / "fineweb_val_bytes_000000.bin", np.ones(len(toks)))
    with pytest.raises(tg.DataError, match=f"no BOS \\(id 1\\) in {re.escape(f)}"):
        tg.load_val(val_h(tmp_path, caseops_sp), caseops_sp)


def test_val_token_beyond_vocab_and_too_short_refuse(tmp_path, caseops_sp):
    toks = docs_tokens()
    toks[5] = caseops_sp.vocab_size()
    write_shard(tmp_path / "fineweb_val_000000.bin", toks)
    write_shard(tmp_path / "fineweb_val_bytes_000000.bin", np.ones(len(toks)))
    with pytest.raises(tg.DataError, match="VOCAB_SIZE"):
        tg.load_val(val_h(tmp_path, caseops_sp), caseops_sp)
    write_shard(tmp_path / "fineweb_val_000000.bin", docs_tokens(n_docs=2))
    write_shard(tmp_path / "fineweb_val_bytes_000000.bin", np.ones(60))
    with pytest.raises(tg.DataError, match="fewer than EVAL_SEQ_LEN"):
        tg.load_val(val_h(tmp_path, caseops_sp), caseops_sp)


def test_load_tokenizer_errors(tmp_path, prepared_data):
    model = str(next((prepared_data / "tokenizers").glob("*.model")))
    vocab = prepared_vocab(prepared_data)
    assert tg.load_tokenizer(make_h(tokenizer_path=model, vocab_size=vocab)).vocab_size() == vocab
    with pytest.raises(tg.DataError, match=f"tokenizer {re.escape(model)} has {vocab} pieces but VOCAB_SIZE={vocab + 8}"):
        tg.load_tokenizer(make_h(tokenizer_path=model, vocab_size=vocab + 8))
    missing = str(tmp_path / "none.model")
    with pytest.raises(tg.DataError, match=f"tokenizer {re.escape(missing)} not found"):
        tg.load_tokenizer(make_h(tokenizer_path=missing))


def test_missing_data_dir_exits_with_data_error_message(tmp_path):
    missing = tmp_path / "no_such_data"
    env = dict(os.environ, DATA_DIR=str(missing), ARTIFACT_DIR=str(tmp_path), COMPILE="0", OMP_NUM_THREADS="1")
    for k in ("TOKENIZER_PATH", "DATA_PATH", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, TRAIN_GPT], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    last = [l for l in r.stderr.splitlines() if l.strip()][-1]
    assert last.startswith("error: ") and str(missing) in last and "not found" in last, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, "bad input should give one clear line, not a traceback"


# ----------------------------------------------------------------------------- cu_seqlens


def test_cu_seqlens_bos_starts_and_padding():
    cu = tg.cu_seqlens_for(np.array([1, 5, 6, 1, 7, 8, 9, 1, 4]), 100, bucket=8)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 7, 9, 9, 9, 9, 9]
    assert tg.cu_seqlens_for([5, 6, 1, 7], 100, bucket=4).tolist() == [0, 2, 4, 4]  # row not starting at BOS: 0 added
    assert tg.cu_seqlens_for([1, 5, 1, 7], 100, bucket=3).tolist() == [0, 2, 4]  # exact multiple: no padding
    assert tg.cu_seqlens_for([1, 5, 1, 7, 1, 2], 100, bucket=3).tolist() == [0, 2, 4, 6, 6, 6]
    assert len(tg.cu_seqlens_for([1, 5, 1], 100)) == 256  # default bucket


def test_cu_seqlens_splits_long_segments_at_max_len():
    assert tg.cu_seqlens_for([1] + [5] * 9, 4, bucket=1).tolist() == [0, 4, 8, 10]
    # splits restart at each document start
    assert tg.cu_seqlens_for([1, 5, 5, 5, 5, 5, 1, 5, 5], 4, bucket=1).tolist() == [0, 4, 6, 9]
    assert tg.cu_seqlens_for([5] * 8, 4, bucket=1).tolist() == [0, 4, 8]


def test_cu_seqlens_extra_starts():
    assert tg.cu_seqlens_for([5] * 6, 100, bucket=1, extra_starts=(3,)).tolist() == [0, 3, 6]
    assert tg.cu_seqlens_for([1, 5, 5, 1, 5, 5], 100, bucket=1, extra_starts=(3, 5)).tolist() == [0, 3, 5, 6]
    assert tg.cu_seqlens_for([1] + [5] * 9, 4, bucket=1, extra_starts=(6,)).tolist() == [0, 4, 6, 10]


# ----------------------------------------------------------------------------- TrainLoader


def train_shards(tmp_path):
    """Two train shards whose token values encode their position (value = offset + index), BOS sprinkled in."""
    a = 2 + np.arange(300)
    a[[7, 50, 120, 200]] = tg.BOS_ID
    b = 1000 + np.arange(200)
    b[[3, 90]] = tg.BOS_ID
    write_shard(tmp_path / "fineweb_train_000000.bin", a)
    write_shard(tmp_path / "fineweb_train_000001.bin", b)
    return a, b


def test_train_loader_rank_slices_of_one_global_span(tmp_path, monkeypatch):
    a, b = train_shards(tmp_path)
    batches = {}
    for rank in (0, 1):
        h = make_h(data_path=str(tmp_path), train_batch_tokens=64, grad_accum_steps=1, train_seq_len=16, world_size=2,
                   rank=rank)
        assert (h.world_size, h.rank, h.micro_batch_tokens) == (2, rank, 32)
        loader = tg.TrainLoader(h, torch.device("cpu"))
        batches[rank] = [loader.next_batch() for _ in range(6)]
    row, span = 33, 66
    # shard 0: cursor starts at its first BOS (7); spans at 7, 73, 139, 205 fit in 300 tokens, 271 does not ->
    # shard 1 from its first BOS (3): spans at 3, 69 (135 would not fit in 200 -> wrap, not reached)
    starts = [(a, 7 + k * span) for k in range(4)] + [(b, 3 + k * span) for k in range(2)]
    for k, (shard, c) in enumerate(starts):
        glob_span = []
        for rank in (0, 1):
            x, y, cu = batches[rank][k]
            piece = shard[c + rank * row : c + (rank + 1) * row]
            assert x.tolist() == piece[:-1].tolist(), (k, rank)
            assert y.tolist() == piece[1:].tolist(), (k, rank)  # targets = inputs shifted by one
            assert torch.equal(cu, tg.cu_seqlens_for(x.numpy(), 16))
            glob_span += piece.tolist()
        assert glob_span == shard[c : c + span].tolist()  # disjoint, consecutive, covering the global span
    assert batches[0][0][0][0].item() == tg.BOS_ID and batches[0][4][0][0].item() == tg.BOS_ID


def test_train_loader_wraps_and_refuses_tiny_shards(tmp_path, monkeypatch):
    a, b = train_shards(tmp_path)
    h = make_h(data_path=str(tmp_path), train_batch_tokens=127, grad_accum_steps=1, train_seq_len=127)
    loader = tg.TrainLoader(h, torch.device("cpu"))
    firsts = [loader.next_batch()[0][:2].tolist() for _ in range(4)]
    # row 128: shard 0 gives spans at 7, 135 (263 does not fit), shard 1 one at 3, then back to shard 0 at 7
    assert firsts == [a[7:9].tolist(), a[135:137].tolist(), b[3:5].tolist(), a[7:9].tolist()]
    h = make_h(data_path=str(tmp_path), train_batch_tokens=400, grad_accum_steps=1, train_seq_len=16)
    with pytest.raises(tg.DataError, match="no training shard holds 401 tokens"):
        tg.TrainLoader(h, torch.device("cpu"))


# ----------------------------------------------------------------------------- end-to-end runs

LOSS_RE = re.compile(r"^(\d+)/(\d+) train_loss: ([0-9.]+)", re.M)


def run_trainer(cmd, env, cwd, timeout=300):
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r.stdout, time.perf_counter() - t0


def test_two_process_gloo_run_trains_and_packages(prepared_data, tmp_path):
    env = tiny_env(prepared_data, ITERATIONS=20, TTT_ENABLED=0, ARTIFACT_DIR=tmp_path, RUN_ID="ddp2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", TRAIN_GPT]
    out, secs = run_trainer(cmd, env, tmp_path)
    losses = [(int(s), float(v)) for s, _, v in LOSS_RE.findall(out)]
    assert [s for s, _ in losses] == list(range(1, 21))
    first, last = np.mean([v for _, v in losses[:3]]), np.mean([v for _, v in losses[-3:]])
    assert last < first - 0.5, (first, last)
    for needle in ("world_size:2", "model_params:", "attn_backend:sdpa", "val_tokens:", "diagnostic pre-quantization post-ema",
                   "Total submission size", "layer_loop:phase", "diagnostic quantized"):
        assert needle in out, needle
    assert "stopping_early" not in out  # iterations-bound (MAX_WALLCLOCK_SECONDS=0)
    assert (tmp_path / "final_model.pt").is_file() and (tmp_path / "final_model.int6.ptz").is_file()
    assert "world_size:2" in (tmp_path / "logs" / "ddp2.txt").read_text()
    assert secs < 120, f"2-process tiny run took {secs:.0f}s"


def test_two_ranks_follow_one_process_with_grad_accumulation(prepared_data, tmp_path):
    """Same global batch, same tokens per step: 2 gloo ranks x 1 micro-step and 1 process x 2 micro-steps log the
    same global-mean loss at step 1 (same tokens, same weights: the loader's rank slices and the loss reduction), and
    then the same curve up to the bf16 rounding of the reduce-scattered Muon gradients (observed <= 0.021 here)."""
    common = dict(ITERATIONS=8, TTT_ENABLED=0, TRAIN_LOG_EVERY=1, WARMUP_STEPS=0, GPTQ_CALIBRATION_BATCHES=1)
    runs = {}
    for tag, nproc, accum in (("one", 1, 2), ("two", 2, 1)):
        env = tiny_env(prepared_data, **common, GRAD_ACCUM_STEPS=accum, ARTIFACT_DIR=tmp_path / tag, RUN_ID=tag)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", TRAIN_GPT]
        out, _ = run_trainer(cmd, env, tmp_path)
        runs[tag] = [float(v) for _, _, v in LOSS_RE.findall(out)]
    assert len(runs["one"]) == len(runs["two"]) == 8
    assert abs(runs["one"][0] - runs["two"][0]) < 2e-4
    np.testing.assert_allclose(runs["one"], runs["two"], atol=0.05)
    assert runs["one"][-1] < runs["one"][0] - 0.3  # it trained: the comparison covers real updates


def test_failing_rank_ends_the_run_instead_of_hanging(prepared_data, tmp_path):
    """Rank 1 dies at its third training step while rank 0 waits in a collective: the launcher must end the
    whole run promptly with a failure (not sit until DIST_TIMEOUT_SECONDS)."""
    wrapper = tmp_path / "fail_rank1.py"
    wrapper.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import train_gpt as tg\n"
        "real = tg.training_step\n"
        "def step(*args):\n"
        "    h, i = next(a for a in args if isinstance(a, tg.Hyperparameters)), next(a for a in args if type(a) is int)\n"
        "    if h.rank == 1 and i == 2:\n"
        "        raise RuntimeError('injected rank-1 failure')\n"
        "    return real(*args)\n"
        "tg.training_step = step\n"
        "tg.main()\n")
    env = tiny_env(prepared_data, ITERATIONS=50, WARMUP_STEPS=0, TTT_ENABLED=0, ARTIFACT_DIR=tmp_path, DIST_TIMEOUT_SECONDS=600)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(wrapper)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    secs = time.perf_counter() - t0
    assert r.returncode != 0
    assert "injected rank-1 failure" in r.stdout + r.stderr
    assert secs < 120, f"run took {secs:.0f}s to end after a rank failed"


@pytest.fixture(scope="module")
def small_val_data(prepared_data, tmp_path_factory):
    """prepared_data with the val set cut to its first 8,193 tokens (scoring dominates a tiny CPU run)."""
    root = tmp_path_factory.mktemp("small_val")
    (root / "tokenizers").symlink_to(prepared_data / "tokenizers", target_is_directory=True)
    src = next((prepared_data / "datasets").iterdir())
    dst = root / "datasets" / src.name
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name.startswith("fineweb_val"):
            write_shard(dst / f.name, np.asarray(tg.read_shard(str(f)))[:8193])
        else:
            (dst / f.name).symlink_to(f)
    return root


def test_seed_reproducibility(small_val_data, tmp_path):
    def losses(seed, tag):
        env = tiny_env(small_val_data, ITERATIONS=4, TTT_ENABLED=0, EVAL_LOOP_DEPTH=1, TRAIN_BATCH_TOKENS=1024, SEED=seed,
                       ARTIFACT_DIR=tmp_path / tag, RUN_ID=tag)
        out, secs = run_trainer([sys.executable, TRAIN_GPT], env, tmp_path)
        assert secs < 60, f"single-process tiny run took {secs:.0f}s"
        found = LOSS_RE.findall(out)
        assert len(found) == 4
        return found

    a, b, c = losses(7, "a"), losses(7, "b"), losses(8, "c")
    assert a == b
    assert a != c and all(x[2] != y[2] for x, y in zip(a, c))


# ----------------------------------------------------------------------------- warm-up and in-loop validation

TINY_TRAIN = dict(num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2, loop_start=1, loop_end=2,
                  parallel_start_layer=3, xsa_last_n=4, train_batch_tokens=512, grad_accum_steps=1,
                  train_seq_len=128, eval_seq_len=128, compile=False, warmup_steps=3, train_loop_prewarm_depths="3")


def test_warmup_compiles_only_the_depths_the_run_trains_at(prepared_data):
    """A schedule that trains at one depth from step 0 (TRAIN_LOOP_PHASE_DEPTHS=3, no prewarm) warms up that depth
    only: a depth-1 graph would cost ~55 s of compile on a GPU for a graph the run never uses."""
    h = make_h(data_dir=str(prepared_data), vocab_size=prepared_vocab(prepared_data),
               **{**TINY_TRAIN, "train_loop_prewarm_depths": "", "train_loop_phase_depths": "3"})
    lines = []
    model = tg.build_model(h, torch.device("cpu"))
    tg.warmup(h, model, tg.Optimizers(h, model), torch.device("cpu"), lines.append, tg.EAGER)
    assert [re.search(r"depth:(\d+)", m)[1] for m in lines] == ["3"] * 3
    h = make_h(data_dir=str(prepared_data), vocab_size=prepared_vocab(prepared_data), **TINY_TRAIN)
    lines = []
    tg.warmup(h, model, tg.Optimizers(h, model), torch.device("cpu"), lines.append, tg.EAGER)
    assert {re.search(r"depth:(\d+)", m)[1] for m in lines} == {"1", "3", "4"}  # the default 1 -> 3 -> 4 curriculum


def test_warmup_leaves_model_and_optimizers_as_fresh_ones(prepared_data):
    """Warm-up trains (to compile every graph) and must then restore everything: the model equals its initial
    weights, every optimizer state tensor equals a fresh optimizer's, and the first real step equals a step of a
    run without warm-up on the same batch."""
    import copy
    cpu = torch.device("cpu")
    h = make_h(data_dir=str(prepared_data), vocab_size=prepared_vocab(prepared_data), **TINY_TRAIN)
    torch.manual_seed(0)
    model = tg.build_model(h, cpu)
    fresh = copy.deepcopy(model)
    opt = tg.Optimizers(h, model)
    tg.warmup(h, model, opt, cpu, lambda msg: None, tg.EAGER)
    fresh_opt = tg.Optimizers(h, fresh)
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    (adam, muon), (adam0, muon0) = opt.state_dict(), fresh_opt.state_dict()
    assert adam["state"].keys() == adam0["state"].keys()
    for k in adam0["state"]:
        for name, t in adam0["state"][k].items():
            assert torch.equal(adam["state"][k][name], t), (k, name)
    assert [g["lr"] for g in adam["param_groups"]] == [g["lr"] for g in adam0["param_groups"]]
    assert all(torch.equal(m, m0) for m, m0 in zip(muon, muon0))
    for m, o in ((model, opt), (fresh, fresh_opt)):
        for step in range(2):
            tg.training_step(h, m, o, FixedBatches(h, prepared_data), cpu, step, 0.5, tg.Fwd(3))
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_compile_failure_in_the_warm_up_names_the_way_out(prepared_data):
    """A torch build that cannot compile the whole-model graph fails in the warm-up, before the timer, with the
    settings that run without it, not only a traceback from deep in torch."""
    cpu = torch.device("cpu")
    h = make_h(data_dir=str(prepared_data), vocab_size=prepared_vocab(prepared_data), **TINY_TRAIN)
    model = tg.build_model(h, cpu)

    def cannot_compile(*a):
        raise torch._dynamo.exc.TorchDynamoException("an op this torch cannot trace")

    fns = tg.BlockFns(*tg.EAGER[:3], cannot_compile)
    with pytest.raises(RuntimeError, match=r"warm-up \(TorchDynamoException\); COMPILE_MODEL=0 compiles one graph per"):
        tg.warmup(h, model, tg.Optimizers(h, model), cpu, lambda msg: None, fns)


class FixedBatches:
    """The first training batch of the shards, every time."""

    def __init__(self, h, root):
        loader = tg.TrainLoader(h, torch.device("cpu"))
        self.batch = loader.next_batch()

    def next_batch(self):
        return self.batch


def test_in_loop_validation_runs_at_the_eval_depth(prepared_data, monkeypatch):
    """The records log `step/iterations val_loss` at EVAL_LOOP_DEPTH, whatever depth training is at."""
    cpu = torch.device("cpu")
    h = make_h(data_dir=str(prepared_data), vocab_size=prepared_vocab(prepared_data),
               **{**TINY_TRAIN, "warmup_steps": 0}, eval_loop_depth=3, iterations=2, val_loss_every=1)
    val = tg.ValData(torch.full((129,), 5), torch.ones(129, dtype=torch.int32), "test")
    val.tokens[0] = tg.BOS_ID
    seen, train_depths = [], []
    real_val, real_step = tg.eval_val, tg.training_step
    monkeypatch.setattr(tg, "eval_val", lambda *a: seen.append(a[-1].depth) or real_val(*a))
    monkeypatch.setattr(tg, "training_step", lambda *a: train_depths.append(a[-1].depth) or real_step(*a))
    torch.manual_seed(0)
    tg.train(h, tg.build_model(h, cpu), cpu, lambda msg: None, val, tg.EAGER)
    assert train_depths == [1, 1] and seen == [3, 3, 3]


# ----------------------------------------------------------------------------- behaviour kept across refactors

GOLDEN = REPO / "tests" / "fixtures" / "logs" / "golden_tiny_cpu.log"
GOLDEN_ENV = dict(ITERATIONS=6, EVAL_LOOP_DEPTH=3, TRAIN_BATCH_TOKENS=1024, SEED=3, VAL_LOSS_EVERY=3, TTT_ENABLED=1,
                  TTT_BATCH_SIZE=4, PHASED_TTT_PREFIX_DOCS=4, PHASED_TTT_NUM_PHASES=2, RUN_ID="golden",
                  TTT_LORA_ALPHA=0, TTT_WARM_START_A=0, TTT_BETA2=0.999)  # the TTT the golden log ran (#1756's)
RESULT_RE = re.compile(r"^(\d+/\d+|diagnostic pre-quantization post-ema|diagnostic quantized|quantized_ttt_phased)"
                       r"\s+val_loss:\s*([0-9.]+)\s+val_bpb:\s*([0-9.]+)", re.M)


def golden_numbers(text):
    return [float(v) for _, _, v in LOSS_RE.findall(text)], [(k, float(a), float(b)) for k, a, b in RESULT_RE.findall(text)]


def test_same_seed_same_numbers_as_the_log_committed_before_the_redesign(small_val_data, tmp_path, have_shared):
    """A tiny CPU run (train with in-loop val at depth 3 after a depth switch, EMA, GPTQ, phased TTT) gives the
    losses and BPBs of tests/fixtures/logs/golden_tiny_cpu.log, written by the code before the issue-14 redesign.
    The committed numbers come from the FineWeb sample + CaseOps tokenizer, so the check needs ../shared/data."""
    if not have_shared:
        pytest.skip("the golden log was made on ../shared/data's FineWeb sample")
    env = tiny_env(small_val_data, ARTIFACT_DIR=tmp_path, **GOLDEN_ENV)
    out, _ = run_trainer([sys.executable, TRAIN_GPT], env, tmp_path)
    (tmp_path / "run.log").write_text(out)  # kept by pytest's basetemp: how the golden log was made
    got, want = golden_numbers(out), golden_numbers(GOLDEN.read_text())
    assert len(want[0]) == 6 and len(want[1]) == 6, want
    assert got[0] == pytest.approx(want[0], abs=2e-4)
    assert [k for k, _, _ in got[1]] == [k for k, _, _ in want[1]]
    for (k, a, b), (_, a0, b0) in zip(got[1], want[1]):
        assert (a, b) == (pytest.approx(a0, abs=2e-4), pytest.approx(b0, abs=2e-4)), k


def test_polar_express_newton_schulz_maps_singular_values_into_a_tight_band(monkeypatch):
    """PR #1855's per-iteration coefficients: every sigma in [1e-3, 1] lands in [0.859, 1.141] after the five steps
    (the stock quintic leaves 1e-3 at 0.47); on Gaussian banks the output singular values stay within [0.85, 1.15];
    more steps than tuples run the five tuples only; Muon uses them when MUON_POLAR_EXPRESS=1."""
    s = torch.logspace(-3, 0, 400, dtype=torch.float64)
    pe, stock = s.clone(), s.clone()
    for (a, b, c), (a0, b0, c0) in zip(tg.POLAR_EXPRESS, [tg.NS_COEFFS] * 5):
        pe, stock = a * pe + b * pe**3 + c * pe**5, a0 * stock + b0 * stock**3 + c0 * stock**5
    assert 0.858 < pe.min() and pe.max() < 1.142 and stock.min() < 0.5
    torch.manual_seed(0)
    for shape in ((256, 512), (512, 2048), (2048, 512)):
        g = torch.randn(1, *shape)
        sv = torch.linalg.svdvals(tg.newton_schulz(g, 5, polar=True).float()[0])
        assert 0.84 < sv.min() and sv.max() < 1.16, shape
        assert torch.linalg.svdvals(tg.newton_schulz(g, 5).float()[0]).min() < 0.8
    assert torch.equal(tg.newton_schulz(g, 7, polar=True), tg.newton_schulz(g, 5, polar=True))
    seen = []
    real = tg.newton_schulz
    monkeypatch.setattr(tg, "newton_schulz", lambda g, steps, polar=False: seen.append(polar) or real(g, steps, polar))
    for flag in (False, True):
        bank = torch.nn.Parameter(torch.randn(2, 8, 4))
        bank.grad = torch.randn_like(bank)
        tg.Muon(make_h(muon_polar_express=flag), [bank]).step(0.01, 0.9, 0.0)
    assert seen == [False, True]
