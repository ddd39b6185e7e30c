"""Install-level checks: smoke.sh end to end (about a minute on 2 CPU cores), and that README.md stays
in step with .ci/run and with the trainer's environment variables."""
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def test_smoke_script_end_to_end(tmp_path):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not installed")
    env = dict(os.environ, SMOKE_DIR=str(tmp_path / "smoke"), PYTHON=sys.executable)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run([bash, str(REPO / "tools" / "smoke.sh")], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    out = r.stdout
    assert r.returncode == 0, out[-4000:] + r.stderr[-4000:]
    assert "world_size:2" in out and "val_bpb:byte_sidecar:enabled" in out
    losses = [float(x) for x in re.findall(r"^\d+/\d+ train_loss: (\S+)", out, re.M)]
    assert len(losses) >= 2 and losses[-1] < losses[0], f"training did not lower the loss: {losses}"
    keys = ["diagnostic pre-quantization post-ema val_loss:", "Total submission size quantized+pergroup:",
            "diagnostic quantized val_loss:", "ttt_phased: total_docs:", "total_eval_time:", "quantized_ttt_phased val_loss:"]
    pos = [out.find(k) for k in keys]
    assert -1 not in pos and pos == sorted(pos), f"missing or misordered lines: {dict(zip(keys, pos))}"
    lines = out.splitlines()
    m = re.fullmatch(r"quantized_ttt_phased val_loss:(\S+) val_bpb:(\S+) eval_time:\d+ms val_tokens:(\d+) val_bytes:(\d+)", lines[-2])
    assert m, lines[-3:]
    loss, bpb = float(m[1]), float(m[2])
    start = re.search(r"^val_tokens:(\d+) val_bytes:(\d+) val_docs:8$", out, re.M)
    assert start and (m[3], m[4]) == (start[1], start[2]), "TTT must score every val target and byte exactly once"
    assert math.isfinite(loss) and math.isfinite(bpb) and bpb > 0
    assert re.fullmatch(r"smoke \[\d+s\] OK in \d+s(; work dir .*)?", lines[-1]), lines[-1]
    assert (tmp_path / "smoke" / "run" / "final_model.int6.ptz").is_file()


def test_readme_test_command_is_what_ci_runs():
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    commands = [l.strip() for l in ci.splitlines() if l.strip() and not l.strip().startswith("#")]
    pytest_cmd = commands[-1]
    assert pytest_cmd.startswith("python3 -m pytest"), "the last command of .ci/run must be the test command"
    assert os.access(REPO / ".ci" / "run", os.X_OK)
    assert any(l.strip().endswith("&& " + pytest_cmd) or l.strip() == pytest_cmd for l in README.splitlines()), \
        f"README.md must show the exact test command {pytest_cmd!r}"


def test_readme_documents_every_env_var():
    import dataclasses
    import train_gpt as tg
    names = {f.name.upper() for f in dataclasses.fields(tg.Hyperparameters) if f.init} - {"RANK", "WORLD_SIZE", "LOCAL_RANK"}
    src = (REPO / "train_gpt.py").read_text(encoding="utf-8")
    names |= set(re.findall(r'os\.environ\.get\(\s*"([A-Z0-9_]+)"', src)) - {"RANK"}
    assert len(names) > 100
    missing = sorted(n for n in names if f"`{n}`" not in README)
    assert not missing, f"README.md does not document {missing}"


def test_ttt_host_cost_tool_times_a_lone_documents_chunk_steps():
    """tools/ttt_host_cost.py (docs/BENCHMARKS.md's TTT host-cost figures) still drives ttt_batch: eager mode, CPU."""
    out = subprocess.run([sys.executable, str(REPO / "tools" / "ttt_host_cost.py"), "eager"], capture_output=True,
                         text=True, timeout=600, cwd=REPO, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    times = re.findall(r"^eager: ([\d.]+) ms per chunk step \((first|second) pass\)$", out.stdout, re.M)
    assert [p for _, p in times] == ["first", "second"] and all(float(ms) > 0 for ms, _ in times), out.stdout
