"""Compile train_gpt.py's fused MLP matmul (_mlp_mm_kernel) for Hopper (sm_90a) on a machine without a GPU and print,
per autotune config and direction, what decides its speed before any device time is spent: shared memory, registers,
stack (spills) and how many programs fit on one SM (issue 16; docs/BENCHMARKS.md). tests/test_kernels.py compiles the
same way, so a kernel edit that Triton's real compiler rejects fails in CI, not in a paid run's warm-up.

    python3 tools/kernel_compile_check.py
    pip install --no-deps --target /tmp/t36 triton==3.6.0 && PYTHONPATH=/tmp/t36 python3 tools/kernel_compile_check.py
                                                           # the Triton of the device image (torch 2.11)

A config that needs more than the 227 KB of shared memory an H100/H200 block can have, or one that spills, shows here
in seconds instead of in an autotune log on the GPU."""
import os, re, subprocess, sys, tempfile, types

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
SMEM_PER_SM, SMEM_PER_BLOCK, REGS_PER_SM, SMS = 228 * 1024, 227 * 1024, 65536, 132


def compile_mlp_mm(cfg, fwd):
    """The kernel of one autotune config and direction, compiled for sm_90a (no GPU needed)."""
    kw = cfg.kwargs
    dtypes = dict(a="bf16", b="bf16", out="bf16", hid="bf16", signs="u8")
    boxes = {name: types.SimpleNamespace() for name in dtypes}
    tg._boxes({**boxes, **kw})  # the TMA box of each descriptor, as the launch sets it
    sig = {**{n: f"tensordesc<{dt}[{','.join(map(str, boxes[n].block_shape))}]>" for n, dt in dtypes.items()},
           "M": "i32", "N": "i32", "K": "i32", **{n: "constexpr" for n in ("FWD", "SMS", *kw)}}
    src = ASTSource(fn=tg._mlp_mm_kernel.fn, signature=sig, constexprs=dict(FWD=fwd, SMS=SMS, **kw))
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))


def resources(kernel):
    """(shared bytes, registers per thread, stack bytes per thread) of a compiled kernel, from its cubin."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        open(path, "wb").write(kernel.asm["cubin"])
        usage = subprocess.run([CUOBJDUMP, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    return kernel.metadata.shared, int(re.search(r"REG:(\d+)", usage)[1]), int(re.search(r"STACK:(\d+)", usage)[1])


if __name__ == "__main__":
    print(f"triton {triton.__version__}, target sm_90a")
    print("| direction | BM x BN x BK | warps | stages | shared KB | registers | stack bytes | programs per SM |")
    print("|---|---|---|---|---|---|---|---|")
    for fwd in (True, False):
        for cfg in tg._mlp_mm_kernel.configs:
            shared, regs, stack = resources(compile_mlp_mm(cfg, fwd))
            fit = min(SMEM_PER_SM // (shared + 1024), REGS_PER_SM // (regs * 32 * cfg.num_warps))
            kw = cfg.kwargs
            print(f"| {'forward' if fwd else 'backward'} | {kw['BM']} x {kw['BN']} x {kw['BK']} | {cfg.num_warps} | "
                  f"{cfg.num_stages} | {shared / 1024:.0f} | {regs} | {stack} | {fit} |", flush=True)
