"""LQER (PR #1797) and COMPRESSOR=pergroup (PR #1855) in train_gpt.py's QUANTIZATION section: CPU, small
trained-looking tensors (a low-rank part, noise and uneven row norms: nothing zero)."""
import io

import pytest
import torch

import train_gpt as tg
from conftest import make_h

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


@pytest.mark.parametrize("over", [dict(lqer_asym_enabled=False), dict(lqer_asym_group=48)], ids=["asym off", "4*64 % 48"])
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
