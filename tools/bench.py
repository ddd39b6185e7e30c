"""GPU benchmark of the record stack: training throughput/MFU/memory, attention backends, optional end-to-end run.

    python3 tools/bench.py                # throughput + attention backends, appended to docs/BENCHMARKS.md
    python3 tools/bench.py --e2e-docs FILE # + prepare FILE (500 val docs), train for --e2e-seconds, quantize, TTT-eval

Prints a table and appends it (date, GPU, torch, world size, git commit) to docs/BENCHMARKS.md.
"""
import argparse, datetime, os, re, subprocess, sys, time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root


def cuda_time_ms(fn, iters=10, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
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


def bench_training(tg, steps, peak):
    h = tg.Hyperparameters()
    h.grad_accum_steps, h.micro_batch_tokens = 1, h.train_batch_tokens // 8  # one GPU's share of the 8-GPU step
    dev = torch.device("cuda")
    model = tg.build_model(h, dev)
    opt = tg.Optimizers(model, h)
    T = h.micro_batch_tokens
    toks = synthetic_docs(T, h.vocab_size).cuda()
    x, y = toks[:-1], toks[1:]
    cu = tg.cu_seqlens_for(toks[:-1].cpu().numpy(), h.train_seq_len).cuda()
    rows, use_flex = [], tg.USE_FLEX
    for flex, depth in [(f, d) for f in ([True, False] if tg.USE_FLEX else [False]) for d in sorted({1, *h.train_depths})]:
        if flex != tg.USE_FLEX:  # the other cu type: start from empty compile caches
            torch._dynamo.reset()
        tg.USE_FLEX = flex
        model.depth = depth
        t0 = time.perf_counter()

        def step():
            with tg.autocast(dev):
                loss = model(x[None], y[None], cu)
            loss.backward()
            opt.step(0, 0.0)

        step()
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        torch.cuda.reset_peak_memory_stats()
        ms = cuda_time_ms(step, iters=steps)
        fpt = model_flops_per_token(tg, h, depth, cu, T)
        tps = T / ms * 1000
        rows.append(dict(attn="flex" if flex else "fa3" if tg._FA3 else "varlen_attn", depth=depth, step_ms=ms, tok_s=tps,
                         flops_tok=fpt, mfu=fpt * tps / (peak * 1e12),
                         mem_gib=torch.cuda.max_memory_allocated() / 2**30, compile_s=compile_s))
    tg.USE_FLEX = use_flex
    return rows


def bench_attention():
    import train_gpt as tg
    T, H, KV, D = 98304, 8, 4, 64
    toks = synthetic_docs(T, 8192)
    cu = tg.cu_seqlens_for(toks[:-1].numpy(), 2048).cuda()
    q = torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, T, KV, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    rows = {}

    def fwd_bwd(f):
        return lambda: f().float().square().mean().backward()

    if tg._FA3:
        rows["fa3 varlen (doc-packed)"] = cuda_time_ms(fwd_bwd(lambda: tg.attend(q, k, v, cu, 2048)))
    if tg._VARLEN:
        rows["torch varlen_attn (doc-packed)"] = cuda_time_ms(fwd_bwd(lambda: tg.attend(q, k, v, cu, 2048)))
    bm = tg.packed_block_mask(cu, T)
    rows["flex_attention + document block mask (doc-packed)"] = cuda_time_ms(fwd_bwd(lambda: tg.attend(q, k, v, bm, 2048)))
    rows["building the block mask from cu_seqlens (once per forward)"] = cuda_time_ms(lambda: tg.packed_block_mask(cu, T))
    qd, kd, vd = (t.detach().view(48, 2048, -1, D).requires_grad_() for t in (q, k, v))
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel([be]):
                rows[f"sdpa {name} dense causal 48x2048 (no doc mask; TTT rows)"] = cuda_time_ms(fwd_bwd(lambda: tg.attend(qd, kd, vd, None, 2048)))
        except RuntimeError as e:
            print(f"sdpa {name}: {e}")
    return rows


def bench_ttt(tg):
    """Phased-TTT inner loop (score + LoRA step per 48-token chunk) at the eval depth on random weights: row tokens/s
    per GPU, eager vs compiled, on 64 short docs (FineWeb-like) and 16 long ones (rows at the 2,048 window)."""
    h = tg.Hyperparameters()
    dev = torch.device("cuda")
    rows = []
    for compiled in (False, True):
        model = tg.build_model(h, dev)
        model.depth = h.eval_loop_depth
        model.requires_grad_(False)
        warm = "-"
        if compiled:
            tg.compile_lora_fns(model)
            t0, g0 = time.perf_counter(), tg.compiled_graphs()
            tg.ttt_warmup(model, h, dev, lambda msg: None)
            warm = f"{time.perf_counter() - t0:.0f} s, {tg.compiled_graphs() - g0} graphs"
        for name, n, length in (("64 docs x 800 tokens", 64, 800), ("16 docs x 4,000 tokens", 16, 4000)):
            toks = synthetic_docs(n * length, h.vocab_size, mean_doc=10**9).cuda()
            toks[::length] = tg.BOS_ID
            docs = [tg.Doc(i * length, length + 1) for i in range(n)]
            gen = torch.Generator(device=dev).manual_seed(0)
            g0 = tg.compiled_graphs()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            sums = tg.ttt_batch(model, toks, torch.ones_like(toks), docs, h, dev, gen)
            torch.cuda.synchronize()
            t = time.perf_counter() - t0
            rows.append(dict(mode="compiled" if compiled else "eager", work=name, s=t, row_tok_s=sums[3].item() / t,
                             target_tok_s=sums[1].item() / t, warm=warm, new_graphs=tg.compiled_graphs() - g0))
        del model
        torch.cuda.empty_cache()
    return rows


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
    ap.add_argument("--sections", default="train,attention,ttt", help="comma list of train, attention, ttt")
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
             "", f"Measured bf16 matmul peak (8192^3): {peak:.0f} TFLOP/s; attention backend: {tg.ATTN_BACKEND}", "",
             ]
    sections = args.sections.split(",")
    if "train" in sections:
        lines += ["| attention | recurrence depth | step ms (98,304 tok) | tok/s per GPU | GFLOP/token | MFU | peak mem GiB | first step (compile) s |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in bench_training(tg, args.steps, peak):
            lines.append(f"| {r['attn']} | {r['depth']} | {r['step_ms']:.1f} | {r['tok_s']:,.0f} | {r['flops_tok'] / 1e9:.2f} | {100 * r['mfu']:.1f}% | {r['mem_gib']:.1f} | {r['compile_s']:.0f} |")
    if "attention" in sections:
        lines += ["", "| attention (98,304 tokens, 8 q / 4 kv heads, d64) | fwd+bwd ms |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in bench_attention().items()]
    emit(lines, args.out)
    if "ttt" in sections:
        lines = ["", f"| TTT loop (depth {tg.Hyperparameters().eval_loop_depth}, chunk 48, window 2,048) | mode | s | row tok/s per GPU | "
                 "scored tok/s per GPU | compile warm-up | graphs compiled in the loop |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['work']} | {r['mode']} | {r['s']:.1f} | {r['row_tok_s']:,.0f} | {r['target_tok_s']:,.0f} | {r['warm']} | {r['new_graphs']} |" for r in bench_ttt(tg)]
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
