"""tools/bench.py's CPU-side parts: the profile table's aggregation and the compile modes a device run will ask for."""
import re
from types import SimpleNamespace

import pytest
import torch
import torch._inductor.config

import bench


def kernel_event(name, us, count, device="DeviceType.CUDA"):
    return SimpleNamespace(key=name, device_time_total=us, count=count, device_type=device)


def test_profile_keeps_kernels_that_share_a_long_name_prefix_apart():
    """Two Inductor kernels whose names differ only after 90 characters are two rows with their own calls; CPU-side
    events (which would count the kernels twice) are skipped; times are per step."""
    stem = "triton_per_fused__fused_rms_norm__fused_rms_norm_backward__to_copy_add_mul_select_sum_view"
    events = [kernel_event(stem + "_55", 6410.0 * 2, 2), kernel_event(stem + "_12", 740.0 * 2, 2),
              kernel_event("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", 13010.0 * 2, 242),
              kernel_event(stem + "_55", 99999.0, 2, device="DeviceType.CPU")]
    cats, top = {}, {}
    bench.add_kernel_times(cats, top, "fwd+bwd", events, steps=2)
    assert top == {("fwd+bwd", stem + "_55"): (6.41, 1), ("fwd+bwd", stem + "_12"): (0.74, 1),
                   ("fwd+bwd", "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT"): (13.01, 121)}
    assert abs(sum(cats.values()) - (6.41 + 0.74 + 13.01)) < 1e-9 and cats["matmul"] == 13.01
    bench.add_kernel_times(cats, top, "optimizer", [kernel_event("some_kernel", 500.0, 1)], steps=1)
    assert cats["optimizer (all kernels)"] == 0.5 and top[("optimizer", "some_kernel")] == (0.5, 1)


def test_compile_modes_name_real_inductor_options_and_settings():
    """A misspelt Inductor option or setting would only fail on the GPU machine, after its start-up was paid."""
    import train_gpt as tg
    for mode, over in bench.COMPILE_MODES.items():
        for key in over.get("inductor", {}):
            assert hasattr(torch._inductor.config, key), (mode, key)
        settings = {k: v for k, v in over.items() if k != "inductor"}
        h = bench.one_gpu_h(tg, **settings)
        assert all(getattr(h, k) == v for k, v in settings.items()), mode


def test_timed_sections_run_trained_looking_weights(monkeypatch):
    """Kernel times depend on the weights (an H200 ran the same depth-1 forward+backward 6% faster at the initial,
    zero-projection weights than after four optimizer steps), so the profile, like the training rows, must build its
    model through trained_looking_model, whose output and down projections are not zero."""
    import train_gpt as tg

    h = bench.one_gpu_h(tg, train_batch_tokens=8 * 2048, num_layers=2, model_dim=64, num_heads=2, num_kv_heads=1)
    model = bench.trained_looking_model(tg, h, torch.device("cpu"))
    L = h.num_layers
    assert model.qo_bank[L:].abs().min() > 0 and model.mlp_down_bank.abs().min() > 0

    class Built(Exception):
        pass

    def stop(*_):
        raise Built

    monkeypatch.setattr(bench, "trained_looking_model", stop)
    monkeypatch.setattr(tg, "build_model", lambda *_: pytest.fail("profile_step built a zero-initialised model"))
    with pytest.raises(Built):
        bench.profile_step(tg, steps=1, depths=(1,))


def test_kernel_gaps_split_the_launch_floor_from_waits_for_the_host():
    """Gaps under STALL_US are the launch floor; longer ones are charged to the kernel that ended them; overlapping
    kernels (another stream) leave no gap; the input order does not matter; figures are ms per step."""
    kernels = [(47.0, 3.0, "fa4_fwd"), (0.0, 10.0, "a"), (12.0, 5.0, "b"), (48.0, 1.0, "overlapping"),
               (60.0, 1.0, "fa4_fwd"), (61.5, 2.0, "c")]
    floor, stall, after = bench.kernel_gaps(kernels, steps=2)
    assert floor == pytest.approx((2.0 + 0.5) / 2000) and stall == pytest.approx((30.0 + 10.0) / 2000)
    assert after == {"fa4_fwd": pytest.approx(40.0 / 2000)}


def test_profiled_leaves_the_profilers_first_step_out():
    """The first call runs under the profiler but is not recorded: in it the GPU waits for the profiler's start-up,
    which would be counted as the step's own idle time. Here the first call alone runs cos: no cos may be counted."""
    from torch.profiler import ProfilerActivity

    x, calls = torch.randn(64), []

    def fn():
        (torch.cos if not calls else torch.sin)(x)
        calls.append(1)

    averages, kernels = bench.profiled(fn, steps=3, activities=[ProfilerActivity.CPU])
    names = {e.key: e.count for e in averages}
    assert len(calls) == 4 and "aten::cos" not in names and names["aten::sin"] == 3 and kernels == []


def test_gap_summary_reports_each_part_and_where_the_host_fell_behind():
    lines = bench.gap_summary({"fwd+bwd": (2.02, 0.5, {"fa4_fwd": 0.4, "mm": 0.1}), "optimizer": (0.1, 3.0, {})})
    fwd = next(x for x in lines if x.startswith("- fwd+bwd:"))
    assert "2.02 in gaps under 10 us" in fwd and "0.50 in longer ones" in fwd
    assert fwd.index("`fa4_fwd` 0.40") < fwd.index("`mm` 0.10")
    assert any(x.startswith("- optimizer: 0.10 in gaps") and "longest" not in x for x in lines)


def test_loop_profile_times_the_trainers_whole_step(monkeypatch, prepared_data):
    """The loop section must time what the trainer does per step, not a fixed batch: every micro-step takes a batch
    from TrainLoader and the optimizer and the EMA update run once per step (3 warm-up, 2 timed, 1 + 2 profiled)."""
    from conftest import tiny_env
    import train_gpt as tg

    for k, v in tiny_env(prepared_data, TRAIN_BATCH_TOKENS="1024", GRAD_ACCUM_STEPS="2").items():
        monkeypatch.setenv(k, v)
    calls = {"batch": 0, "opt": 0, "ema": 0}

    def counted(name, f):
        def g(*a, **kw):
            calls[name] += 1
            return f(*a, **kw)
        return g

    monkeypatch.setattr(tg.TrainLoader, "next_batch", counted("batch", tg.TrainLoader.next_batch))
    monkeypatch.setattr(tg.Optimizers, "step", counted("opt", tg.Optimizers.step))
    monkeypatch.setattr(tg.EMA, "update", counted("ema", tg.EMA.update))
    lines = bench.profile_loop(tg, steps=2)
    assert calls == {"batch": 2 * 8, "opt": 8, "ema": 8}
    head = next(x for x in lines if x.startswith("Training-loop profile, depth 1: 2 micro-steps of 512 tokens"))
    assert float(re.search(r"sync: ([\d.]+) ms per step", head).group(1)) > 0
