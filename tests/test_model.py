"""CPU tests of train_gpt.py's MODEL section: causality, document isolation under packing, the attention backends,
the recurrence layer schedule and depth curriculum, and the default parameter count (SPEC 4)."""
import functools

import pytest

import torch

import train_gpt as tg
from conftest import make_h

# 4 physical layers (head_dim 16, partial RoPE on 8 dims), loop over layers 1-2, layer 3 parallel, XSA and the
# attention gate everywhere:
# depth 3 -> encoder [0, 1, 2, 1], decoder [2, 1, 2, 3] with 4 skips, so every model feature is exercised.
TINY = dict(vocab_size=64, num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=2.0, rope_dims=8,
            loop_start=1, loop_end=2, parallel_start_layer=3, xsa_last_n=4, train_seq_len=64, compile=False,
            attn_backend="sdpa")  # CPU tensors: the SDPA path, even on a machine with FA3/varlen_attn
FAST_VARLEN = [b for b, ok in (("fa3", tg._FA3), ("fa4", tg._FA4), ("varlen", tg._VARLEN)) if ok]


def tiny_model(depth=1, seed=0, **over):
    """fp32 tiny GPT with every parameter randomised: the default init zeroes the output and down projections
    (blocks start as identities), which would hide any cross-position leak. Evaluated at `depth`."""
    torch.manual_seed(seed)
    model = tg.build_model(make_h(**{**TINY, "eval_loop_depth": depth, **over}), torch.device("cpu"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_bank"):  # [n, out, in]
                p.copy_(torch.randn_like(p) / p.size(-1) ** 0.5)
            elif name == "tok_emb.weight":
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(p + 0.3 * torch.randn_like(p))
    model.eval()
    return model


@torch.no_grad()
def logits(model, ids, cu=None):
    fwd = tg.Fwd(model.h.eval_loop_depth)
    return model.logits(model.hidden(ids, fwd, cu), fwd)


def packed_row(lengths, seed=0, vocab=64):
    """One packed row of documents, each starting with BOS, interior tokens in [2, vocab)."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for n in lengths:
        d = torch.randint(2, vocab, (n,), generator=g)
        d[0] = tg.BOS_ID
        docs.append(d)
    return torch.cat(docs), docs


def changed_token(tok, vocab=64):
    return 2 + (int(tok) - 2 + 7) % (vocab - 2)  # a different non-BOS id


# ----------------------------------------------------------------------------- causality


@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_changing_a_later_token_never_changes_an_earlier_logit(depth, packed):
    model = tiny_model(depth)
    if packed:
        row, _ = packed_row([13, 19, 16])
        ids = row[None]
        cu_of = lambda ids: tg.cu_seqlens_for(ids[0].numpy(), 64, bucket=8)
    else:
        ids = torch.randint(2, 64, (2, 48), generator=torch.Generator().manual_seed(1))
        cu_of = lambda ids: None
    base = logits(model, ids, cu_of(ids))
    for t in (5, 20, 40, 47):
        if ids[0, t] == tg.BOS_ID:
            continue
        ids2 = ids.clone()
        ids2[:, t] = changed_token(ids[0, t])
        out = logits(model, ids2, cu_of(ids2))
        torch.testing.assert_close(out[:, :t], base[:, :t], atol=1e-5, rtol=1e-5, msg=f"position {t} leaked backwards")
        assert (out[:, t] - base[:, t]).abs().max() > 1e-3, "the changed token itself must move its logits"


# ----------------------------------------------------------------------------- document isolation


@pytest.mark.parametrize("depth", [1, 3])
def test_a_document_never_affects_another_documents_logits(depth):
    model = tiny_model(depth)
    row, docs = packed_row([13, 19, 16])
    s1, s2 = len(docs[0]), len(docs[0]) + len(docs[1])
    cu = tg.cu_seqlens_for(row.numpy(), 64, bucket=8)
    assert cu.tolist() == [0, 13, 32, 48, 48, 48, 48, 48]
    base = logits(model, row[None], cu)[0]
    row2 = row.clone()
    row2[s1 + 1 : s2] = torch.tensor([changed_token(t) for t in row[s1 + 1 : s2]])  # doc 2's tokens, BOS kept
    out = logits(model, row2[None], tg.cu_seqlens_for(row2.numpy(), 64, bucket=8))[0]
    torch.testing.assert_close(out[:s1], base[:s1], atol=1e-5, rtol=1e-5, msg="doc 1 saw doc 2")
    torch.testing.assert_close(out[s2:], base[s2:], atol=1e-5, rtol=1e-5, msg="doc 3 saw doc 2")
    assert (out[s1 + 1 : s2] - base[s1 + 1 : s2]).abs().max() > 1e-3


@pytest.mark.parametrize("depth", [1, 3])
def test_packed_row_equals_each_document_alone(depth):
    model = tiny_model(depth)
    row, docs = packed_row([13, 19, 16], seed=3)
    packed = logits(model, row[None], tg.cu_seqlens_for(row.numpy(), 64, bucket=8))[0]
    start = 0
    for d in docs:
        alone = logits(model, d[None])[0]  # dense causal call, positions from 0 (RoPE is relative)
        torch.testing.assert_close(packed[start : start + len(d)], alone, atol=1e-4, rtol=1e-4)
        start += len(d)
    # without cu_seqlens the row is one sequence: doc 3 then sees docs 1-2, so the comparison above is not vacuous
    unpacked = logits(model, row[None])[0]
    assert (unpacked[-len(docs[-1]) :] - packed[-len(docs[-1]) :]).abs().max() > 1e-3


# ----------------------------------------------------------------------------- parallel decoder lanes


def records_hidden(model, ids):
    """The records' decoder rule, written out directly: at the first parallel layer both lanes start from x as it
    is *before* that layer's U-Net skip; every skip from then on goes to lane 0 only; the output is the lane mean."""
    h, x0 = model.h, tg.rms(model.tok_emb(ids))
    attn = tg.AttnArgs(model.rope(ids.size(1), ids.device), None, h.train_seq_len, "sdpa")
    enc, dec = tg.layer_plan(h, h.eval_loop_depth)
    x, skips = x0, []
    for i in enc:
        x = tg.sequential_block(x, x0, model.layer_weights()[i], attn)
        skips.append(x)
    lanes = None
    for j, i in enumerate(dec):
        if i >= h.parallel_start_layer and lanes is None:
            lanes = [x, x]
        if j < model.num_skips and skips:
            g, s = torch.sigmoid(model.skip_gates[j]), model.skip_weights[j] * skips.pop()
            if lanes is None:
                x = g * x + (1 - g) * s
            else:
                lanes[0] = g * lanes[0] + (1 - g) * s
        if lanes is None:
            x = tg.sequential_block(x, x0, model.layer_weights()[i], attn)
        else:
            lanes = list(tg.parallel_block(*lanes, x0, model.layer_weights()[i], model.parallel_resid_lambdas[i],
                                           model.parallel_post_lambdas[i], attn))
    return 0.5 * (lanes[0] + lanes[1])


@pytest.mark.parametrize("depth", [1, 3])
def test_parallel_lanes_follow_the_records_rule(depth):
    """Lane 1 must not receive the skip of the first parallel layer (trained-looking weights: with zero output
    projections both rules agree, which hid this)."""
    model = tiny_model(depth)
    enc, dec = tg.layer_plan(model.h, depth)
    first_parallel = next(j for j, i in enumerate(dec) if i >= model.h.parallel_start_layer)
    assert first_parallel < min(model.num_skips, len(enc)), "the first parallel layer must receive a skip"
    ids = torch.randint(2, 64, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(model.hidden(ids, tg.Fwd(depth)), records_hidden(model, ids), atol=1e-5, rtol=1e-5)


def bank_backward_nodes(t, banks):
    """Names of the autograd nodes that feed a bank's gradient accumulator directly."""
    seen, todo, names = set(), [t.grad_fn], []
    while todo:
        n = todo.pop()
        if n is None or n in seen:
            continue
        seen.add(n)
        for f, _ in n.next_functions:
            if any(getattr(f, "variable", None) is b for b in banks):
                names.append(type(n).__name__)
            todo.append(f)
    return names


@pytest.mark.parametrize("depth", [1, 3])
def test_bank_gradients_flow_through_one_unbind_per_bank(depth):
    """Each bank reaches the blocks through a single unbind (one stack in backward), not a select per use (each
    select's backward writes a bank-sized zero tensor that is then added into the bank's gradient); the gradients
    equal those of per-use bank[i] indexing."""
    model = tiny_model(depth)
    ids = torch.randint(2, 64, (2, 40), generator=torch.Generator().manual_seed(3))
    loss = model(ids[:, :-1], ids[:, 1:], tg.Fwd(depth))
    banks = [p for n, p in model.named_parameters() if n.endswith("_bank")]
    assert bank_backward_nodes(loss, banks) == ["UnbindBackward0"] * 4
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if n.endswith("_bank")}
    model.zero_grad()
    L = model.h.num_layers
    per_use = lambda self: [w._replace(wq=self.qo_bank[i], wk=self.kv_bank[i], wv=self.kv_bank[L + i],
                                       wo=self.qo_bank[L + i], up=self.mlp_up_bank[i], down=self.mlp_down_bank[i])
                            for i, w in enumerate(tg.GPT.layer_weights(self))]
    model.layer_weights = per_use.__get__(model)
    model(ids[:, :-1], ids[:, 1:], tg.Fwd(depth)).backward()
    for n, p in model.named_parameters():
        if n in grads:
            assert p.grad.abs().sum() > 0
            torch.testing.assert_close(grads[n], p.grad, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- attention backends


def reference_attention(q, k, v, seg):
    """Dense fp64 softmax attention with a block-diagonal causal mask; seg[i] = segment id of position i.
    Query head h reads KV head h // (H / KV) (GQA)."""
    B, T, H, D = q.shape
    kv_of = torch.arange(H) // (H // k.size(2))
    q, k, v = q.double(), k[:, :, kv_of].double(), v[:, :, kv_of].double()
    s = torch.einsum("bihd,bjhd->bhij", q, k) / D**0.5
    pos = torch.arange(T)
    allowed = (pos[None, :] <= pos[:, None]) & (seg[None, :] == seg[:, None])
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", s.softmax(-1), v).float()


def segments_of(cu, T):
    bounds = torch.unique_consecutive(cu)
    return torch.bucketize(torch.arange(T), bounds[1:-1], right=True)


def qkv(T, H=4, KV=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, T, H, D, generator=g), torch.randn(1, T, KV, D, generator=g), torch.randn(1, T, KV, D, generator=g))


def test_sdpa_segment_path_equals_block_diagonal_masked_reference():
    tokens = [1, 5, 6, 7, 1, 8, 9, 5, 6, 7, 8, 9, 5, 6, 1, 4, 4, 1, 3, 3]  # the 10-token doc is split at max_len 8
    T = len(tokens)
    cu = tg.cu_seqlens_for(tokens, 8, bucket=16)
    assert cu[:6].tolist() == [0, 4, 12, 14, 17, 20] and (cu[6:] == T).all()  # split + padding exercised
    q, k, v = qkv(T)
    out = tg.attend(q, k, v, cu, 8)
    torch.testing.assert_close(out, reference_attention(q, k, v, segments_of(cu, T)), atol=1e-5, rtol=1e-4)
    # separate dense causal calls, one per segment, give the same rows
    bounds = torch.unique_consecutive(cu).tolist()
    sep = torch.cat([tg.attend(q[:, a:b], k[:, a:b], v[:, a:b], None, 8) for a, b in zip(bounds[:-1], bounds[1:])], dim=1)
    torch.testing.assert_close(out, sep, atol=1e-6, rtol=1e-5)


def test_dense_attention_is_causal_gqa_reference():
    q, k, v = qkv(24, H=8, KV=2, seed=1)
    out = tg.attend(q, k, v, None, 24)
    torch.testing.assert_close(out, reference_attention(q, k, v, torch.zeros(24, dtype=torch.long)), atol=1e-5, rtol=1e-4)
    # the reference is sensitive to the GQA head mapping: a wrong head->KV assignment would not match
    wrong = reference_attention(q, k.flip(2), v.flip(2), torch.zeros(24, dtype=torch.long))
    assert (wrong - out).abs().max() > 1e-2


@pytest.mark.skipif(not FAST_VARLEN, reason="FA3, FA4 and torch's varlen_attn run on CUDA only")
@pytest.mark.parametrize("backend", FAST_VARLEN or [None])
def test_fast_varlen_backend_matches_reference(backend):
    dev = torch.device("cuda")
    tokens = [1] + [5] * 40 + [1] + [6] * 30 + [1] + [7] * 57
    T = len(tokens)
    cu = tg.cu_seqlens_for(tokens, 32, bucket=64)
    q, k, v = qkv(T, H=8, KV=4, D=64)
    out = tg.attend(*(t.to(dev, torch.bfloat16) for t in (q, k, v)), cu.to(dev), 32, backend).float().cpu()
    torch.testing.assert_close(out, reference_attention(q, k, v, segments_of(cu, T)), atol=3e-2, rtol=3e-2)
    dense = tg.attend(*(t.to(dev, torch.bfloat16) for t in (q, k, v)), None, T, backend).float().cpu()
    torch.testing.assert_close(dense, reference_attention(q, k, v, torch.zeros(T, dtype=torch.long)), atol=3e-2, rtol=3e-2)


class ReferenceFA4:
    """Stands in for flash-attn-4's interface module on the CPU: its two entry points that train_gpt calls, computed
    with the fp64 reference, so the tests below check our wrapper (custom op, autograd, compile, model path)."""
    calls = 0

    @staticmethod
    def _flash_attn_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, return_lse):
        assert causal and return_lse and cu_seqlens_q is cu_seqlens_k and q.dim() == 3
        ReferenceFA4.calls += 1
        ReferenceFA4.kv_heads = k.size(1)
        T, H, D = q.shape
        seg = segments_of(cu_seqlens_q, T)
        kv_of = torch.arange(H) // (H // k.size(1))
        s = torch.einsum("ihd,jhd->hij", q.double(), k[:, kv_of].double()) / D**0.5
        pos = torch.arange(T)
        s = s.masked_fill(~((pos[None] <= pos[:, None]) & (seg[None] == seg[:, None])), float("-inf"))
        lse = s.logsumexp(-1)
        out = torch.einsum("hij,jhd->ihd", (s - lse[..., None]).exp(), v[:, kv_of].double())
        return out.to(q.dtype).contiguous(), lse.float().contiguous(), None, None, None

    @staticmethod
    def _flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale, causal, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                        max_seqlen_k):
        """The attention backward from out and lse (custom ops run below autograd: no recomputation by autograd)."""
        assert softmax_scale is None and causal and cu_seqlens_q is cu_seqlens_k
        T, H, D = q.shape
        KV = k.size(1)
        kv_of = torch.arange(H) // (H // KV)
        q, kh, vh, out, dout = q.double(), k[:, kv_of].double(), v[:, kv_of].double(), out.double(), dout.double()
        seg, pos = segments_of(cu_seqlens_q, T), torch.arange(T)
        s = torch.einsum("ihd,jhd->hij", q, kh) / D**0.5
        s = s.masked_fill(~((pos[None] <= pos[:, None]) & (seg[None] == seg[:, None])), float("-inf"))
        p = (s - lse.double()[..., None]).exp()
        ds = p * (torch.einsum("ihd,jhd->hij", dout, vh) - (dout * out).sum(-1).t()[..., None])
        dq = torch.einsum("hij,jhd->ihd", ds, kh) / D**0.5
        per_head = torch.einsum("hij,ihd->jhd", ds, q) / D**0.5, torch.einsum("hij,ihd->jhd", p, dout)
        dk, dv = (t.view(T, KV, H // KV, D).sum(2) for t in per_head)
        return tuple(t.to(k.dtype).contiguous() for t in (dq, dk, dv))


def use_fa4(monkeypatch, impl):
    monkeypatch.setattr(tg, "_FA4", impl)


def test_fa4_backend_wrapper_matches_reference_forward_and_gradients(monkeypatch):
    """ATTN_BACKEND=fa4 goes through the pgolf::fa4_varlen custom op (forward, lse, backward op) and traces into a
    compiled graph without a break; with the reference standing in for the CuTe kernels it equals the SDPA path (GQA:
    the gradients of k and v summed over the query heads that share them)."""
    use_fa4(monkeypatch, ReferenceFA4)
    tokens = [1] + [5] * 20 + [1] + [6] * 9 + [1] + [7] * 30
    T = len(tokens)
    cu = tg.cu_seqlens_for(tokens, 16, bucket=16)  # a doc split at max_len, padding entries at T
    q, k, v = (t.requires_grad_() for t in qkv(T, H=4, KV=2, D=16))
    g, ReferenceFA4.calls = torch.randn(1, T, 4, 16), 0
    want = tg.attend(q, k, v, cu, 16, "sdpa")
    want_grads = torch.autograd.grad(want, (q, k, v), g)
    for f in (tg.attend, *(torch.compile(tg.attend, backend="aot_eager", fullgraph=True, dynamic=d) for d in (False, True))):
        got = f(q, k, v, cu, 16, "fa4")
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        for a, b in zip(torch.autograd.grad(got, (q, k, v), g), want_grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert ReferenceFA4.calls > 0
    assert ReferenceFA4.kv_heads == 2  # FA4 does the GQA itself: k and v are not repeated to the query heads
    torch.library.opcheck(tg.fa4_varlen, (q.detach()[0], k.detach()[0], v.detach()[0], cu, 16))


@pytest.mark.parametrize("bucket", [1, 16])  # unpadded, as the trainer gives FA4 (h.cu_bucket), and padded
def test_fa4_backend_runs_the_model_like_sdpa(monkeypatch, bucket):
    """The model's packed path with fa4 gives the SDPA path's losses (randomised weights, a split document)."""
    use_fa4(monkeypatch, ReferenceFA4)
    tokens = torch.tensor([1] + [5, 9, 3] * 20 + [1] + [7, 2] * 15 + [1, 4, 4, 8])
    cu = tg.cu_seqlens_for(tokens[:-1].tolist(), 32, bucket=bucket)
    ids, tgt = tokens[None, :-1], tokens[None, 1:]
    losses, ReferenceFA4.calls = {}, 0
    for backend in ("sdpa", "fa4"):
        model = tiny_model(depth=2, attn_backend=backend)
        with torch.no_grad():
            losses[backend] = model.token_losses(ids, tgt, tg.Fwd(2), cu)
    torch.testing.assert_close(losses["fa4"], losses["sdpa"], atol=1e-5, rtol=1e-5)
    assert ReferenceFA4.calls == sum(map(len, tg.layer_plan(model.h, 2)))  # every virtual layer ran it


def test_fa4_is_the_default_after_fa3_and_refused_when_absent(monkeypatch):
    monkeypatch.setattr(tg.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tg, "_FA3", None)
    monkeypatch.setattr(tg, "_FA4", ReferenceFA4)
    assert tg.attention_backend("") == "fa4"
    monkeypatch.setattr(tg, "_FA3", (None, None))
    assert tg.attention_backend("") == "fa3"
    monkeypatch.setattr(tg, "_FA3", None)
    monkeypatch.setattr(tg, "_FA4", None)
    assert tg.attention_backend("") == "flex"
    with pytest.raises(tg.ConfigError, match="ATTN_BACKEND='fa4' is not available here; unset it for flex"):
        tg.attention_backend("fa4")


@pytest.mark.parametrize("cute_init, broken", [
    ("import cutlass.cute\n", True),  # flash-attn-4 without nvidia-cutlass-dsl-libs-core (seen on a device install)
    (None, False),  # flash-attn 2: a flash_attn package without .cute is simply not FA4
])
def test_a_broken_fa4_install_is_named_not_silently_replaced_by_flex(monkeypatch, tmp_path, cute_init, broken):
    pkg = tmp_path / "flash_attn"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    if cute_init is not None:
        (pkg / "cute").mkdir()
        (pkg / "cute" / "__init__.py").write_text(cute_init)
    monkeypatch.syspath_prepend(str(tmp_path))
    names = ("flash_attn", "flash_attn.cute", "cutlass", "cutlass.cute")
    for name in names:
        monkeypatch.delitem(tg.sys.modules, name, raising=False)
    monkeypatch.setattr(tg.torch.cuda, "is_available", lambda: True)
    try:
        fa3, fa4, varlen, error = tg._fast_attention_kernels()
    finally:  # the stand-in package must not serve later imports (monkeypatch then restores any real one)
        for name in names:
            tg.sys.modules.pop(name, None)
    assert fa4 is None
    assert ("No module named 'cutlass" in error) == broken and bool(error) == broken
    monkeypatch.setattr(tg, "_FA3", None)
    monkeypatch.setattr(tg, "_FA4", None)
    monkeypatch.setattr(tg, "_FA4_ERROR", error)
    h = make_h(**{**TINY, "attn_backend": "flex"})
    assert ("WARNING: attention runs flex, not fa4: flash-attn-4 is installed but does not import (ModuleNotFoundError"
            in tg.kernels_line(h)) == broken
    assert tg.kernels_line(h).startswith("attn_backend:flex fused_mlp:")
    with pytest.raises(tg.ConfigError) as e:
        tg.attention_backend("fa4")
    assert ("pip install 'flash-attn-4[cu13]'" in str(e.value)) == broken


def test_a_failing_fa4_kernel_says_how_to_run_without_it(monkeypatch):
    class Broken:
        @staticmethod
        def _flash_attn_fwd(*a, **kw):
            raise ValueError("no kernel for sm_75")
    use_fa4(monkeypatch, Broken)
    q, k, v = qkv(32)
    with pytest.raises(RuntimeError, match=r"FA4 \(flash-attn-4\) failed: ValueError: no kernel for sm_75; ATTN_BACKEND=flex runs"):
        tg.attend(q, k, v, tg.cu_seqlens_for([1] + [5] * 31, 32, bucket=16), 32, "fa4")


def whole_model_batch():
    """A packed row of five documents (ids, targets, cu_seqlens) for the whole-model compile tests."""
    row, _ = packed_row([40, 60, 30, 60, 66])
    ids = row[None, :-1]
    return ids, row[None, 1:], tg.cu_seqlens_for(ids[0].numpy(), 64, bucket=8)


def loss_and_grads(model, fns, batch, depth=3):
    model.zero_grad()
    loss = model(batch[0], batch[1], tg.Fwd(depth, fns), batch[2])
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_whole_model_compile_gives_the_block_paths_loss_and_gradients(monkeypatch):
    """COMPILE_MODEL: GPT.forward runs GPT.losses as one graph (fullgraph: no break anywhere in the model, the
    attention custom op included), with the block path's loss and gradients (randomised weights, depth 3, packed)."""
    use_fa4(monkeypatch, ReferenceFA4)
    model, batch = tiny_model(depth=3, attn_backend="fa4").train(), whole_model_batch()
    want_loss, want = loss_and_grads(model, tg.EAGER, batch)
    whole = torch.compile(tg.GPT.losses, backend="aot_eager", fullgraph=True, dynamic=False)
    calls = []
    counted = lambda *a: calls.append(1) or whole(*a)
    loss, grads = loss_and_grads(model, tg.BlockFns(*tg.EAGER[:3], counted), batch)
    assert calls == [1]  # the whole forward went through the one compiled function
    torch.testing.assert_close(loss, want_loss, atol=1e-6, rtol=1e-6)
    for a, b in zip(grads, want):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_fa4_takes_cu_seqlens_unpadded_and_one_graph_serves_every_segment_count(monkeypatch):
    """With FA4, cu_seqlens is not padded (h.cu_bucket = 1: each padding entry would add 128 rows to FA4's backward
    accumulators) and its length is marked dynamic, so the whole-model graph (dynamic=False) compiles once for rows
    of 3, 5 and 8 segments, with the eager path's loss and gradients; the other backends keep the 256-entry buckets."""
    use_fa4(monkeypatch, ReferenceFA4)
    model = tiny_model(depth=2, attn_backend="fa4").train()
    assert model.h.cu_bucket == 1 and tiny_model(attn_backend="sdpa").h.cu_bucket == 256
    graphs = []
    whole = torch.compile(tg.GPT.losses, fullgraph=True, dynamic=False,
                          backend=lambda gm, _: graphs.append(gm) or gm.forward)
    for lens in ([50, 90, 116], [20, 40, 60, 70, 66], [30] * 7 + [46]):
        row, _ = packed_row(lens)
        ids = row[None, :-1]
        cu = tg.cu_seqlens_for(ids[0].numpy(), 64, model.h.cu_bucket)
        assert cu.tolist()[-2:] != [len(row) - 1] * 2  # no padding entry
        batch = ids, row[None, 1:], cu
        want_loss, want = loss_and_grads(model, tg.EAGER, batch, depth=2)
        loss, grads = loss_and_grads(model, tg.BlockFns(*tg.EAGER[:3], whole), batch, depth=2)
        torch.testing.assert_close(loss, want_loss, atol=1e-6, rtol=1e-6)
        for a, b in zip(grads, want):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert len(graphs) == 1


def test_block_keeps_no_output_projection_for_the_scale_gradients():
    """attn_scale and mlp_scale scale the rows of the output and down matrices instead of the block's activations, so
    the partitioned block (Inductor's min-cut) keeps one [T, d] matmul output for its backward, q's (its RMSNorm's
    backward needs it), not also the two projections' outputs that d(scale) = sum over tokens of g * out would read."""
    from bench import kept_for_backward
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    model = tiny_model(depth=1).train()
    T, d, saved = 96, model.h.model_dim, []

    def keep(gm, _):
        saved.append(kept_for_backward(gm))
        return make_boxed_func(gm.forward)

    block = torch.compile(tg.sequential_block, fullgraph=True, dynamic=False, backend=aot_autograd(
        fw_compiler=keep, bw_compiler=lambda gm, _: make_boxed_func(gm.forward),
        partition_fn=functools.partial(min_cut_rematerialization_partition, compiler="inductor")))
    x, x0 = (torch.randn(1, T, d, requires_grad=True) for _ in range(2))
    w, attn = model.layer_weights()[0], model.attn_args(torch.randint(2, 64, (1, T)))[1]
    block(x, x0, w, attn).sum().backward()
    assert saved[0][("mm.default", (T, d), "float32")] == T * d * 4
    assert w.attn_scale.grad.abs().sum() > 0 and w.mlp_scale.grad.abs().sum() > 0


def test_activation_memory_budget_keeps_fewer_activations_for_the_same_gradients(monkeypatch):
    """ACTIVATION_MEMORY_BUDGET < 1: the whole-model graph, partitioned as Inductor does (min-cut), keeps fewer bytes for
    its backward (cheap ops recomputed there) and gives the same loss and gradients (randomised weights, depth 3)."""
    from bench import kept_for_backward
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    use_fa4(monkeypatch, ReferenceFA4)
    batch, saved, results = whole_model_batch(), [], []

    def keep_saved_bytes(gm, _):
        saved.append(sum(kept_for_backward(gm).values()))
        return make_boxed_func(gm.forward)

    partition = functools.partial(min_cut_rematerialization_partition, compiler="inductor")
    for budget in (1.0, 0.5):
        torch._dynamo.reset()
        model = tiny_model(depth=3, attn_backend="fa4", activation_memory_budget=budget).train()
        whole = torch.compile(tg.GPT.losses, fullgraph=True, dynamic=False, backend=aot_autograd(
            fw_compiler=keep_saved_bytes, bw_compiler=lambda gm, _: make_boxed_func(gm.forward), partition_fn=partition))
        results.append(loss_and_grads(model, tg.BlockFns(*tg.EAGER[:3], tg.within_memory_budget(whole, model.h)), batch))
    assert saved[1] < 0.75 * saved[0]
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-6, rtol=1e-6)
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    with pytest.raises(tg.ConfigError, match=r"ACTIVATION_MEMORY_BUDGET=0.0 must be in \(0, 1\]"):
        make_h(activation_memory_budget=0.0)


def packed_docs(lens):
    return [t for i, n in enumerate(lens) for t in [1] + [2 + i % 7] * (n - 1)]


# docs shorter than a block, a doc split at max_len 400 (its first piece covers two whole blocks), boundaries on and off the 128-token block edges
FLEX_LENS = [5, 123, 1, 300 + 290, 128, 40, 83, 128 + 256, 100, 14, 68]


def kv_sets(num, idx):
    return [set(idx[0, 0, i, : num[0, 0, i]].tolist()) for i in range(num.size(-1))]


def test_packed_block_mask_lists_equal_create_block_mask():
    """The block lists built from cu_seqlens (partial: evaluate the mask; full: skip it; absent: never visited)
    equal what flex_attention's own create_block_mask derives by evaluating the mask at every position."""
    from torch.nn.attention.flex_attention import create_block_mask
    tokens = packed_docs(FLEX_LENS)
    n = len(tokens)
    assert n % tg.FLEX_BLOCK == 0
    cu = tg.cu_seqlens_for(tokens, 400, bucket=16)
    seg = segments_of(cu, n)
    ref = create_block_mask(lambda b, h, q, k: (seg[q] == seg[k]) & (q >= k), 1, 1, n, n, device="cpu", BLOCK_SIZE=tg.FLEX_BLOCK)
    bm = tg.packed_block_mask(cu, n)
    assert kv_sets(bm.kv_num_blocks, bm.kv_indices) == kv_sets(ref.kv_num_blocks, ref.kv_indices)
    assert kv_sets(bm.full_kv_num_blocks, bm.full_kv_indices) == kv_sets(ref.full_kv_num_blocks, ref.full_kv_indices)
    assert sum(map(len, kv_sets(bm.full_kv_num_blocks, bm.full_kv_indices))) > 0  # the skip path is exercised
    dense = bm.to_dense()[0, 0]
    assert not dense[-1, 0] and dense.sum() < dense.numel() // 2  # blocks of other documents are never visited


def test_flex_attention_matches_reference(monkeypatch):
    """flex_attention with the packed block mask (GQA, [B,T,H,D] layout) = block-diagonal causal reference; a
    second mask of the same length updates the shared segment buffer in place."""
    from torch.nn.attention.flex_attention import flex_attention
    monkeypatch.setattr(tg, "_flex", flex_attention)  # eager on CPU; CUDA runs the compiled kernel
    for lens in (FLEX_LENS, FLEX_LENS[::-1]):
        tokens = packed_docs(lens)
        n = len(tokens)
        cu = tg.cu_seqlens_for(tokens, 400, bucket=16)
        q, k, v = qkv(n, H=8, KV=2, D=16, seed=len(lens))
        out = tg.attend(q, k, v, tg.packed_block_mask(cu, n), 400)
        torch.testing.assert_close(out, reference_attention(q, k, v, segments_of(cu, n)), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out, tg.attend(q, k, v, cu, 400), atol=1e-5, rtol=1e-4)  # the SDPA fallback agrees


def test_compiled_flex_uses_block_lists_and_compiles_once():
    """The compiled kernel (what CUDA runs) visits only the listed blocks: it must still equal the reference, and a
    new mask per micro-batch (same length) must reuse the compiled graph (10 s on CPU)."""
    attend = torch.compile(lambda q, k, v, bm: tg.attend(q, k, v, bm, 256), dynamic=False, fullgraph=True)
    n, g0 = 512, tg.compiled_graphs()
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(2, 60, (n,), generator=g)
        tokens[torch.randint(0, n, (6,), generator=g)] = 1
        cu = tg.cu_seqlens_for(tokens.numpy(), 256, bucket=16)
        q, k, v = qkv(n, H=4, KV=2, D=16, seed=seed)
        out = attend(q, k, v, tg.packed_block_mask(cu, n))
        torch.testing.assert_close(out, reference_attention(q, k, v, segments_of(cu, n)), atol=1e-5, rtol=1e-4)
    assert tg.compiled_graphs() - g0 == 1


def test_model_on_flex_equals_sdpa_path(monkeypatch):
    """The whole model with FLEX_ATTENTION's path (row padded to whole 128-token blocks, the padding its own segment)
    gives the logits of the per-segment SDPA path, for a row length that is not a multiple of 128."""
    from torch.nn.attention.flex_attention import flex_attention
    model = tiny_model(depth=3)
    ids, _ = packed_row([70, 5, 90, 33, 1, 101])
    assert len(ids) % tg.FLEX_BLOCK
    cu = tg.cu_seqlens_for(ids.numpy(), 64, bucket=16)
    ref = logits(model, ids[None], cu)
    monkeypatch.setattr(tg, "_flex", flex_attention)  # eager on CPU
    out = logits(tiny_model(depth=3, attn_backend="flex"), ids[None], cu)  # the same weights, the flex backend
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def bf16_stream_model(monkeypatch, **over):
    """tiny_model at depth 3 with CUDA's bf16 embedding, so the residual stream is bf16 as in training; RoPE keeps
    q/k's dtype (CUDA's tables are bf16, the CPU's fp32 ones would promote them)."""
    rope = tg.apply_rope
    monkeypatch.setattr(tg, "apply_rope", lambda x, *a: rope(x, *a).to(x.dtype))
    model = tiny_model(depth=3, **over)
    model.tok_emb.weight.data = model.tok_emb.weight.data.to(torch.bfloat16)
    return model


@pytest.mark.parametrize("cap", [16, 0])
def test_x0_stays_fp32_under_a_bf16_stream_with_or_without_a_fusion_cap(monkeypatch, cap):
    """With the bf16 embedding of CUDA, every block gets x0 in fp32 (so the ~20 per-layer gradient terms of x0 and
    any partial sum of them are fp32) while the residual stream and the blocks' outputs stay bf16. Uncapped too:
    bf16 x0 there ended 200 equal steps at depth 1 0.0043 BPB worse."""
    model = bf16_stream_model(monkeypatch, fusion_max_buffers=cap)
    seen = []

    def spy(f):
        def call(*a, **kw):
            out = f(*a, **kw)
            ins = a[:3] if f is tg.parallel_block else a[:2]
            seen.append(([t.dtype for t in ins], [t.dtype for t in (out if isinstance(out, tuple) else (out,))]))
            return out
        return call

    ids = packed_row([40, 24])[0][None]
    fns = tg.BlockFns(spy(tg.sequential_block), spy(tg.parallel_block), tg.head_losses)
    loss = model(ids[:, :-1], ids[:, 1:], tg.Fwd(depth=3, fns=fns))
    loss.backward()
    seqs = [s for s in seen if len(s[0]) == 2]
    pars = [s for s in seen if len(s[0]) == 3]
    assert len(seqs) == 7 and len(pars) == 1  # depth 3: 8 virtual layers, the last (physical layer 3) parallel
    assert all(ins == [torch.bfloat16, torch.float32] and outs == [torch.bfloat16] for ins, outs in seqs)
    assert all(ins == [torch.bfloat16] * 2 + [torch.float32] and outs == [torch.bfloat16] * 2 for ins, outs in pars)
    assert model.tok_emb.weight.grad.dtype == torch.bfloat16 and torch.isfinite(model.tok_emb.weight.grad).all()
    with torch.no_grad():
        ref = model(ids[:, :-1], ids[:, 1:], tg.Fwd(depth=3, fns=tg.EAGER))
    assert abs(loss.item() - ref.item()) == 0  # the spies change nothing


def test_rms_keeps_its_input_dtype_under_an_autocast_that_computes_it_in_fp32(monkeypatch):
    """torch >= 2.12's CUDA autocast runs rms_norm on an fp32 copy of its input and returns fp32 (emulated here under
    the CPU's autocast, which leaves rms_norm alone). rms() runs it outside autocast: its input's dtype and torch <=
    2.11's values, so x0 and the residual stream stay bf16 and attention gets the bf16 q/k that FA3/FA4 require."""
    model, ids = bf16_stream_model(monkeypatch), packed_row([40, 24])[0][None]
    x = torch.randn(6, 64).to(torch.bfloat16)
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    with torch.no_grad(), bf16():
        want_rms, want_loss = tg.rms(x), model(ids[:, :-1], ids[:, 1:], tg.Fwd(depth=3))
    plain = torch.nn.functional.rms_norm
    monkeypatch.setattr(torch.nn.functional, "rms_norm", lambda t, *a, **kw: plain(
        t.float() if torch.is_autocast_enabled(t.device.type) else t, *a, **kw))  # torch 2.12's policy, on the CPU
    seen, attend = [], tg.attend
    monkeypatch.setattr(tg, "attend", lambda q, k, *a, **kw: seen.append((q.dtype, k.dtype)) or attend(q, k, *a, **kw))
    with torch.no_grad(), bf16():
        assert torch.nn.functional.rms_norm(x, (64,)).dtype == torch.float32  # the emulation bites
        loss, hid = model(ids[:, :-1], ids[:, 1:], tg.Fwd(depth=3)), model.hidden(ids, tg.Fwd(depth=3))
        got_rms = tg.rms(x)
    assert got_rms.dtype == torch.bfloat16 and torch.equal(got_rms, want_rms)
    assert len(seen) == 16 and set(seen) == {(torch.bfloat16, torch.bfloat16)}
    assert hid.dtype == torch.bfloat16 and loss.item() == want_loss.item()


# ----------------------------------------------------------------------------- recurrence schedule and curriculum


def test_layer_plan_matches_spec_lists_for_default_config():
    h = make_h()
    assert (h.num_layers, h.loop_start, h.loop_end, h.num_loops) == (11, 3, 5, 2)
    assert tg.layer_plan(h, 1) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10])
    assert tg.layer_plan(h, 3) == ([0, 1, 2, 3, 4, 5, 3, 4], [5, 3, 4, 5, 6, 7, 8, 9, 10])
    assert tg.layer_plan(h, 4) == ([0, 1, 2, 3, 4, 5, 3, 4, 5, 3], [4, 5, 3, 4, 5, 6, 7, 8, 9, 10])
    assert h.depth_schedule == ((0.0, 1), (1 / 3, 3), (2 / 3, 4))


def test_loop_depth_curriculum_equal_thirds():
    h = make_h(train_loop_phase_depths="1,3,4", train_loop_phase_fractions="")
    assert h.train_loop_phase_depths == (1, 3, 4)
    for frac, depth in [(0.0, 1), (0.2, 1), (0.333, 1), (1 / 3 + 1e-9, 3), (0.5, 3), (0.666, 3), (2 / 3 + 1e-9, 4), (0.9, 4), (1.0, 4), (1.2, 4)]:
        assert tg.loop_depth_at(h, frac) == depth, frac
    h = make_h(train_loop_phase_depths="1,3,4", enable_looping_at=0.05)  # ignored in phased mode
    assert tg.loop_depth_at(h, 0.1) == 1


def test_loop_depth_curriculum_with_fractions():
    h = make_h(train_loop_phase_depths="1,3,4", train_loop_phase_fractions="1,1,2")  # boundaries 0.25, 0.5
    assert [tg.loop_depth_at(h, f) for f in (0.0, 0.24, 0.26, 0.49, 0.51, 0.99)] == [1, 1, 3, 3, 4, 4]
    h = make_h(train_loop_phase_depths="2,5", train_loop_phase_fractions="0.3,0.1")  # normalised: boundary 0.75
    assert [tg.loop_depth_at(h, f) for f in (0.7, 0.74, 0.76, 1.0)] == [2, 2, 5, 5]


def test_loop_depth_enable_looping_at_when_no_phase_depths():
    h = make_h(train_loop_phase_depths="", enable_looping_at=0.35)
    assert h.train_loop_phase_depths == () and h.depth_schedule == ((0.0, 1), (0.35, 3))
    assert [tg.loop_depth_at(h, f) for f in (0.0, 0.34, 0.35, 0.6, 1.0)] == [1, 1, 3, 3, 3]
    h = make_h(train_loop_phase_depths="", num_loops=3, enable_looping_at=0.5)
    assert [tg.loop_depth_at(h, f) for f in (0.49, 0.5)] == [1, 4]


@pytest.fixture(scope="module")
def default_counts():
    """Default-config GPT built on the meta device (same constructor, no 36M-parameter init on CPU)."""
    out = {}
    for gated in (True, False):
        with torch.device("meta"):
            model = tg.GPT(make_h(gated_attn_enabled=gated))
        out[gated] = model
    return out


def test_default_num_skips_is_eight(default_counts):
    model = default_counts[True]
    assert model.num_skips == 8
    assert tuple(model.skip_weights.shape) == tuple(model.skip_gates.shape) == (8, 512)
    enc4, dec4 = tg.layer_plan(model.h, 4)
    assert min(len(enc4), len(dec4)) == 10  # depth 4 would allow 10, but skips stay sized for depth 3 (SPEC 4.10)


def test_default_parameter_count(default_counts):
    gated, plain = default_counts[True], default_counts[False]
    assert sum(p.numel() for p in gated.parameters()) == 35_989_658
    assert sum(p.numel() for p in plain.parameters()) == 35_944_602
    shapes = {n: tuple(p.shape) for n, p in gated.named_parameters()}
    assert shapes["qo_bank"] == (22, 512, 512) and shapes["kv_bank"] == (22, 256, 512)
    assert shapes["mlp_up_bank"] == (11, 2048, 512) and shapes["mlp_down_bank"] == (11, 512, 2048)
    assert shapes["tok_emb.weight"] == (8192, 512) and shapes["blocks.0.attn_gate_w"] == (8, 512)


def test_param_groups_partition_all_parameters():
    model = tiny_model()
    banks, embed, scalars = tg.param_groups(model)
    assert [b.ndim for b in banks] == [3, 3, 3, 3] and embed == [model.tok_emb.weight]
    ids = [id(p) for p in banks + embed + scalars]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in banks} == {"qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank"}
    assert not any(names[id(p)].endswith("_bank") for p in scalars)


# ----------------------------------------------------------------------------- SmearGate (SMEAR_GATE_ENABLED)


def test_smear_gate_adds_the_previous_embedding_except_at_bos_and_row_start():
    """lam=1, w=0: gate 0.5 everywhere; row [a, BOS, b]: a and BOS keep their embeddings, b gets 0.5*E[BOS]."""
    E = torch.randn(64, 16)
    ids = torch.tensor([[7, tg.BOS_ID, 9]])
    out = tg.smear(E[ids], ids, torch.zeros(12), torch.ones(1))
    assert torch.equal(out[0, 0], E[7]) and torch.equal(out[0, 1], E[tg.BOS_ID])
    torch.testing.assert_close(out[0, 2], E[9] + 0.5 * E[tg.BOS_ID])


def test_smear_gate_at_zero_lambda_is_the_plain_model():
    ids = torch.randint(2, 64, (2, 40), generator=torch.Generator().manual_seed(3))
    smeared, plain = tiny_model(depth=3, smear_gate_enabled=True), tiny_model(depth=3)
    plain.load_state_dict({k: v for k, v in smeared.state_dict().items() if not k.startswith("smear")})
    assert smeared.smear_lambda.abs().item() > 0  # trained-looking: the gate is open
    assert (logits(smeared, ids) - logits(plain, ids)).abs().max() > 1e-3
    with torch.no_grad():
        smeared.smear_lambda.zero_()
    torch.testing.assert_close(logits(smeared, ids), logits(plain, ids), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("depth", [1, 3])
def test_smear_gate_never_carries_a_document_into_the_next(depth):
    """Packed row: changing the last token before a BOS leaves every logit from that BOS on unchanged (#1797's leak
    changed the prediction at the BOS), and each document scores as it does alone."""
    model = tiny_model(depth, smear_gate_enabled=True)
    row, docs = packed_row([13, 19, 16], seed=4)
    cu = lambda r: tg.cu_seqlens_for(r.numpy(), 64, bucket=8)
    base = logits(model, row[None], cu(row))[0]
    s1 = len(docs[0])
    row2 = row.clone()
    row2[s1 - 1] = changed_token(row[s1 - 1])
    out = logits(model, row2[None], cu(row2))[0]
    torch.testing.assert_close(out[s1:], base[s1:], atol=1e-6, rtol=1e-6, msg="the smear crossed a BOS")
    assert (out[s1 - 1] - base[s1 - 1]).abs().max() > 1e-3
    start = 0
    for d in docs:
        torch.testing.assert_close(base[start : start + len(d)], logits(model, d[None])[0], atol=1e-4, rtol=1e-4)
        start += len(d)


# ----------------------------------------------------------------------------- sparse attention gate


def test_sparse_attention_gate_scales_each_head_by_its_narrow_gate():
    """SPARSE_ATTN_GATE_ENABLED: y_h * sigmoid(kappa * a[:12] . W_h) per head, after attention and XSA, before the
    output projection (taken as the identity here, to read y). Dims >= GATE_WINDOW never reach the gate; zero W
    halves the output exactly."""
    model = tiny_model(depth=1, sparse_attn_gate_enabled=True, sparse_attn_gate_scale=0.5)
    w = model.layer_weights()[3]._replace(wo=torch.eye(64))
    assert tuple(w.gate_w.shape) == (4, 12) and w.gate_scale == 0.5 and w.gate_w.abs().min() > 0
    a = torch.randn(2, 24, 64, generator=torch.Generator().manual_seed(2))
    attn = tg.AttnArgs(model.rope(24, a.device), None, 64, "sdpa")
    with torch.no_grad():
        plain = tg.attention(a, w._replace(gate_w=None), attn, None, None).view(2, 24, 4, 16)
        gate = torch.sigmoid(0.5 * a[..., :12] @ w.gate_w.T)[..., None]
        torch.testing.assert_close(tg.attention(a, w, attn, None, None).view(2, 24, 4, 16), plain * gate)
        half = tg.attention(a, w._replace(gate_w=torch.zeros(4, 12)), attn, None, None).view(2, 24, 4, 16)
        torch.testing.assert_close(half, 0.5 * plain, atol=0, rtol=0)


def test_frontier_flags_build_the_1855_model(default_counts):
    """PR #1855's command line (sparse gate + SmearGate) builds its 35,945,671-parameter model; the sparse [8, 12]
    gates are quantized int8 per row like the dense ones."""
    with torch.device("meta"):
        model = tg.GPT(make_h(sparse_attn_gate_enabled=True, smear_gate_enabled=True))
    assert sum(p.numel() for p in model.parameters()) == 35_945_671
    assert tuple(model.blocks[0].attn_gate_w.shape) == (8, 12)
    payload, _ = tg.quantize_state_dict(make_h(), {"blocks.0.attn_gate_w": torch.randn(8, 12)}, {})
    assert payload["m"]["blocks.0.attn_gate_w"] == "gate_int8_row"


def test_fa3_stand_in_for_the_record_scripts_is_causal_gqa_attention():
    """tools/fa3_stand_in (tools/compare_script.sh runs the PR #1756 script with it): FA3's dense call, with the
    [B,T,H,D] layout and 8 query / 4 KV heads, equals our causal SDPA path; anything but causal attention is refused."""
    import importlib.util
    from conftest import REPO
    spec = importlib.util.spec_from_file_location("fa3_stand_in", REPO / "tools" / "fa3_stand_in" / "flash_attn_interface.py")
    fa3 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fa3)
    q, k, v = qkv(40, H=8, KV=4, D=16)
    torch.testing.assert_close(fa3.flash_attn_func(q, k, v, causal=True), tg.attend(q, k, v, None, 0, "sdpa"))
    with pytest.raises(AssertionError, match="only causal"):
        fa3.flash_attn_func(q, k, v)
    with pytest.raises(AssertionError, match="only causal"):
        fa3.flash_attn_varlen_func(q[0], k[0], v[0], None, None, 40, 40, causal=True, window_size=(128, 0))


def test_fusion_max_buffers_reaches_the_whole_model_compile(monkeypatch):
    """FUSION_MAX_BUFFERS caps the buffers of Inductor's fused kernels in the whole-model training graph: 16 by default
    (5% faster at depth 4; x0 in fp32 keeps the split gradient sum fp32), 0 = Inductor uncapped."""
    compiles = []
    monkeypatch.setattr(tg.torch, "compile", lambda f, **kw: compiles.append((f, kw)) or f)
    for value, want in ((None, 16), (16, 16), (24, 24), (0, None)):
        compiles.clear()
        h = make_h(compile=True, compile_model=True, **({} if value is None else {"fusion_max_buffers": value}))
        tg.compiled_block_fns(h)
        whole = [kw for f, kw in compiles if f is tg.GPT.losses]
        assert whole == [{"dynamic": False, "fullgraph": True, "options": {"max_fusion_unique_io_buffers": want}}]
    with pytest.raises(tg.ConfigError, match=r"FUSION_MAX_BUFFERS=-1 must be >= 0"):
        make_h(fusion_max_buffers=-1)
