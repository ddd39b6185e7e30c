"""GPU benchmark of the record stack: training throughput/MFU/memory, attention backends, optional end-to-end run.

    python3 tools/bench.py                # throughput + attention backends, appended to docs/BENCHMARKS.md
    python3 tools/bench.py --e2e-docs FILE # + prepare FILE (500 val docs), train for --e2e-seconds, quantize, TTT-eval
    python3 tools/bench.py --sections kernels   # fused MLP / CE kernels: equivalence, timing, training and TTT on vs off
    python3 tools/bench.py --sections loop      # the trainer's step (loader, optimizer, EMA, sync) against its kernel time

Prints a table and appends it (date, GPU, torch, world size, git commit) to docs/BENCHMARKS.md.
BENCH_BACKENDS=fa4,flex limits the training rows to those attention backends (default: every importable one);
BENCH_TTT_MODES=eager,compiled,whole,graphs picks the TTT loop modes (whole and graphs: bit-identity checked); BENCH_COMPILE_MODES=model,blocks,model_cdt,model_uncapped and BENCH_MICRO=49152,98304 widen the training rows (default: model, one GPU's
share of the record step); BENCH_PROFILE_TOP=40 lists more kernels in the profile section (BENCH_DEPTHS=4 profiles only depth 4); BENCH_FLEX_VARIANTS=0 skips the flex kernel-option rows of the attention section (max-autotune alone takes ~100 s).
"""
import argparse, datetime, functools, json, math, os, re, subprocess, sys, tempfile, time

import numpy as np
import torch
import torch._inductor.config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root


def cuda_time_ms(fn, iters=10, warmup=3, per=1):
    """Median ms of fn over `iters` timings, each of `per` back-to-back calls (per > 1: kernel time without launch
    latency, for calls that keep the GPU busy)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        for _ in range(per):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / per)
    return float(np.median(times))


def bf16_peak_tflops():
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * 8192**3 / cuda_time_ms(lambda: a @ b, iters=20) / 1e9


def synthetic_docs(n_tokens, vocab, mean_doc=700, seed=0):
    """Random tokens with BOS at document starts; doc lengths ~ exponential like web text."""
    rng = np.random.default_rng(seed)
    toks = rng.integers(8, vocab, n_tokens + 1)
    pos = 0
    while pos < n_tokens:
        toks[pos] = 1
        pos += max(2, int(rng.exponential(mean_doc)))
    return torch.from_numpy(toks.astype(np.int64))


def model_flops_per_token(tg, h, depth, cu, T):
    """Training FLOPs per token (3x forward): matmuls of every virtual layer, the tied head, causal attention."""
    enc, dec = tg.layer_plan(h, depth)
    d, kvd, hid = h.model_dim, h.model_dim // h.num_heads * h.num_kv_heads, int(h.mlp_mult * h.model_dim)
    per_layer = 2 * (2 * d * d + 2 * kvd * d + 2 * hid * d)
    seg = torch.diff(torch.unique_consecutive(cu)).double()
    attn = 2 * 2 * d * float((seg * (seg + 1) / 2).sum()) / T  # QK^T and AV over causal pairs
    return 3 * ((per_layer + attn) * (len(enc) + len(dec)) + 2 * d * h.vocab_size)


def one_gpu_h(tg, **over):
    """The run's config (env) with one GPU's share of the 8-GPU step as one micro-batch."""
    full = tg.Hyperparameters.from_env()
    return tg.Hyperparameters.from_env(**{"grad_accum_steps": 1, "train_batch_tokens": full.train_batch_tokens // 8, **over})


COMPILE_MODES = {  # BENCH_COMPILE_MODES: how the training step is compiled
    "blocks": {"compile_model": False},  # each block function its own graph, Python glue between them (COMPILE_MODEL=0)
    "model": {"compile_model": True},  # the whole forward+backward one graph per depth (the default)
    "model_cdt": {"compile_model": True, "inductor": {"coordinate_descent_tuning": True}},  # Inductor tunes its kernels
    # the cap on a fused kernel's buffers (FUSION_MAX_BUFFERS, 16 in "model"): none, or a looser one
    "model_uncapped": {"compile_model": True, "fusion_max_buffers": 0},
    "model_io24": {"compile_model": True, "fusion_max_buffers": 24},
    # reductions autotuned instead of given one heuristic config (for a 512-wide inner reduction over many rows: 2 rows
    # per program, one warp; at depth 4 the x0-gradient kernel holds 20+ inputs in that one warp's registers)
    "model_atpw": {"compile_model": True, "inductor": {"max_autotune_pointwise": True}},
    # every reduction looped over its row in blocks instead of the whole row held in registers at once
    "model_nopr": {"compile_model": True, "inductor": {"triton.persistent_reductions": False}},
    # the partitioner recomputes cheap ops in the backward instead of saving them, down to this share of the saved bytes
    "model_mem": {"compile_model": True, "activation_memory_budget": 0.8},
    "model_fused_mlp": {"compile_model": True, "fused_mlp": True},  # FUSED_MLP=1 inside the whole graph
}


def accumulated_grads(tg, model, fwd, batches):
    """Gradients of the micro-steps accumulated as a training step does, taken from a second pass (the first compiles:
    its seconds are returned), then cleared."""
    first_s = 0.0
    for rep in range(2):
        t0 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        for x, y, cu in batches:
            with tg.autocast(x.device):
                loss = model(x[None], y[None], fwd, cu)
            loss.backward()
        torch.cuda.synchronize()
        first_s = first_s or time.perf_counter() - t0
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads, first_s


def env_list(key, default):
    return os.environ[key].split(",") if os.environ.get(key) else default


def bench_training(tg, steps, peak):
    """Compiled training step (forward, backward, optimizer) per attention backend, compile mode (BENCH_COMPILE_MODES),
    micro-batch (BENCH_MICRO, default one GPU's share of the record step) and recurrence depth (BENCH_DEPTHS). host ms:
    the Python time to issue one step without synchronizing; near the step time, the step is launch-bound."""
    rows, ref_grads = [], {}
    backends = env_list("BENCH_BACKENDS", [b for b, ok in (("fa3", tg._FA3), ("fa4", tg._FA4), ("flex", True),
                                                           ("varlen", tg._VARLEN)) if ok])
    for backend in backends:
        for mode in env_list("BENCH_COMPILE_MODES", ["model"]):
            for micro in env_list("BENCH_MICRO", [""]):
                torch._dynamo.reset()  # each backend's cu type and each mode: start from empty compile caches
                try:
                    rows += bench_training_mode(tg, steps, peak, backend, mode, micro, ref_grads)
                except Exception as e:  # one mode failing (e.g. out of memory) leaves the others' rows
                    print(f"bench_training {backend} {mode} {micro}: {type(e).__name__}: {e}", flush=True)
                torch.cuda.empty_cache()
    return rows


def bench_training_mode(tg, steps, peak, backend, mode, micro, ref_grads):
    over = {"train_batch_tokens": int(micro)} if micro else {}
    over.update(COMPILE_MODES[mode])
    with torch._inductor.config.patch(over.pop("inductor", {})):
        return bench_training_run(tg, steps, peak, backend, mode, one_gpu_h(tg, attn_backend=backend, **over), ref_grads)


def bench_training_run(tg, steps, peak, backend, mode, h, ref_grads):
    dev, rows = torch.device("cuda"), []
    torch.manual_seed(0)
    model, fns = trained_looking_model(tg, h, dev), tg.compiled_block_fns(h)
    opt = tg.Optimizers(h, model)
    T = h.micro_batch_tokens
    toks = [synthetic_docs(T, h.vocab_size, seed=s) for s in (0, 1)]
    cu_of = lambda t: tg.cu_seqlens_for(t[:-1].numpy(), h.train_seq_len, h.cu_bucket).cuda()
    batches = [(t[:-1].cuda(), t[1:].cuda(), cu_of(t)) for t in toks]
    x, y, cu = batches[0]
    init = {k: v.clone() for k, v in model.state_dict().items()}
    for depth in [int(d) for d in env_list("BENCH_DEPTHS", sorted({d for _, d in h.depth_schedule} | {1}))]:
        fwd = tg.Fwd(depth, fns)
        model.load_state_dict(init)
        grads, compile_s = accumulated_grads(tg, model, fwd, batches)  # no step yet: same weights in every mode
        grad_err = max(rel_err(a, b) for a, b in zip(grads, ref_grads.setdefault((backend, T, depth), grads)))

        def step():
            with tg.autocast(dev):
                loss = model(x[None], y[None], fwd, cu)
            loss.backward()
            opt.step(0, 0.0)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        ms = cuda_time_ms(step, iters=steps)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            step()
        host_ms = (time.perf_counter() - t0) * 1000 / 3  # a full launch queue makes the host wait: an upper bound
        torch.cuda.synchronize()
        fpt = model_flops_per_token(tg, h, depth, cu, T)
        tps = T / ms * 1000
        rows.append(dict(attn=backend, mode=mode, micro=T, depth=depth, step_ms=ms, host_ms=host_ms, tok_s=tps,
                         grad_err=grad_err, flops_tok=fpt, mfu=fpt * tps / (peak * 1e12),
                         mem_gib=torch.cuda.max_memory_allocated() / 2**30, compile_s=compile_s))
        print(rows[-1], flush=True)
    return rows


def kept_for_backward(gm):
    """{(producing op, shape, dtype): bytes} of what a partitioned forward graph returns after the loss: the tensors
    it keeps for the backward."""
    kept = {}
    for a in [n for n in gm.graph.nodes if n.op == "output"][0].args[0][1:]:
        v = a.meta.get("val")
        if isinstance(v, torch.Tensor):  # (a symbolic size, e.g. FA4's cu_seqlens length, by its name and hint)
            shape = tuple(d if isinstance(d, int) else str(d) for d in v.shape)
            key = (getattr(a.target, "__name__", str(a.target)), shape, str(v.dtype).split(".")[-1])
            numel = math.prod(d if isinstance(d, int) else d.node.hint for d in v.shape)
            kept[key] = kept.get(key, 0) + numel * v.element_size()
    return kept


def saved_activations(tg):
    """What the whole-model training graph keeps for its backward, per compile mode (BENCH_COMPILE_MODES) and depth
    (BENCH_DEPTHS, default 4), at one GPU's micro-batch: traced only (the partition Inductor's min-cut partitioner
    makes, on fake tensors; nothing runs), so a breakdown costs seconds of tracing, no kernels."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._inductor.decomposition import select_decomp_table

    class Traced(Exception):
        pass

    def record(gm, _):
        raise Traced(kept_for_backward(gm))

    backend = aot_autograd(fw_compiler=record, decompositions=select_decomp_table(),
                           partition_fn=functools.partial(min_cut_rematerialization_partition, compiler="inductor"))
    dev, lines = torch.device("cuda" if torch.cuda.is_available() else "cpu"), []
    for mode in env_list("BENCH_COMPILE_MODES", ["model", "model_mem"]):
        over = dict(COMPILE_MODES[mode])
        over.pop("inductor", None)
        h = one_gpu_h(tg, **over)
        model = tg.build_model(h, dev)
        T = h.micro_batch_tokens
        toks = synthetic_docs(T, h.vocab_size).to(dev)
        cu = tg.cu_seqlens_for(toks[:-1].cpu().numpy(), h.train_seq_len, h.cu_bucket).to(dev)
        for depth in [int(d) for d in env_list("BENCH_DEPTHS", ["4"])]:
            torch._dynamo.reset()
            fn = tg.within_memory_budget(torch.compile(tg.GPT.losses, backend=backend, fullgraph=True, dynamic=False), h)
            try:
                with tg.autocast(dev):
                    fn(model, *model.attn_args(toks[None, :-1], cu), toks[None, 1:], tg.Fwd(depth, tg.EAGER))
                continue
            except Exception as e:  # dynamo wraps the backend's exception
                found = next((x.args[0] for x in (e, e.__cause__, e.__context__) if isinstance(x, Traced)), None)
                if found is None:
                    raise
            layers = sum(map(len, tg.layer_plan(h, depth)))
            total = sum(found.values())
            lines += ["", f"Saved for backward, {mode}, depth {depth} ({layers} virtual layers), {T:,} tokens: "
                      f"{total / 2**30:.2f} GiB = {total / T / layers:,.0f} bytes per token per layer", "",
                      "| producing op | shape | dtype | GiB | bytes per token per layer |", "|---|---|---|---|---|"]
            lines += [f"| {op} | {['T' if d == T else d for d in shape]} | {dt} | {b / 2**30:.2f} | {b / T / layers:,.0f} |"
                      for (op, shape, dt), b in sorted(found.items(), key=lambda kv: -kv[1])[:12]]
            print("\n".join(lines[-16:]), flush=True)
        del model
    return lines


KERNEL_CATEGORIES = (  # first match wins; names are matched lower-cased
    ("attention", ("flex", "flash", "fmha", "attention", "triton_tem")),
    ("fused MLP/CE (ours)", ("_mlp_mm", "_ce_fwd", "_ce_bwd", "quack")),  # (quack's GEMMs carry the MLP's activation)
    ("matmul", ("gemm", "wgmma", "nvjet", "cutlass", "xmma", "matmul", "cublas")),
    ("communication", ("nccl",)),
    ("memcpy/memset", ("memcpy", "memset")),
    ("elementwise/norm/reduction", ("triton_", "elementwise", "reduce", "vectorized", "unrolled", "cat", "index")),
)


def kernel_category(name):
    n = name.lower()
    return next((cat for cat, keys in KERNEL_CATEGORIES if any(k in n for k in keys)), "other")


def add_kernel_times(cats, top, part, events, steps):
    """Adds the profiler's CUDA kernel events (per-step ms) into cats {category: ms} and top {(part, full kernel name):
    (ms, calls)}. By full name: Inductor's kernel names share long prefixes, and one cut to a prefix sums different
    kernels (a depth-4 "kernel" of 8.66 ms was a sum of that kind)."""
    for e in events:
        us = e.device_time_total
        if us <= 0 or not str(e.device_type).endswith("CUDA"):  # kernels only: CPU ops would count them twice
            continue
        cat = "optimizer (all kernels)" if part == "optimizer" else kernel_category(e.key)
        cats[cat] = cats.get(cat, 0.0) + us / 1000 / steps
        ms, calls = top.get((part, e.key), (0.0, 0))
        top[(part, e.key)] = (ms + us / 1000 / steps, calls + e.count // steps)


STALL_US = 10.0  # a longer gap between two kernels: the GPU waited for the host or a sync, not for a launch


def kernel_gaps(kernels, steps):
    """GPU idle between consecutive kernels (kernels: (start us, duration us, name), any order), per step: ms in
    gaps under STALL_US (the launch floor, ~2-4 us a kernel on an H200, which CUDA graphs would shrink), ms in longer
    gaps (the host fell behind, e.g. a launch with a long Python preamble, or a sync), and {kernel after such a gap:
    ms}, which says where the host fell behind."""
    floor = stall = 0.0
    after, end = {}, None
    for ts, dur, name in sorted(kernels):
        gap = 0.0 if end is None else ts - end
        if gap >= STALL_US:
            stall += gap
            after[name] = after.get(name, 0.0) + gap / 1000 / steps
        elif gap > 0:
            floor += gap
        end = ts + dur if end is None else max(end, ts + dur)
    return floor / 1000 / steps, stall / 1000 / steps, after


def gap_summary(gaps):
    """Lines for the profile: per part ({part: kernel_gaps(...)}), ms per step in the launch floor and in waits for
    the host, and the kernels after the longest waits."""
    lines = ["", "GPU gaps between kernels, ms per step of the profiled steps (the profiler adds some):", ""]
    for part, (floor, stall, after) in gaps.items():
        top = ", ".join(f"`{k[:60]}` {ms:.2f}" for k, ms in sorted(after.items(), key=lambda kv: -kv[1])[:3])
        lines.append(f"- {part}: {floor:.2f} in gaps under {STALL_US:.0f} us (launch floor), {stall:.2f} in longer ones "
                     f"(the GPU waited for the host or a sync){'; the longest before ' + top if top else ''}")
    return lines


def profiled(fn, steps, activities=None):
    """key_averages and (start us, duration us, name) of every kernel, copy and memset over `steps` calls of fn, after
    one unrecorded warm-up call under the profiler: in the first profiled step the GPU waits for the host (in a
    2026-12-04 trace of a 45 ms depth-1 micro-step on an H200, 5.5-6.0 ms of gaps in its forward against 0.6 ms in the
    steps after it), which would otherwise be counted as the step's own."""
    from torch.profiler import ProfilerActivity, profile, schedule

    out = {}

    def collect(prof):
        with tempfile.TemporaryDirectory() as d:
            prof.export_chrome_trace(os.path.join(d, "trace.json"))
            events = json.load(open(os.path.join(d, "trace.json")))["traceEvents"]
        out["kernels"] = [(e["ts"], e["dur"], e["name"]) for e in events
                          if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
        out["averages"] = prof.key_averages()

    with profile(activities=activities or [ProfilerActivity.CUDA], on_trace_ready=collect,
                 schedule=schedule(wait=0, warmup=1, active=steps)) as prof:
        for i in range(steps + 1):
            fn()
            if i == steps and torch.cuda.is_available():
                torch.cuda.synchronize()
            prof.step()
    return out["averages"], out["kernels"]


def profile_step(tg, steps, depths=(1, 4)):
    """Per-op profile of one GPU's training step (98,304 tokens, compiled, fused CE on): GPU kernel time by category
    for forward+backward and for the optimizer step (profiled apart, so the split is exact), and the idle share
    (step wall time minus kernel time: launch gaps, host work such as the block mask, syncs); kernel_gaps splits the
    profiled steps' gaps into the launch floor and the waits for the host."""
    dev = torch.device("cuda")
    h = one_gpu_h(tg)
    model, fns = trained_looking_model(tg, h, dev), tg.compiled_block_fns(h)
    opt = tg.Optimizers(h, model)
    T = h.micro_batch_tokens
    host = synthetic_docs(T, h.vocab_size)
    toks = host.cuda()
    lines = []
    for depth in depths:
        fwd = tg.Fwd(depth, fns)

        def fwd_bwd():  # cu built on the host per step as the loader does, and copied without a device sync
            cu = tg.cu_seqlens_for(host[:-1].numpy(), h.train_seq_len, h.cu_bucket).pin_memory()
            cu = cu.to(dev, non_blocking=True)
            with tg.autocast(dev):
                model(toks[None, :-1], toks[None, 1:], fwd, cu).backward()

        def opt_step():
            for p, g in zip(model.parameters(), grads):  # the step clears .grad: hand it the saved ones
                p.grad = g
            opt.step(0, 0.0)

        for _ in range(3):
            fwd_bwd()
            opt.step(0, 0.0)
        fwd_bwd()
        grads = [p.grad for p in model.parameters()]
        torch.cuda.synchronize()
        wall = cuda_time_ms(lambda: (fwd_bwd(), opt.step(0, 0.0)), iters=steps, warmup=1)
        cats, top, gaps = {}, {}, {}
        for part, fn in (("fwd+bwd", lambda: (model.zero_grad(set_to_none=True), fwd_bwd())), ("optimizer", opt_step)):
            torch.cuda.synchronize()
            averages, kernels = profiled(fn, steps)
            add_kernel_times(cats, top, part, averages, steps)
            gaps[part] = kernel_gaps(kernels, steps)
        busy = sum(cats.values())
        cats["idle (launch gaps, host work, syncs)"] = max(0.0, wall - busy)
        first = len(lines)
        lines += ["", f"Per-op profile, depth {depth}: one GPU's compiled training step ({T:,} tokens, 1 micro-batch), "
                  f"{wall:.1f} ms wall ({T / wall * 1000:,.0f} tok/s)", "",
                  "| category | ms per step | share |", "|---|---|---|"]
        lines += [f"| {c} | {ms:.2f} | {100 * ms / wall:.1f}% |" for c, ms in sorted(cats.items(), key=lambda kv: -kv[1])]
        lines += gap_summary(gaps)
        lines += ["", "| top kernels (part, name) | calls per step | ms per step |", "|---|---|---|"]
        top_n = int(os.environ.get("BENCH_PROFILE_TOP", "15"))
        lines += [f"| {p}: `{k[:100]}` | {n} | {ms:.2f} |" for (p, k), (ms, n) in sorted(top.items(), key=lambda kv: -kv[1][0])[:top_n]]
        print("\n".join(lines[first:]), flush=True)  # this depth's lines: main prints them all again
    return lines


def profile_loop(tg, steps):
    """The trainer's own step at the run's config (env: TRAIN_BATCH_TOKENS, DATA_DIR, ...): TrainLoader batches, the
    micro-steps, optimizer, EMA update and the per-step sync of the wallclock check, at each of BENCH_DEPTHS (default
    1). Wall ms per step against GPU kernel time and the GPU's gaps: what the step loses outside the kernels, where
    profile_step (fixed batch, no loader, EMA or sync) cannot see it."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    h = tg.Hyperparameters.from_env()
    model, fns = trained_looking_model(tg, h, dev), tg.compiled_block_fns(h)
    opt, ema, loader = tg.Optimizers(h, model), tg.EMA(model, h.ema_decay), tg.TrainLoader(h, dev)
    activities = None if dev.type == "cuda" else [torch.profiler.ProfilerActivity.CPU]
    lines = []
    for depth in [int(d) for d in env_list("BENCH_DEPTHS", ["1"])]:
        fwd = tg.Fwd(depth, fns)

        def step():
            tg.training_step(h, model, opt, loader, dev, 0, 0.0, fwd)
            ema.update()
            tg.sync(dev)

        for _ in range(3):
            step()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        wall = 1000 * (time.perf_counter() - t0) / steps
        averages, kernels = profiled(step, steps, activities)
        cats, top = {}, {}
        add_kernel_times(cats, top, "step", averages, steps)
        busy, tokens = sum(cats.values()), h.micro_batch_tokens * h.grad_accum_steps
        first = len(lines)
        lines += ["", f"Training-loop profile, depth {depth}: {h.grad_accum_steps} micro-steps of {h.micro_batch_tokens:,} "
                  f"tokens, optimizer, EMA, sync: {wall:.1f} ms per step unprofiled ({tokens / wall * 1000:,.0f} tok/s per "
                  f"GPU), GPU busy {busy:.1f} ms, so {wall - busy:.1f} ms ({100 * (wall - busy) / wall:.1f}%) without a "
                  "kernel running", "", "| category | ms per step |", "|---|---|"]
        lines += [f"| {c} | {ms:.2f} |" for c, ms in sorted(cats.items(), key=lambda kv: -kv[1])]
        lines += gap_summary({"step": kernel_gaps(kernels, steps)})
        print("\n".join(lines[first:]), flush=True)  # this depth's lines: main prints them all again
    return lines


FLEX_VARIANTS = (  # flex_attention kernel options tried against its defaults (torch's own H100 configs)
    ("rows safe + contiguous blocks", {"ROWS_GUARANTEED_SAFE": True, "BLOCKS_ARE_CONTIGUOUS": True}),
    ("TMA", {"USE_TMA": True}),
    ("prescaled QK", {"PRESCALE_QK": True}),
    ("bwd 64x64 4 warps 3 stages", {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64,
                                    "bwd_num_warps": 4, "bwd_num_stages": 3}),
    ("bwd 64x128 8 warps 4 stages", {"bwd_num_stages": 4}),
    ("fwd 128x64", {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64}),
)


def bench_attention():
    """fwd+bwd ms of each packed-document kernel at the training shape, and its output / gradient error against
    flex (the default) on the same inputs."""
    import train_gpt as tg
    from torch.nn.attention.flex_attention import flex_attention
    T, H, KV, D = 98304, 8, 4, 64
    toks = synthetic_docs(T, 8192)
    cu = tg.cu_seqlens_for(toks[:-1].numpy(), 2048).cuda()
    q = torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, T, KV, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    g = torch.randn_like(q)
    rows = {}

    def fwd_bwd(f):
        return lambda: f().backward(g)

    def grads(f):
        out = f()
        return [out.detach()] + list(torch.autograd.grad(out, (q, k, v), g))

    bm = tg.packed_block_mask(cu, T)
    flex = lambda: tg.attend(q, k, v, bm, 2048)
    ref = grads(flex)
    err = lambda f: " / ".join(f"{rel_err(a, b):.1e}" for a, b in zip(grads(f), ref))
    rows["flex_attention + document block mask (doc-packed, default)"] = (cuda_time_ms(fwd_bwd(flex)), "")
    tr = lambda z: z.transpose(1, 2)
    variants = [(n, o, None) for n, o in FLEX_VARIANTS] + [("max-autotune", None, "max-autotune-no-cudagraphs")]
    for name, opts, mode in variants if os.environ.get("BENCH_FLEX_VARIANTS", "1") == "1" else ():
        try:
            f = torch.compile(lambda a, b, c, m, o=opts: flex_attention(a, b, c, block_mask=m, enable_gqa=True,
                                                                          kernel_options=o), dynamic=False, mode=mode)
            call = lambda f=f: tr(f(tr(q), tr(k), tr(v), bm))
            rows[f"flex, {name}"] = (cuda_time_ms(fwd_bwd(call)), err(call))
        except Exception as e:  # an option this torch / GPU refuses: say so, keep going
            print(f"flex {name}: {type(e).__name__}: {str(e)[:300]}")
    for backend, ok in (("fa3", tg._FA3), ("fa4", tg._FA4), ("varlen", tg._VARLEN)):
        if ok:  # cu_seqlens padded as the trainer pads them for this backend (h.cu_bucket: none for FA4)
            bucket = one_gpu_h(tg, attn_backend=backend).cu_bucket
            c = tg.cu_seqlens_for(toks[:-1].numpy(), 2048, bucket).cuda()
            f = lambda b=backend, c=c: tg.attend(q, k, v, c, 2048, b)
            rows[f"{backend} varlen (doc-packed)"] = (cuda_time_ms(fwd_bwd(f)), err(f))
    rows["building the block mask from cu_seqlens (once per forward)"] = (cuda_time_ms(lambda: tg.packed_block_mask(cu, T)), "")
    qd, kd, vd = (t.detach().view(48, 2048, -1, D).requires_grad_() for t in (q, k, v))
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel([be]):
                rows[f"sdpa {name} dense causal 48x2048 (no doc mask; TTT rows)"] = (
                    cuda_time_ms(lambda: tg.attend(qd, kd, vd, None, 2048).float().square().mean().backward()), "")
        except RuntimeError as e:
            print(f"sdpa {name}: {e}")
    return rows


TTT_MODES = {  # BENCH_TTT_MODES: how the TTT loop runs
    "eager": {"ttt_compile": False, "ttt_cuda_graphs": False},
    "compiled": {"ttt_compile": True, "ttt_compile_model": False, "ttt_cuda_graphs": False},  # per-block graphs
    "whole": {"ttt_compile": True, "ttt_compile_model": True, "ttt_cuda_graphs": False},  # the model one graph
    "graphs": {"ttt_compile": True, "ttt_compile_model": True, "ttt_cuda_graphs": True},  # + CUDA graphs (default)
}
TTT_WORK = (("64 docs x 800 tokens", [800] * 64), ("16 docs x 4,000 tokens", [4000] * 16),
            ("1 doc x 20,000 tokens (a long document's serial tail)", [20000]),
            ("16 docs: 1 x 20,000 + 15 x 3,000 (a tail in a full batch)", [20000] + [3000] * 15))


def bench_ttt(tg):
    """Phased-TTT inner loop (score + LoRA step per 48-token chunk) at the eval depth on random weights: row tokens/s
    per GPU and ms per chunk step, per mode (BENCH_TTT_MODES), on 64 short docs (FineWeb-like), 16 long ones (rows at
    the 2,048 window), one long document alone (one live row plus its padding row: latency-bound) and one long
    document among short ones. Modes with the same compile settings share one model and one warm-up, and their
    scores and trained adapters are compared bit for bit (the "same as" column)."""
    dev = torch.device("cuda")
    rows, key = [], None
    for mode in env_list("BENCH_TTT_MODES", list(TTT_MODES)):
        h = tg.Hyperparameters.from_env(**TTT_MODES[mode])
        if key != (h.ttt_compile, h.ttt_compile_model):  # a new compile setting: the last one's model and states go
            key, model, fns, states = (h.ttt_compile, h.ttt_compile_model), None, None, {}
            torch.cuda.empty_cache()
            torch.manual_seed(0)
            model, fns = trained_looking_model(tg, h, dev), tg.ttt_block_fns(h)
            model.requires_grad_(False)
            warm = "-"
            if h.ttt_compile:
                t0, g0 = time.perf_counter(), tg.compiled_graphs()
                tg.ttt_warmup(h, model, fns, dev, lambda msg: None)
                warm = f"{time.perf_counter() - t0:.0f} s, {tg.compiled_graphs() - g0} graphs"
        for name, lengths in TTT_WORK:
            toks = synthetic_docs(sum(lengths), h.vocab_size, mean_doc=10**9).cuda()
            starts = np.cumsum([0] + lengths[:-1])
            toks[torch.from_numpy(starts).cuda()] = tg.BOS_ID
            docs = [tg.Doc(int(s0), n + 1) for s0, n in zip(starts, lengths)]
            gen, keep = torch.Generator(device=dev).manual_seed(0), []
            g0 = tg.compiled_graphs()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            sums = tg.ttt_batch(h, model, fns, toks, torch.ones_like(toks), docs, dev, gen, None, keep)
            torch.cuda.synchronize()
            t = time.perf_counter() - t0
            state = [sums] + [x.detach() for l in keep[1][0] for ab in l if ab is not None for x in ab[:2]]
            same = [m for (m, w), st in states.items() if w == name and all(map(torch.equal, st, state))]
            states[mode, name] = state
            rows.append(dict(mode=mode, work=name, s=t, row_tok_s=sums[3].item() / t, target_tok_s=sums[1].item() / t,
                             chunk_ms=1000 * t / -(-max(lengths) // h.ttt_chunk_size), warm=warm,
                             new_graphs=tg.compiled_graphs() - g0, same=",".join(same) or "-", nll=sums[0].item()))
            print(rows[-1], flush=True)
    return rows


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def trained_looking_model(tg, h, dev):
    """The model every timed section runs, its matrix banks random instead of the zero-initialised output and down
    projections, which would hide attention and MLP and flatter kernel times: on an H200 the same depth-1
    forward+backward took 43.6 ms per 49,152-token micro-step at the initial weights and 46.1 ms after four optimizer
    steps (logs/step_time_breakdown_d1_49k_h200_2026-12-03e.log)."""
    model = tg.build_model(h, dev)
    with torch.no_grad():
        for p in (model.qo_bank, model.kv_bank, model.mlp_up_bank, model.mlp_down_bank):
            p.copy_(torch.randn_like(p) / p.size(-1) ** 0.5)
    return model


def mlp_kernel_configs(tg, x, up, down, g):
    """Each autotune candidate of the MLP matmul kernel alone, forward (x @ up.T -> hid, sign bits) and backward
    (g @ down -> dpre), against cuBLAS's plain matmul and the compiled plain expressions (matmul + LeakyReLU^2; matmul +
    its backward), with the errors against fp32; where importable, quack's two GEMMs (QUACK_MLP) the same way."""
    import torch.nn.functional as F
    from triton.testing import do_bench
    M, d, N = x.size(0), x.size(1), up.size(0)
    tf = lambda ms: f"{2 * M * d * N / ms / 1e9:.0f}"
    hid, signs = tg._mlp_mm(x, up)
    pre = F.linear(x.float(), up.float())
    neg = tg.unpack_signs(signs)
    act_f = torch.compile(lambda x, w: F.leaky_relu(F.linear(x, w), 0.5).square())
    dpre = lambda g, w, p: torch.where(p > 0, 2 * p, 0.5 * p) * (g @ w)
    plain_bwd = torch.compile(dpre)
    pre_b = pre.bfloat16()
    lines = ["", f"MLP matmul kernel ({M:,} x {d} -> {N:,}; TFLOP/s of the matmul alone), per autotune candidate:", "",
             "| config | forward ms | TFLOP/s | backward (dpre) ms | TFLOP/s |", "|---|---|---|---|---|",
             f"| cuBLAS matmul alone (no epilogue) | {(t := do_bench(lambda: F.linear(x, up), return_mode='median')):.3f} | "
             f"{tf(t)} | {(t := do_bench(lambda: g @ down, return_mode='median')):.3f} | {tf(t)} |",
             f"| compiled plain: matmul + LeakyReLU^2 / matmul + its backward | "
             f"{(t := do_bench(lambda: act_f(x, up), return_mode='median')):.3f} | {tf(t)} | "
             f"{(t := do_bench(lambda: plain_bwd(g, down, pre_b), return_mode='median')):.3f} | {tf(t)} |"]
    kern, configs = tg._mlp_mm_kernel, tg._mlp_mm_kernel.configs
    try:
        for c in configs:
            kern.configs, kern.cache = [c], {}
            try:
                tf_ms = do_bench(lambda: tg._mlp_mm(x, up), return_mode="median")
                tb_ms = do_bench(lambda: tg._mlp_mm(g, down.t(), hid, signs), return_mode="median")
                lines.append(f"| {c} | {tf_ms:.3f} | {tf(tf_ms)} | {tb_ms:.3f} | {tf(tb_ms)} |")
            except Exception as e:  # a candidate that does not fit this GPU's shared memory
                lines.append(f"| {c} | failed: {type(e).__name__} | | | |")
            print(lines[-1], flush=True)
    finally:
        kern.configs, kern.cache = configs, {}
    tg._mlp_mm(x, up)  # autotune again over every candidate, for best_config below
    d_k = tg._mlp_mm(g, down.t(), hid, signs)
    ref_d = dpre(g.float(), down.float(), pre)
    ref_hid = F.leaky_relu(pre, 0.5).square()
    miss = neg != (pre < 0)
    lines += ["", f"autotune's choice: {kern.best_config}; hid rel. error {rel_err(hid, ref_hid):.1e}, "
              f"dpre rel. error {rel_err(d_k, ref_d):.1e} (the plain bf16 expression's: "
              f"{rel_err(plain_bwd(g, down, pre_b), ref_d):.1e}); sign mismatches {miss.sum().item()} "
              f"(all at |pre| < 1e-3: {bool((miss <= (pre.abs() < 1e-3)).all())})", ""]
    if tg._QUACK:  # forward: x @ up.T -> pre, hid; backward: g @ down, pre -> dpre, hid again
        act, dact = tg._QUACK
        q_fwd = lambda: act(x, up.t(), activation=tg.QUACK_ACT, tuned=False)
        q_pre, q_hid = q_fwd()
        q_bwd = lambda: dact(g, down, q_pre, activation=tg.QUACK_ACT, tuned=False)
        q_d, q_hid2 = q_bwd()
        t_f, t_b = (do_bench(fn, return_mode="median") for fn in (q_fwd, q_bwd))
        lines += [f"quack's GEMMs (default config): forward {t_f:.3f} ms ({tf(t_f)} TFLOP/s), backward {t_b:.3f} ms "
                  f"({tf(t_b)}); rel. errors: pre {rel_err(q_pre, pre):.1e}, hid {rel_err(q_hid, ref_hid):.1e}, dpre "
                  f"{rel_err(q_d, ref_d):.1e}, the backward's hid {rel_err(q_hid2, ref_hid):.1e}", ""]
    return lines


def bench_kernel_ops(tg):
    """train_gpt.py's fused kernels (FUSED_MLP, FUSED_CE_ENABLED) against the plain expressions on random bf16 data at the
    training shapes (49,152 tokens x 512 -> 2,048; logits 49,152 x 8,192): relative error of outputs and gradients
    against an fp32 (MLP) / fp64 (loss) reference beside the plain bf16 path's own, median fwd+bwd ms eager and
    compiled, peak memory."""
    import torch.nn.functional as F
    from triton.testing import do_bench
    dev, M, d, V, cap = torch.device("cuda"), 49152, 512, 8192, 30.0
    bf16 = lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    min_rows, tg.FUSED_MLP_MIN_ROWS = tg.FUSED_MLP_MIN_ROWS, 0  # the op against the plain expressions at 49,152 rows

    def timed(fn, leaves, g):
        def fwd_bwd():
            with bf16():
                out = fn(*leaves)
            out.backward(g)
            return out

        def fwd():
            with torch.no_grad(), bf16():
                return fn(*leaves)

        for t in leaves:
            t.grad = None
        out = fwd_bwd().detach()
        grads = [t.grad for t in leaves]
        for t in leaves:
            t.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd()
        torch.cuda.synchronize()
        mem = (torch.cuda.max_memory_allocated() - base) / 2**30
        ms = do_bench(fwd_bwd, grad_to_none=leaves, return_mode="median")
        return [out] + grads, ms, do_bench(fwd, return_mode="median"), mem

    def compare(name, make_fn, leaves, g, ref, paths=(("plain", False), ("fused", True))):
        rows = []
        for path, arg in paths:
            for compiled in (False, True):
                torch._dynamo.reset()
                fn = torch.compile(make_fn(arg), dynamic=False, fullgraph=True) if compiled else make_fn(arg)
                vals, ms, ms_fwd, mem = timed(fn, leaves, g)
                rows.append(f"| {name} | {path} | {'compiled' if compiled else 'eager'} | "
                            f"{ms:.3f} | {ms_fwd:.3f} | {mem:.2f} | " + " / ".join(f"{rel_err(v, r):.1e}" for v, r in zip(vals, ref)) + " |")
                print(rows[-1], flush=True)
        return rows

    lines = ["Fused kernels (train_gpt.py KERNELS; errors: output / input grads against the fp32-fp64 reference on the same "
             "bf16 operands):", "", "| op | path | mode | fwd+bwd ms | fwd ms (no grad) | peak extra GiB | rel. errors |",
             "|---|---|---|---|---|---|---|"]
    torch.manual_seed(0)
    a = torch.randn(1, M, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    up = (torch.randn(4 * d, d, device=dev) / d**0.5).requires_grad_()
    down = (torch.randn(d, 4 * d, device=dev) / (4 * d) ** 0.5).requires_grad_()
    g = torch.randn(1, M, d, device=dev, dtype=torch.bfloat16)
    r = [t.detach().bfloat16().float().requires_grad_() for t in (a, up, down)]
    out = F.linear(F.leaky_relu(F.linear(r[0], r[1]), 0.5).square(), r[2])
    out.backward(g.float())
    ref = [out.detach()] + [t.grad for t in r]
    blk = lambda u, w, op: tg.BlockWeights(None, None, None, None, u, w, None, None, None, None, None, None, False, op)
    paths = [("plain", None), ("triton", tg.fused_mlp)] + [("quack", tg.quack_mlp)] * bool(tg._QUACK)
    lines += compare("MLP up+act+down", lambda op: lambda a, u, w: tg.mlp(a, blk(u, w, op), None, None), [a, up, down], g,
                     ref, paths)
    lines += mlp_kernel_configs(tg, a.detach()[0], up.detach().bfloat16(), down.detach().bfloat16(), g[0])
    del r, out, ref
    hidden = torch.randn(1, M, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    emb = (torch.randn(V, d, device=dev) * 0.35).bfloat16().requires_grad_()  # logits ~ N(0, 8^2): some saturate
    tgt = torch.randint(0, V, (1, M), device=dev)
    gl = torch.rand(1, M, device=dev) / M
    z = F.linear(tg.rms(hidden.detach().double()), emb.detach().double()).bfloat16().double().requires_grad_()
    loss = F.cross_entropy(cap * torch.tanh(z[0] / cap), tgt[0], reduction="none")[None]
    loss.backward(gl.double())
    zr = z.detach().bfloat16().requires_grad_()
    lines += ["| op | path | | loss rel. error | d logits rel. error |", "|---|---|---|---|---|"]
    for name, f in (("plain", lambda z: F.cross_entropy(cap * torch.tanh(z[0].float() / cap), tgt[0], reduction="none")),
                    ("fused", lambda z: tg.softcap_ce(z[0], tgt[0], cap)[0])):
        zr.grad = None
        l = f(zr)[None]
        l.backward(gl)
        lines.append(f"| softcap CE on fixed bf16 logits | {name} | | {rel_err(l, loss):.1e} | {rel_err(zr.grad, z.grad):.1e} |")
    del z, zr, loss
    lines += ["", "| op | path | mode | fwd+bwd ms | fwd ms (no grad) | peak extra GiB | rel. errors |", "|---|---|---|---|---|---|---|"]
    with torch.no_grad():
        ref = [F.cross_entropy(tg.softcap_logits(hidden.float(), emb.float(), None, cap)[0], tgt[0], reduction="none")[None]]
    hd = hidden.detach().float().requires_grad_()
    ed = emb.detach().float().requires_grad_()
    l = F.cross_entropy(tg.softcap_logits(hd, ed, None, cap)[0], tgt[0], reduction="none")[None]
    l.backward(gl)
    ref += [hd.grad, ed.grad]
    del hd, ed, l
    lines += compare("head (rms, tied matmul, softcap CE)", lambda fused: lambda h, e: tg.head_losses(h, e, tgt, None, cap, fused),
                     [hidden, emb], gl, ref)
    lines += ["", f"softcap CE best configs: forward {tg._ce_fwd_kernel.best_config}, backward {tg._ce_bwd_kernel.best_config}"]
    tg.FUSED_MLP_MIN_ROWS = min_rows
    return lines


def bench_kernel_training(tg, steps, combos, depth=1):
    """Compiled training steps (one GPU's 98,304 tokens) per FUSED_MLP/FUSED_CE_ENABLED pair ("10" = MLP only): step
    time, peak memory, and the first step's gradients against the plain eager path's (the "00" row's own difference is
    compile's reordering of the bf16 arithmetic: the noise floor)."""
    dev = torch.device("cuda")

    def model_and_grads(compiled, combo):
        h = one_gpu_h(tg, compile=compiled, fused_mlp=combo[0] == "1", fused_ce_enabled=combo[1] == "1")
        torch._dynamo.reset()
        torch.manual_seed(0)
        model, fwd = trained_looking_model(tg, h, dev), tg.Fwd(depth, tg.compiled_block_fns(h))
        with tg.autocast(dev):
            loss = model(toks[None, :-1], toks[None, 1:], fwd, cu)
        loss.backward()
        return h, model, fwd, {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}

    h = one_gpu_h(tg)
    T = h.micro_batch_tokens
    toks = synthetic_docs(T, h.vocab_size).to(dev)
    cu = tg.cu_seqlens_for(toks[:-1].cpu().numpy(), h.train_seq_len, h.cu_bucket).to(dev)
    ref = model_and_grads(False, "00")[3]
    lines = [f"| FUSED_MLP, FUSED_CE_ENABLED | compiled training step, depth {depth} ({T:,} tok) ms | tok/s | peak GiB | first "
             "step (compile) s | grad rel. diff vs plain eager: matrices | worst parameter |", "|---|---|---|---|---|---|---|"]
    for combo in combos:
        t0 = time.perf_counter()
        h, model, fwd, grads = model_and_grads(True, combo)
        compile_s = time.perf_counter() - t0
        diff = {n: rel_err(grads[n], ref[n]) for n in ref if ref[n].norm() > 0}
        worst = max(diff, key=diff.get)
        opt = tg.Optimizers(h, model)

        def step():
            with tg.autocast(dev):
                l = model(toks[None, :-1], toks[None, 1:], fwd, cu)
            l.backward()
            opt.step(0, 0.0)

        step()
        torch.cuda.reset_peak_memory_stats()
        ms = cuda_time_ms(step, iters=steps)
        mats = max(v for n, v in diff.items() if n.endswith("_bank") or n == "tok_emb.weight")
        lines.append(f"| {combo[0]}, {combo[1]} | {ms:.1f} | {T / ms * 1000:,.0f} | {torch.cuda.max_memory_allocated() / 2**30:.1f} | "
                     f"{compile_s:.0f} | {mats:.1e} | {diff[worst]:.1e} ({worst}) |")
        print(lines[-1], flush=True)
        del model, opt, grads
        torch.cuda.empty_cache()
    return lines


def bench_kernel_ttt(tg):
    """The TTT loop (LoRA forward/backward per 48-token chunk, rows and widths changing) on 16 short documents:
    fused eager and fused compiled (ttt_block_fns, symbolic rows) against plain eager. Only the CE kernels run there:
    mlp() keeps calls with adapters on the plain path."""
    dev = torch.device("cuda")
    lines, plain = None, None
    for name, fused, compiled in (("plain eager", False, False), ("fused eager", True, False), ("fused compiled (dynamic rows)", True, True)):
        h = tg.Hyperparameters.from_env(fused_mlp=fused, fused_ce_enabled=fused, ttt_compile=compiled)
        torch._dynamo.reset()
        torch.manual_seed(0)
        m = trained_looking_model(tg, h, dev)
        m.requires_grad_(False)
        if lines is None:
            rng = np.random.default_rng(0)
            lens = rng.integers(60, 700, 16)
            toks = synthetic_docs(int(lens.sum()) + 1, h.vocab_size, mean_doc=10**9).to(dev)
            starts = np.cumsum([0, *lens[:-1]])
            toks[torch.from_numpy(starts).to(dev)] = tg.BOS_ID
            docs = [tg.Doc(int(s), int(n)) for s, n in zip(starts, lens)]
            lines = [f"| TTT loop (depth {h.eval_loop_depth}, 16 docs of 60-700 tokens) | s (with compile) | nll/token | "
                     "rel. diff vs plain eager |", "|---|---|---|---|"]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        sums = tg.ttt_batch(h, m, tg.ttt_block_fns(h), toks, torch.ones_like(toks), docs, dev, torch.Generator(device=dev).manual_seed(0))
        torch.cuda.synchronize()
        nll = (sums[0] / sums[1]).item()
        plain = plain or nll
        lines.append(f"| {name} | {time.perf_counter() - t0:.1f} | {nll:.5f} | {abs(nll - plain) / plain:.1e} |")
        print(lines[-1], flush=True)
    return lines


def run_e2e(args, log_dir):
    data = os.path.join(args.work, "data")
    if not os.path.isdir(os.path.join(data, "datasets")):
        subprocess.run([sys.executable, os.path.join(ROOT, "prepare_caseops_data.py"), "--docs", args.e2e_docs, "--out", data,
                        "--tokenizer", args.tokenizer, "--val-docs", str(args.val_docs), "--shard-tokens", "10000000"], check=True)
    env = dict(os.environ, DATA_DIR=data, MAX_WALLCLOCK_SECONDS=str(args.e2e_seconds), ARTIFACT_DIR=args.work,
               RUN_ID="bench_e2e", VAL_LOSS_EVERY="0", TRAIN_LOG_EVERY="100")
    ngpu = torch.cuda.device_count()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ngpu}", os.path.join(ROOT, "train_gpt.py")]
    t0 = time.perf_counter()
    with open(os.path.join(log_dir, "bench_e2e.log"), "w") as f:
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    text = open(os.path.join(log_dir, "bench_e2e.log")).read()
    grab = lambda pat: (re.findall(pat, text) or ["n/a"])[-1]
    return {
        "steps": grab(r"stopping_early: .* step: (\d+)/") if "stopping_early" in text else grab(r"(\d+)/\d+ train_loss"), "pre-quant bpb": grab(r"pre-quantization post-ema .*val_bpb:([\d.]+)"),
        "quantized bpb": grab(r"diagnostic quantized val_loss:\S+ val_bpb:([\d.]+)"),
        "post-TTT bpb": grab(r"quantized_ttt_phased .*val_bpb:([\d.]+)"), "artifact bytes": grab(r"Total submission size \S+: (\d+)"),
        "TTT warm-up s": grab(r"compile warmup done \(([\d.]+)s"), "TTT eval s": grab(r"total_eval_time:([\d.]+)"),
        "eval wall s": grab(r"eval_wall_time:([\d.]+)"), "GPTQ calib s": grab(r"collected \d+ Hessians in ([\d.]+)s"),
        "peak mem": grab(r"peak memory allocated: (\d+ MiB)"), "wall s": f"{time.perf_counter() - t0:.0f}", "exit code": rc,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--sections", default="train,attention,ttt", help="comma list of train, attention, ttt, kernels, profile, loop, saved")
    ap.add_argument("--kernel-combos", default="00,10,01,11", help="kernels: FUSED_MLP/FUSED_CE_ENABLED pairs for the training rows")
    ap.add_argument("--e2e-docs", default="")
    ap.add_argument("--e2e-seconds", type=float, default=120)
    ap.add_argument("--val-docs", type=int, default=500)
    ap.add_argument("--tokenizer", default=os.path.join(ROOT, "..", "shared", "data", "tokenizers", "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"))
    ap.add_argument("--work", default="/tmp/pg_bench")
    ap.add_argument("--log-dir", default=os.path.join(ROOT, "logs"))
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "BENCHMARKS.md"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench.py needs a CUDA GPU")
    os.environ.setdefault("COMPILE", "1")
    sys.path.insert(0, ROOT)
    import train_gpt as tg
    os.makedirs(args.log_dir, exist_ok=True)
    peak = bf16_peak_tflops()
    lines = [f"\n## {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {torch.cuda.get_device_name()}, torch {torch.__version__}, "
             f"world size {torch.cuda.device_count()}, commit {os.environ.get('GIT_COMMIT') or subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True).stdout.strip() or 'n/a'}",
             "", f"Measured bf16 matmul peak (8192^3): {peak:.0f} TFLOP/s; attention backend: {tg.attention_backend('')}", "",
             ]
    sections = args.sections.split(",")
    if "train" in sections:
        lines += ["| attention | compile | micro-batch | recurrence depth | step ms | host ms | tok/s per GPU | GFLOP/token | MFU | peak mem GiB | first step (compile) s | grad rel. error vs first mode |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in bench_training(tg, args.steps, peak):
            lines.append(f"| {r['attn']} | {r['mode']} | {r['micro']:,} | {r['depth']} | {r['step_ms']:.1f} | {r['host_ms']:.1f} | {r['tok_s']:,.0f} | "
                         f"{r['flops_tok'] / 1e9:.2f} | {100 * r['mfu']:.1f}% | {r['mem_gib']:.1f} | {r['compile_s']:.0f} | {r['grad_err']:.1e} |")
    if "attention" in sections:
        lines += ["", "| attention (98,304 tokens, 8 q / 4 kv heads, d64) | fwd+bwd ms | rel. error vs flex: out / dq / dk / dv |",
                  "|---|---|---|"]
        lines += [f"| {k} | {ms:.2f} | {e} |" for k, (ms, e) in bench_attention().items()]
    emit(lines, args.out)
    if "saved" in sections:
        emit(saved_activations(tg), args.out)
    if "profile" in sections:
        emit(profile_step(tg, args.steps, [int(d) for d in env_list("BENCH_DEPTHS", ["1", "4"])]), args.out)
    if "loop" in sections:
        emit(profile_loop(tg, args.steps), args.out)
    if "kernels" in sections:
        for part in (lambda: bench_kernel_ops(tg), lambda: bench_kernel_training(tg, args.steps, args.kernel_combos.split(",")),
                     lambda: bench_kernel_ttt(tg)):
            emit([""] + part(), args.out)
    if "ttt" in sections:
        lines = ["", f"| TTT loop (depth {tg.Hyperparameters.from_env().eval_loop_depth}, chunk 48, window 2,048) | mode | s | row tok/s per GPU | "
                 "scored tok/s per GPU | ms per chunk step | compile warm-up | graphs compiled in the loop | scores and adapters bit-identical to |",
                 "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['work']} | {r['mode']} | {r['s']:.1f} | {r['row_tok_s']:,.0f} | {r['target_tok_s']:,.0f} | {r['chunk_ms']:.1f} | {r['warm']} | {r['new_graphs']} | {r['same']} |" for r in bench_ttt(tg)]
        emit(lines, args.out)
    if args.e2e_docs:
        import gc
        gc.collect()
        torch.cuda.empty_cache()  # the e2e run is a separate process: give it the GPU memory back
        e2e = run_e2e(args, args.log_dir)
        lines = ["", f"End-to-end on {os.path.basename(args.e2e_docs)} ({args.val_docs} val docs, {args.e2e_seconds:g}s training budget; "
                  "proxy corpus, BPB not comparable to FineWeb records):", "", "| " + " | ".join(e2e) + " |",
                  "|" + "---|" * len(e2e), "| " + " | ".join(str(v) for v in e2e.values()) + " |"]
        emit(lines, args.out)


def emit(lines, path):
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
