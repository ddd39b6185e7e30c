#!/usr/bin/env python3
"""Record tooling: parse train_gpt.py logs, check the track caps, write results.md and submission.json.

python3 tools/record.py LOG [LOG ...] [--baseline-bpb 1.06108] [--out DIR] [--allow-non-record] [--plot]
                  [--name ..] [--author ..] [--github-id ..] [--blurb ..] [--hardware NAME]
Exit status 2, one stderr line per reason, for logs that cannot be used (truncated, missing lines,
duplicate seed) and for runs that are not a record: not on 8 GPUs, not on the full 50,000-doc
validation set, a TTT line whose val_tokens/val_bytes differ from the validation set's (checked
when the TTT line gives them), over the time or size caps, flagged NOT A VALID RECORD, or a lossy
transform.  --allow-non-record writes those anyway, labelled as a non-record (submission.json
"record": false, track "non_record_16mb" and the reasons; results.md opens with them).

Hardware, GPU count, torch version and val-doc count come from the log ('hardware: NAME xN',
'val_tokens:N val_bytes:M val_docs:D', 'torch_version:', 'world_size:').  Logs of an older
train_gpt.py lack the hardware line and val_docs: --hardware NAME then states the hardware (the GPU
count comes from world_size), without it the hardware is "unknown"; an unknown hardware or val-doc
count cannot be certified, so such a log is only accepted with --allow-non-record.
"""
import argparse
import datetime
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

SIZE_CAP = 16_000_000          # bytes, decimal
TIME_CAP_S = 600.0             # training and evaluation, each
RECORD_GPUS = 8                # the track's 8xH100
FULL_VAL_DOCS = 50_000         # the FineWeb validation set of the record folders
NAT_THRESHOLD = 0.005          # required improvement, nats/token
DEFAULT_BASELINE_BPB = 1.06108  # D, PR #1855
NUM = r"([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"
LOSS_BPB = rf"val_loss:\s*{NUM}\s+val_bpb:\s*{NUM}(?:\s+eval_time:\s*{NUM}\s*ms)?"
RX = {
    "pre": re.compile(r"diagnostic pre-quantization.*?" + LOSS_BPB),
    "quant": re.compile(r"diagnostic quantized\s+" + LOSS_BPB),
    "ttt": re.compile(r"quantized_ttt_phased\s+" + LOSS_BPB + r"(?:\s+val_tokens:\s*(\d+)\s+val_bytes:\s*(\d+))?"),
    "step": re.compile(r"^\s*(?:step:\s*)?(\d+)/(\d+)\s+(?:train_loss|val_loss)"),
    "train_loss": re.compile(rf"train_loss:\s*{NUM}"),
    "val_bpb": re.compile(rf"val_bpb:\s*{NUM}"),
    "train_time": re.compile(rf"train_time:\s*{NUM}\s*(ms|s|m)\b"),
    "stop": re.compile(rf"stopping_early:.*?train_time:\s*{NUM}\s*ms.*?step:\s*(\d+)/(\d+)"),
    "total": re.compile(r"Total submission size(?: quantized\+(\w+))?:\s*(\d+)\s*bytes"),
    "model": re.compile(r"Serialized model quantized\+(\w+):\s*(\d+)\s*bytes"),
    "code": re.compile(r"Code size \(compressed\):\s*(\d+)\s*bytes"),
    "peak": re.compile(r"peak memory allocated:\s*(\d+)\s*MiB"),
    "eval_total": re.compile(rf"^total_eval_time:\s*{NUM}\s*s"),
    "eval_wall": re.compile(rf"^eval_wall_time:\s*{NUM}\s*s"),
    "torch": re.compile(r"^torch_version:\s*(\S+)"),
    "transform": re.compile(r"^data_transform:\s*(.+?)\s*$"),
    "hardware": re.compile(r"^hardware:\s*(.+?)(?:\s+x(\d+))?\s*$"),
    "world": re.compile(r"^world_size:\s*(\d+)\s+grad_accum_steps"),
    # anchored: the evaluation lines carry val_tokens/val_bytes too, after eval_time
    "val_set": re.compile(r"^val_tokens:\s*(\d+)\s+val_bytes:\s*(\d+)(?:\s+val_docs:\s*(\d+))?"),
}
UNIT_S = {"ms": 1e-3, "s": 1.0, "m": 60.0}


def parse_log(path):
    """Every field record.py reports, from one log; absent fields are None."""
    r = dict(path=str(path), hp={}, seed=None, pre=None, quant=None, ttt=None, steps=None, iterations=None,
             train_time_s=None, eval_time_s=None, eval_wall_s=None, artifact_bytes=None, model_bytes=None,
             code_bytes=None, compressor=None, transform=None, transform_text=None, torch_version=None,
             world_size=None, peak_mib=None, not_valid=False, curve=[], val_curve=[], hardware=None,
             gpu_count=None, val_tokens=None, val_bytes=None, val_docs=None, ttt_val_tokens=None, ttt_val_bytes=None)
    best_time = None  # (step, is_ms, seconds): the latest step wins, ms beats minutes at equal step
    in_hp = False
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.rstrip()
        if line.strip() == "Hyperparameters:":
            in_hp = True
            continue
        if in_hp and line[:1].isspace() and ":" in line:
            k, v = line.strip().split(":", 1)
            r["hp"][k.strip()] = v.strip()
            continue
        in_hp = False
        # the string inside source code (full-source run logs) must not count: skip quoted lines
        if "NOT A VALID RECORD" in line and not any(q in line for q in "\"'{"):
            r["not_valid"] = True
        for key in ("pre", "quant", "ttt"):
            m = RX[key].search(line)
            if m:
                r[key] = (float(m[1]), float(m[2]))
                if key == "ttt" and m[3] is not None and r["eval_time_s"] is None:
                    r["eval_time_s"] = float(m[3]) / 1000.0  # fallback when total_eval_time is absent
                if key == "ttt" and m[4] is not None:
                    r["ttt_val_tokens"], r["ttt_val_bytes"] = int(m[4]), int(m[5])
        if m := RX["step"].match(line):
            step, r["iterations"] = int(m[1]), int(m[2])
            r["steps"] = max(r["steps"] or 0, step)
            t = RX["train_time"].search(line)
            sec = float(t[1]) * UNIT_S[t[2]] if t else None
            if t and (best_time is None or (step, t[2] == "ms") >= best_time[:2]):
                best_time = (step, t[2] == "ms", sec)
            if (tl := RX["train_loss"].search(line)) and sec is not None:
                r["curve"].append((step, sec, float(tl[1])))
            elif vb := RX["val_bpb"].search(line):
                r["val_curve"].append((step, float(vb[1])))
        if m := RX["stop"].search(line):
            r["stop"] = (float(m[1]) / 1000.0, int(m[2]), int(m[3]))
        if m := RX["total"].search(line):
            r["artifact_bytes"], r["compressor"] = int(m[2]), m[1] or r["compressor"]
        if m := RX["model"].search(line):
            r["compressor"], r["model_bytes"] = m[1], int(m[2])
        for key, field, conv in (("code", "code_bytes", int), ("peak", "peak_mib", int), ("torch", "torch_version", str),
                                 ("eval_total", "eval_time_s", float), ("eval_wall", "eval_wall_s", float)):
            if m := RX[key].search(line):
                r[field] = conv(m[1])
        if m := RX["transform"].search(line):
            r["transform_text"] = m[1]
            r["transform"] = m[1].split()[0]
        _parse_run_lines(line, r)
    if "stop" in r:   # wallclock cap: the stopping_early line is authoritative
        r["train_time_s"], r["steps"], r["iterations"] = r.pop("stop")
    elif best_time:
        r["train_time_s"] = best_time[2]
    hp = r["hp"]
    if "seed" in hp:
        r["seed"] = int(hp["seed"])
    elif m := re.search(r"seed_?(\d+)", Path(path).name):
        r["seed"] = int(m[1])
    if "world_size" in hp and r["world_size"] is None:
        r["world_size"] = int(hp["world_size"])
    return r


def _parse_run_lines(line, r):
    """The lines that say where the run ran and on what: hardware, world_size, the validation set."""
    if m := RX["hardware"].match(line):
        r["hardware"], r["gpu_count"] = m[1], None if m[2] is None else int(m[2])
    if m := RX["world"].match(line):
        r["world_size"] = int(m[1])
    if m := RX["val_set"].match(line):
        r["val_tokens"], r["val_bytes"] = int(m[1]), int(m[2])
        r["val_docs"] = None if m[3] is None else int(m[3])


def problems(r):
    """(fatal, overridable) reasons to refuse a parsed log."""
    fatal, soft = [], []
    if r["ttt"] is None:
        fatal.append("truncated: missing the final 'quantized_ttt_phased val_loss:... val_bpb:...' line")
    if r["artifact_bytes"] is None:
        fatal.append("missing the 'Total submission size ...: N bytes' line")
    if r["train_time_s"] is None or r["steps"] is None:
        fatal.append("missing training progress ('stopping_early' or 'S/I train_loss ... train_time:' lines)")
    if r["ttt"] is not None and r["eval_time_s"] is None:
        fatal.append("missing 'total_eval_time:' (and no eval_time on the quantized_ttt_phased line)")
    if r["seed"] is None:
        fatal.append("no seed (no '  seed:' hyperparameter line and no seed in the file name)")
    if r["artifact_bytes"] is not None and r["artifact_bytes"] > SIZE_CAP:
        soft.append(f"total submission size {r['artifact_bytes']:,} bytes > {SIZE_CAP:,} cap")
    if r["train_time_s"] is not None and r["train_time_s"] > TIME_CAP_S:
        soft.append(f"train time {r['train_time_s']:.3f} s > {TIME_CAP_S:.0f} s cap")
    if r["eval_time_s"] is not None and r["eval_time_s"] > TIME_CAP_S:
        soft.append(f"total_eval_time {r['eval_time_s']:.1f} s > {TIME_CAP_S:.0f} s cap")
    if r["not_valid"]:
        soft.append("log says NOT A VALID RECORD")
    if r["transform_text"] and (r["transform"] == "casefold" or "LOSSY" in r["transform_text"]):
        soft.append(f"non-record data transform '{r['transform_text']}'")
    return fatal, soft + run_setup_problems(r)


def gpus(r):
    """GPU count: the hardware line's xN, else world_size (older logs)."""
    return r["gpu_count"] if r["gpu_count"] is not None else r["world_size"]


def hardware_label(r):
    """'8x NVIDIA H100 80GB HBM3' from the hardware line; the --hardware text as given; else 'unknown'."""
    if r["hardware"] is None:
        return "unknown"
    return r["hardware"] if r["gpu_count"] is None else f"{r['gpu_count']}x {r['hardware']}"


def on_record_gpus(r):
    return gpus(r) == RECORD_GPUS and (r["hardware"] or "").lower() != "cpu"


def ttt_scored_val_set(r):
    """False when the TTT line's val_tokens/val_bytes differ from the startup line's; True when either is absent."""
    scored, full = (r["ttt_val_tokens"], r["ttt_val_bytes"]), (r["val_tokens"], r["val_bytes"])
    return None in scored or None in full or scored == full


def run_setup_problems(r):
    """Reasons a run is not a record run: where it ran and what it was scored on (overridable)."""
    soft = []
    if r["hardware"] is None:
        soft.append("hardware unknown: no 'hardware:' line (a log of an older train_gpt.py); "
                    "pass --hardware NAME to state it")
    if gpus(r) is None:
        soft.append("GPU count unknown: no 'hardware:' or 'world_size:' line")
    elif not on_record_gpus(r):
        where = hardware_label(r) if r["gpu_count"] is not None else f"world_size {gpus(r)}"
        soft.append(f"ran on {where}: a record runs on {RECORD_GPUS} GPUs")
    if r["val_docs"] is None:
        soft.append("validation doc count unknown: no val_docs on the 'val_tokens:' line "
                    "(a log of an older train_gpt.py)")
    elif r["val_docs"] != FULL_VAL_DOCS:
        soft.append(f"evaluated on {r['val_docs']:,} val docs, not the full {FULL_VAL_DOCS:,}-doc validation set")
    if not ttt_scored_val_set(r):
        soft.append(f"quantized_ttt_phased scored val_tokens:{r['ttt_val_tokens']} val_bytes:{r['ttt_val_bytes']}, "
                    f"the validation set has val_tokens:{r['val_tokens']} val_bytes:{r['val_bytes']}")
    return soft


# ---- statistics: Student t without scipy ----
def _beta_cf(a, b, x):
    """Continued fraction of the incomplete beta function (modified Lentz evaluation)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        even = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        for coef in (even, odd):
            d = 1.0 + coef * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + coef / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return f


def betainc(a, b, x):
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_cf(a, b, x) / a
    return 1.0 - front * _beta_cf(b, a, 1.0 - x) / b


def t_sf(t, dof):
    """P(T > t) for Student's t with dof degrees of freedom."""
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * betainc(dof / 2.0, 0.5, dof / (dof + t * t))
    return tail if t >= 0 else 1.0 - tail


def t_cdf(t, dof):
    return 1.0 - t_sf(t, dof)


def stats(records, baseline_bpb):
    loss = np.array([r["ttt"][0] for r in records])
    bpb = np.array([r["ttt"][1] for r in records])
    n = len(records)
    s = dict(n=n, loss_mean=loss.mean(), bpb_mean=bpb.mean(), loss_std_pop=loss.std(), bpb_std_pop=bpb.std(),
             loss_std_sample=loss.std(ddof=1) if n > 1 else None, bpb_std_sample=bpb.std(ddof=1) if n > 1 else None)
    s["nats_per_bpb"] = ratio = float(np.mean(loss / bpb))   # = ln2 * bytes / tokens of the val set
    s["baseline_bpb"], s["baseline_nats"] = baseline_bpb, baseline_bpb * ratio
    s["threshold_bpb"] = NAT_THRESHOLD / ratio
    s["delta_bpb"], s["delta_nats"] = s["bpb_mean"] - baseline_bpb, s["loss_mean"] - s["baseline_nats"]
    s["t"] = s["dof"] = s["p"] = None
    if n > 1:   # H0: mean val_loss >= baseline - 0.005 nats; H1: it is below
        diff, se = s["baseline_nats"] - NAT_THRESHOLD - s["loss_mean"], s["loss_std_sample"] / math.sqrt(n)
        s["t"] = diff / se if se > 0 else (math.copysign(math.inf, diff) if diff else 0.0)
        s["dof"], s["p"] = n - 1, t_sf(s["t"], n - 1)
    return s


# ---- outputs ----
def record_status_md(records, non_record):
    """The first lines of results.md: why this is not a record, or which record checks passed."""
    if non_record:
        return ["**Not a record** (written with --allow-non-record):", *[f"- {why}" for why in non_record], ""]
    hardware = ", ".join(sorted({hardware_label(r) for r in records}))
    return [f"**Record run**: {hardware}, full {FULL_VAL_DOCS:,}-doc validation set, train and eval within "
            f"{TIME_CAP_S:.0f} s, artifact within {SIZE_CAP:,} bytes.", ""]


def results_md(records, s, non_record=()):
    f8 = lambda v: "n/a" if v is None else f"{v:.8f}"
    out = record_status_md(records, non_record)
    out += ["| Seed | Steps | Pre-quant BPB | Quantized BPB | **Post-TTT BPB** | Post-TTT val_loss | Artifact bytes "
            "| Train s | Eval s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        pre, qu = (r["pre"] or (None, None))[1], (r["quant"] or (None, None))[1]
        out.append(f"| {r['seed']} | {r['steps']:,} | {f8(pre)} | {f8(qu)} | **{r['ttt'][1]:.8f}** | {r['ttt'][0]:.8f} "
                   f"| {r['artifact_bytes']:,} | {r['train_time_s']:.3f} | {r['eval_time_s'] or float('nan'):.1f} |")
    col = lambda key, i: [r[key][i] for r in records if r[key]]
    mean = lambda v: float(np.mean(v)) if v else None
    std = lambda v, dd: float(np.std(v, ddof=dd)) if len(v) > dd else None
    out.append(f"| **Mean** | {np.mean([r['steps'] for r in records]):,.0f} | {f8(mean(col('pre', 1)))} "
               f"| {f8(mean(col('quant', 1)))} | **{s['bpb_mean']:.8f}** | {s['loss_mean']:.8f} "
               f"| {np.mean([r['artifact_bytes'] for r in records]):,.0f} "
               f"| {np.mean([r['train_time_s'] for r in records]):.3f} "
               f"| {np.mean([r['eval_time_s'] or np.nan for r in records]):.1f} |")
    for label, dd in (("Std (population, ddof=0)", 0), ("Std (sample, ddof=1)", 1)):
        out.append(f"| {label} | | {f8(std(col('pre', 1), dd))} | {f8(std(col('quant', 1), dd))} "
                   f"| {f8(std(col('ttt', 1), dd))} | {f8(std(col('ttt', 0), dd))} | | | |")
    out += ["", "| Seed | Model bytes | Code bytes | Compressor | Transform | Torch | Hardware | World size "
            "| Val docs | Peak MiB | Eval wall s | Log |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, spec="": "n/a" if v is None else format(v, spec)
    for r in records:
        out.append(f"| {r['seed']} | {fmt(r['model_bytes'], ',')} | {fmt(r['code_bytes'], ',')} | {fmt(r['compressor'])} "
                   f"| {fmt(r['transform_text'])} | {fmt(r['torch_version'])} | {hardware_label(r)} "
                   f"| {fmt(r['world_size'])} | {fmt(r['val_docs'], ',')} | {fmt(r['peak_mib'], ',')} "
                   f"| {fmt(r['eval_wall_s'], '.1f')} | {Path(r['path']).name} |")
    out += ["", f"## Significance vs baseline {s['baseline_bpb']:.5f} BPB", "",
            f"- nats per BPB (mean post-TTT val_loss / val_bpb): {s['nats_per_bpb']:.6f}; "
            f"baseline = {s['baseline_nats']:.6f} nats",
            f"- threshold {NAT_THRESHOLD} nats = {s['threshold_bpb']:.6f} BPB: need mean val_loss < "
            f"{s['baseline_nats'] - NAT_THRESHOLD:.6f} (val_bpb < {s['baseline_bpb'] - s['threshold_bpb']:.6f})",
            f"- delta vs baseline: {s['delta_bpb']:+.6f} BPB, {s['delta_nats']:+.6f} nats"]
    if s["t"] is None:
        out.append("- n = 1 seed: no t-test possible (needs at least 2 seeds; records use 3)")
    else:
        verdict = "yes" if s["p"] < 0.01 else "no"
        out.append(f"- one-sided one-sample t-test (H0: mean val_loss >= baseline - {NAT_THRESHOLD} nats): "
                   f"t = {s['t']:.4f}, dof = {s['dof']}, p = {s['p']:.3g}; significant at p < 0.01: {verdict}")
    return "\n".join(out) + "\n"


def common(values):
    """The value every seed shares, else None (mixed or unknown)."""
    values = set(values)
    return values.pop() if len(values) == 1 else None


def submission(records, s, args, non_record=()):
    mean = lambda key: float(np.mean([r[key] for r in records if r[key] is not None] or [np.nan]))
    torch = sorted({r["torch_version"] for r in records if r["torch_version"]})
    r8 = lambda v: None if v is None else round(float(v), 8)
    return {
        "author": args.author, "github_id": args.github_id, "name": args.name, "blurb": args.blurb,
        "date": datetime.date.today().isoformat(), "track": "non_record_16mb" if non_record else "10min_16mb",
        "record": not non_record, "non_record_reasons": list(non_record),
        "val_loss": r8(s["loss_mean"]), "val_bpb": r8(s["bpb_mean"]),
        "val_bpb_std": r8(s["bpb_std_pop"]), "val_loss_std": r8(s["loss_std_pop"]),
        "seeds": [r["seed"] for r in records],
        "seed_results": {str(r["seed"]): {"val_loss": r["ttt"][0], "val_bpb": r["ttt"][1],
                                          "artifact_bytes": r["artifact_bytes"], "steps": r["steps"],
                                          "train_time_s": round(r["train_time_s"], 3),
                                          "eval_time_s": r["eval_time_s"], "hardware": hardware_label(r),
                                          "gpu_count": gpus(r), "val_docs": r["val_docs"]} for r in records},
        "artifact_bytes_mean": round(mean("artifact_bytes")),
        "artifact_bytes_max": max(r["artifact_bytes"] for r in records),
        "train_time_s_mean": round(mean("train_time_s"), 3), "eval_time_s_mean": round(mean("eval_time_s"), 1),
        "hardware": ", ".join(sorted({hardware_label(r) for r in records})), "gpu_count": common(map(gpus, records)),
        "val_docs": common(r["val_docs"] for r in records), "pytorch_version": ", ".join(torch) or None,
        "comparison_baseline_bpb": s["baseline_bpb"], "delta_vs_leaderboard_bpb": r8(s["delta_bpb"]),
        "delta_vs_leaderboard_nats": r8(s["delta_nats"]), "p_value": s["p"],
        "reproducibility_notes": (
            f"val_bpb_std and val_loss_std are population std (ddof=0) over {s['n']} seed(s); sample std (ddof=1): "
            + (f"val_bpb {s['bpb_std_sample']:.8f}, val_loss {s['loss_std_sample']:.8f}." if s["n"] > 1 else "n/a.")
            + " p_value: one-sided one-sample t-test that mean post-TTT val_loss is below the baseline by at least "
            f"{NAT_THRESHOLD} nats/token (baseline BPB converted with the logs' mean val_loss/val_bpb ratio "
            f"{s['nats_per_bpb']:.6f}). train_time_s = stopping_early train_time (else the last step line's); "
            "eval_time_s = total_eval_time (phased-TTT scoring loop; compile warm-up excluded)."),
        "compliance": {"train_under_600s": all(r["train_time_s"] <= TIME_CAP_S for r in records),
                       "eval_under_600s": all(r["eval_time_s"] is not None and r["eval_time_s"] <= TIME_CAP_S
                                              for r in records),
                       "artifact_under_16mb": all(r["artifact_bytes"] <= SIZE_CAP for r in records),
                       "eight_gpus": all(map(on_record_gpus, records)),
                       "full_val_set": all(r["val_docs"] == FULL_VAL_DOCS for r in records),
                       "ttt_scored_val_set": all(map(ttt_scored_val_set, records)),
                       "score_first_ttt": True, "no_pre_quant_ttt": True, "three_seeds": len(records) >= 3},
    }


def plot(records, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--plot: matplotlib is not installed, so {path} was not written (pip install matplotlib); "
              "results.md and submission.json were.")
        return False
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in records:
        if not r["curve"]:
            continue
        steps, secs, losses = (np.array(v) for v in zip(*r["curve"]))
        a1.plot(secs, losses, label=f"seed {r['seed']}")
        if r["val_curve"]:   # val lines carry no time: interpolate it from the train lines' step -> time
            vs, vb = (np.array(v) for v in zip(*r["val_curve"]))
            a2.plot(np.interp(vs, steps, secs), vb, marker="o", label=f"seed {r['seed']}")
    a1.set(xlabel="train time (s)", ylabel="train loss", title="train loss")
    a2.set(xlabel="train time (s)", ylabel="val_bpb", title="in-training val_bpb")
    for a in (a1, a2):
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("logs", nargs="+")
    ap.add_argument("--baseline-bpb", type=float, default=DEFAULT_BASELINE_BPB)
    ap.add_argument("--out", default=".")
    ap.add_argument("--allow-non-record", action="store_true",
                    help="write runs that are not a record (hardware, val set, caps) anyway, labelled as a non-record")
    ap.add_argument("--plot", action="store_true")
    for flag in ("name", "author", "github-id", "blurb"):
        ap.add_argument(f"--{flag}", default="")
    ap.add_argument("--hardware", default=None,
                    help="hardware of logs without a 'hardware:' line (older train_gpt.py), e.g. '8xH100 80GB SXM'")
    args = ap.parse_args(argv)
    records, refused, non_record, seen = [], [], [], {}
    for path in args.logs:
        try:
            r = parse_log(path)
        except OSError as e:
            refused.append(f"{path}: cannot read ({e.strerror})")
            continue
        if r["hardware"] is None and args.hardware:
            r["hardware"] = args.hardware  # the log's own hardware line always wins
        fatal, soft = problems(r)
        if r["seed"] in seen:
            fatal.append(f"seed {r['seed']} already given by {seen[r['seed']]}")
        blocking = soft if not args.allow_non_record else []
        if fatal or blocking:
            hint = "" if fatal else " (--allow-non-record writes it as a non-record)"
            refused += [f"{path}: {why}" for why in fatal] + [f"{path}: {why}{hint}" for why in blocking]
            continue
        seen[r["seed"]] = path
        records.append(r)
        non_record += [f"seed {r['seed']} ({Path(path).name}): {why}" for why in soft]
    if refused:
        for line in refused:
            print(f"record.py: refusing {line}", file=sys.stderr)
        return 2
    s = stats(records, args.baseline_bpb)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = results_md(records, s, non_record)
    (out / "results.md").write_text(md)
    (out / "submission.json").write_text(json.dumps(submission(records, s, args, non_record), indent=2) + "\n")
    print(md)
    print(f"wrote {out / 'results.md'} and {out / 'submission.json'}")
    if args.plot and plot(records, out / "curves.png"):
        print(f"wrote {out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
