"""LQER (PR #1797) and COMPRESSOR=pergroup (PR #1855) in train_gpt.py's QUANTIZATION section: CPU, small
trained-looking tensors (a low-rank part, noise and uneven row norms: nothing zero)."""
import io
import sys

import pytest
import torch

import train_gpt as tg
from conftest import ARTIFACT_FIX, assert_every_bit_flip_rejected, make_h

TINY = dict(num_layers=3, model_dim=64, num_heads=4, num_kv_heads=2, loop_start=1, loop_end=1, parallel_start_layer=2,
            xsa_last_n=3, vocab_size=96, compile=False)
LQER = dict(lqer_enabled=True, lqer_rank=4, lqer_top_k=3)
GPTQ_ROLES = ("tok_emb.weight", "attn.c_q.weight", "attn.c_k.weight", "attn.c_v.weight", "attn.proj.weight",
              "mlp.fc.weight", "mlp.proj.weight")  # what collect_hessians hooks


def trained(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, 8, generator=g) @ torch.randn(8, cols, generator=g) * 0.01
    return (w + torch.randn(rows, cols, generator=g) * 0.02) * torch.rand(rows, 1, generator=g).add(0.5)


def hessian(cols, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(512, 16, generator=g) @ torch.randn(16, cols, generator=g)
         + 0.3 * torch.randn(512, cols, generator=g)) * torch.rand(cols, generator=g).add(0.2)
    return x.T @ x / 512


def model_state(**over):
    """The tiny model's real state-dict names with trained-looking values, and Hessians for the GPTQ'd matrices."""
    h = make_h(**TINY, **over)
    sd = tg.build_model(h, torch.device("cpu")).unbanked_state_dict()
    hessians = {}
    for i, (name, t) in enumerate(sd.items()):
        sd[name] = trained(*t.shape, seed=i) if t.ndim == 2 else torch.randn(t.shape) * 0.1 + 1
        if tg.collapse_layer_index(name).removeprefix("blocks.") in GPTQ_ROLES:
            hessians[name] = hessian(t.shape[1], seed=i)
    return h, sd, hessians


@pytest.fixture(scope="module")
def lqer_payload():
    h, sd, hessians = model_state(**LQER)
    payload, lines = tg.quantize_state_dict(h, sd, hessians)
    return h, sd, hessians, payload, lines


def base(w, name):
    return w[name + ".q"].float() * w[name + ".scale"].float()[:, None]


# ----------------------------------------------------------------------------- LQER


def test_lqer_round_trip_is_base_plus_the_factor_product(lqer_payload, capsys):
    """W_deq - Q*s equals the rank-4 product of the dequantised factors, and W_deq is closer to W than Q*s."""
    h, sd, _, payload, _ = lqer_payload
    w, m = payload["w"], payload["m"]
    out = tg.dequantize_state_dict(payload, sd)
    corrected = [n for n, tag in m.items() if tag.endswith("+lqer_asym")]
    assert len(corrected) == 3
    for n in corrected:
        qa, sa, qb, sb = (w[f"{n}.{k}"] for k in ("lqA_a", "lqAs_a", "lqB_a", "lqBs_a"))
        rows, cols = sd[n].shape
        assert qa.shape == (rows, 4) and qb.shape == (4, cols) and sa.shape == () and sb.shape == (4 * cols // 64,)
        assert qa.dtype == qb.dtype == torch.int8 and sa.dtype == sb.dtype == torch.float16
        assert -2 <= qa.min() and qa.max() <= 1 and -8 <= qb.min() and qb.max() <= 7
        B = (qb.float().reshape(-1, 64) * sb.float()[:, None]).reshape(4, cols)  # groups of the flattened B
        torch.testing.assert_close(out[n] - base(w, n), (qa.float() * sa.float()) @ B, rtol=0, atol=1e-6)
        before, after = (sd[n] - base(w, n)).norm().item(), (sd[n] - out[n]).norm().item()
        with capsys.disabled():
            print(f"\n  {n}: ||W - Q*s||_F = {before:.5f}, ||W - W_deq||_F = {after:.5f}")
        assert after < before
    for n, tag in m.items():  # the others dequantise as before
        if tag in ("gptq (int6)", "gptq (int7)"):
            assert torch.equal(out[n], base(w, n))


def test_lqer_corrects_the_top_k_errors_and_logs_them(lqer_payload):
    h, sd, _, payload, lines = lqer_payload
    w, m = payload["w"], payload["m"]
    gptq = [n for n, tag in m.items() if tag.startswith("gptq")]
    assert len(gptq) == 1 + 6 * 3  # tok_emb and the six roles of every layer: all of them GPTQ'd
    errs = sorted(gptq, key=lambda n: -(sd[n] - base(w, n)).norm().item())
    assert {n for n in gptq if "lqer" in m[n]} == set(errs[:3])
    tags = {line.split(": ")[0].strip() for line in lines}
    assert any(t.endswith("+lqer_asym") for t in tags) and lines == tg.quant_summary_lines(m)
    assert f"  {m[errs[0]]}: " in "\n".join(lines)


def test_lqer_top_k_zero_is_lqer_off(lqer_payload):
    h, sd, hessians, _, _ = lqer_payload
    off, off_lines = tg.quantize_state_dict(make_h(**TINY), sd, hessians)
    zero, zero_lines = tg.quantize_state_dict(make_h(**TINY, **{**LQER, "lqer_top_k": 0}), sd, hessians)
    assert zero["m"] == off["m"] and zero_lines == off_lines and list(zero["w"]) == list(off["w"])
    assert all(torch.equal(zero["w"][k], t) for k, t in off["w"].items())
    assert tg.pack_artifact(zero, "lzma") == tg.pack_artifact(off, "lzma")


def test_lqer_int2_a_saturates_on_the_positive_side():
    """A's one scale is max|A|/1.5: +max -> 1.5 -> 2 -> clamped to 1 (0.67 max), -max -> -2 (-1.33 max)."""
    h = make_h(**TINY, **LQER)
    B = trained(4, 64, seed=1)
    A = torch.tensor([[3.0, -2.5, 0.7, 0.1], [1.1, 0.4, -0.2, 2.0]])  # the largest entry is positive
    f, tag = tg.lqer_factors(h, A, B)
    assert tag == "+lqer_asym" and f["lqAs_a"].item() == 2.0
    assert f["lqA_a"].tolist() == [[1, -1, 0, 0], [1, 0, 0, 1]]
    f, _ = tg.lqer_factors(h, -A, B)  # now the largest entry is negative: it keeps its full range
    assert f["lqA_a"].tolist() == [[-2, 1, 0, 0], [-1, 0, 0, -1]]
    sb = (B.reshape(-1, 64).abs().amax(1) / 7.5).half()
    assert torch.equal(f["lqBs_a"], sb) and f["lqB_a"].max() == 7  # B's +group max clamps to 7 as well
    assert torch.equal(f["lqB_a"], (B.reshape(-1, 64) / sb.float()[:, None]).round().clamp(-8, 7).to(torch.int8)
                       .view(4, 64))


@pytest.mark.parametrize("over", [dict(lqer_asym_enabled=False), dict(lqer_asym_group=48)],
                         ids=["asym off", "4*64 % 48"])
@pytest.mark.parametrize("bits", [4, 3])
def test_lqer_symmetric_fallback(over, bits):
    """Asym off, or a group that does not divide numel(B): both factors per-row int(LQER_FACTOR_BITS), tag +lqer."""
    h = make_h(**TINY, **LQER, lqer_factor_bits=bits, **over)
    A, B = trained(96, 4, seed=2), trained(4, 64, seed=3)
    f, tag = tg.lqer_factors(h, A, B)
    n = 2 ** (bits - 1) - 1
    assert tag == "+lqer" and set(f) == {"lqA", "lqAs", "lqB", "lqBs"}
    for q, s, x in ((f["lqA"], f["lqAs"], A), (f["lqB"], f["lqBs"], B)):
        assert torch.equal(s, (x.abs().amax(1) / n).half()) and q.abs().max() == n and q.dtype == torch.int8
        assert torch.equal(q, (x / s.float()[:, None]).round().clamp(-n, n).to(torch.int8))
    w = {f"x.{k}": v for k, v in f.items()}
    want = (f["lqA"].float() * f["lqAs"].float()[:, None]) @ (f["lqB"].float() * f["lqBs"].float()[:, None])
    assert torch.equal(tg.lqer_delta(w, "x", "gptq (int6)" + tag), want)
    assert (want - A @ B).norm() < 0.5 ** bits * 2 * (A @ B).norm()  # the factors still carry A @ B


def test_lqer_settings_that_cannot_work_are_refused():
    for bad in (dict(lqer_rank=0), dict(lqer_asym_group=0), dict(lqer_factor_bits=1), dict(lqer_factor_bits=9)):
        with pytest.raises(tg.ConfigError, match="LQER_RANK=.* LQER_FACTOR_BITS="):
            make_h(**TINY, **{**LQER, **bad})
    make_h(**TINY, lqer_rank=0)  # off: not read


def test_size_line_counts_the_lqer_factors(lqer_payload, tmp_path):
    """The size lines report the artifact's bytes on disk, which hold the factors."""
    h, sd, hessians, with_lqer, _ = lqer_payload
    without, _ = tg.quantize_state_dict(make_h(**TINY), sd, hessians)
    sizes = {}
    for name, p in (("with", with_lqer), ("without", without)):
        path = tmp_path / f"{name}.ptz"
        path.write_bytes(tg.pack_artifact(p, "brotli"))
        sizes[name] = path.stat().st_size
        lines, _ = tg.submission_size_lines(sizes[name], 1000, "brotli")
        assert lines[0] == f"Serialized model quantized+brotli: {sizes[name]} bytes"
    factors = sum(t.numel() * t.element_size() for k, t in with_lqer["w"].items() if ".lq" in k)
    assert factors > 0 and sizes["with"] > sizes["without"]


# ----------------------------------------------------------------------------- COMPRESSOR=pergroup


def same_payload(a, b):
    assert a["m"] == b["m"] and set(a["w"]) == set(b["w"])
    for k, t in a["w"].items():
        assert b["w"][k].dtype == t.dtype and b["w"][k].shape == t.shape and torch.equal(b["w"][k], t), k


def remainder(blob):
    import brotli
    return torch.load(io.BytesIO(tg.byte_unshuffle(brotli.decompress(tg.unframe(blob[5:])[0]))), weights_only=True)


def test_pergroup_round_trip_is_bit_exact(lqer_payload):
    """Codes, scales, gates, passthrough, LQER factors and tags all come back exactly; every GPTQ code tensor of the
    model is in its role's stream (layers in order), the rest in the remainder; loading needs no COMPRESSOR."""
    payload = lqer_payload[3]
    payload["w"]["step"] = torch.tensor(7)  # an int64 passthrough
    blob = tg.pack_artifact(payload, "pergroup")
    assert blob[:1] == b"P"
    same_payload(payload, tg.unpack_artifact(blob, "a.ptz"))
    rest = remainder(blob)
    codes = [k for k in payload["w"] if k.endswith(".q")]
    assert [k for members in rest["g"].values() for k, _, _ in members] == sorted(
        codes, key=lambda k: (tg.PERGROUP_ROLES.index(tg.collapse_layer_index(k[:-2]).removeprefix("blocks.")), k))
    assert not set(codes) & set(rest["w"]) and {k for k in rest["w"] if ".lq" in k} == \
        {k for k in payload["w"] if ".lq" in k}
    assert set(rest["p"]) == {k for k in codes if tg.collapse_layer_index(k[:-2]).removeprefix("blocks.")
                              in tg.PERGROUP_SORTED}
    assert all(p.dtype == torch.uint16 for p in rest["p"].values())


def test_pergroup_artifact_loads_into_the_model(lqer_payload, tmp_path):
    h, sd, _, payload, _ = lqer_payload
    path = tmp_path / "final_model.int6.ptz"
    path.write_bytes(tg.pack_artifact(payload, "pergroup"))
    model = tg.load_artifact_model(h, torch.device("cpu"), str(path))
    want = tg.dequantize_state_dict(payload, {k: v.cpu() for k, v in model.unbanked_state_dict().items()})
    got = model.unbanked_state_dict()
    assert all(torch.equal(got[k], v) for k, v in want.items())


def brute_force_order(q):
    x, order, left = q.long(), [0], set(range(1, q.size(0)))
    while left:
        d = (x - x[order[-1]]).abs().sum(1).tolist()
        order.append(min(left, key=lambda j: (d[j], j)))
        left.remove(order[-1])
    return order


@pytest.mark.parametrize("shape,lo,hi", [((200, 70), -3, 3), ((150, 300), -128, 127), ((600, 40), -31, 31)],
                         ids=["many ties", "full int8 range", "past the 512-step compaction"])
def test_l1_row_order_is_the_exact_greedy_chain(shape, lo, hi):
    q = torch.randint(lo, hi + 1, shape, generator=torch.Generator().manual_seed(shape[0]), dtype=torch.int8)
    threads = torch.get_num_threads()
    order = tg.l1_row_order(q)
    assert order.tolist() == brute_force_order(q) and torch.get_num_threads() == threads
    assert sorted(order.tolist()) == list(range(shape[0])) and torch.equal(tg.l1_row_order(q), order)


def test_pergroup_permutation_inverse_restores_the_rows():
    """Rows that are all distinct and far from sorted: the stored permutation is not the identity, and decoding
    puts every row back where it was."""
    g = torch.Generator().manual_seed(9)
    q = torch.randint(-31, 32, (300, 64), generator=g, dtype=torch.int8)
    i = torch.randperm(300, generator=g)
    q[:, 0], q[:, 1] = i % 50 - 25, i // 50  # a distinct (q[:, 0], q[:, 1]) pair per row
    assert torch.unique(q, dim=0).size(0) == 300
    payload = {"w": {"tok_emb.weight.q": q, "tok_emb.weight.scale": torch.ones(q.size(0)).half()},
               "m": {"tok_emb.weight": "gptq (int7)"}}
    blob = tg.pack_artifact(payload, "pergroup")
    perm = remainder(blob)["p"]["tok_emb.weight.q"].int()
    assert not torch.equal(perm, torch.arange(q.size(0))) and torch.equal(perm, tg.l1_row_order(q).int())
    same_payload(payload, tg.unpack_artifact(blob))




def test_pergroup_single_bit_flips_are_all_rejected(lqer_payload):
    """As for the brotli and lzma kinds: any one flipped bit is a one-line DataError (CRC32), never a silent decode."""
    payload = {"w": {k: v for k, v in lqer_payload[3]["w"].items() if k.startswith(("blocks.0.", "tok_emb"))},
               "m": {k: v for k, v in lqer_payload[3]["m"].items() if k.startswith(("blocks.0.", "tok_emb"))}}
    blob = tg.pack_artifact(payload, "pergroup")
    same_payload(payload, tg.unpack_artifact(blob, "a.ptz"))
    assert_every_bit_flip_rejected(blob)


def test_pergroup_corrupt_body_with_a_good_checksum_is_one_line():
    body = tg.frame([b"not brotli", b"x"])
    for bad in (tg.seal(b"P", body), tg.seal(b"P", body[:-1])):
        with pytest.raises(tg.DataError, match="corrupt model artifact") as e:
            tg.unpack_artifact(bad, "/runs/x.ptz")
        assert ARTIFACT_FIX in str(e.value) and "\n" not in str(e.value)


def test_missing_codec_package_is_a_data_error_naming_the_pip_command(lqer_payload, monkeypatch):
    """bzip3 is imported only for pergroup: without it, COMPRESSOR=pergroup is refused at startup, and loading a
    pergroup artifact says which package to install (not "corrupt"); brotli and lzma artifacts do not need it."""
    payload = lqer_payload[3]
    blob = tg.pack_artifact(payload, "pergroup")
    monkeypatch.setitem(sys.modules, "bz3", None)  # import bz3 now raises ImportError
    want = "COMPRESSOR=pergroup artifacts need the bzip3 package: pip install bzip3==0.1.10"
    for fail in (lambda: tg.unpack_artifact(blob, "a.ptz"), lambda: tg.pack_artifact(payload, "pergroup"),
                 lambda: make_h(**TINY, compressor="pergroup")):
        with pytest.raises(tg.DataError) as e:
            fail()
        assert str(e.value) == want
    same_payload(payload, tg.unpack_artifact(tg.pack_artifact(payload, "lzma")))
    assert "bzip3==0.1.10" in open(tg.__file__.replace("train_gpt.py", "requirements.txt")).read()
