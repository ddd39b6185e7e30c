"""Config sweep of train_gpt.py's fused MLP matmul (_mlp_mm_kernel) at the training shape, both epilogues, against a
plain cuBLAS matmul of the same shape: where its autotune list comes from (issue 16; docs/BENCHMARKS.md).

    python3 tools/mlp_mm_sweep.py [M N K]      # default 98304 2048 512: one GPU's micro-batch, hidden, model dim

Each timing is the median over 20 rounds of 10 back-to-back launches (kernel time, not launch latency). `exact` says
whether the config's output equals the autotuned kernel's bit for bit. Needs a Hopper GPU (TMA)."""
import functools, itertools, os, sys

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg
from bench import cuda_time_ms

ms = functools.partial(cuda_time_ms, iters=20, per=10)

M, N, K = (int(v) for v in sys.argv[1:4]) if len(sys.argv) > 3 else (98304, 2048, 512)
dev = torch.device("cuda")
x, g = (torch.randn(M, K, device=dev, dtype=torch.bfloat16) for _ in range(2))
up = torch.randn(N, K, device=dev, dtype=torch.bfloat16) / K**0.5
down = torch.randn(K, N, device=dev, dtype=torch.bfloat16) / N**0.5
ref_hid, ref_signs = tg._mlp_mm(x, up)
ref_d = tg._mlp_mm(g, down.t(), ref_hid, ref_signs)
sms = tg._sms(dev)


def config_ms(fwd, BM, BN, BK, warps, stages):
    a, b = (x, up) if fwd else (g, down.t().contiguous())
    out = a.new_empty(M, N)
    hid, signs = (out, torch.empty(M, N // 8, dtype=torch.uint8, device=dev)) if fwd else (ref_hid, ref_signs)
    d = {n: TensorDescriptor.from_tensor(t, [1] * t.dim()) for n, t in dict(a=a, b=b, out=out, hid=hid, signs=signs).items()}
    tg._boxes({**d, "BM": BM, "BN": BN, "BK": BK})
    grid = (min(sms, triton.cdiv(M, BM) * triton.cdiv(N, BN)),)
    launch = lambda: tg._mlp_mm_kernel.fn[grid](d["a"], d["b"], d["out"], d["hid"], d["signs"], M, N, K, fwd, sms,
                                                BM=BM, BN=BN, BK=BK, num_warps=warps, num_stages=stages)
    launch()
    exact = torch.equal(out, ref_hid) and torch.equal(signs, ref_signs) if fwd else torch.equal(out, ref_d)
    return ms(launch), exact


flop = 2 * M * N * K
print(f"M={M} N={N} K={K}; cuBLAS matmul alone: forward shape {ms(lambda: x @ up.t()):.3f} ms, backward shape "
      f"{ms(lambda: g @ down):.3f} ms; autotuned kernel with its host work: forward {ms(lambda: tg._mlp_mm(x, up)):.3f} "
      f"ms, backward {ms(lambda: tg._mlp_mm(g, down.t(), ref_hid, ref_signs)):.3f} ms", flush=True)
for fwd in (True, False):
    rows = []
    for cfg in itertools.product((64, 128, 256), (128, 256), (64, 128), (4, 8), (2, 3, 4, 5)):
        BM, BN, BK, _, stages = cfg
        if (BM + BN) * BK * 2 * stages > 227 * 1024 or BM * BN > 128 * 256:  # shared memory, registers
            continue
        try:
            t, exact = config_ms(fwd, *cfg)
        except triton.runtime.errors.OutOfResources:
            continue
        rows.append((t, cfg, exact))
    print(f"\n{'forward (up projection + activation)' if fwd else 'backward (g @ down * f_prime)'}: best first")
    print("| BM x BN x BK | warps | stages | ms | TFLOP/s | exact |\n|---|---|---|---|---|---|")
    for t, (BM, BN, BK, warps, stages), exact in sorted(rows)[:10]:
        print(f"| {BM} x {BN} x {BK} | {warps} | {stages} | {t:.3f} | {flop / t / 1e9:.0f} | {exact} |", flush=True)
