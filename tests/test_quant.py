"""Quantisation and packaging section of train_gpt.py (SPEC 6.3-6.6, 1.2, 8.2): CPU, small tensors."""
import lzma
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

import train_gpt as tg
from conftest import ARTIFACT_FIX, assert_every_bit_flip_rejected, run_python

H_ARGS = SimpleNamespace(matrix_bits=6, embed_bits=7, matrix_clip_sigmas=12.85, attn_clip_sigmas=13.0,
                         mlp_clip_sigmas=12.0, embed_clip_sigmas=15.0, gated_attn_quant_gate=True, lqer_enabled=False)


def correlated_hessian(cols, n=4096, rank=32, seed=0):
    """Activations = low-rank signal + noise with uneven column scales, like real layer inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, rank, generator=g) @ torch.randn(rank, cols, generator=g)
    x = (x + 0.3 * torch.randn(n, cols, generator=g)) * torch.rand(cols, generator=g).add(0.2)
    return x.T @ x / n


def weight(rows, cols, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * 0.02


def output_error(w, q, s, H):
    e = w - q.float() * s.float()[:, None]
    return torch.trace(e @ H @ e.T).item()


def test_gptq_output_error_below_rtn():
    w, H = weight(128, 512), correlated_hessian(512)
    gq, gs = tg.gptq_quantize(w, H, 6, 12.85)
    rq, rs = tg.rtn_quantize(w, 6, 12.85)
    assert torch.equal(gs, rs)
    assert output_error(w, gq, gs, H) < 0.5 * output_error(w, rq, rs, H)


def textbook_gptq(w, H, bits, clip_sigmas):
    """Column-by-column GPTQ in float64 that updates the full inverse Hessian (no Cholesky, no blocks)."""
    clip_range = 2 ** (bits - 1) - 1
    s = (clip_sigmas * w.std(dim=1) / clip_range).half().double()
    H = H.double().clone()
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1
    H.diagonal().add_(0.01 * H.diagonal().mean())
    order = H.diagonal().argsort(descending=True)
    W = w.double()[:, order]
    W[:, dead[order]] = 0
    Hinv, q = torch.linalg.inv(H[order][:, order]), torch.empty_like(W)
    for j in range(W.shape[1]):
        q[:, j] = (W[:, j] / s).round().clamp(-clip_range, clip_range)
        W[:, j:] -= ((W[:, j] - q[:, j] * s) / Hinv[j, j])[:, None] * Hinv[j, j:]
        Hinv[j:, j:] -= Hinv[j:, j, None] * Hinv[None, j, j:] / Hinv[j, j]
    return q[:, order.argsort()].to(torch.int8)


def test_gptq_matches_textbook_algorithm():
    # Catches act-order direction, damping, dead columns and block propagation, not just "beats RTN".
    w, H = weight(64, 320), correlated_hessian(320)
    H[:, 17] = H[17, :] = 0
    q, _ = tg.gptq_quantize(w, H, 6, 12.85, block_size=128)
    assert (q == textbook_gptq(w, H, 6, 12.85)).float().mean() > 0.99


def test_gptq_with_diagonal_hessian_is_rtn():
    # No cross-column correlation -> nothing to compensate; a wrong un-permutation would show here.
    w = weight(64, 300)
    H = torch.diag(torch.rand(300, generator=torch.Generator().manual_seed(2)) + 0.1)
    gq, _ = tg.gptq_quantize(w, H, 6, 12.85, block_size=128)
    rq, _ = tg.rtn_quantize(w, 6, 12.85)
    assert torch.equal(gq, rq)


@pytest.mark.parametrize("bits", [6, 7])
def test_q_is_int8_within_clip_range(bits):
    w = weight(64, 256) * torch.linspace(0.1, 5, 256)  # heavy columns force clipping
    clip_range = 2 ** (bits - 1) - 1
    for q, s in (tg.gptq_quantize(w, correlated_hessian(256), bits, 3.0), tg.rtn_quantize(w, bits, 3.0)):
        assert q.dtype == torch.int8 and q.shape == w.shape
        assert s.dtype == torch.float16 and s.shape == (64,)
        assert q.abs().max().item() == clip_range


def test_sdclip_scale_formula():
    w = weight(32, 128)
    w[5] = 0  # dead row: needs a positive scale, not 0/0
    want = (13.0 * w.std(dim=1) / 31).to(torch.float16)
    q, s = tg.gptq_quantize(w, correlated_hessian(128), 6, 13.0)
    live = torch.arange(32) != 5
    assert torch.equal(s[live], want[live])
    assert s[5] > 0 and (q[5] == 0).all()
    q7, s7 = tg.rtn_quantize(w, 7, 15.0)
    assert torch.equal(s7[live], (15.0 * w.std(dim=1) / 63).to(torch.float16)[live])


def test_dead_columns_zeroed_and_finite():
    w, H = weight(32, 128), correlated_hessian(128)
    dead = torch.tensor([0, 7, 64, 127])
    H[dead, :] = 0
    H[:, dead] = 0
    w[:, dead] = 1.0  # would quantise to the clip limit if not zeroed
    q, s = tg.gptq_quantize(w, H, 6, 12.85)
    assert (q[:, dead] == 0).all()
    live = torch.ones(128, dtype=torch.bool)
    live[dead] = False
    assert (q[:, live] != 0).any() and torch.isfinite(s.float()).all()


def test_gptq_rejects_mismatched_hessian():
    with pytest.raises(ValueError, match="Hessian shape"):
        tg.gptq_quantize(weight(16, 64), torch.eye(32), 6, 12.85)


def small_model(dtype=torch.float32):
    """Real names at toy sizes; tok_emb and the matrices have Hessians, the rest do not."""
    g = torch.Generator().manual_seed(3)
    r = lambda *shape: torch.randn(*shape, generator=g).to(dtype) * 0.1
    sd, hessians = {"tok_emb.weight": r(96, 64), "skip_weights": r(8, 64), "parallel_resid_lambdas": r(11, 2)}, {}
    for i in range(2):
        p = f"blocks.{i}."
        sd |= {p + "attn.c_q.weight": r(64, 64), p + "attn.c_k.weight": r(32, 64), p + "mlp.fc.weight": r(128, 64),
               p + "mlp.proj.weight": r(64, 128), p + "attn_scale": r(64), p + "attn.q_gain": r(8),
               p + "attn.attn_gate_w": r(8, 128), p + "resid_mix": r(2, 64)}
    for name, t in sd.items():
        if t.ndim == 2 and t.shape[0] >= 32 and "gate" not in name and "skip" not in name:
            hessians[name] = correlated_hessian(t.shape[1], n=512)
    return sd, hessians


def test_quantize_state_dict_classes():
    sd, hessians = small_model()
    payload, _ = tg.quantize_state_dict(H_ARGS, sd, hessians)
    w, m = payload["w"], payload["m"]
    assert m["tok_emb.weight"] == "gptq (int7)" and m["blocks.1.mlp.proj.weight"] == "gptq (int6)"
    assert m["blocks.0.attn.attn_gate_w"] == "gate_int8_row" and m["blocks.0.attn.q_gain"] == "passthrough (float16)"
    assert set(m) == set(sd)
    clips = {"tok_emb.weight": 15.0 / 63, "blocks.0.mlp.fc.weight": 12.0 / 31, "blocks.0.attn.c_k.weight": 13.0 / 31}
    for name, k in clips.items():
        assert torch.equal(w[name + ".scale"], (k * sd[name].std(dim=1)).to(torch.float16)), name
    assert w["tok_emb.weight.q"].abs().max() <= 63 and w["blocks.0.attn.c_q.weight.q"].abs().max() <= 31
    assert w["skip_weights"].dtype == torch.float16 and "skip_weights.q" not in w


def test_matrix_clip_for_unclassified_names():
    sd = {"lm_head.weight": weight(32, 64)}
    payload, _ = tg.quantize_state_dict(H_ARGS, sd, {"lm_head.weight": correlated_hessian(64)})
    assert torch.equal(payload["w"]["lm_head.weight.scale"], (12.85 * sd["lm_head.weight"].std(dim=1) / 31).half())


def test_summary_lines():
    sd, hessians = small_model()
    _, lines = tg.quantize_state_dict(H_ARGS, sd, hessians)
    assert lines == [  # logged under a "Quantized weights:" header
        "  gate_int8_row: blocks.attn.attn_gate_w",
        "  gptq (int6): blocks.attn.c_k.weight, blocks.attn.c_q.weight, blocks.mlp.fc.weight, blocks.mlp.proj.weight",
        "  gptq (int7): tok_emb.weight",
        "  passthrough (float16): blocks.attn.q_gain, blocks.attn_scale, blocks.resid_mix, parallel_resid_lambdas, "
        "skip_weights",
    ]


def test_large_float_without_hessian_raises():
    big = {"blocks.0.mlp.fc.weight": torch.zeros(257, 256)}  # 65,792 elements
    with pytest.raises(ValueError, match="blocks.0.mlp.fc.weight"):
        tg.quantize_state_dict(H_ARGS, big, {})
    at_limit = {"x": torch.zeros(256, 256), "ids": torch.zeros(300, 300, dtype=torch.int64)}
    payload, _ = tg.quantize_state_dict(H_ARGS, at_limit, {})
    assert payload["w"]["x"].dtype == torch.float16 and payload["w"]["ids"].dtype == torch.int64


def test_passthrough_does_not_drag_a_view_storage():
    bank = torch.zeros(1000, 64, dtype=torch.float16)
    payload, _ = tg.quantize_state_dict(H_ARGS, {"skip_gates": bank[:8]}, {})
    assert payload["w"]["skip_gates"].untyped_storage().nbytes() == 8 * 64 * 2


# numel window 32..8192 (PR #1855 widened B's 1,024 lower bound for the sparse [8, 12] gate)
@pytest.mark.parametrize("shape,gated", [((8, 128), True), ((8, 1024), True), ((8, 12), True), ((1, 31), False),
                                         ((8, 1025), False), ((4096,), False)])
def test_gate_int8_row_numel_window(shape, gated):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    name = "blocks.0.attn.attn_gate_w"
    payload, _ = tg.quantize_state_dict(H_ARGS, {name: t}, {})
    assert payload["m"][name] == ("gate_int8_row" if gated else "passthrough (float16)")
    if gated:
        q, s = payload["w"][name + ".gq"], payload["w"][name + ".gs"]
        assert q.dtype == torch.int8 and q.abs().max() == 127
        assert torch.equal(s, (t.abs().amax(dim=1) / 127).half())
        assert torch.equal(q, (t / s.float()[:, None]).round().clamp(-127, 127).to(torch.int8))


def test_gate_quant_off_or_other_name_passes_through():
    t = torch.randn(8, 512)
    off = SimpleNamespace(**{**vars(H_ARGS), "gated_attn_quant_gate": False})
    assert tg.quantize_state_dict(off, {"blocks.0.attn.attn_gate_w": t}, {})[0]["m"]["blocks.0.attn.attn_gate_w"] \
        == "passthrough (float16)"
    assert tg.quantize_state_dict(H_ARGS, {"blocks.0.attn.gate_w": t}, {})[0]["m"]["blocks.0.attn.gate_w"] \
        == "passthrough (float16)"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_bit_exact(dtype):
    sd, hessians = small_model(dtype)
    payload, _ = tg.quantize_state_dict(H_ARGS, sd, hessians)
    w, m = payload["w"], payload["m"]
    out = tg.dequantize_state_dict(payload, sd)
    assert list(out) == list(sd)
    for name, t in sd.items():
        q, s = {"gptq (int6)": ".q", "gptq (int7)": ".q", "gate_int8_row": ".gq"}.get(m[name]), None
        if q:
            q, s = w[name + q], w[name + (".scale" if q == ".q" else ".gs")]
            want = (q.float() * s.float()[:, None]).to(dtype)
        else:
            want = t.half().to(dtype)
        assert out[name].dtype == dtype and torch.equal(out[name], want), name
    name = "blocks.0.attn.c_q.weight"  # sanity: the dequantised layer computes nearly the same outputs
    e, W, H = out[name].float() - sd[name].float(), sd[name].float(), hessians[name]
    assert torch.trace(e @ H @ e.T) < 0.01 * torch.trace(W @ H @ W.T)


def test_dequantize_rejects_mismatched_template():
    sd, hessians = small_model()
    payload, _ = tg.quantize_state_dict(H_ARGS, sd, hessians)
    with pytest.raises(ValueError, match="blocks.9.attn_scale"):
        tg.dequantize_state_dict(payload, {**sd, "blocks.9.attn_scale": torch.ones(64)})
    with pytest.raises(ValueError, match="skip_weights"):
        tg.dequantize_state_dict(payload, {k: v for k, v in sd.items() if k != "skip_weights"})
    with pytest.raises(ValueError, match="blocks.0.attn.c_k.weight"):
        tg.dequantize_state_dict(payload, {**sd, "blocks.0.attn.c_k.weight": torch.zeros(64, 32)})
    with pytest.raises(ValueError, match="attn_scale"):
        tg.dequantize_state_dict(payload, {**sd, "blocks.0.attn_scale": torch.zeros(63)})


def test_byte_shuffle_layout():
    assert tg.byte_shuffle(b"abcdefg") == b"BSHF\x02acegbdf"
    assert tg.byte_shuffle(b"abcdefg", 4) == b"BSHF\x04aebfcgd"


@pytest.mark.parametrize("stride", [2, 4])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 1000, 1001])
def test_byte_shuffle_round_trip(stride, n):
    data = bytes(torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).to(torch.uint8).tolist())
    assert tg.byte_unshuffle(tg.byte_shuffle(data, stride)) == data


def test_byte_unshuffle_rejects_unshuffled():
    with pytest.raises(ValueError, match="BSHF"):
        tg.byte_unshuffle(b"PK\x03\x04 not shuffled")


@pytest.mark.parametrize("compressor", ["brotli", "lzma", "pergroup"])
def test_pack_unpack_exact(compressor):
    if compressor == "brotli":
        pytest.importorskip("brotli")
    sd, hessians = small_model(torch.bfloat16)
    sd["step"] = torch.tensor(7)
    payload, _ = tg.quantize_state_dict(H_ARGS, sd, hessians)
    back = tg.unpack_artifact(tg.pack_artifact(payload, compressor))
    order = list if compressor != "pergroup" else set  # pergroup puts the code tensors after the rest
    assert back["m"] == payload["m"] and order(back["w"]) == order(payload["w"])
    for k, t in payload["w"].items():
        assert back["w"][k].dtype == t.dtype and torch.equal(back["w"][k], t), k


def test_pack_compressors_are_self_describing():
    payload = {"w": {"x": torch.arange(100, dtype=torch.int8)}, "m": {"x": "passthrough (float16)"}}
    blobs = [tg.pack_artifact(payload, c) for c in ("lzma", "brotli", "pergroup")]
    assert len({b[:1] for b in blobs}) == 3
    assert lzma.decompress(blobs[0][5:]).startswith(b"BSHF\x02")  # after the compressor byte and the CRC32
    with pytest.raises(ValueError, match="zstd"):
        tg.pack_artifact(payload, "zstd")


@pytest.mark.parametrize("compressor", ["brotli", "lzma", "pergroup"])
def test_artifact_single_bit_flips_are_all_rejected(compressor):
    """Any one flipped bit (compressor byte, checksum or body) is a one-line DataError, never a silent decode
    (without the checksum most flips decoded to slightly different weights); the intact artifact round-trips."""
    x = torch.randn(3000, generator=torch.Generator().manual_seed(0)).half()
    payload = {"w": {"x": x}, "m": {"x": "passthrough (float16)"}}
    blob = tg.pack_artifact(payload, compressor)
    assert torch.equal(tg.unpack_artifact(blob, "a.ptz")["w"]["x"], payload["w"]["x"])
    assert_every_bit_flip_rejected(blob)


@pytest.mark.parametrize("compressor", ["brotli", "lzma", "pergroup"])
def test_unpack_bad_files_one_line_errors(compressor):
    blob = tg.pack_artifact({"w": {"x": torch.randn(300)}, "m": {}}, compressor)
    cases = {blob[: len(blob) // 2]: "checksum mismatch", blob + b"\0": "checksum mismatch",
             blob[:3]: "3 bytes, not a model artifact (empty or truncated)", b"": "0 bytes, not a model artifact",
             b"Z" + blob[1:]: "not a model artifact (first byte b'Z'",
             # a body its checksum vouches for that still does not decode: written corrupt (or by another version)
             tg.seal(blob[:1], b"\x00garbage that no decoder accepts" * 3): "corrupt model artifact"}
    for bad, want in cases.items():
        with pytest.raises(tg.DataError) as e:
            tg.unpack_artifact(bad, "/runs/x.ptz")
        msg = str(e.value)
        assert msg.startswith("/runs/x.ptz: ") and want in msg and ARTIFACT_FIX in msg and "\n" not in msg, msg


def test_artifact_of_another_model_config_is_a_data_error(tmp_path):
    """EVAL_ONLY with other model settings than the training run: one line naming the file, not a traceback."""
    from conftest import make_h
    small = make_h(num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, loop_start=0, loop_end=1, xsa_last_n=2,
                   parallel_start_layer=2, vocab_size=64, compile=False)
    sd = tg.build_model(small, torch.device("cpu")).unbanked_state_dict()
    payload = {"w": {k: v.half() for k, v in sd.items()}, "m": {k: "passthrough (float16)" for k in sd}}
    path = tmp_path / "final_model.int6.ptz"
    path.write_bytes(tg.pack_artifact(payload, "lzma"))
    assert tg.load_artifact_model(small, torch.device("cpu"), str(path)).tok_emb.weight.shape == (64, 64)
    same = {k: getattr(small, k) for k in ("model_dim", "num_heads", "num_kv_heads", "vocab_size", "compile")}
    bigger = make_h(**same, num_layers=3, loop_start=0, loop_end=1, xsa_last_n=2, parallel_start_layer=2)
    with pytest.raises(tg.DataError, match=f"{path} does not fit this model .*set the model settings"):
        tg.load_artifact_model(bigger, torch.device("cpu"), str(path))


def test_size_lines_report_bytes_on_disk(tmp_path):
    sd, hessians = small_model()
    blob = tg.pack_artifact(tg.quantize_state_dict(H_ARGS, sd, hessians)[0], "lzma")
    path = tmp_path / "final_model.int6.ptz"
    path.write_bytes(blob)
    code, _ = tg.code_wrapper("print('hi')\n")
    size = path.stat().st_size
    lines, ok = tg.submission_size_lines(size, len(code.encode()), "lzma")
    assert ok and lines == [f"Serialized model quantized+lzma: {size} bytes",
                            f"Total submission size quantized+lzma: {size + len(code.encode())} bytes"]


@pytest.mark.parametrize("model_bytes,warn", [(15_999_000, False), (15_999_001, True), (20_000_000, True)])
def test_over_cap_warning_exactly_when_over(model_bytes, warn):
    lines, ok = tg.submission_size_lines(model_bytes, 1_000, "brotli")
    total = model_bytes + 1_000
    assert ok is not warn and len(lines) == 2 + warn
    if warn:
        assert lines[2] == (f"WARNING: total submission size {total} bytes exceeds the 16,000,000-byte cap by "
                            f"{total - 16_000_000} bytes: this run is NOT A VALID RECORD")


SCRIPT = '''"""Module docstring the minifier drops."""
def area(r):
    """Docstring."""
    return 3 * r * r  # comment
RESULT = [area(r) for r in range(4)]
'''


@pytest.mark.parametrize("have_minifier", [True, False])
def test_code_wrapper_runs_the_code(monkeypatch, have_minifier):
    if have_minifier:
        pytest.importorskip("python_minifier")
    else:
        monkeypatch.setitem(sys.modules, "python_minifier", None)  # import now raises ImportError
    wrapper, minified = tg.code_wrapper(SCRIPT)
    assert minified is have_minifier
    head, body, tail = wrapper.split("\n")
    assert head == "import lzma as L,base64 as B,linecache as C" and body.startswith('s=L.decompress(B.b85decode("')
    assert tail == ""
    ns = {}
    exec(wrapper, ns)
    assert ns["RESULT"] == [0, 3, 12, 27]
    inner = lzma.decompress(__import__("base64").b85decode(body.split('"')[1])).decode()
    assert ("docstring" in inner) is not have_minifier


def test_counted_code_of_the_trainer_runs_as_the_trainer():
    """The counted code (the minified wrapper) must be the trainer: it defines everything (custom ops without the
    annotations the minifier strips, Triton kernels that read their source) and computes the same loss."""
    out = run_python(textwrap.dedent("""
        import torch, train_gpt as tg
        src = open(tg.__file__, encoding="utf-8").read()
        wrapper, _ = tg.code_wrapper(src)
        assert len(wrapper.encode()) < len(src.encode())
        tiny = dict(num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2, loop_start=1, loop_end=2,
                    parallel_start_layer=3, xsa_last_n=4, vocab_size=64, compile=False)
        def loss(mod):
            torch.manual_seed(0)
            model = mod["build_model"](mod["Hyperparameters"](**tiny), torch.device("cpu"))
            with torch.no_grad():
                model.mlp_down_bank.normal_(0, 0.02)  # trained-looking: the zero init makes every block an identity
                model.qo_bank.normal_(0, 0.05)
                ids = torch.randint(2, 64, (1, 40), generator=torch.Generator().manual_seed(1))
                return model(ids[:, :-1], ids[:, 1:], mod["Fwd"](2)).item()
        want = loss(vars(tg))
        counted = {"__name__": "counted_train_gpt"}
        exec(wrapper, counted)  # re-registers the custom ops (the counted copy's own): never in the test process
        print(want, loss(counted))"""))
    want, got = map(float, out.split())
    assert got == want
