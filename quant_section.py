import base64
import io
import lzma

import torch

# ---- QUANTIZATION ----
# GPTQ with SDClip row scales (SPEC 6.3), int8 attention-gate rows and fp16 passthrough (6.4),
# byte-shuffled Brotli/LZMA artifact (6.5), self-extracting code wrapper (6.6), size report (1.2).

PASSTHROUGH_MAX_NUMEL = 65536
GATE_NUMEL_RANGE = (1024, 8192)
SIZE_CAP_BYTES = 16_000_000
FP16_TINY = 2.0**-24  # smallest positive fp16: SPEC's 1e-10 floor would round to 0 in fp16 and give 0/0 rows


def fp16_row_scale(x):
    return x.clamp_min(FP16_TINY).to(torch.float16)


def round_rows(w, scale, clip_range):
    return (w.float() / scale.float()[:, None]).round().clamp(-clip_range, clip_range).to(torch.int8)


def sdclip_scale(w, bits, clip_sigmas):
    """Row scale clip_sigmas*std(row)/clip_range: clipping at k sigma ignores rare outliers."""
    clip_range = 2 ** (bits - 1) - 1
    return fp16_row_scale(clip_sigmas * w.float().std(dim=1) / clip_range), clip_range


def rtn_quantize(w, bits, clip_sigmas):
    scale, clip_range = sdclip_scale(w, bits, clip_sigmas)
    return round_rows(w, scale, clip_range), scale


@torch.no_grad()
def gptq_quantize(w, H, bits, clip_sigmas, block_size=128):
    """Quantise columns in act-order, pushing each column's error onto the not-yet-quantised ones
    through the upper Cholesky factor of H^-1 so that tr(E H E^T) stays small."""
    rows, cols = w.shape
    if H.shape != (cols, cols):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match weight {tuple(w.shape)}")
    H = H.detach().to(w.device, torch.float32).clone()
    dead = H.diagonal() == 0  # input never active: the weight column is irrelevant, 1 keeps H invertible
    H.diagonal()[dead] = 1
    H.diagonal().add_(0.01 * H.diagonal().mean())
    perm = H.diagonal().argsort(descending=True)
    W = w.detach().float()[:, perm]
    W[:, dead[perm]] = 0
    H = H[perm][:, perm]
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    scale, clip_range = sdclip_scale(w, bits, clip_sigmas)
    s = scale.float()[:, None]
    Q = torch.empty(rows, cols, dtype=torch.int8, device=w.device)
    for b in range(0, cols, block_size):
        e = min(b + block_size, cols)
        Wb, Hb = W[:, b:e], Hinv[b:e, b:e]  # views: updates land in W
        err = torch.empty_like(Wb)
        for j in range(e - b):
            col = Wb[:, j : j + 1]
            q = (col / s).round().clamp(-clip_range, clip_range)
            Q[:, b + j] = q[:, 0].to(torch.int8)
            err[:, j : j + 1] = (col - q * s) / Hb[j, j]
            Wb[:, j:] -= err[:, j : j + 1] * Hb[j : j + 1, j:]
        W[:, e:] -= err @ Hinv[b:e, e:]
    return Q[:, perm.argsort()], scale


def gptq_bits_and_clip(name, h):
    if "tok_emb" in name:
        return h.embed_bits, h.embed_clip_sigmas
    clip = h.mlp_clip_sigmas if ".mlp." in name else h.attn_clip_sigmas if ".attn." in name else h.matrix_clip_sigmas
    return h.matrix_bits, clip


def is_quant_gate(name, t, h):
    lo, hi = GATE_NUMEL_RANGE
    return h.gated_attn_quant_gate and name.endswith(".attn_gate_w") and t.ndim == 2 and lo <= t.numel() <= hi


def collapse_layer_index(name):
    """blocks.3.attn.c_q.weight -> blocks.attn.c_q.weight, so the log lists each kind once."""
    p = name.split(".")
    return ".".join(x for i, x in enumerate(p) if not (i and p[i - 1] == "blocks" and x.isdigit()))


def quant_summary_lines(meta):
    """The indented lines logged under "Quantized weights:", one per tag."""
    groups = {}
    for name, tag in meta.items():
        groups.setdefault(tag, set()).add(collapse_layer_index(name))
    return [f"  {tag}: {', '.join(sorted(names))}" for tag, names in sorted(groups.items())]


def quantize_state_dict(sd, hessians, h):
    w, m = {}, {}
    for name, t in sd.items():
        t = t.detach()
        if is_quant_gate(name, t, h):
            scale = fp16_row_scale(t.float().abs().amax(dim=1) / 127)
            w[name + ".gq"], w[name + ".gs"], m[name] = round_rows(t, scale, 127).cpu(), scale.cpu(), "gate_int8_row"
        elif name in hessians:
            bits, clip_sigmas = gptq_bits_and_clip(name, h)
            q, scale = gptq_quantize(t, hessians[name], bits, clip_sigmas)
            w[name + ".q"], w[name + ".scale"], m[name] = q.cpu(), scale.cpu(), f"gptq (int{bits})"
        elif not t.is_floating_point() or t.numel() <= PASSTHROUGH_MAX_NUMEL:
            # clone: torch.save writes a view's whole storage (e.g. a bank slice)
            w[name], m[name] = (t.half() if t.is_floating_point() else t).cpu().clone(), "passthrough (float16)"
        else:
            raise ValueError(f"{name}: float tensor with {t.numel()} elements has no Hessian; "
                             "refusing to ship it unquantised (missing calibration hook?)")
    return {"w": w, "m": m}, quant_summary_lines(m)


def dequantize_state_dict(payload, template):
    w, m = payload["w"], payload["m"]
    if set(m) != set(template):
        raise ValueError(f"artifact keys do not match the model: missing {sorted(set(template) - set(m))}, "
                         f"unexpected {sorted(set(m) - set(template))}")
    out = {}
    for name, t in template.items():
        tag = m[name]
        if tag.startswith("gptq") or tag == "gate_int8_row":
            q, s = (w[name + ".q"], w[name + ".scale"]) if tag.startswith("gptq") else (w[name + ".gq"], w[name + ".gs"])
            out[name] = (q.float() * s.float()[:, None]).to(t.dtype)
        elif tag == "passthrough (float16)":
            out[name] = w[name].to(t.dtype)
        else:
            raise ValueError(f"{name}: unknown quantisation tag {tag!r}")
        if out[name].shape != t.shape:
            raise ValueError(f"{name}: artifact shape {tuple(out[name].shape)} != model shape {tuple(t.shape)}")
    return out


def byte_shuffle(data, stride=2):
    """Group byte k of every fp16/int8 pair together: high bytes are low-entropy and compress far better."""
    return b"BSHF" + bytes([stride]) + b"".join(data[i::stride] for i in range(stride))


def byte_unshuffle(data):
    if data[:4] != b"BSHF" or len(data) < 5 or data[4] == 0:
        raise ValueError("not a byte-shuffled stream (missing BSHF header)")
    stride, body = data[4], data[5:]
    out, pos = bytearray(len(body)), 0
    for i in range(stride):
        n = len(range(i, len(body), stride))
        out[i::stride] = body[pos : pos + n]
        pos += n
    return bytes(out)


def pack_artifact(payload, compressor):
    buf = io.BytesIO()
    torch.save(payload, buf)
    raw = byte_shuffle(buf.getvalue())
    if compressor == "brotli":
        import brotli

        return b"B" + brotli.compress(raw, quality=11, lgwin=24)
    if compressor == "lzma":
        return b"L" + lzma.compress(raw, preset=6)
    raise ValueError(f"unknown compressor {compressor!r} (brotli or lzma)")


def unpack_artifact(blob):
    """The first byte names the compressor, so loading needs no COMPRESSOR setting."""
    kind, body = blob[:1], blob[1:]
    if kind == b"B":
        import brotli

        decompress, corrupt = brotli.decompress, brotli.error
    elif kind == b"L":
        decompress, corrupt = lzma.decompress, lzma.LZMAError
    else:
        raise ValueError(f"not a model artifact: unknown compressor byte {kind!r}")
    try:
        raw = decompress(body)
    except corrupt as e:
        raise ValueError(f"corrupt model artifact: {e}") from e
    return torch.load(io.BytesIO(byte_unshuffle(raw)), map_location="cpu", weights_only=True)


def code_wrapper(source_text):
    """Counted code = this two-line self-extracting stub (SPEC 6.6), not the raw file."""
    try:
        import python_minifier

        text = python_minifier.minify(source_text, remove_literal_statements=True, rename_locals=False, hoist_literals=False)
        minified = True
    except ImportError:
        text, minified = source_text, False
    blob = base64.b85encode(lzma.compress(text.encode())).decode()
    return f'import lzma as L,base64 as B\nexec(L.decompress(B.b85decode("{blob}")))\n', minified


def submission_size_lines(model_bytes, code_bytes, compressor, cap=SIZE_CAP_BYTES):
    total = model_bytes + code_bytes
    lines = [f"Serialized model quantized+{compressor}: {model_bytes} bytes",
             f"Total submission size quantized+{compressor}: {total} bytes"]
    if total > cap:
        lines.append(f"WARNING: total submission size {total} bytes exceeds the {cap:,}-byte cap "
                     f"by {total - cap} bytes: this run is NOT A VALID RECORD")
    return lines, total <= cap
