"""CPU tests of train_gpt.py's KERNELS section: the custom ops' torch paths and hand-written backwards against
autograd of the plain expressions, their composition with torch.compile, the call sites in mlp() and
head_losses(), and (when triton is installed) the Triton kernels themselves under TRITON_INTERPRET=1."""
import copy
import dataclasses
import importlib.util
import textwrap

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import make_h, run_python

CAP = 30.0
REAL_KERNEL_OK = tg.kernel_ok


def plain_mlp(x, up, down):
    return F.linear(F.leaky_relu(F.linear(x, up), 0.5).square(), down)


def plain_ce(z, t):
    return F.cross_entropy(CAP * torch.tanh(z.float() / CAP), t, reduction="none")


def grads(f, *inputs, g):
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = f(*inputs)
    out.backward(g)
    return out.detach(), [t.grad for t in inputs]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_sign_bits_round_trip_in_the_kernel_layout():
    neg = torch.rand(9, 256) < 0.5
    bits = tg.pack_signs(neg)
    assert bits.shape == (9, 32) and bits.dtype == torch.uint8 and torch.equal(tg.unpack_signs(bits), neg)
    one = torch.zeros(1, 256, dtype=torch.bool)
    one[0, 16 * 3 + 5] = one[0, 128 + 2] = True  # per 128 columns, column 16i+j is bit i of byte j
    expect = [0] * 32
    expect[5], expect[16 + 2] = 8, 1
    assert tg.pack_signs(one).tolist() == [expect]


def mlp_case():
    torch.manual_seed(0)
    x, up, down = torch.randn(37, 24, dtype=torch.float64), torch.randn(128, 24, dtype=torch.float64) / 5, \
        torch.randn(24, 128, dtype=torch.float64) / 11
    return x, up, down, torch.randn(37, 24, dtype=torch.float64)


def assert_plain_mlp_gradients(op, x, up, down, g):
    """op's gradients equal autograd's of the plain MLP in fp64; in bf16 they are within the plain bf16 expression's
    own error (both against fp64 on the same bf16 operands)."""
    _, got = grads(op, x, up, down, g=g)
    _, ref = grads(plain_mlp, x, up, down, g=g)
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-12) for a, b in zip(got, ref))
    bf = [t.bfloat16() for t in (x, up, down)]
    _, ob = grads(op, *bf, g=g.bfloat16())
    _, pb = grads(plain_mlp, *bf, g=g.bfloat16())
    _, rb = grads(plain_mlp, *(t.double() for t in bf), g=g.bfloat16().double())
    assert all(rel(o, r) < 1e-2 and rel(o, r) < 1.5 * rel(p, r) for o, p, r in zip(ob, pb, rb))


def test_fused_mlp_matches_autograd():
    """The forward is the plain MLP; the backward rebuilds f'(pre) from hid and one sign bit per hidden unit: exact
    in fp64, within bf16 rounding in bf16 (no worse than the plain expression's own bf16 autograd, both against
    fp64). It keeps hid and the bits, not the pre-activation, and hands no gradient to them."""
    x, up, down, g = mlp_case()
    out, hid, bits = tg.fused_mlp(x, up, down)
    pre = F.linear(x, up)
    assert torch.equal(out, plain_mlp(x, up, down)) and torch.equal(hid, F.leaky_relu(pre, 0.5).square())
    assert torch.equal(tg.unpack_signs(bits), pre < 0) and (pre < 0).any() and not (pre < 0).all()
    assert_plain_mlp_gradients(lambda *t: tg.fused_mlp(*t)[0], x, up, down, g)
    xs = x.detach().requires_grad_()
    _, hid, bits = tg.fused_mlp(xs, up, down)
    assert not hid.requires_grad and not bits.requires_grad


def test_quack_mlp_matches_autograd():
    """quack's op (its torch path off Hopper): the forward is the plain MLP and hands out the pre-activation, the only
    tensor its backward keeps besides the inputs; the backward's dpre = (g @ down) * f'(pre) and hid = f(pre) give
    autograd's gradients, exact in fp64 and within the plain bf16 expression's own error in bf16."""
    x, up, down, g = mlp_case()
    out, pre = tg.quack_mlp(x, up, down)
    assert torch.equal(out, plain_mlp(x, up, down)) and torch.equal(pre, F.linear(x, up))
    assert (pre < 0).any() and not (pre < 0).all()
    assert_plain_mlp_gradients(lambda *t: tg.quack_mlp(*t)[0], x, up, down, g)
    assert not tg.quack_mlp(x.requires_grad_(), up, down)[1].requires_grad


def _stub_quack(monkeypatch, gemm_act=None, gemm_dact=None, capability=(9, 0)):
    """Stand-ins for cutlass.cute and quack whose relu and packed f32x2 ops run on Python floats (pairs as tuples),
    so that the activation train_gpt registers in quack's tables can be evaluated here."""
    import sys
    import types
    pair = lambda f: lambda a, b: tuple(f(u, v) for u, v in zip(a, b))
    arch = types.SimpleNamespace(add_packed_f32x2=pair(lambda u, v: u + v), mul_packed_f32x2=pair(lambda u, v: u * v))
    mods = {"cutlass": types.ModuleType("cutlass"), "cutlass.cute": types.ModuleType("cutlass.cute"),
            "quack": types.ModuleType("quack"), "quack.activation": types.ModuleType("quack.activation"),
            "quack.gemm_interface": types.ModuleType("quack.gemm_interface")}
    mods["cutlass.cute"].arch = arch
    mods["cutlass"].cute = mods["cutlass.cute"]
    act = mods["quack.activation"]
    act.relu = lambda x: tuple(max(v, 0.0) for v in x) if isinstance(x, tuple) else max(x, 0.0)
    act.act_fn_map, act.dact_fn_map = {}, {}
    mods["quack"].activation = act
    mods["quack.gemm_interface"].gemm_act, mods["quack.gemm_interface"].gemm_dact = gemm_act, gemm_dact
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    return act


def test_quack_epilogue_is_leaky_relu_squared_and_its_derivative(monkeypatch):
    """The functions train_gpt registers as quack's epilogue: act(x) = leaky_relu(x, 0.5)^2 and dact(x, dout) =
    (dout * f'(x), f(x)), for single values and for packed (x, y) pairs, against the formula and a central difference."""
    def gemm_act():
        pass

    def gemm_dact():
        pass

    stub = _stub_quack(monkeypatch, gemm_act, gemm_dact)
    assert tg._quack_gemms() == (gemm_act, gemm_dact)
    act, dact = stub.act_fn_map[tg.QUACK_ACT], stub.dact_fn_map[tg.QUACK_ACT]
    f = lambda x: (x if x > 0 else 0.5 * x) ** 2
    for x in (-3.0, -0.5, 0.0, 0.25, 2.0):
        assert act(x) == pytest.approx(f(x), abs=1e-15)
        dx, fx = dact(x, 1.5)
        assert fx == pytest.approx(f(x), abs=1e-15)
        assert dx == pytest.approx(1.5 * (f(x + 1e-6) - f(x - 1e-6)) / 2e-6, rel=1e-6, abs=1e-5)
    assert act((-2.0, 3.0)) == pytest.approx((1.0, 9.0))
    dx, fx = dact((-2.0, 3.0), (1.0, 2.0))
    assert dx == pytest.approx((-1.0, 12.0)) and fx == pytest.approx((1.0, 9.0))


def test_quack_is_not_taken_off_hopper(monkeypatch):
    """quack is checked on Hopper only: on another GPU _quack_gemms registers nothing and returns None, so FUSED_MLP
    runs our Triton kernels there and the kernel line does not name quack."""
    stub = _stub_quack(monkeypatch, lambda: None, lambda: None, capability=(10, 0))
    assert tg._quack_gemms() is None and not stub.act_fn_map


def test_quack_failure_names_the_way_out(monkeypatch):
    """A quack GEMM that fails (an unsupported GPU, CUDA or install) stops in the warm-up with QUACK_MLP=0 named."""
    def broken(*a, **k):
        raise TypeError("no kernel for this GPU")

    monkeypatch.setattr(tg, "_QUACK", (broken, broken))
    monkeypatch.setattr(tg, "quack_ok", lambda x, w: True)
    with pytest.raises(RuntimeError, match="quack .*TypeError: no kernel for this GPU; QUACK_MLP=0 runs our Triton"):
        tg.quack_mlp(torch.randn(4, 8), torch.randn(16, 8), torch.randn(8, 16))


def test_kernels_line_names_the_mlp_kernels(monkeypatch):
    h = make_h()
    assert f"fused_mlp:{'triton' if tg.KERNELS_ON else '0'} " in tg.kernels_line(h)
    assert "fused_mlp:0 " in tg.kernels_line(make_h(fused_mlp=False))
    monkeypatch.setattr(tg, "_QUACK", (None, None))  # importable
    assert "fused_mlp:quack " in tg.kernels_line(h) and tg.mlp_op(h) is tg.quack_mlp
    assert f"fused_mlp:{'triton' if tg.KERNELS_ON else '0'} " in tg.kernels_line(make_h(quack_mlp=False))
    assert tg.mlp_op(make_h(quack_mlp=False)) is tg.fused_mlp and tg.mlp_op(make_h(fused_mlp=False)) is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_softcap_ce_matches_cross_entropy(dtype):
    """Loss = the unfused head's cross-entropy; d z from the softcap_ce_bwd op = autograd of it, with logits far
    into tanh's saturation; lse is the softcapped logits' logsumexp."""
    torch.manual_seed(1)
    z = (torch.randn(50, 33, dtype=torch.float64) * 40).to(dtype)
    t = torch.randint(0, 33, (50,))
    g = torch.randn(50)
    loss, lse = tg.softcap_ce(z, t, CAP)
    assert torch.equal(loss, plain_ce(z, t)) and loss.dtype == torch.float32
    assert torch.allclose(lse, (CAP * torch.tanh(z.float() / CAP)).logsumexp(-1))
    _, (dz,) = grads(lambda a: tg.softcap_ce(a, t, CAP)[0], z, g=g)
    _, (rz,) = grads(lambda a: plain_ce(a, t), z, g=g)
    assert dz.dtype == dtype and rel(dz, rz) < (1e-6 if dtype == torch.float64 else 4e-3)


def test_ops_compile_fullgraph_with_dynamic_rows():
    """Both ops inside torch.compile(fullgraph=True), rows marked dynamic as TTT does: one graph serves two row
    counts, and values and gradients equal eager's (inductor on CPU)."""
    torch.manual_seed(2)
    w, emb = torch.randn(128, 16) / 4, torch.randn(20, 16) / 4
    down = torch.randn(16, 128) / 11

    def f(x, t, w, down, emb):
        return tg.softcap_ce(F.linear(tg.fused_mlp(x, w, down)[0], emb), t, CAP)[0]

    cf = torch.compile(f, fullgraph=True)
    g0 = tg.compiled_graphs()
    for rows in (12, 7):
        x, t, g = torch.randn(rows, 16), torch.randint(0, 20, (rows,)), torch.rand(rows)
        ref, rg = grads(lambda a, b, c, e: f(a, t, b, c, e), x, w, down, emb, g=g)
        out, cg = grads(lambda a, b, c, e: tg.mark_rows((0,), a, t) or cf(a, t, b, c, e), x, w, down, emb, g=g)
        assert torch.allclose(out, ref, atol=1e-5) and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(cg, rg))
    assert tg.compiled_graphs() - g0 == 1


@pytest.fixture
def model():
    h = make_h(vocab_size=64, num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2, mlp_mult=2.0, rope_dims=8,
               loop_start=1, loop_end=2, parallel_start_layer=3, xsa_last_n=4, train_seq_len=64, compile=False,
               ttt_lora_rank=4, eval_loop_depth=2)
    torch.manual_seed(0)
    m = tg.build_model(h, torch.device("cpu"))
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn_like(p) / p.size(-1) ** 0.5 if name.endswith("_bank") else p + 0.3 * torch.randn_like(p))
    return m


def _run(m, fused, monkeypatch, quack=False):
    """Training loss + gradients and TTT-style losses (adapters, head LoRA, gathered columns) of one batch; quack:
    quack's op (its torch path) takes the MLP, as where quack-kernels is importable."""
    m = copy.deepcopy(m)
    m.h = dataclasses.replace(m.h, fused_mlp=fused, fused_ce_enabled=fused)  # the same weights, other kernel flags
    monkeypatch.setattr(tg, "kernel_ok", lambda x: True)  # CPU tensors through the ops' torch paths
    monkeypatch.setattr(tg, "FUSED_MLP_MIN_ROWS", 64)  # this batch's 64 rows take the fused MLP
    monkeypatch.setattr(tg, "_QUACK", (None, None) if quack else None)
    called = []
    for name in ("fused_mlp", "quack_mlp", "softcap_ce"):
        real = getattr(tg, name)
        monkeypatch.setattr(tg, name, lambda *a, real=real, name=name: called.append(name) or real(*a))
    g = torch.Generator().manual_seed(5)
    ids, y = torch.randint(0, 64, (2, 32), generator=g), torch.randint(0, 64, (2, 32), generator=g)
    m.zero_grad(set_to_none=True)
    loss = m(ids, y, tg.Fwd(2))
    loss.backward()
    grads = {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}
    mlp_calls = len(called) - called.count("softcap_ce")
    m.token_losses(ids[:1], y[:1], tg.Fwd(2))  # 32 rows: under FUSED_MLP_MIN_ROWS, plain
    assert len(called) - called.count("softcap_ce") == mlp_calls
    loras, head, _ = tg.new_adapters(m.h, m, 2, torch.device("cpu"), torch.Generator().manual_seed(0))
    with torch.no_grad():
        head[1].normal_(0, 0.3, generator=g)
    cols = torch.stack([torch.arange(8, 16), torch.arange(20, 28)])
    ttt = m.token_losses(ids, y, tg.Fwd(2, tg.EAGER, loras, head), cols=cols)
    ttt.sum().backward()
    assert len(called) - called.count("softcap_ce") == mlp_calls  # TTT's calls (adapters) run plain: host-bound there
    return loss.detach(), grads, ttt.detach(), head[1].grad, set(called)


def test_call_sites_use_the_ops_with_the_plain_results(model, monkeypatch):
    """mlp() and head_losses() with the flags on (the ops' torch paths standing in for the kernels: our MLP op, or
    quack's) give the plain path's loss, gradients and TTT scores; the MLP op only for calls of FUSED_MLP_MIN_ROWS rows or more and without
    adapters; off CUDA the real kernel_ok keeps the plain path."""
    plain = _run(model, False, monkeypatch)
    assert plain[4] == set()
    for quack in (False, True):
        fused = _run(model, True, monkeypatch, quack)
        assert fused[4] == {"quack_mlp" if quack else "fused_mlp", "softcap_ce"}
        assert torch.allclose(fused[0], plain[0], rtol=1e-6) and torch.allclose(fused[2], plain[2], rtol=1e-5, atol=1e-6)
        assert fused[1].keys() == plain[1].keys()
        assert all(torch.allclose(fused[1][k], plain[1][k], rtol=1e-4, atol=1e-6) for k in plain[1])
        assert torch.allclose(fused[3], plain[3], rtol=1e-4, atol=1e-6)
    assert not REAL_KERNEL_OK(torch.ones(1, dtype=torch.bfloat16))


def test_gptq_hook_sees_the_mlp_inputs_with_the_flags_on(model, monkeypatch):
    model.h = dataclasses.replace(model.h, fused_mlp=True)
    monkeypatch.setattr(tg, "kernel_ok", lambda x: True)
    seen = set()
    model.hidden(torch.randint(0, 64, (1, 16)), tg.Fwd(2, cap=lambda name, x: seen.add(name)))
    assert {f"blocks.{i}.mlp.{n}.weight" for i in range(4) for n in ("fc", "proj")} <= seen


INTERPRETED = r"""
import torch, triton
import train_gpt as tg
tg._mlp_mm_kernel.configs = [triton.Config({"BM": 32, "BN": 128, "BK": 32}, pre_hook=tg._boxes)]  # no autotuning here
tg._sms = lambda device: 3  # three persistent programs: each walks several tiles
tg._ce_fwd_kernel.configs, tg._ce_bwd_kernel.configs = tg._ce_fwd_kernel.configs[:1], tg._ce_bwd_kernel.configs[:1]
torch.manual_seed(0)
# edge tiles: M and K not multiples of the tile (TMA pads the loads with zeros and clips the stores). fp32, because
# the interpreter's bf16 dot is wrong (on the GPU the kernel runs bf16)
x, up, down, g = torch.randn(70, 80), torch.randn(256, 80) / 9, torch.randn(80, 256) / 9, torch.randn(70, 80)
hid, bits = tg._mlp_mm(x, up)
_, rhid, rbits = tg.fused_mlp(x, up, down)  # the torch path: fp32 is not the kernel's dtype
assert torch.equal(bits, rbits) and torch.allclose(hid, rhid, rtol=1e-5, atol=1e-6), (hid - rhid).abs().max()
d, rd = tg._mlp_mm(g, down.t(), hid, bits), tg.mlp_dpre(g, down, hid, bits)
assert torch.allclose(d, rd, rtol=1e-5, atol=1e-5), (d - rd).abs().max()
for dtype in (torch.float32, torch.bfloat16):
    z, t, g = (torch.randn(33, 100) * 40).to(dtype), torch.randint(0, 100, (33,)), torch.randn(33)
    loss, lse = tg._ce_fwd_triton(z, t, 30.0)
    rl, rlse = tg.softcap_ce(z, t, 30.0)
    assert torch.allclose(loss, rl, atol=1e-4) and torch.allclose(lse, rlse, atol=1e-4), (loss - rl).abs().max()
    dz, rdz = tg._ce_bwd_triton(z, t, lse, g, 30.0), tg.softcap_ce_bwd(z, t, rlse, g, 30.0)
    # 8e-3: the interpreter truncates fp32 to bf16 where the GPU rounds to nearest
    assert dz.dtype == dtype and ((dz.float() - rdz.float()).norm() / rdz.float().norm()) < 8e-3
print("ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_kernels_interpreted():
    """The Triton kernels on CPU tensors (TRITON_INTERPRET=1, set before triton is imported: a subprocess) against
    the ops' torch paths (a few seconds)."""
    assert run_python(textwrap.dedent(INTERPRETED), TRITON_INTERPRET="1").strip() == "ok"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_mlp_kernel_compiles_for_hopper_in_every_config():
    """Triton's real compiler, not its interpreter, for sm_90a on this CPU machine (tools/kernel_compile_check.py):
    every autotune config of the fused MLP matmul compiles in both directions (the compiler rejects what the
    interpreter runs, e.g. a reshape the accumulator's layout cannot take), and each direction keeps a config within
    a block's shared memory (the autotuner skips the others; none left would fail a paid run's warm-up)."""
    import kernel_compile_check as kc
    for fwd in (True, False):
        usage = [kc.resources(kc.compile_mlp_mm(cfg, fwd)) for cfg in tg._mlp_mm_kernel.configs]
        assert all(regs > 0 for _, regs, _ in usage)
        assert any(shared <= kc.SMEM_PER_BLOCK for shared, _, _ in usage), (fwd, usage)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_counted_code_keeps_the_kernels_constexpr_parameters():
    """Triton takes tile sizes and switches as compile-time constants only through tl.constexpr annotations: the
    minified counted code must keep argument annotations, or its kernels fail to compile on the GPU."""
    pytest.importorskip("python_minifier")
    kernels = ("_mlp_mm_kernel", "_ce_fwd_kernel", "_ce_bwd_kernel")
    out = run_python(textwrap.dedent(f"""
        import train_gpt as tg
        wrapper, minified = tg.code_wrapper(open(tg.__file__, encoding="utf-8").read())
        assert minified
        counted = {{"__name__": "counted_train_gpt"}}
        exec(wrapper, counted)  # re-registers the custom ops: never in the test process
        for name in {kernels}:
            print(name, [(p.name, p.is_constexpr) for p in counted[name].fn.params])"""))
    flags = {name: [(p.name, p.is_constexpr) for p in getattr(tg, name).fn.params] for name in kernels}
    assert out.splitlines() == [f"{n} {f}" for n, f in flags.items()] and all(any(c for _, c in f) for f in flags.values())


def test_mlp_kernels_only_where_tma_exists(monkeypatch):
    """Below Hopper (no TMA) the persistent grid is empty and mlp_mm_ok sends the ops down their torch paths."""
    props = lambda major: type("Props", (), {"major": major, "multi_processor_count": 132})()
    for major, sms in ((8, 0), (9, 132), (10, 132)):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, major=major: props(major))
        assert tg._sms.__wrapped__("cuda:0") == sms
