"""Host cost of one TTT chunk step for a lone long document (one live row + its padding row): the default model's
layers, recurrence depth and LoRA adapters at tiny widths, so the kernels cost ~nothing and what is timed is the
Python, dispatcher, guard and autograd work per chunk step. Runs on CPU (Inductor compiles C++ there) or CUDA.
A GPU step that takes about this long is host-bound. --profile prints the top functions (cProfile).
  python3 tools/ttt_host_cost.py [eager|blocks|whole] [--profile]"""
import cProfile, os, pstats, sys, time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import train_gpt as tg  # noqa: E402

mode = sys.argv[1] if len(sys.argv) > 1 else "whole"
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_adamw = torch.optim.AdamW
torch.optim.AdamW = lambda *a, **k: _adamw(*a, **{**k, "fused": True})  # as on CUDA (no per-parameter .item())
h = tg.Hyperparameters.from_env(model_dim=64, num_heads=4, num_kv_heads=2, rope_dims=8, vocab_size=256, compile=False,
                                ttt_compile=mode != "eager", ttt_compile_model=mode == "whole", ttt_chunk_size=16,
                                ttt_eval_seq_len=128, train_seq_len=128, eval_seq_len=128, ttt_batch_size=4)
model = tg.build_model(h, dev)
model.requires_grad_(False)
fns = tg.ttt_block_fns(h)
if h.ttt_compile:
    t0 = time.perf_counter()
    tg.ttt_warmup(h, model, fns, dev, lambda msg: None)
    print(f"{mode}: compile warm-up {time.perf_counter() - t0:.0f} s")
chunks = 40
L = h.ttt_chunk_size * chunks + 1
toks = torch.randint(8, h.vocab_size, (L + 1,), device=dev)
toks[0] = tg.BOS_ID
prof = cProfile.Profile() if "--profile" in sys.argv else None
for rep in range(2):  # the first pass may still compile
    if prof and rep:
        prof.enable()
    t0 = time.perf_counter()
    tg.ttt_batch(h, model, fns, toks, torch.ones_like(toks), [tg.Doc(0, L)], dev, torch.Generator(device=dev).manual_seed(0))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    print(f"{mode}: {(time.perf_counter() - t0) / chunks * 1000:.1f} ms per chunk step ({'first' if rep == 0 else 'second'} pass)")
if prof:
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(20)
