"""Per-group compression benchmark (COMPRESSOR=pergroup): which codec, and whether the row sort and the transpose pay.

    python3 tools/compress_bench.py ARTIFACT.ptz [--log logs/compress_bench_NAME.log] [--quick]

ARTIFACT is any of train_gpt.py's artifacts (brotli, lzma or pergroup kind). It is decoded to the quantized payload,
the int8 GPTQ codes are split into train_gpt.py's groups (one per matrix role, layers in order), and each group is
compressed by every codec below: bytes and single-core decode seconds per group, then the totals. Then the best codecs
on the four layouts (row sort on/off x transpose on/off), the remainder stream, and the whole pergroup artifact against
the brotli artifact of the same payload. --quick runs the PPMd sweep on the first tensor of each group only.
"""
import argparse
import bz2
import io
import lzma
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import train_gpt as tg  # noqa: E402

SHORT = {"tok_emb.weight": "tok_emb", "attn.c_k.weight": "c_k", "attn.c_q.weight": "c_q", "attn.c_v.weight": "c_v",
         "attn.proj.weight": "attn.proj", "mlp.fc.weight": "mlp.fc", "mlp.proj.weight": "mlp.proj"}


def lzma_raw(filters):
    return (lambda b: lzma.compress(b, format=lzma.FORMAT_RAW, filters=filters),
            lambda b: lzma.decompress(b, format=lzma.FORMAT_RAW, filters=filters))


def ppmd(order, mem_mb, variant):
    import pyppmd
    mem = mem_mb << 20
    if variant == "I":
        return (lambda b: pyppmd.compress(b, max_order=order, mem_size=mem, variant="I"),
                lambda b: pyppmd.decompress(b, max_order=order, mem_size=mem, variant="I"))
    # variant H: pyppmd.decompress cannot decode it (its decoder needs the length), so the length goes in front
    return (lambda b: len(b).to_bytes(8, "little") + pyppmd.compress(b, max_order=order, mem_size=mem, variant="H"),
            lambda b: pyppmd.Ppmd7Decoder(order, mem).decode(b[8:], int.from_bytes(b[:8], "little")))


def codecs(quick_ppmd=None):
    """name -> (compress, decompress); codecs whose package is missing are skipped (listed in the log)."""
    import brotli
    out = {"brotli q11 w24": (lambda b: brotli.compress(b, quality=11, lgwin=24), brotli.decompress),
           "lzma 9e": (lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME), lzma.decompress),
           "lzma2 raw lc4 lp0 pb0": lzma_raw([{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "lc": 4,
                                              "lp": 0, "pb": 0, "dict_size": 64 << 20}]),
           "delta1+lzma2 raw": lzma_raw([{"id": lzma.FILTER_DELTA, "dist": 1},
                                         {"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]),
           "bz2 9": (lambda b: bz2.compress(b, 9), bz2.decompress)}
    try:
        import zstandard as zstd
        params = zstd.ZstdCompressionParameters.from_level(22, window_log=27, enable_ldm=True)
        out["zstd 22 ldm w27"] = (lambda b: zstd.ZstdCompressor(compression_params=params).compress(b),
                                  lambda b: zstd.ZstdDecompressor().decompress(b, max_output_size=1 << 31))
    except ImportError:
        print("skipped: zstandard not installed")
    try:
        import pyppmd  # noqa: F401
        for order, mem, variant in quick_ppmd or [(6, 256, "I"), (8, 256, "I"), (4, 256, "H"), (6, 256, "H")]:
            out[f"ppmd {variant} o{order} {mem}M"] = ppmd(order, mem, variant)
    except ImportError:
        print("skipped: pyppmd not installed")
    try:
        import bz3
        out["bzip3 16M"] = (lambda b: bz3.compress(b, block_size=16 << 20), bz3.decompress)
    except ImportError:
        print("skipped: bzip3 not installed")
    try:
        import zpaq
        for level in (3, 4, 5):
            out[f"zpaq {level}"] = (lambda b, level=level: zpaq.compress(b, level=level, threads=1),
                                    lambda b: zpaq.decompress(b, threads=1))
    except ImportError:
        print("skipped: zpaq not installed")
    try:
        import kanzi
        for level in (6, 8, 9):
            out[f"kanzi {level}"] = (lambda b, level=level: kanzi.compress(b, level), kanzi.decompress)
    except ImportError:
        print("skipped: kanzi not installed")
    return out


def group_blobs(w, groups, orders, sort_roles=tg.PERGROUP_SORTED, transpose=True):
    """Each group's bytes as pack_pergroup lays them out (rows of sort_roles in L1 order, column-major)."""
    blobs = {}
    for role, keys in groups.items():
        parts = []
        for k in keys:
            q = w[k][orders[k]] if role in sort_roles else w[k]
            parts.append((q.T if transpose else q).contiguous().numpy().tobytes())
        blobs[role] = b"".join(parts)
    return blobs


def perm_bytes(groups, orders, roles):
    import brotli
    raw = b"".join(orders[k].to(torch.uint16).numpy().tobytes() for r in roles for k in groups[r])
    return len(brotli.compress(raw, quality=11, lgwin=24)) if raw else 0


def measure(codec, blobs):
    """(bytes, decode seconds) per group; decodes are checked against the input."""
    comp, dec = codec
    out = {}
    for role, blob in blobs.items():
        if not blob:
            continue
        c = comp(blob)
        t = time.perf_counter()
        back = dec(c)
        out[role] = (len(c), time.perf_counter() - t)
        assert back == blob, f"round trip failed for {role}"
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--log", default="")
    ap.add_argument("--quick", action="store_true", help="PPMd sweep on one tensor per group")
    ap.add_argument("--only", default="", help="comma-separated substrings of codec names to run")
    args = ap.parse_args()
    torch.set_num_threads(1)  # decode seconds on one core
    lines = []

    def say(s=""):
        print(s, flush=True)
        lines.append(s)

    blob = open(args.artifact, "rb").read()
    payload = tg.unpack_artifact(blob, args.artifact)
    w = payload["w"]
    groups = tg.pergroup_split(w)
    say(f"# compress_bench {os.path.basename(args.artifact)}: {len(blob):,} bytes, kind {blob[:1]!r}, "
        f"torch {torch.__version__}, python {sys.version.split()[0]}")
    tags = {}
    for name, tag in payload["m"].items():
        tags[tag] = tags.get(tag, 0) + 1
    say("tags: " + ", ".join(f"{t} x{n}" for t, n in sorted(tags.items())))
    orders, sort_s = {}, {}
    for role in tg.PERGROUP_ROLES:  # every role, to measure what sorting each one would save
        t = time.perf_counter()
        for k in groups[role]:
            orders[k] = tg.l1_row_order(w[k])
        sort_s[role] = time.perf_counter() - t
    say("L1 row sort (one thread): " + ", ".join(f"{SHORT[r]} {s:.2f}s" for r, s in sort_s.items()))
    blobs = group_blobs(w, groups, orders)
    roles = [r for r in tg.PERGROUP_ROLES if blobs[r]]
    raw = sum(len(blobs[r]) for r in roles)
    say("groups (raw bytes): " + ", ".join(f"{SHORT[r]} {len(blobs[r]):,}" for r in roles) + f"; total {raw:,}")
    say(f"layout: train_gpt.py's (rows of {', '.join(SHORT[r] for r in tg.PERGROUP_SORTED)} L1-sorted, every matrix "
        "column-major) unless a table says otherwise")

    # 1. PPMd sweep (orders x memory x variant)
    sweep = [(o, m, v) for v in ("H", "I") for o in (2, 3, 4, 5, 6, 8, 12, 16) for m in (64, 256, 1024)]
    sample = {r: b"".join(group_blobs(w, {r: groups[r][:1]}, orders).values()) for r in roles} if args.quick else blobs
    quick_ppmd = None
    if not args.only or "ppmd" in args.only:
        say("\n## PPMd sweep (" + ("first tensor of each group, " if args.quick else "")
            + f"{sum(map(len, sample.values())):,} bytes)")
        say("| variant | order | mem MiB | bytes | decode s |")
        say("|---|---|---|---|---|")
        best = {}
        for o, m, v in sweep:
            try:
                r = measure(ppmd(o, m, v), sample)
            except Exception as e:  # noqa: BLE001
                say(f"| {v} | {o} | {m} | failed: {type(e).__name__}: {e} | |")
                continue
            b, s = sum(x[0] for x in r.values()), sum(x[1] for x in r.values())
            best[v, o] = min(best.get((v, o), (b, s, m)), (b, s, m))
            say(f"| {v} | {o} | {m} | {b:,} | {s:.2f} |")
        quick_ppmd = [(o, m, v) for (v, o), (_, _, m) in sorted(best.items(), key=lambda kv: kv[1])[:2]]
        say("best PPMd: " + ", ".join(f"{v} order {o} {m} MiB" for o, m, v in quick_ppmd))

    # 2. every codec on the groups
    table = {}
    for name, codec in codecs(quick_ppmd).items():
        if args.only and not any(s in name for s in args.only.split(",")):
            continue
        t = time.perf_counter()
        table[name] = measure(codec, blobs)
        print(f"  {name}: {sum(x[0] for x in table[name].values()):,} bytes ({time.perf_counter() - t:.1f}s)",
              flush=True)
    total = {n: (sum(x[0] for x in r.values()), sum(x[1] for x in r.values())) for n, r in table.items()}
    ranked = sorted(table, key=lambda n: total[n])
    say("\n## Codecs: bytes (decode s, one core) per group")
    say("| codec | " + " | ".join(SHORT[r] for r in roles) + " | total bytes | total decode s |")
    say("|---" * (len(roles) + 3) + "|")
    for name in ranked:
        r = table[name]
        say(f"| {name} | " + " | ".join(f"{r[g][0]:,} ({r[g][1]:.1f})" for g in roles)
            + f" | {total[name][0]:,} | {total[name][1]:.1f} |")
    fast = [n for n in ranked if total[n][1] < 60][:2]  # the layout checks, for the two best that decode in < 60 s

    # 3. row sort per group and layouts, for the two best codecs that decode in under a minute
    all_codecs = codecs(quick_ppmd)
    sorted_all = group_blobs(w, groups, orders, tg.PERGROUP_ROLES)
    unsorted = group_blobs(w, groups, orders, ())
    say("\n## Row sort per group: bytes unsorted -> sorted, minus the permutations' Brotli bytes = net saving")
    say("| codec | " + " | ".join(SHORT[r] for r in roles) + " |")
    say("|---" * (len(roles) + 1) + "|")
    for name in fast:
        a, b = measure(all_codecs[name], unsorted), measure(all_codecs[name], sorted_all)
        pb = {g: perm_bytes(groups, orders, [g]) for g in roles}
        say(f"| {name} | " + " | ".join(f"{a[g][0]:,} -> {b[g][0]:,} - {pb[g]:,} = {a[g][0] - b[g][0] - pb[g]:+,}"
                                      for g in roles) + " |")
    say("\n## Layouts: bytes of all groups + the permutations' Brotli bytes")
    d_sorted = ("tok_emb.weight", "attn.c_q.weight", "mlp.fc.weight")
    layouts = {"train_gpt.py (sort " + "+".join(SHORT[r] for r in tg.PERGROUP_SORTED) + ", column-major)":
               (tg.PERGROUP_SORTED, True), "PR #1855 (sort tok_emb+c_q+mlp.fc, column-major)": (d_sorted, True),
               "no sort, column-major": ((), True), "sort as train_gpt.py, row-major": (tg.PERGROUP_SORTED, False),
               "no sort, row-major": ((), False)}
    say("| codec | " + " | ".join(layouts) + " |")
    say("|---" * (len(layouts) + 1) + "|")
    for name in fast:
        cells = []
        for sort_roles, transpose in layouts.values():
            r = measure(all_codecs[name], group_blobs(w, groups, orders, sort_roles, transpose))
            cells.append(f"{sum(x[0] for x in r.values()) + perm_bytes(groups, orders, sort_roles):,}")
        say(f"| {name} | " + " | ".join(cells) + " |")

    # 4. the remainder stream and whole artifacts
    import brotli
    grouped = {k for keys in groups.values() for k in keys}
    rest = {"w": {k: t for k, t in w.items() if k not in grouped}, "m": payload["m"],
            "p": {k: orders[k].to(torch.uint16) for r in tg.PERGROUP_SORTED for k in groups[r]},
            "g": {r: [(k, *w[k].shape) for k in keys] for r, keys in groups.items()}}
    buf = io.BytesIO()
    torch.save(rest, buf)
    plain = len(brotli.compress(buf.getvalue(), quality=11, lgwin=24))
    shuffled = len(brotli.compress(tg.byte_shuffle(buf.getvalue()), quality=11, lgwin=24))
    say(f"\nremainder (with the permutations): {len(buf.getvalue()):,} raw, brotli {plain:,}, "
        f"byte-shuffled + brotli {shuffled:,} (train_gpt.py)")
    t = time.perf_counter()
    ref = tg.pack_artifact(payload, "brotli")
    say(f"brotli artifact of this payload: {len(ref):,} bytes ({time.perf_counter() - t:.1f}s)")
    head = 5 + 4 * (1 + len(tg.PERGROUP_ROLES))  # seal + stream lengths
    say("| codec | pergroup artifact (estimated) | vs brotli |")
    say("|---|---|---|")
    for name in ranked:
        size = head + shuffled + total[name][0]
        say(f"| {name} | {size:,} | {size - len(ref):+,} |")
    t = time.perf_counter()
    packed = tg.pack_artifact(payload, "pergroup")
    enc = time.perf_counter() - t
    t = time.perf_counter()
    back = tg.unpack_artifact(packed, "pergroup")
    dec = time.perf_counter() - t
    same = back["m"] == payload["m"] and set(back["w"]) == set(w) and all(
        back["w"][k].dtype == v.dtype and torch.equal(back["w"][k], v) for k, v in w.items())
    say(f"train_gpt.py pergroup artifact: {len(packed):,} bytes ({len(packed) - len(ref):+,} vs brotli), "
        f"pack {enc:.1f}s, unpack {dec:.1f}s, round trip {'exact' if same else 'DIFFERS'}")
    if args.log:
        os.makedirs(os.path.dirname(args.log) or ".", exist_ok=True)
        with open(args.log, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
