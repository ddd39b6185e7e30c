"""Evaluation legality and exactness of train_gpt.py (SPEC 1.4, 2.4, 6.7, 7): BPB, eval_val, sliding window and
phased score-first TTT. Unit tests use a tiny fp32 GPT on synthetic token streams (BOS = 1 at every document start,
random byte sidecar, 0 bytes at BOS), so comparisons are exact; the end-to-end tests run train_gpt.py on prepared_data."""
import copy
import glob
import math
import os
import re
import socket
import subprocess
import sys
import time
from collections import defaultdict

import numpy as np
import pytest
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train_gpt as tg
from conftest import REPO, make_h, prepared_vocab, tiny_env

CPU = torch.device("cpu")
V = 64  # synthetic vocabulary: 0 unused, 1 = BOS, content ids 2..63


def tiny_h(**over):
    """Hyperparameters of a tiny looped GPT (4 physical layers, loop 1-2, parallel lanes at 3, XSA everywhere), with
    #1756's plain TTT (TTT_OPTS adds #1855's output scaling and warm-start A)."""
    cfg = dict(num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=4.0, loop_start=1, loop_end=2,
               num_loops=2, parallel_start_layer=3, xsa_last_n=4, vocab_size=V, train_seq_len=64, eval_seq_len=64,
               val_batch_tokens=1 << 20, eval_stride=16, eval_loop_depth=2, compile=False, seed=0,
               ttt_eval_seq_len=64, ttt_chunk_size=8, ttt_batch_size=4, ttt_lora_rank=4, ttt_lora_lr=1e-2,
               ttt_grad_steps=1, ttt_weight_decay=0.5, ttt_beta1=0.0, ttt_beta2=0.999, ttt_lora_alpha=0.0,
               ttt_warm_start_a=False, ttt_k_lora=True,
               ttt_mlp_lora=True, ttt_o_lora=True, val_doc_fraction=1.0, phased_ttt_prefix_docs=0,
               phased_ttt_num_phases=1, global_ttt_lr=1e-2, global_ttt_momentum=0.9, global_ttt_epochs=1,
               global_ttt_chunk_tokens=128, global_ttt_grad_clip=1.0, rank=0, world_size=1, local_rank=0,
               train_loop_phase_depths="1,3,4", train_batch_tokens=3840, grad_accum_steps=1, ttt_compile=False)
    cfg.update(over)
    return make_h(**cfg)


def ev(h, fns=tg.EAGER):
    """The evaluation forward: EVAL_LOOP_DEPTH, eager block functions."""
    return tg.Fwd(h.eval_loop_depth, fns)


def tiny_model(h, seed=0):
    """fp32 CPU model with every weight perturbed (zero-initialised projections would hide most of the network),
    frozen as in evaluation, at the looped eval depth."""
    torch.manual_seed(seed)
    m = tg.build_model(h, CPU)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
            p.requires_grad_(False)
    return m


def make_val(preds, seed=0, end_bos=True):
    """A stream of documents with preds[k] tokens each (BOS + content), followed by one more token: the next document's
    BOS, or (end_bos=False) one more content token, as when the real stream is cut inside its last document.
    Targets = sum(preds); the byte sidecar is 1-4 per token, 0 at BOS."""
    g = torch.Generator().manual_seed(seed)
    toks = []
    for p in preds:
        toks += [tg.BOS_ID] + torch.randint(2, V, (p - 1,), generator=g).tolist()
    t = torch.tensor(toks + [tg.BOS_ID if end_bos else 2 + seed % (V - 2)], dtype=torch.int64)
    b = torch.randint(1, 5, (len(t),), generator=g, dtype=torch.int32)
    b[t == tg.BOS_ID] = 0
    return tg.ValData(t, b, "byte_sidecar")


def padded(preds, multiple=64):
    """Append one document so that the number of targets is a multiple of EVAL_SEQ_LEN (eval_val scores whole rows)."""
    rest = -sum(preds) % multiple
    return list(preds) + ([rest] if rest >= 2 else [rest + multiple] if rest else [])


def quiet(msg=""):
    pass


def capture_sums(monkeypatch):
    """Record every sums tensor given to bpb_from_sums; the last one is the function's final (reduced) total."""
    seen, real = [], tg.bpb_from_sums

    def spy(sums):
        seen.append(sums.detach().clone())
        return real(sums)

    monkeypatch.setattr(tg, "bpb_from_sums", spy)
    return seen


def ttt_scores(model, val, h, log=quiet):
    """Run eval_ttt_phased on a copy of the model (global SGD updates it in place); per-target scores per document."""
    per_doc = defaultdict(list)
    res = tg.eval_ttt_phased(h, copy.deepcopy(model), tg.EAGER, val, CPU, log, per_doc)
    return res, {s: torch.cat(v) for s, v in per_doc.items()}, per_doc


def doc_alone_losses(model, val, doc):
    """Per-target NLL of a document scored on its own from position 0 (no packing, no adapters)."""
    x = val.tokens[doc.start : doc.start + doc.length - 1]
    y = val.tokens[doc.start + 1 : doc.start + doc.length]
    with torch.no_grad():
        return model.token_losses(x[None], y[None], ev(model.h))[0]


def scramble(val, doc, seed, lo=1):
    """Same stream with the content tokens of `doc` from offset lo on replaced (length, BOS and bytes kept)."""
    t = val.tokens.clone()
    g = torch.Generator().manual_seed(seed)
    a, b = doc.start + lo, doc.start + doc.length - 1
    t[a:b] = (t[a:b] - 2 + torch.randint(1, V - 2, (b - a,), generator=g)) % (V - 2) + 2  # every token changes
    return val._replace(tokens=t)


# ----------------------------------------------------------------------------- BPB and plain evaluation


def test_bpb_from_sums_formula():
    loss, bpb, ntok, nbytes = tg.bpb_from_sums(torch.tensor([12.5, 5.0, 9.0], dtype=torch.float64))
    assert (ntok, nbytes) == (5, 9) and type(ntok) is int  # the counts scored come back for the result line
    assert loss == pytest.approx(12.5 / 5)
    assert bpb == pytest.approx(12.5 / (math.log(2) * 9))
    # val_bpb = (val_loss / ln 2) * (targets / bytes)
    assert bpb == pytest.approx(loss / math.log(2) * 5 / 9)


def test_eval_val_matches_hand_computation():
    """eval_val = sum of per-document NLL (each document scored alone) / targets; bpb = NLL / (ln 2 * sidecar bytes)."""
    h = tiny_h()
    m = tiny_model(h)
    val = make_val(padded([30, 2, 64, 17, 5, 40, 11]))
    docs = tg.find_docs(val.tokens)
    assert all(d.length - 1 <= h.eval_seq_len for d in docs)
    nll = sum(doc_alone_losses(m, val, d).double().sum().item() for d in docs)
    n, nbytes = len(val.tokens) - 1, int(val.bytes[1:].sum())
    loss, bpb, ntok, got_bytes = tg.eval_val(h, m, val, CPU, ev(h))
    assert (ntok, got_bytes) == (n, nbytes)
    assert loss == pytest.approx(nll / n, rel=1e-6)
    assert bpb == pytest.approx(nll / (math.log(2) * nbytes), rel=1e-6)
    # several rows per batch (row boundaries fall between documents of exactly one row) give the same numbers
    val2 = make_val([32, 32, 64, 20, 44], seed=1)
    a = tg.eval_val(h, m, val2, CPU, ev(h))
    b = tg.eval_val(tiny_h(val_batch_tokens=64), m, val2, CPU, ev(h))
    assert a == pytest.approx(b, rel=1e-6)


# ----------------------------------------------------------------------------- documents, schedule, claims


def test_find_docs_spans_and_cover():
    Doc = tg.Doc
    t = torch.tensor([1, 5, 6, 1, 7, 1, 1, 8, 9, 10])
    docs = tg.find_docs(t)
    # doc k spans [BOS_k, BOS_{k+1}] inclusive: it ends with the next document's BOS as its last target
    assert docs == [Doc(0, 4), Doc(3, 3), Doc(5, 2), Doc(6, 4)]
    assert all(d.length >= 2 for d in docs)
    targets = [p for d in docs for p in range(d.start + 1, d.start + d.length)]
    assert targets == list(range(1, len(t)))  # every target exactly once, in order
    # a leading fragment without BOS is still scored once; a BOS at the very end is only a target
    assert tg.find_docs(torch.tensor([5, 6, 1, 7, 8])) == [Doc(0, 3), Doc(2, 3)]
    assert tg.find_docs(torch.tensor([1, 5, 1])) == [Doc(0, 3)]
    val = make_val([7, 2, 30, 1, 64, 3])
    docs = tg.find_docs(val.tokens)
    assert [d.length - 1 for d in docs] == [7, 2, 30, 1, 64, 3]  # a lone BOS: one target (the next BOS)
    assert sum(d.length - 1 for d in docs) == len(val.tokens) - 1


def test_ttt_schedule_longest_first_and_phase_ends():
    lens = [5, 17, 3, 40, 17, 9, 22, 11, 30, 2]
    docs = [tg.Doc(100 * i, L) for i, L in enumerate(lens)]
    h = tiny_h(ttt_batch_size=4, phased_ttt_prefix_docs=7, phased_ttt_num_phases=3)
    batches, bounds, ends = tg.ttt_schedule(h, docs)
    asc = sorted(range(len(lens)), key=lambda i: (lens[i], i))
    # ascending batches of 4, queue reversed: the remainder batch (the 2 longest documents) is processed first
    assert batches == [asc[8:], asc[4:8], asc[:4]]
    assert sorted(i for b in batches for i in b) == list(range(len(lens)))
    longest = [max(lens[i] for i in b) for b in batches]
    assert longest == sorted(longest, reverse=True)
    assert bounds == [7 * k // 3 for k in (1, 2, 3)] == [2, 4, 7]
    done = np.cumsum([len(b) for b in batches])  # documents scored after each queue entry: 2, 6, 10
    assert ends == [1, 2, 3]
    for b, e in zip(bounds, ends):  # phase ends after exactly the batch holding its boundary document
        assert done[e - 1] >= b and (e == 1 or done[e - 2] < b)
    # an exact multiple has no short batch; prefix larger than the set is clipped; prefix 0 = no phases
    b8, _, _ = tg.ttt_schedule(h, docs[:8])
    assert [len(b) for b in b8] == [4, 4]
    _, bounds, ends = tg.ttt_schedule(tiny_h(phased_ttt_prefix_docs=50, phased_ttt_num_phases=2), docs)
    assert bounds == [5, 10] and ends == [2, 3]
    assert tg.ttt_schedule(tiny_h(phased_ttt_prefix_docs=0, phased_ttt_num_phases=3), docs)[1:] == ([], [])


def test_work_claimer_single_process():
    c = tg.WorkClaimer(tiny_h())
    assert [c.claim("seg0") for _ in range(4)] == [0, 1, 2, 3]
    assert [c.claim("seg1"), c.claim("seg0"), c.claim("seg1")] == [0, 4, 1]
    assert tg.WorkClaimer(tiny_h()).claim("seg0") == 0  # a new claimer (a new evaluation) starts from 0


# ----------------------------------------------------------------------------- 4. normalised distribution


@pytest.mark.parametrize("with_lora", [False, True])
def test_scores_are_full_vocabulary_softmax(with_lora):
    """exp(-loss) over every possible target at one position sums to 1: no target-dependent renormalisation."""
    h = tiny_h()
    m = tiny_model(h)
    g = torch.Generator().manual_seed(3)
    T, t = 24, 13
    ids = torch.randint(2, V, (1, T), generator=g)
    ids[0, 0] = tg.BOS_ID
    y = torch.randint(2, V, (1, T), generator=g).repeat(V, 1)
    y[:, t] = torch.arange(V)
    loras = head = None
    if with_lora:
        gen = torch.Generator().manual_seed(0)
        loras, head, _ = tg.new_adapters(h, m, 1, CPU, gen)
        with torch.no_grad():  # trained-looking adapters: B = 0 would leave the logits unchanged
            for ab in [ab for l in loras for ab in l if ab is not None] + [head]:
                ab[1].normal_(0, 0.3, generator=gen)

        def tile(ab):
            return None if ab is None else (ab[0].expand(V, -1, -1), ab[1].expand(V, -1, -1))

        loras = [tg.Lora(*(tile(ab) for ab in l)) for l in loras]
        head = tile(head)
    with torch.no_grad():
        losses = m.token_losses(ids.expand(V, T), y, tg.Fwd(m.h.eval_loop_depth, tg.EAGER, loras, head))
        plain = m.token_losses(ids.expand(V, T), y, ev(m.h))
    assert torch.logsumexp(-losses[:, t].double(), 0).abs().item() < 1e-5
    assert torch.allclose(losses[:, :t], losses[:1, :t].expand(V, -1), atol=1e-6)  # same inputs, same earlier scores
    if with_lora:
        assert (losses[:, t] - plain[:, t]).abs().max() > 1e-2  # the adapters really changed the distribution


# ----------------------------------------------------------------------------- 3. single pass


def test_single_pass_eval_val_and_sliding(monkeypatch):
    h = tiny_h()
    m = tiny_model(h)
    val = make_val(padded([150, 3, 1, 64, 65, 9, 40, 16, 2, 70]), end_bos=False)
    n, nbytes = len(val.tokens) - 1, val.bytes[1:].double().sum().item()
    assert val.bytes[-1] > 0  # target bytes, not input bytes: the two totals differ by the last token's bytes
    seen = capture_sums(monkeypatch)
    tg.eval_val(h, m, val, CPU, ev(h))
    assert seen[-1][1].item() == n and seen[-1][2].item() == nbytes
    for stride in (16, 28, 64):  # windows ending exactly at N and a partial last window
        tg.eval_sliding(tiny_h(eval_stride=stride), m, val, CPU, quiet, ev(h))
        assert seen[-1][1].item() == n and seen[-1][2].item() == nbytes
    short = make_val([20, 30])  # N <= window: one window scoring everything
    tg.eval_sliding(h, m, short, CPU, quiet, ev(h))
    assert seen[-1][1].item() == 50 and seen[-1][2].item() == short.bytes[1:].double().sum().item()
    # the per-rank shares of eval_val and eval_sliding add up to every target once (each rank's own sums, as if
    # there were no other rank to all-reduce with)
    monkeypatch.setattr(tg, "reduce_sums", lambda *a: next(x for x in a if isinstance(x, torch.Tensor)))
    for ws in (2, 3):
        for fn in (lambda hh: tg.eval_val(hh, m, val, CPU, ev(hh)), lambda hh: tg.eval_sliding(hh, m, val, CPU, quiet, ev(hh))):
            total = torch.zeros(3, dtype=torch.float64)
            for r in range(ws):
                fn(tiny_h(rank=r, world_size=ws, eval_stride=20))
                total += seen[-1]
            assert total[1].item() == n and total[2].item() == nbytes


@pytest.mark.parametrize("chunk,window", [(8, 64), (16, 16), (7, 20)])
def test_single_pass_ttt_mixed_lengths(monkeypatch, chunk, window):
    """Docs longer than TTT_EVAL_SEQ_LEN, shorter than one chunk, of one target, exact chunk multiples: every target
    is scored once, each chunk once, and the byte total equals the sidecar's."""
    h = tiny_h(phased_ttt_prefix_docs=5, phased_ttt_num_phases=2, ttt_chunk_size=chunk, ttt_eval_seq_len=window)
    m = tiny_model(h)
    val = make_val(padded([150, 3, 1, 2, 64, 65, 9, 16, 24, 70, 5]), end_bos=False)
    assert val.bytes[-1] > 0
    docs = tg.find_docs(val.tokens)
    assert max(d.length - 1 for d in docs) > h.ttt_eval_seq_len and min(d.length - 1 for d in docs) < h.ttt_chunk_size
    seen = capture_sums(monkeypatch)
    _, scores, per_doc = ttt_scores(m, val, h)
    total = seen[-1]
    assert total[1].item() == len(val.tokens) - 1
    assert total[2].item() == val.bytes[1:].double().sum().item()
    assert total[0].item() == pytest.approx(sum(s.double().sum().item() for s in scores.values()), rel=1e-12)
    assert sorted(scores) == [d.start for d in docs]
    C = h.ttt_chunk_size
    for d in docs:
        pred = d.length - 1
        assert [len(x) for x in per_doc[d.start]] == [min(C, pred - C * c) for c in range(-(-pred // C))]


def test_ttt_more_phases_than_prefix_docs(monkeypatch):
    """PHASED_TTT_PREFIX_DOCS below the number of phases (or VAL_DOC_FRACTION leaving few docs) gives an empty
    first phase; evaluation must still score everything once."""
    h = tiny_h(phased_ttt_prefix_docs=2, phased_ttt_num_phases=3)
    m = tiny_model(h)
    val = make_val([40, 17, 60, 5])
    assert tg.ttt_schedule(h, tg.find_docs(val.tokens))[1] == [0, 1, 2]
    seen = capture_sums(monkeypatch)
    ttt_scores(m, val, h)
    assert seen[-1][1].item() == len(val.tokens) - 1


def test_windows_that_would_skip_targets_are_refused():
    """A TTT chunk wider than its scoring window, or a sliding stride longer than the window, would leave targets
    unscored: refused rather than silently reporting a BPB over part of the set."""
    m = tiny_model(tiny_h())
    val = make_val([40, 24])
    with pytest.raises(tg.ConfigError, match="TTT_CHUNK_SIZE"):
        tg.eval_ttt_phased(tiny_h(ttt_chunk_size=16, ttt_eval_seq_len=8), m, tg.EAGER, val, CPU, quiet)
    with pytest.raises(tg.ConfigError, match="EVAL_STRIDE"):
        tg.eval_sliding(tiny_h(eval_stride=100), m, val, CPU, quiet, ev(m.h))
    # refused at startup too (these used to fail only after training), where the evaluation is enabled
    with pytest.raises(tg.ConfigError, match="EVAL_STRIDE=4096 must be in 1..EVAL_SEQ_LEN=2048"):
        make_h(sliding_window_enabled=True, eval_stride=4096)
    with pytest.raises(tg.ConfigError, match="TTT_CHUNK_SIZE=4096 must be in 1..TTT_EVAL_SEQ_LEN=2048"):
        make_h(ttt_chunk_size=4096)
    make_h(eval_stride=4096, ttt_enabled=False, ttt_chunk_size=4096)


# ----------------------------------------------------------------------------- scored counts (issue 13)


def scored_docs_totals(val, per_doc):
    """(targets, bytes) of the documents that per_doc shows were scored, from find_docs' spans."""
    docs = [d for d in tg.find_docs(val.tokens) if d.start in per_doc]
    return sum(d.length - 1 for d in docs), sum(int(val.bytes[d.start + 1 : d.start + d.length].sum()) for d in docs)


def test_scored_counts_are_the_val_tokens_and_original_utf8_bytes(prepared_data, docs):
    """Real val set: with every token kept (EVAL_SEQ_LEN = all targets) its totals are the val token count and the
    UTF-8 bytes of the 12 val documents (SentencePiece charges no leading/trailing whitespace), and the evaluations
    report exactly that over the last three documents (the full set is scored by the end-to-end run)."""
    vocab = prepared_vocab(prepared_data)
    n = sum(tg.shard_tokens(f) for f in glob.glob(make_h(data_dir=str(prepared_data), vocab_size=vocab).val_files))
    tiny = dict(num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2, loop_start=1, loop_end=2, num_loops=2,
                parallel_start_layer=3, xsa_last_n=4, compile=False, eval_loop_depth=2, vocab_size=vocab)
    h = make_h(data_dir=str(prepared_data), eval_seq_len=n - 1, **tiny)
    val = tg.load_val(h, spm.SentencePieceProcessor(model_file=h.tokenizer_path))
    utf8 = lambda texts: sum(len(d.strip(" \t\n").encode("utf-8")) for d in texts)
    assert len(val.tokens) == n and len(tg.find_docs(val.tokens)) == 12
    assert tg.val_totals(val) == (n - 1, utf8(docs[:12]))
    start = tg.find_docs(val.tokens)[9].start
    tail = val._replace(tokens=val.tokens[start:], bytes=val.bytes[start:])
    want = (len(tail.tokens) - 1, utf8(docs[9:12]))
    m = tiny_model(h)
    assert tg.eval_val(make_h(eval_seq_len=want[0], **tiny), m, tail, CPU, ev(m.h))[2:] == want
    assert tg.eval_sliding(make_h(eval_seq_len=256, eval_stride=128, **tiny), m, tail, CPU, quiet, ev(m.h))[2:] == want


def artifact_of(model, path):
    sd = model.unbanked_state_dict()
    path.write_bytes(tg.pack_artifact({"w": {k: v.half() for k, v in sd.items()},
                                       "m": {k: "passthrough (float16)" for k in sd}}, "lzma"))
    return str(path)


def test_evaluate_artifact_logs_counts_and_refuses_a_scorer_that_drops_a_batch(tmp_path, monkeypatch):
    """Every result line ends with the targets and bytes scored (the whole set; the kept documents' totals for TTT
    with VAL_DOC_FRACTION < 1); a scorer that drops a batch fails loudly instead of logging a BPB."""
    over = dict(ttt_compile=False, val_doc_fraction=0.5, phased_ttt_prefix_docs=2, phased_ttt_num_phases=1)
    h = tiny_h(**over, sliding_window_enabled=True, eval_stride=32)
    path = artifact_of(tiny_model(h), tmp_path / "a.ptz")
    val = make_val(padded([40, 12, 33, 2, 64, 25, 9, 44, 30, 18, 38, 7]))
    lines = []
    tg.evaluate_artifact(h, CPU, lines.append, val, path, time.perf_counter(), tg.EAGER)
    line_re = r"^(.+) val_loss:[0-9.]+ val_bpb:[0-9.]+ eval_time:\d+ms val_tokens:(\d+) val_bytes:(\d+)$"
    got = {m[1]: (int(m[2]), int(m[3])) for m in re.finditer(line_re, "\n".join(lines), re.M)}
    full = (len(val.tokens) - 1, int(val.bytes[1:].sum()))
    assert got["diagnostic quantized"] == got["diagnostic quantized_sliding_window"] == full
    subset = tg.ttt_docs(h, val)
    assert 0 < len(subset) < len(tg.find_docs(val.tokens))
    assert got["quantized_ttt_phased"] == (sum(d.length - 1 for d in subset),
                                           sum(int(val.bytes[d.start + 1 : d.start + d.length].sum()) for d in subset))
    real_val, real_batch = tg.eval_val, tg.ttt_batch
    monkeypatch.setattr(tg, "eval_val", lambda h, m, v, *a: real_val(h, m, v._replace(tokens=v.tokens[:-64]), *a))
    with pytest.raises(RuntimeError, match=f"diagnostic quantized scored {full[0] - 64} targets / \\d+ bytes but the "
                                           f"set holds {full[0]} / {full[1]}: targets were skipped"):
        tg.evaluate_artifact(tiny_h(ttt_enabled=False), CPU, quiet, val, path, time.perf_counter(), tg.EAGER)
    monkeypatch.setattr(tg, "eval_val", real_val)
    calls = []
    monkeypatch.setattr(tg, "ttt_batch", lambda *a: real_batch(*a) * (len(calls.append(1) or calls) > 1))  # drops #1
    with pytest.raises(RuntimeError, match="quantized_ttt_phased scored .* targets were skipped or scored twice"):
        tg.evaluate_artifact(tiny_h(**over), CPU, quiet, val, path, time.perf_counter(), tg.EAGER)


@pytest.mark.parametrize("error", [torch._dynamo.exc.TorchDynamoException("an op this torch cannot trace"),
                                   RuntimeError("CUDA error: operation not permitted when stream is capturing")])
def test_a_ttt_warmup_failure_names_the_saved_artifact_and_the_way_out(error, tmp_path, monkeypatch):
    """The TTT warm-up runs after training: when this torch cannot compile the TTT graph or capture the tail's CUDA
    graph, the message says how to score the artifact already written instead of a bare traceback."""
    h = tiny_h(ttt_compile=True)
    path = artifact_of(tiny_model(h), tmp_path / "a.ptz")

    def fails(*a):
        raise error

    monkeypatch.setattr(tg, "ttt_warmup", fails)
    with pytest.raises(RuntimeError, match=f"TTT warm-up failed \\({type(error).__name__}\\); EVAL_ONLY=1 ARTIFACT={re.escape(path)} "
                                           "scores the saved artifact, with TTT_CUDA_GRAPHS=0, TTT_COMPILE_MODEL=0"):
        tg.evaluate_artifact(h, CPU, quiet, make_val(padded([40, 12, 33])), path, time.perf_counter(), tg.EAGER)


# ----------------------------------------------------------------------------- 1. score before update


# PR #1855's TTT options on (scale 6 / 4 = 1.5): the legality tests below run with and without them
TTT_OPTS = pytest.mark.parametrize("opts", [{}, dict(ttt_lora_alpha=6.0, ttt_warm_start_a=True)],
                                   ids=["plain", "alpha_warm_a"])


def run_batch(model, h, tokens, nbytes, docs, seed=5, fns=tg.EAGER):
    """One TTT batch; with TTT_WARM_START_A its adapters come from an earlier batch of its size (on a fixed other
    stream), so the reset path, with A already trained, is what scores it."""
    per_doc, keep = defaultdict(list), [] if h.ttt_warm_start_a else None
    if keep is not None:
        prime = make_val([40, 25, 60, 12, 33, 70, 9, 50][: len(docs)], seed=9)
        tg.ttt_batch(h, model, fns, prime.tokens, prime.bytes, tg.find_docs(prime.tokens), CPU,
                     torch.Generator().manual_seed(seed + 1), None, keep)
    sums = tg.ttt_batch(h, model, fns, tokens, nbytes, docs, CPU, torch.Generator().manual_seed(seed), per_doc, keep)
    return sums, per_doc


@TTT_OPTS
def test_score_before_update_truncation(opts):
    """The loss of chunk c is the same whether or not the document's later tokens exist: truncate the document
    after chunk c (and scramble what followed) and chunks 0..c score bit-identically; other documents too."""
    h = tiny_h(**opts)
    m = tiny_model(h)
    val = make_val([150, 45, 20, 9])
    docs = tg.find_docs(val.tokens)[:4]
    _, base = run_batch(m, h, val.tokens, val.bytes, docs)
    d, C = docs[0], h.ttt_chunk_size
    assert len(base[d.start]) == -(-(d.length - 1) // C) == 19
    changed_later = False
    for c in (0, 3, 9, 15):  # chunk 9 on: the window slides (C * (c + 1) > TTT_EVAL_SEQ_LEN)
        cut = C * (c + 1)
        later = scramble(val, d, seed=c, lo=cut + 1)
        _, full = run_batch(m, h, later.tokens, later.bytes, docs)
        trunc_docs = [tg.Doc(d.start, cut + 1)] + docs[1:]
        sums, trunc = run_batch(m, h, later.tokens, later.bytes, trunc_docs)
        assert len(trunc[d.start]) == c + 1
        # the truncated doc's last target is a content token: its bytes count (target bytes, not input bytes)
        assert sums[1].item() == sum(o.length - 1 for o in trunc_docs)
        assert sums[2].item() == sum(later.bytes[o.start + 1 : o.start + o.length].sum().item() for o in trunc_docs)
        for k in range(c + 1):
            assert torch.equal(trunc[d.start][k], base[d.start][k]), f"chunk {k} changed when truncating after {c}"
            assert torch.equal(full[d.start][k], base[d.start][k])
        for o in docs[1:]:
            assert all(torch.equal(a, b) for a, b in zip(trunc[o.start], base[o.start]))
        changed_later |= any(not torch.equal(a, b) for a, b in zip(full[d.start][c + 1 :], base[d.start][c + 1 :]))
    assert changed_later  # the scrambled future does matter once it is scored


@TTT_OPTS
def test_score_before_update_within_chunk(opts):
    """Changing the token at position p changes no score of a target before p, even inside p's own chunk: the
    adapters that score chunk c were trained on chunks < c only (training on chunk c first would fail this)."""
    h = tiny_h(**opts)
    m = tiny_model(h)
    val = make_val([100, 37, 20, 9])
    docs = tg.find_docs(val.tokens)[:4]
    _, base = run_batch(m, h, val.tokens, val.bytes, docs)
    base_t = torch.cat(base[docs[0].start])
    C, d = h.ttt_chunk_size, docs[0]
    for c in (1, 4, 8):
        j = C * (c + 1) - 1  # last target of chunk c, at position d.start + j + 1
        t = val.tokens.clone()
        t[d.start + j + 1] = (t[d.start + j + 1] - 2 + 7) % (V - 2) + 2
        _, new = run_batch(m, h, t, val.bytes, docs)
        new_t = torch.cat(new[d.start])
        assert torch.equal(new_t[:j], base_t[:j])
        assert new_t[j] != base_t[j]  # the changed target itself is scored differently
        assert not torch.equal(new_t[j + 1 :], base_t[j + 1 :])  # later targets do see it
    # with the update path off, later chunks would not change: the adaptation is what is being tested
    h0 = tiny_h(ttt_lora_lr=0.0, **opts)
    _, b0 = run_batch(m, h0, val.tokens, val.bytes, docs)
    assert not torch.allclose(torch.cat(b0[d.start]), base_t)


def test_ttt_head_on_chunk_columns_and_never_one_row(monkeypatch):
    """The vocabulary projection runs on the C chunk columns only (not the whole window), and a batch never shrinks
    to one row (a finished document rides along unscored), so compiled TTT needs one graph per function."""
    h = tiny_h()
    m = tiny_model(h)
    widths, rows = [], []
    seq, par, head = tg.EAGER[:3]
    fns = tg.BlockFns(lambda x, *a: rows.append(x.size(0)) or seq(x, *a), par,
                      lambda hid, *a: widths.append(hid.size(1)) or head(hid, *a))
    val = make_val([150, 45, 20, 9])
    docs = tg.find_docs(val.tokens)[:4]
    sums, per_doc = run_batch(m, h, val.tokens, val.bytes, docs, fns=fns)
    assert set(widths) == {h.ttt_chunk_size} and min(rows) == 2 and max(rows) == 4
    assert sums[1].item() == sum(d.length - 1 for d in docs)  # the riding document adds nothing to the sums
    assert sums[2].item() == sum(val.bytes[d.start + 1 : d.start + d.length].sum().item() for d in docs)


@pytest.mark.parametrize("opts", [{}, dict(ttt_lora_alpha=6.0, ttt_warm_start_a=True, ttt_grad_steps=2)],
                         ids=["plain", "alpha_warm_a_2steps"])
def test_ttt_tail_steps_through_the_chunk_graph_score_and_train_the_same(opts, monkeypatch):
    """TTT_CUDA_GRAPHS: once a batch's rows and width stay fixed (here the 150-token document alone with its padding
    row, then two long ones together), its chunk steps go through ChunkGraph's static row table (on CUDA a captured
    graph). Every score, sum and trained adapter equals the plain loop's, and the graph is used for those segments
    only: a stale row table, a missed update or a step run twice would all show."""
    calls = []
    real = tg.ChunkGraph.__call__
    monkeypatch.setattr(tg.ChunkGraph, "__call__", lambda self, meta: calls.append(self.meta.shape[1]) or real(self, meta))
    m = tiny_model(tiny_h())
    val = make_val([150, 45, 20, 9, 180, 170, 33, 12])
    docs = tg.find_docs(val.tokens)[:8]
    out = {}
    for graphs in (False, True):
        h = tiny_h(ttt_cuda_graphs=graphs, **opts)
        keep = [] if h.ttt_warm_start_a else None
        per_doc, gen = defaultdict(list), torch.Generator().manual_seed(3)
        sums = [tg.ttt_batch(h, m, tg.EAGER, val.tokens, val.bytes, b, CPU, gen, per_doc, keep) for b in (docs[:4], docs[4:])]
        adapters = [t.detach().clone() for l in keep[1][0] for ab in l for t in ab[:2]] if keep else []
        out[graphs] = sums, dict(per_doc), adapters
    steps = opts.get("ttt_grad_steps", 1)
    # docs[:4]: chunks 7 (width 64) to 17 of the lone 150-token row train, chunk 18 only scores; docs[4:]: 180 and
    # 170 targets train together in chunks 7-21, then 180's last chunk (22) only scores
    assert calls == [2] * 11 * steps + [2] * 15 * steps
    (s0, p0, a0), (s1, p1, a1) = out[False], out[True]
    assert all(torch.equal(a, b) for a, b in zip(s0, s1))
    assert p0.keys() == p1.keys() and all(len(p0[k]) == len(p1[k]) and all(map(torch.equal, p0[k], p1[k])) for k in p0)
    assert len(a0) == len(a1) and all(map(torch.equal, a0, a1))


def test_ttt_warmup_leaves_weights_and_flags_untouched():
    """The warm-up before the timer trains LoRA adapters and runs a global-SGD backward on random tokens: the base
    weights it leaves behind must be bit-identical and frozen, so the scored model is the artifact's."""
    h = tiny_h(phased_ttt_prefix_docs=4, phased_ttt_num_phases=2)
    m = tiny_model(h)
    m.requires_grad_(True)  # as loaded from the artifact
    before = {k: v.clone() for k, v in m.state_dict().items()}
    lines = []
    tg.ttt_warmup(h, m, tg.EAGER, CPU, lines.append)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert not any(p.requires_grad or p.grad is not None for p in m.parameters())
    assert lines[-1].startswith("ttt_lora:compile warmup done")


def test_compiled_ttt_one_graph_per_function_and_eager_scores():
    """TTT_COMPILE_MODEL=0's graphs: the warm-up compiles one graph per block function (rows and width symbolic, never a
    size-1 batch), later batches of other sizes, widths and a single document compile nothing more, and the scores
    equal the eager loop's (inductor on CPU, about a minute)."""
    compiled_ttt_is_eager_ttt(tiny_h(), tiny_h(ttt_compile=True, ttt_compile_model=False), graphs=3, tol=1e-3)


def compiled_ttt_is_eager_ttt(h, compiled_h, graphs, tol):
    """ttt_warmup compiles `graphs` graphs for compiled_h's TTT functions; batches of other sizes and widths and a
    lone long document then compile nothing more and score as the eager loop does."""
    eager = tiny_model(h)
    m, fns = copy.deepcopy(eager), tg.ttt_block_fns(compiled_h)
    lines = []
    tg.ttt_warmup(h, m, fns, CPU, lines.append)
    assert lines[-1].endswith(f", {graphs} graphs)"), lines[-1]
    g0 = tg.compiled_graphs()
    val = make_val([150, 45, 20, 9, 33, 70, 12, 100])
    docs = tg.find_docs(val.tokens)
    for batch in (docs[:4], docs[4:7], docs[7:]):
        _, got = run_batch(m, h, val.tokens, val.bytes, batch, fns=fns)
        _, want = run_batch(eager, h, val.tokens, val.bytes, batch)
        for d in batch:
            torch.testing.assert_close(torch.cat(got[d.start]), torch.cat(want[d.start]), atol=tol, rtol=tol)
    assert tg.compiled_graphs() == g0


def test_whole_model_ttt_is_one_graph_for_every_batch_and_scores_as_eager(monkeypatch):
    """TTT_COMPILE_MODEL: the TTT forward (and its backward) is one graph with rows and width symbolic. The warm-up
    compiles it, later batches of other sizes and widths and a lone long document compile nothing more, and the
    scores equal the eager loop's. aot_eager stands in for Inductor: what is checked is the tracing (fullgraph, no
    break), the symbolic shapes and the scores; Inductor's code generation is torch's. #1855's TTT options on."""
    opts = dict(ttt_lora_alpha=6.0, ttt_warm_start_a=True)
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda f, **kw: compile_(f, backend="aot_eager", **kw))
    compiled_ttt_is_eager_ttt(tiny_h(**opts), tiny_h(ttt_compile=True, ttt_compile_model=True, **opts), graphs=1, tol=1e-5)


# ----------------------------------------------------------------------------- 2. causality across documents


CAUSAL_PREDS = [70, 12, 33, 9, 50, 21, 40, 5, 27, 60, 16, 44, 30, 2]


def processing_order(val, h):
    docs = tg.find_docs(val.tokens)
    batches, bounds, ends = tg.ttt_schedule(h, docs)
    return docs, batches, bounds, ends


def identical(a, b, starts):
    return all(torch.equal(a[s], b[s]) for s in starts)


def changed(a, b, starts):
    return any(not torch.equal(a[s], b[s]) for s in starts)


@TTT_OPTS
def test_causality_across_documents_and_phases(opts):
    h = tiny_h(phased_ttt_prefix_docs=8, phased_ttt_num_phases=2, ttt_batch_size=4, **opts)
    m = tiny_model(h)
    val = make_val(CAUSAL_PREDS)
    docs, batches, bounds, ends = processing_order(val, h)
    assert [len(b) for b in batches] == [2, 4, 4, 4] and bounds == [4, 8] and ends == [2, 3]
    starts = [[docs[i].start for i in b] for b in batches]  # per queue entry, in processing order
    order = [i for b in batches for i in b]
    _, base, _ = ttt_scores(m, val, h)

    # a) the document processed last changes: nothing scored before it (nor its batch mates) moves
    last = docs[batches[-1][0]]
    _, s, _ = ttt_scores(m, scramble(val, last, 1), h)
    assert identical(s, base, [x for b in starts for x in b if x != last.start])
    assert not torch.equal(s[last.start], base[last.start])

    # b) a document in phase 1's global-SGD data changes: its phase (batches 0-1) is untouched, later phases move
    # because the global SGD after phase 1 trained on it (it was fully scored by then) - the legal dependence, and
    # the teeth of (a)
    sgd1 = tg.global_sgd_docs(docs, batches[: ends[0]], bounds[0])
    first = sgd1[0]
    _, s, _ = ttt_scores(m, scramble(val, first, 2), h)
    assert identical(s, base, [x for b in starts[: ends[0]] for x in b if x != first.start])
    assert changed(s, base, [x for b in starts[ends[0] :] for x in b])

    # c) the first document processed is scored in phase 1 but, being among the longest, is in no phase's global-SGD
    # data (the records keep the shortest scored documents): no other document's score may depend on it
    late = docs[order[0]]
    assert late not in sgd1 and late not in tg.global_sgd_docs(docs, batches[: ends[1]], bounds[1])
    _, s, _ = ttt_scores(m, scramble(val, late, 3), h)
    assert identical(s, base, [x for b in starts for x in b if x != late.start])

    # d) global SGD really changes later scores (and only later ones)
    _, s, _ = ttt_scores(m, val, tiny_h(phased_ttt_prefix_docs=8, phased_ttt_num_phases=2, global_ttt_lr=0.0, **opts))
    assert identical(s, base, [x for b in starts[: ends[0]] for x in b])
    assert changed(s, base, [x for b in starts[ends[0] :] for x in b])


def adapter_factors(loras, head):
    """Every (A, B[, scale]) of a set of adapters: the virtual layers' then the LM head's."""
    return [ab for l in loras for ab in l if ab is not None] + [head]


def test_warm_start_reset_keeps_a_zeroes_b_and_adam_state():
    """TTT_WARM_START_A (PR #1855): a batch of the last set's size gets that very set back with A as trained, B = 0
    and every AdamW moment and step 0, so its first update is a fresh optimizer's on the kept A."""
    h = tiny_h(ttt_warm_start_a=True)
    m = tiny_model(h)
    val, keep = make_val([40, 25, 60]), []
    docs = tg.find_docs(val.tokens)
    tg.ttt_batch(h, m, tg.EAGER, val.tokens, val.bytes, docs, CPU, torch.Generator().manual_seed(0), None, keep)
    loras, head, opt = keep[1]
    trained = [(ab[0].detach().clone(), ab[1].detach().clone()) for ab in adapter_factors(loras, head)]
    state = [t for st in opt.state.values() for t in st.values()]
    assert all(b.abs().sum() > 0 for _, b in trained) and all(t.abs().sum() > 0 for t in state)  # trained-looking
    fresh_a = tg.new_adapters(h, m, 3, CPU, torch.Generator().manual_seed(1))[0][0].q[0]
    got = tg.new_adapters(h, m, 3, CPU, torch.Generator().manual_seed(1), keep)
    assert got[0] is loras and got[1] is head and got[2] is opt and keep[0] == 3
    assert not torch.equal(got[0][0].q[0], fresh_a)  # not re-drawn
    for ab, (a, _) in zip(adapter_factors(loras, head), trained):
        assert torch.equal(ab[0], a) and not ab[1].any() and ab[0].requires_grad and ab[1].requires_grad
    assert len(opt.state) == len(state) // 3 and not any(t.any() for t in state)  # moments and step 0
    # the next step equals a brand-new AdamW's on the same values and gradients
    params = [p for g in opt.param_groups for p in g["params"]]
    twins = [p.detach().clone().requires_grad_() for p in params]
    ref = torch.optim.AdamW(twins, **{k: opt.defaults[k] for k in ("lr", "betas", "eps", "weight_decay")})
    gen = torch.Generator().manual_seed(2)
    for p, q in zip(params, twins):
        p.grad = torch.randn(p.shape, generator=gen)
        q.grad = p.grad.clone()
    opt.step(), ref.step()
    assert all(torch.equal(p, q) for p, q in zip(params, twins))
    # another size, or a cleared keep (after a global-SGD phase), builds a new set with a new A
    for bsz, clear in ((2, False), (3, True)):
        if clear:
            keep.clear()
        new = tg.new_adapters(h, m, bsz, CPU, torch.Generator().manual_seed(1), keep)
        assert new[0] is not loras and keep[0] == bsz and keep[1][0] is new[0]
        assert not any(ab[1].any() for ab in adapter_factors(*new[:2])) and len(new[2].state) == 0
    assert torch.equal(new[0][0].q[0], fresh_a)


@pytest.mark.parametrize("warm", [False, True])
def test_adapter_sets_built_per_batch_size_and_phase(monkeypatch, warm):
    """Which batches get a new adapter set (and so a new A) in eval_ttt_phased: without warm start every batch, each
    drawn from its queue index's generator; with it, the first batch, each batch after a global-SGD phase and each
    batch of another size than the last; the others reuse the set, A as trained."""
    builds, real = [], tg.new_adapters

    def spy(h, model, bsz, device, gen, keep=None):
        new = not (keep and keep[0] == bsz)
        out = real(h, model, bsz, device, gen, keep)
        builds.append((new, out[0][0].q[0], out[0][0].q[0].detach().clone()))
        return out

    monkeypatch.setattr(tg, "new_adapters", spy)
    val = make_val(CAUSAL_PREDS)  # 14 documents
    for over, new_at in ((dict(phased_ttt_prefix_docs=0, ttt_batch_size=4), [0, 1]),  # batches of 2, 4, 4, 4
                         (dict(phased_ttt_prefix_docs=8, phased_ttt_num_phases=2, ttt_batch_size=2), [0, 2, 4])):
        h = tiny_h(ttt_warm_start_a=warm, **over)
        m = tiny_model(h)
        n = len(tg.ttt_schedule(h, tg.find_docs(val.tokens))[0])
        builds.clear()
        ttt_scores(m, val, h)
        assert len(builds) == n
        assert [q for q, b in enumerate(builds) if b[0]] == (new_at if warm else list(range(n)))
        for q, (new, a, a0) in enumerate(builds):
            if new:  # drawn from this batch's generator
                drawn = real(h, m, a.size(0), CPU, torch.Generator().manual_seed(h.seed * 1000003 + q))[0][0].q[0]
                assert torch.equal(a0, drawn)
            else:  # the previous batch's A object, as that batch left it (trained, so no longer its draw)
                assert a is builds[q - 1][1] and not torch.equal(a0, builds[q - 1][2])


@pytest.mark.parametrize("warm", [False, True])
def test_warm_start_a_carries_only_scored_documents(warm):
    """With TTT_WARM_START_A a document reaches the documents in its row of the later batches of its phase through
    A (trained on it after it was scored): legal, and the only new dependence; nothing processed before it and no
    other row moves. (A document's first chunk is scored with B = 0, so only multi-chunk documents can show it.)"""
    h = tiny_h(phased_ttt_prefix_docs=0, ttt_batch_size=4, ttt_warm_start_a=warm)
    m = tiny_model(h)
    val = make_val(CAUSAL_PREDS)
    docs, batches, _, _ = processing_order(val, h)
    assert [len(b) for b in batches] == [2, 4, 4, 4]  # batches 1-3 share one adapter set under warm start
    _, base, _ = ttt_scores(m, val, h)
    d = docs[batches[1][-1]]  # the last row of the first batch of the shared set
    heirs = [docs[b[-1]].start for b in batches[2:]]  # its row in the later batches: 30 and 12 targets
    assert all(docs[b[-1]].length - 1 > h.ttt_chunk_size for b in batches[2:])
    _, s, _ = ttt_scores(m, scramble(val, d, 4), h)
    assert not torch.equal(s[d.start], base[d.start])
    assert identical(s, base, [docs[i].start for b in batches for i in b if docs[i] != d and docs[i].start not in heirs])
    assert all(changed(s, base, [x]) == warm for x in heirs)


def test_lora_alpha_scales_every_adapter_output():
    """TTT_LORA_ALPHA (PR #1767): every adapter returns (x A^T) B^T * alpha / rank, 1.8x at #1855's rank 80 and alpha
    144; in the whole TTT forward (Q, K, V, O, MLP and LM-head adapters) that equals unscaled adapters with 1.8 B."""
    h, h0 = tiny_h(ttt_lora_rank=80, ttt_lora_alpha=144.0), tiny_h(ttt_lora_rank=80)
    m = tiny_model(h)
    gen = torch.Generator().manual_seed(0)
    loras, head, _ = tg.new_adapters(h, m, 2, CPU, gen)
    factors = adapter_factors(loras, head)
    with torch.no_grad():  # trained-looking adapters: B = 0 would make every output 0
        for ab in factors:
            ab[1].normal_(0, 0.05, generator=gen)
    assert all(len(ab) == 3 and ab[2] == 1.8 for ab in factors)
    assert all(len(ab) == 2 for ab in adapter_factors(*tg.new_adapters(h0, m, 2, CPU, gen)[:2]))  # default: unscaled
    A, B, _ = loras[0].q
    x = torch.randn(2, 24, A.size(2), generator=gen)
    unscaled = torch.bmm(torch.bmm(x, A.transpose(1, 2)), B.transpose(1, 2))
    assert torch.equal(tg.lora_delta(x, loras[0].q), 1.8 * unscaled) and unscaled.abs().max() > 1e-2
    assert tg._rows(loras, head, torch.tensor([1]))[1][2] == 1.8  # the documents still scored keep the scale
    ids = torch.randint(2, V, (2, 24), generator=gen)
    ids[:, 0] = tg.BOS_ID
    y = torch.randint(2, V, (2, 24), generator=gen)
    with torch.no_grad():
        got = m.token_losses(ids, y, tg.Fwd(h.eval_loop_depth, tg.EAGER, loras, head))
        as_b = lambda ab: (ab[0], 1.8 * ab[1])
        want = m.token_losses(ids, y, tg.Fwd(h.eval_loop_depth, tg.EAGER, [tg.Lora(*(ab and as_b(ab) for ab in l))
                                                                          for l in loras], as_b(head)))
        plain = m.token_losses(ids, y, tg.Fwd(h.eval_loop_depth, tg.EAGER, [tg.Lora(*(ab and ab[:2] for ab in l))
                                                                           for l in loras], head[:2]))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-3


def test_global_sgd_data_is_the_shortest_scored_documents_in_batch_order():
    """The records sort scored documents by (batch index, position) with batches numbered shortest first and keep
    the first `boundary`: the shortest scored documents, not the first processed (the longest)."""
    h = tiny_h(phased_ttt_prefix_docs=8, phased_ttt_num_phases=2, ttt_batch_size=4)
    docs, batches, bounds, ends = processing_order(make_val(CAUSAL_PREDS), h)
    for phase in range(2):
        scored = [docs[i] for b in batches[: ends[phase]] for i in b]
        picked = tg.global_sgd_docs(docs, batches[: ends[phase]], bounds[phase])
        assert len(picked) == bounds[phase] < len(scored)
        assert [d.length for d in picked] == sorted(d.length for d in scored)[: bounds[phase]]
        assert set(picked) <= set(scored)


# ----------------------------------------------------------------------------- 5./6. agreement with plain evaluation


def test_sliding_equals_plain_on_short_documents():
    """Every document shorter than window - stride: each target sees its whole document in both evaluations."""
    h = tiny_h(eval_stride=16)
    m = tiny_model(h)
    val = make_val(padded([40, 12, 33, 2, 47, 25, 9, 44, 30, 18, 38]))
    assert max(d.length - 1 for d in tg.find_docs(val.tokens)) <= h.eval_seq_len - h.eval_stride
    plain = tg.eval_val(h, m, val, CPU, ev(h))
    for stride in (16, 24):
        sl = tg.eval_sliding(tiny_h(eval_stride=stride), m, val, CPU, quiet, ev(h))
        assert sl[0] == pytest.approx(plain[0], abs=1e-6)
        assert sl[1] == pytest.approx(plain[1], abs=1e-6)
    # a document longer than the window is cut differently by the two: they must then differ (the check can fail)
    long_val = make_val(padded([150, 20]))
    assert abs(tg.eval_sliding(h, m, long_val, CPU, quiet, ev(h))[0] - tg.eval_val(h, m, long_val, CPU, ev(h))[0]) > 1e-4


def test_ttt_without_updates_equals_plain_evaluation():
    h0 = tiny_h(ttt_lora_lr=0.0, global_ttt_lr=0.0, phased_ttt_prefix_docs=6, phased_ttt_num_phases=2)
    m = tiny_model(h0)
    val = make_val(padded([40, 12, 33, 2, 64, 25, 9, 44, 30, 18, 38, 7]))
    docs = tg.find_docs(val.tokens)
    assert max(d.length - 1 for d in docs) <= min(h0.eval_seq_len, h0.ttt_eval_seq_len)
    plain = tg.eval_val(h0, m, val, CPU, ev(h0))
    res, scores, _ = ttt_scores(m, val, h0)
    assert res[0] == pytest.approx(plain[0], abs=1e-5)
    assert res[1] == pytest.approx(plain[1], abs=1e-5)
    for d in docs:  # the same targets at the same positions, each with the same context
        assert torch.allclose(scores[d.start], doc_alone_losses(m, val, d), atol=1e-5)
    # each adaptation path, on its own, changes the score
    for over in (dict(ttt_lora_lr=1e-2), dict(global_ttt_lr=1e-1)):
        res2, _, _ = ttt_scores(m, val, tiny_h(**{**dict(ttt_lora_lr=0.0, global_ttt_lr=0.0, phased_ttt_prefix_docs=6,
                                                          phased_ttt_num_phases=2), **over}))
        assert abs(res2[0] - plain[0]) > 1e-4 and abs(res2[1] - plain[1]) > 1e-4, over


# ----------------------------------------------------------------------------- rank independence (gloo)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ttt_rank_worker(rank, world, port, out_dir, over, val):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        h = tiny_h(**over, rank=rank, world_size=world)
        res, scores, _ = ttt_scores(tiny_model(h), val, h)
        torch.save({"res": tuple(res), "scores": scores}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ttt_two_ranks_equal_one(tmp_path):
    """2 gloo processes claim disjoint batches, all-reduce global-SGD gradients and sums: same score as 1 process."""
    over = dict(phased_ttt_prefix_docs=8, phased_ttt_num_phases=2)
    val = make_val(CAUSAL_PREDS)
    h = tiny_h(**over)
    one, one_scores, _ = ttt_scores(tiny_model(h), val, h)
    mp.spawn(_ttt_rank_worker, args=(2, _free_port(), str(tmp_path), over, val), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert not set(r0["scores"]) & set(r1["scores"]), "a batch was scored by both ranks"
    assert set(r0["scores"]) | set(r1["scores"]) == set(one_scores)
    assert r0["res"] == r1["res"]
    assert r0["res"][0] == pytest.approx(one[0], abs=1e-6) and r0["res"][1] == pytest.approx(one[1], abs=1e-6)
    both = {**r0["scores"], **r1["scores"]}
    for s, v in one_scores.items():
        assert torch.allclose(both[s], v, atol=1e-5)


# ----------------------------------------------------------------------------- end to end (subprocess, prepared_data)

# Small enough for ~30 s per run on one CPU thread: half the val docs in TTT, 256-token chunks, looped depth 2.
E2E = dict(ITERATIONS=4, EVAL_LOOP_DEPTH=2, VAL_BATCH_TOKENS=4096, TTT_CHUNK_SIZE=256, VAL_DOC_FRACTION=0.5,
           PHASED_TTT_PREFIX_DOCS=2, PHASED_TTT_NUM_PHASES=2, GLOBAL_TTT_CHUNK_TOKENS=256)
FULL_RUN_LINES = ["diagnostic pre-quantization post-ema val_loss:", "Serialized model quantized+pergroup:",
                  "Total submission size quantized+pergroup:", "diagnostic quantized val_loss:", "beginning TTT eval timer",
                  "ttt_phased: total_docs:", "ttpp: phase:", "tttg: c1/", "ttpr: phase:", "quantized_ttt_phased val_loss:",
                  "total_eval_time:", "eval_wall_time:"]


def run_trainer(data_root, cwd, nproc=1, **over):
    env = tiny_env(data_root, **{**E2E, **over})
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    script = str(REPO / "train_gpt.py")
    cmd = [sys.executable, script] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                        f"--nproc_per_node={nproc}", script]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def metric(out, name):
    m = re.search(rf"^{re.escape(name)} val_loss:(\S+) val_bpb:(\S+)", out, re.M)
    assert m, f"no '{name}' result in:\n{out[-3000:]}"
    return m.group(1), m.group(2)


@pytest.fixture(scope="module")
def full_run(prepared_data, tmp_path_factory):
    art = tmp_path_factory.mktemp("full_run")
    r = run_trainer(prepared_data, art, ARTIFACT_DIR=str(art))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return art, r.stdout


def test_e2e_full_run_logs(full_run):
    art, out = full_run
    pos = [out.find(line) for line in FULL_RUN_LINES]
    missing = [line for line, p in zip(FULL_RUN_LINES, pos) if p < 0]
    assert not missing, f"missing log lines {missing}"
    assert pos == sorted(pos), "log lines out of order"
    ptz = art / "final_model.int6.ptz"
    model_bytes = int(re.search(r"^Serialized model quantized\+pergroup: (\d+) bytes", out, re.M).group(1))
    assert model_bytes == os.path.getsize(ptz)
    code = int(re.search(r"^Code size \(compressed\): (\d+) bytes", out, re.M).group(1))
    total = int(re.search(r"^Total submission size quantized\+pergroup: (\d+) bytes", out, re.M).group(1))
    assert total == model_bytes + code
    loss, bpb = map(float, metric(out, "quantized_ttt_phased"))
    assert math.isfinite(loss) and math.isfinite(bpb) and bpb > 0


def counts(out, name):
    tail = r" val_loss:\S+ val_bpb:\S+ eval_time:\d+ms val_tokens:(\d+) val_bytes:(\d+)$"
    m = re.search(rf"^{re.escape(name)}{tail}", out, re.M)
    assert m, f"no '{name}' result with counts in:\n{out[-3000:]}"
    return int(m[1]), int(m[2])


def test_e2e_logs_hardware_and_the_counts_every_evaluation_scored(full_run, prepared_data):
    """Record tooling reads `hardware: NAME xWORLD` and `val_tokens:N val_bytes:M val_docs:D`; every result line
    repeats the targets and bytes it scored (TTT: the VAL_DOC_FRACTION=0.5 documents' totals)."""
    _, out = full_run
    assert re.search(r"^hardware: cpu x1$", out, re.M)
    h = make_h(data_dir=str(prepared_data), vocab_size=prepared_vocab(prepared_data), eval_seq_len=256,
               val_doc_fraction=0.5)
    val = tg.load_val(h, spm.SentencePieceProcessor(model_file=h.tokenizer_path))
    full = tg.val_totals(val)
    assert re.search(rf"^val_tokens:{full[0]} val_bytes:{full[1]} val_docs:{len(tg.find_docs(val.tokens))}$", out, re.M)
    assert counts(out, "diagnostic pre-quantization post-ema") == counts(out, "diagnostic quantized") == full
    assert counts(out, "quantized_ttt_phased") == tg.val_totals(val, tg.ttt_docs(h, val)) != full


def test_e2e_resume_from_requantizes_without_training(full_run, prepared_data, tmp_path):
    """RESUME_FROM=final_model.pt skips training and re-quantizes the same weights with other settings.
    (Runs before the EVAL_ONLY test below, which deletes final_model.pt.)"""
    art, out = full_run
    r = run_trainer(prepared_data, tmp_path, RESUME_FROM=str(art / "final_model.pt"), COMPRESSOR="lzma", TTT_ENABLED=0,
                    ARTIFACT_DIR=str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "resume_from:" in r.stdout
    assert not re.search(r"^(\d+/\d+ train_loss|warmup_step:)", r.stdout, re.M)  # no training at all
    pre = "diagnostic pre-quantization post-ema"
    assert metric(r.stdout, pre) == metric(out, pre)  # the very weights of the first run
    assert "Total submission size quantized+lzma:" in r.stdout
    assert (tmp_path / "final_model.int6.ptz").read_bytes() != (art / "final_model.int6.ptz").read_bytes()


def test_e2e_lqer_and_brotli_requantize_and_score(full_run, prepared_data, tmp_path):
    """LQER_ENABLED=1 COMPRESSOR=brotli on the first run's weights: the log lists the corrected tensors, the size
    line is the file's bytes, and the brotli artifact is loaded (by its kind byte) and scored like the default
    (pergroup) one, within LQER's change."""
    art, out = full_run
    assert (art / "final_model.int6.ptz").read_bytes()[:1] == b"P"  # the default run's artifact is pergroup
    r = run_trainer(prepared_data, tmp_path, RESUME_FROM=str(art / "final_model.pt"), COMPRESSOR="brotli",
                    LQER_ENABLED=1, TTT_ENABLED=0, ARTIFACT_DIR=str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert len(re.findall(r"^  gptq \(int\d\)\+lqer_asym: \S", r.stdout, re.M)) >= 1
    ptz = tmp_path / "final_model.int6.ptz"
    assert ptz.read_bytes()[:1] == b"B"
    size = re.search(r"^Serialized model quantized\+brotli: (\d+) bytes", r.stdout, re.M)
    assert int(size[1]) == ptz.stat().st_size
    loss, bpb = map(float, metric(r.stdout, "diagnostic quantized"))
    assert abs(bpb - float(metric(out, "diagnostic quantized")[1])) < 0.05


def test_e2e_eval_only_rescores_artifact(full_run, prepared_data, tmp_path):
    """Scoring needs only the .ptz: delete final_model.pt, re-score with EVAL_ONLY=1 -> the very same numbers."""
    art, out = full_run
    (art / "final_model.pt").unlink(missing_ok=True)
    r = run_trainer(prepared_data, tmp_path, EVAL_ONLY=1, ARTIFACT=str(art / "final_model.int6.ptz"),
                    ARTIFACT_DIR=str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert metric(r.stdout, "quantized_ttt_phased") == metric(out, "quantized_ttt_phased")
    assert metric(r.stdout, "diagnostic quantized")[0] == metric(out, "diagnostic quantized")[0]
    assert "train_loss" not in r.stdout and not (tmp_path / "final_model.int6.ptz").exists()


def test_e2e_two_ranks_eval_only_agrees(full_run, prepared_data, tmp_path):
    art, out = full_run
    r = run_trainer(prepared_data, tmp_path, nproc=2, EVAL_ONLY=1, ARTIFACT=str(art / "final_model.int6.ptz"),
                    ARTIFACT_DIR=str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "world_size:2" in r.stdout and re.search(r"^hardware: cpu x2$", r.stdout, re.M)
    one, two = map(float, metric(out, "quantized_ttt_phased")), map(float, metric(r.stdout, "quantized_ttt_phased"))
    for a, b in zip(one, two):
        assert abs(a - b) < 1e-6


def test_e2e_prequant_ttt_refused(prepared_data, tmp_path):
    r = run_trainer(prepared_data, tmp_path, PREQUANT_TTT_ENABLED=1, ARTIFACT_DIR=str(tmp_path))
    assert r.returncode != 0
    msg = r.stderr.strip()
    assert "score-before-update" in msg and "Traceback" not in msg and len(msg.splitlines()) == 1
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_e2e_eval_only_missing_artifact(prepared_data, tmp_path):
    missing = tmp_path / "nope.ptz"
    r = run_trainer(prepared_data, tmp_path, EVAL_ONLY=1, ARTIFACT=str(missing), ARTIFACT_DIR=str(tmp_path))
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "EVAL_ONLY" in last and str(missing) in last and "does not exist" in last


def test_e2e_lzma_and_sliding_window(full_run, prepared_data, tmp_path):
    """COMPRESSOR=lzma: same trained model, lossless container -> the same quantized diagnostic as the default run's;
    SLIDING_WINDOW_ENABLED=1 logs progress and a result."""
    _, out = full_run
    r = run_trainer(prepared_data, tmp_path, COMPRESSOR="lzma", SLIDING_WINDOW_ENABLED=1, EVAL_STRIDE=128,
                    TTT_ENABLED=0, ARTIFACT_DIR=str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    ptz = tmp_path / "final_model.int6.ptz"
    assert ptz.read_bytes()[:1] == b"L"
    size = int(re.search(r"^Serialized model quantized\+lzma: (\d+) bytes", r.stdout, re.M).group(1))
    assert size == os.path.getsize(ptz)
    assert metric(r.stdout, "diagnostic quantized") == metric(out, "diagnostic quantized")
    assert re.search(r"^sliding_progress: batch 1/\d+ tokens:\d+ running_loss:", r.stdout, re.M)
    sl = metric(r.stdout, "diagnostic quantized_sliding_window")
    assert all(math.isfinite(float(v)) for v in sl)
    assert "beginning TTT eval timer" not in r.stdout
