"""record.py: log parsing, cap refusals, statistics (t distribution without scipy), results.md/submission.json."""
import datetime
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import record

REPO = Path(__file__).resolve().parents[1]
LOGS = REPO / "tests" / "fixtures" / "logs"
SEEDS3 = [LOGS / "train_seed42.log", LOGS / "train_seed0.log", LOGS / "train_seed1234.log"]


def run_main(argv, capsys):
    rc = record.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def variant(tmp_path, src, name, edit):
    """A copy of fixture `src` with `edit(text) -> text` applied."""
    path = tmp_path / name
    path.write_text(edit((LOGS / src).read_text()))
    return path


# ---------------- parsing ----------------
def test_parse_our_format_without_spaces():
    r = record.parse_log(LOGS / "train_seed42.log")
    assert r["seed"] == 42 and r["world_size"] == 8
    assert r["pre"] == (2.354, 1.07) and r["quant"] == (2.376, 1.08) and r["ttt"] == (2.332, 1.06)
    assert (r["steps"], r["iterations"]) == (4921, 20000)
    assert r["train_time_s"] == pytest.approx(596.107)
    assert r["eval_time_s"] == pytest.approx(488.8) and r["eval_wall_s"] == pytest.approx(652.3)
    assert (r["artifact_bytes"], r["model_bytes"], r["code_bytes"]) == (15932307, 15903987, 28320)
    assert r["compressor"] == "brotli" and r["transform"] == "caseops"
    assert r["torch_version"] == "2.11.0+cu130" and r["peak_mib"] == 40029 and r["not_valid"] is False
    assert r["hp"]["train_batch_tokens"] == "786432"
    # where it ran and on what; the evaluation lines carry val_tokens/val_bytes after eval_time
    assert (r["hardware"], r["gpu_count"]) == ("NVIDIA H100 80GB HBM3", 8)
    assert (r["val_tokens"], r["val_bytes"], r["val_docs"]) == (47851520, 151073826, 50000)
    assert (r["ttt_val_tokens"], r["ttt_val_bytes"]) == (47851520, 151073826)
    assert "eval_time:488800ms val_tokens:47851520" in (LOGS / "train_seed42.log").read_text()


def test_parse_spaces_after_colons():
    r = record.parse_log(LOGS / "train_seed0.log")
    assert "val_loss: 2.33420000" in (LOGS / "train_seed0.log").read_text()  # the fixture really is spaced
    assert r["seed"] == 0 and r["ttt"] == (2.3342, 1.061) and r["pre"] == (2.3562, 1.071)
    assert r["quant"] == (2.3782, 1.081)
    assert r["steps"] == 4866 and r["train_time_s"] == pytest.approx(596.114)
    assert r["eval_time_s"] == pytest.approx(482.0) and r["eval_wall_s"] == pytest.approx(645.5)
    assert (r["artifact_bytes"], r["code_bytes"], r["peak_mib"]) == (15935802, 28320, 40029)
    assert (r["hardware"], r["gpu_count"], r["world_size"]) == ("NVIDIA H100 80GB HBM3", 8, 8)
    assert (r["val_tokens"], r["val_bytes"], r["val_docs"]) == (47851520, 151073826, 50000)
    assert (r["ttt_val_tokens"], r["ttt_val_bytes"]) == (47851520, 151073826)


def test_parse_public_style_lzma_log():
    r = record.parse_log(LOGS / "train_seed1234.log")
    assert r["compressor"] == "lzma" and r["model_bytes"] == 15914786 and r["artifact_bytes"] == 15943106
    assert r["transform"] is None and r["torch_version"] is None and r["eval_wall_s"] is None
    assert r["ttt"] == (2.3364, 1.062) and r["eval_time_s"] == pytest.approx(494.6)
    assert r["ttt_val_tokens"] is None and r["val_docs"] == 50000 and r["world_size"] == 8  # world_size from hp


def test_parse_run_reaching_iterations_uses_last_step_line():
    r = record.parse_log(LOGS / "iterations_seed7.log")
    assert "stopping_early" not in (LOGS / "iterations_seed7.log").read_text()
    assert (r["steps"], r["iterations"]) == (3000, 3000)
    assert r["train_time_s"] == pytest.approx(9.5 * 60)


def test_train_time_prefers_ms_figure(tmp_path):
    # a ms figure on the last step beats the minutes figure of the same step, whatever the line order
    p = variant(tmp_path, "iterations_seed7.log", "ms.log", lambda t: t.replace(
        "3000/3000 val_loss:2.4000", "3000/3000 val_loss:2.4000 train_time: 571234ms"))
    assert record.parse_log(p)["train_time_s"] == pytest.approx(571.234)
    p = variant(tmp_path, "iterations_seed7.log", "ms_first.log", lambda t: t.replace(
        "3000/3000 train_loss:2.5000", "3000/3000 val_loss:2.4100 train_time:571234ms\n3000/3000 train_loss:2.5000"))
    assert record.parse_log(p)["train_time_s"] == pytest.approx(571.234)
    # but a later step wins over an earlier ms figure
    p = variant(tmp_path, "iterations_seed7.log", "ms2.log", lambda t: t.replace(
        "1000/3000 val_loss:2.4667", "1000/3000 val_loss:2.4667 train_time:190000ms"))
    assert record.parse_log(p)["train_time_s"] == pytest.approx(570.0)


def test_older_step_prefix_and_pergroup_compressor(tmp_path):
    p = variant(tmp_path, "iterations_seed7.log", "old.log", lambda t: t.replace(
        "3000/3000 train_loss:2.5000 train_time:9.5m", "step:3000/3000 train_loss:2.5000 train_time:571000ms")
        .replace("3000/3000 val_loss", "2999/3000 val_loss").replace("quantized+brotli", "quantized+pergroup"))
    r = record.parse_log(p)
    assert r["steps"] == 3000 and r["train_time_s"] == pytest.approx(571.0) and r["compressor"] == "pergroup"


def test_seed_from_file_name_without_hyperparameters(tmp_path):
    text = (LOGS / "train_seed42.log").read_text().replace("  seed: 42\n", "")
    p = tmp_path / "train_seed314.log"
    p.write_text(text)
    assert record.parse_log(p)["seed"] == 314


def test_curves_collected_for_plot():
    r = record.parse_log(LOGS / "train_seed42.log")
    assert [c[0] for c in r["curve"]] == [1, 2, 500, 1000, 2000, 4921]
    assert r["curve"][-1][1] == pytest.approx(9.9 * 60) and r["curve"][-1][2] == pytest.approx(2.5)
    assert r["val_curve"] == [(1000, pytest.approx(1.1271)), (4921, pytest.approx(1.0909))]


# ---------------- statistics ----------------
@pytest.mark.parametrize("t,dof,p", [(2.92, 2, 0.05), (6.965, 2, 0.01), (1.812, 10, 0.05), (2.764, 10, 0.01),
                                     (2.457, 30, 0.01), (1.310, 30, 0.10), (6.314, 1, 0.05), (31.821, 1, 0.01)])
def test_t_sf_matches_t_table(t, dof, p):
    assert record.t_sf(t, dof) == pytest.approx(p, abs=2e-4)
    assert record.t_cdf(-t, dof) == pytest.approx(p, abs=2e-4)


def test_t_distribution_closed_forms():
    for t in (-7.0, -1.3, -0.2, 0.0, 0.4, 1.0, 2.5, 9.0, 40.0):
        cauchy = 0.5 + math.atan(t) / math.pi                       # dof = 1
        two = 0.5 + t / (2 * math.sqrt(t * t + 2))                  # dof = 2
        assert record.t_cdf(t, 1) == pytest.approx(cauchy, abs=1e-12)
        assert record.t_cdf(t, 2) == pytest.approx(two, abs=1e-12)
        normal = 0.5 * (1 + math.erf(t / math.sqrt(2)))             # dof -> infinity
        assert record.t_cdf(t, 10**7) == pytest.approx(normal, abs=1e-6)
    assert record.t_sf(math.inf, 2) == 0.0 and record.t_sf(-math.inf, 2) == 1.0


def test_betainc_against_scipy():
    special = pytest.importorskip("scipy.special")
    for a, b, x in [(0.5, 0.5, 0.3), (1.0, 0.5, 0.9), (15.0, 0.5, 0.95), (2.5, 7.0, 0.2), (40.0, 3.0, 0.93)]:
        assert record.betainc(a, b, x) == pytest.approx(special.betainc(a, b, x), rel=1e-10, abs=1e-14)


def three_seed_stats(baseline):
    return record.stats([record.parse_log(p) for p in SEEDS3], baseline)


def test_mean_and_both_stds_hand_computed():
    s = three_seed_stats(1.06108)
    # val_loss 2.332, 2.3342, 2.3364: deviations -0.0022, 0, +0.0022
    assert s["loss_mean"] == pytest.approx(2.3342, abs=1e-12)
    assert s["loss_std_pop"] == pytest.approx(math.sqrt(2 * 0.0022 ** 2 / 3), abs=1e-12)
    assert s["loss_std_sample"] == pytest.approx(0.0022, abs=1e-12)
    assert s["bpb_mean"] == pytest.approx(1.061, abs=1e-12)
    assert s["bpb_std_pop"] == pytest.approx(0.001 * math.sqrt(2 / 3), abs=1e-12)
    assert s["bpb_std_sample"] == pytest.approx(0.001, abs=1e-12)


def test_significance_test_values():
    s = three_seed_stats(1.066)
    assert s["nats_per_bpb"] == pytest.approx(2.2, abs=1e-12)
    assert s["baseline_nats"] == pytest.approx(1.066 * 2.2)
    assert s["threshold_bpb"] == pytest.approx(0.005 / 2.2)
    assert s["delta_bpb"] == pytest.approx(-0.005) and s["delta_nats"] == pytest.approx(-0.011)
    t = (1.066 * 2.2 - 0.005 - 2.3342) / (0.0022 / math.sqrt(3))       # = 4.7238
    assert s["dof"] == 2 and s["t"] == pytest.approx(t) and s["t"] == pytest.approx(4.7238, abs=1e-4)
    assert s["p"] == pytest.approx(0.5 * (1 - t / math.sqrt(t * t + 2)), rel=1e-9)   # ~0.0210
    worse = three_seed_stats(1.06108)    # mean is not 0.005 nats below: t < 0, p > 0.5
    assert worse["t"] < 0 and worse["p"] > 0.5


def test_single_seed_has_no_t_test(tmp_path, capsys):
    rc, out, _ = run_main([LOGS / "train_seed42.log", "--out", tmp_path], capsys)
    assert rc == 0 and "no t-test possible" in out
    sub = json.loads((tmp_path / "submission.json").read_text())
    assert sub["p_value"] is None and sub["compliance"]["three_seeds"] is False


# ---------------- refusals ----------------
def test_refuses_truncated_log_even_with_allow(tmp_path, capsys):
    for extra in ([], ["--allow-non-record"]):
        rc, _, err = run_main([LOGS / "truncated.log", "--out", tmp_path, *extra], capsys)
        assert rc == 2
        assert "truncated.log" in err and "truncated" in err and "quantized_ttt_phased" in err
    assert not (tmp_path / "submission.json").exists()


def test_refuses_over_cap_unless_allowed(tmp_path, capsys):
    rc, _, err = run_main([*SEEDS3, LOGS / "over_cap.log", "--out", tmp_path], capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 2 and all("over_cap.log: " in l and "--allow-non-record" in l for l in lines)
    assert "16,000,123" in lines[0] and "NOT A VALID RECORD" in lines[1]
    rc, _, _ = run_main([*SEEDS3, LOGS / "over_cap.log", "--out", tmp_path, "--allow-non-record"], capsys)
    sub = json.loads((tmp_path / "submission.json").read_text())
    assert rc == 0 and sub["compliance"]["artifact_under_16mb"] is False and sub["artifact_bytes_max"] == 16000123
    assert sub["record"] is False and sub["track"] == "non_record_16mb" and len(sub["non_record_reasons"]) == 2
    assert sub["non_record_reasons"][0].startswith("seed 9 (over_cap.log): total submission size 16,000,123")
    assert (tmp_path / "results.md").read_text().startswith("**Not a record** (written with --allow-non-record):\n")


def test_refuses_casefold_unless_allowed(tmp_path, capsys):
    rc, _, err = run_main([LOGS / "casefold.log", "--out", tmp_path], capsys)
    assert rc == 2 and "casefold.log" in err and "casefold" in err.split("casefold.log", 1)[1]
    rc, out, _ = run_main([LOGS / "casefold.log", "--out", tmp_path, "--allow-non-record"], capsys)
    assert rc == 0 and "casefold (LOSSY" in out


def test_refuses_not_valid_record_line_but_not_source_code_string(tmp_path, capsys):
    flagged = variant(tmp_path, "train_seed42.log", "flagged.log",
                      lambda t: t + "size check: NOT A VALID RECORD\n")
    rc, _, err = run_main([flagged, "--out", tmp_path], capsys)
    assert rc == 2 and "flagged.log" in err and "NOT A VALID RECORD" in err
    source = variant(tmp_path, "train_seed42.log", "source.log",
                     lambda t: t + '        log0(f"{total} bytes: NOT A VALID RECORD")\n')
    assert run_main([source, "--out", tmp_path], capsys)[0] == 0


@pytest.mark.parametrize("old,new,reason", [
    ("train_time:596107ms", "train_time:600001ms", "train time 600.001 s"),
    ("total_eval_time:488.8s", "total_eval_time:600.5s", "total_eval_time 600.5 s"),
])
def test_refuses_time_over_cap(tmp_path, capsys, old, new, reason):
    p = variant(tmp_path, "train_seed42.log", "slow.log", lambda t: t.replace(old, new))
    rc, _, err = run_main([p, "--out", tmp_path], capsys)
    assert rc == 2 and "slow.log" in err and reason in err


def test_refuses_duplicate_seed_and_missing_file(tmp_path, capsys):
    rc, _, err = run_main([LOGS / "train_seed42.log", LOGS / "train_seed42.log", "--out", tmp_path], capsys)
    assert rc == 2 and "seed 42 already given" in err
    rc, _, err = run_main([tmp_path / "nope.log", "--out", tmp_path], capsys)
    assert rc == 2 and "nope.log" in err and "cannot read" in err


# ---------------- hardware and validation set: from the log ----------------
CPU_SMOKE = LOGS / "cpu_smoke.log"   # the run log of a real tools/smoke.sh run (2 CPU ranks, 8 val docs), unedited


def test_cpu_smoke_run_is_refused_as_record(tmp_path, capsys):
    rc, _, err = run_main([CPU_SMOKE, "--out", tmp_path], capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 2 and all(l.startswith(f"record.py: refusing {CPU_SMOKE}: ") for l in lines)
    assert "ran on 2x cpu: a record runs on 8 GPUs" in lines[0]
    assert "evaluated on 8 val docs, not the full 50,000-doc validation set" in lines[1]
    assert not (tmp_path / "submission.json").exists()


def test_cpu_smoke_run_allowed_is_labelled_non_record(tmp_path, capsys):
    rc, out, _ = run_main([CPU_SMOKE, "--out", tmp_path, "--allow-non-record"], capsys)
    sub = json.loads((tmp_path / "submission.json").read_text())
    assert rc == 0 and sub["record"] is False and sub["track"] == "non_record_16mb"
    assert (sub["hardware"], sub["gpu_count"], sub["val_docs"]) == ("2x cpu", 2, 8)
    assert sub["pytorch_version"] == "2.13.0+cpu" and sub["seed_results"]["0"]["hardware"] == "2x cpu"
    assert sub["non_record_reasons"] == [
        "seed 0 (cpu_smoke.log): ran on 2x cpu: a record runs on 8 GPUs",
        "seed 0 (cpu_smoke.log): evaluated on 8 val docs, not the full 50,000-doc validation set"]
    assert sub["compliance"]["eight_gpus"] is False and sub["compliance"]["full_val_set"] is False
    md = (tmp_path / "results.md").read_text()
    assert md.startswith("**Not a record** (written with --allow-non-record):\n- seed 0 (cpu_smoke.log): ran on 2x cpu")
    assert "| 2x cpu | 2 | 8 |" in md and md in out


@pytest.mark.parametrize("hardware_line, reason", [
    ("hardware: NVIDIA H100 80GB HBM3 x4", "ran on 4x NVIDIA H100 80GB HBM3: a record runs on 8 GPUs"),
    ("hardware: cpu x8", "ran on 8x cpu: a record runs on 8 GPUs"),
])
def test_refuses_other_than_eight_gpus(tmp_path, capsys, hardware_line, reason):
    p = variant(tmp_path, "train_seed42.log", "small.log",
                lambda t: t.replace("hardware: NVIDIA H100 80GB HBM3 x8", hardware_line))
    rc, _, err = run_main([p, "--out", tmp_path], capsys)
    assert rc == 2 and err.strip().splitlines() == [
        f"record.py: refusing {p}: {reason} (--allow-non-record writes it as a non-record)"]


def test_log_without_hardware_line_needs_the_flag(tmp_path, capsys):
    """Older logs: --hardware states the hardware, world_size gives the GPU count; without it, 'unknown'."""
    old = variant(tmp_path, "train_seed42.log", "old.log",
                  lambda t: t.replace("hardware: NVIDIA H100 80GB HBM3 x8\n", ""))
    rc, _, err = run_main([old, "--out", tmp_path], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "hardware unknown: no 'hardware:' line" in err and "pass --hardware NAME" in err
    rc, _, _ = run_main([old, "--out", tmp_path, "--allow-non-record"], capsys)
    sub = json.loads((tmp_path / "submission.json").read_text())
    assert rc == 0 and sub["record"] is False and sub["hardware"] == "unknown" and sub["gpu_count"] == 8
    rc, _, _ = run_main([old, "--out", tmp_path, "--hardware", "8xH100 80GB SXM"], capsys)
    sub = json.loads((tmp_path / "submission.json").read_text())
    assert rc == 0 and sub["record"] is True and (sub["hardware"], sub["gpu_count"]) == ("8xH100 80GB SXM", 8)
    two = tmp_path / "two.log"
    two.write_text(old.read_text().replace("world_size:8 ", "world_size:2 "))
    rc, _, err = run_main([two, "--out", tmp_path, "--hardware", "8xH100 80GB SXM"], capsys)
    assert rc == 2 and "ran on world_size 2: a record runs on 8 GPUs" in err
    bare = tmp_path / "bare.log"
    bare.write_text(old.read_text().replace("world_size:8 grad_accum_steps:1 micro_batch_tokens:98304\n", "")
                    .replace("  world_size: 8\n", ""))
    rc, _, err = run_main([bare, "--out", tmp_path, "--hardware", "8xH100 80GB SXM"], capsys)
    assert rc == 2 and err.strip().endswith("GPU count unknown: no 'hardware:' or 'world_size:' line "
                                            "(--allow-non-record writes it as a non-record)")
    # the log's own hardware line wins over the flag
    rc, _, _ = run_main([LOGS / "train_seed42.log", "--out", tmp_path, "--hardware", "something else"], capsys)
    assert rc == 0 and json.loads((tmp_path / "submission.json").read_text())["hardware"] == "8x NVIDIA H100 80GB HBM3"


def test_log_without_val_docs_is_not_certified(tmp_path, capsys):
    old = variant(tmp_path, "train_seed42.log", "old.log", lambda t: t.replace(" val_docs:50000", ""))
    assert record.parse_log(old)["val_tokens"] == 47851520 and record.parse_log(old)["val_docs"] is None
    rc, _, err = run_main([old, "--out", tmp_path], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "validation doc count unknown" in err
    assert run_main([old, "--out", tmp_path, "--allow-non-record"], capsys)[0] == 0
    assert json.loads((tmp_path / "submission.json").read_text())["val_docs"] is None


def test_ttt_must_score_the_whole_val_set(tmp_path, capsys):
    p = variant(tmp_path, "train_seed42.log", "cut.log", lambda t: t.replace(
        "eval_time:488800ms val_tokens:47851520 val_bytes:151073826",
        "eval_time:488800ms val_tokens:40000000 val_bytes:150000000"))
    r = record.parse_log(p)
    assert r["ttt"] == (2.332, 1.06) and (r["ttt_val_tokens"], r["ttt_val_bytes"]) == (40000000, 150000000)
    rc, _, err = run_main([p, "--out", tmp_path], capsys)
    assert rc == 2 and err.strip().splitlines() == [
        f"record.py: refusing {p}: quantized_ttt_phased scored val_tokens:40000000 val_bytes:150000000, the validation "
        "set has val_tokens:47851520 val_bytes:151073826 (--allow-non-record writes it as a non-record)"]
    rc, _, _ = run_main([p, "--out", tmp_path, "--allow-non-record"], capsys)
    sub = json.loads((tmp_path / "submission.json").read_text())
    assert rc == 0 and sub["record"] is False and sub["compliance"]["ttt_scored_val_set"] is False


def test_parse_real_cpu_smoke_log_and_world_size_line(tmp_path):
    r = record.parse_log(CPU_SMOKE)
    assert (r["hardware"], r["gpu_count"], r["world_size"], r["seed"]) == ("cpu", 2, 2, 0)
    assert (r["steps"], r["iterations"]) == (30, 30) and r["ttt"] == (6.09336049, 3.26627055)
    assert (r["val_tokens"], r["val_bytes"], r["val_docs"]) == (2560, 6890, 8) and r["ttt_val_tokens"] == 2560
    p = variant(tmp_path, "train_seed42.log", "ws.log", lambda t: t.replace("world_size:8 ", "world_size:4 "))
    assert record.parse_log(p)["hp"]["world_size"] == "8" and record.parse_log(p)["world_size"] == 4  # the line wins


# ---------------- outputs ----------------
def test_submission_json_contents(tmp_path, capsys):
    rc, _, _ = run_main([*SEEDS3, "--out", tmp_path, "--baseline-bpb", "1.066", "--author", "A. Person",
                         "--github-id", "aperson", "--name", "Test record", "--blurb", "b"], capsys)
    assert rc == 0
    sub = json.loads((tmp_path / "submission.json").read_text())
    assert (sub["author"], sub["github_id"], sub["name"], sub["blurb"]) == ("A. Person", "aperson", "Test record", "b")
    assert sub["date"] == datetime.date.today().isoformat() and sub["track"] == "10min_16mb"
    assert sub["record"] is True and sub["non_record_reasons"] == []
    assert sub["val_loss"] == pytest.approx(2.3342) and sub["val_bpb"] == pytest.approx(1.061)
    assert sub["val_bpb_std"] == pytest.approx(0.001 * math.sqrt(2 / 3), abs=1e-8)   # population
    assert sub["val_loss_std"] == pytest.approx(0.0022 * math.sqrt(2 / 3), abs=1e-8)
    assert "population" in sub["reproducibility_notes"] and "0.00100000" in sub["reproducibility_notes"]
    assert sub["seeds"] == [42, 0, 1234]
    assert sub["seed_results"]["0"] == {"val_loss": 2.3342, "val_bpb": 1.061, "artifact_bytes": 15935802,
                                        "steps": 4866, "train_time_s": 596.114, "eval_time_s": 482.0,
                                        "hardware": "8x NVIDIA H100 80GB HBM3", "gpu_count": 8, "val_docs": 50000}
    assert sub["artifact_bytes_mean"] == 15937072 and sub["artifact_bytes_max"] == 15943106
    assert sub["train_time_s_mean"] == pytest.approx(596.107) and sub["eval_time_s_mean"] == pytest.approx(488.5)
    assert sub["hardware"] == "8x NVIDIA H100 80GB HBM3" and sub["pytorch_version"] == "2.11.0+cu130"  # from the logs
    assert sub["gpu_count"] == 8 and sub["val_docs"] == 50000
    assert sub["comparison_baseline_bpb"] == 1.066
    assert sub["delta_vs_leaderboard_bpb"] == pytest.approx(-0.005) and sub["delta_vs_leaderboard_nats"] == pytest.approx(-0.011)
    assert sub["p_value"] == pytest.approx(0.0210055, abs=1e-6)
    assert sub["compliance"] == {"train_under_600s": True, "eval_under_600s": True, "artifact_under_16mb": True,
                                 "eight_gpus": True, "full_val_set": True, "ttt_scored_val_set": True,
                                 "score_first_ttt": True, "no_pre_quant_ttt": True, "three_seeds": True}


def test_cli_subprocess_writes_results_md(tmp_path):
    out = tmp_path / "rec"
    proc = subprocess.run([sys.executable, "tools/record.py", *map(str, SEEDS3), "--out", str(out), "--baseline-bpb", "1.066"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    md = (out / "results.md").read_text()
    assert md in proc.stdout
    assert md.startswith("**Record run**: 8x NVIDIA H100 80GB HBM3, full 50,000-doc validation set, train and eval "
                         "within 600 s, artifact within 16,000,000 bytes.\n")
    assert "| 0 | 15,907,482 | 28,320 | brotli | caseops | 2.11.0+cu130 | 8x NVIDIA H100 80GB HBM3 | 8 | 50,000 |" in md
    assert "| 42 | 4,921 | 1.07000000 | 1.08000000 | **1.06000000** | 2.33200000 | 15,932,307 | 596.107 | 488.8 |" in md
    assert "| **Mean** | 4,886 |" in md and "**1.06100000**" in md
    assert "Std (population, ddof=0)" in md and "0.00081650" in md
    assert "Std (sample, ddof=1)" in md and "0.00220000" in md
    assert "t = 4.7238, dof = 2, p = 0.021" in md and "significant at p < 0.01: no" in md
    assert "0.002273 BPB" in md and "-0.005000 BPB" in md and "-0.011000 nats" in md
    json.loads((out / "submission.json").read_text())
    bad = subprocess.run([sys.executable, "tools/record.py", str(LOGS / "truncated.log"), "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "truncated.log" in bad.stderr


def test_plot_without_matplotlib_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # makes `import matplotlib` raise ImportError
    rc, out, _ = run_main([*SEEDS3, "--out", tmp_path, "--plot"], capsys)
    assert rc == 0 and "matplotlib is not installed" in out
    assert (tmp_path / "results.md").exists() and (tmp_path / "submission.json").exists()
    assert not (tmp_path / "curves.png").exists()


def test_plot_with_matplotlib(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rc, out, _ = run_main([*SEEDS3, "--out", tmp_path, "--plot"], capsys)
    png = tmp_path / "curves.png"
    assert rc == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_committed_submission_json_is_regenerated_from_a_committed_log_as_a_non_record(tmp_path, capsys):
    """The root submission.json is tools/record.py's output for logs/e2e_h100_fineweb200val_full_ttt_compiled.log,
    labelled non-record (one H100, 200 val docs) until an 8xH100 run exists."""
    committed = json.loads((REPO / "submission.json").read_text())
    assert committed["record"] is False and committed["track"] == "non_record_16mb" and committed["non_record_reasons"]
    args = [REPO / "logs" / "e2e_h100_fineweb200val_full_ttt_compiled.log", "--out", tmp_path, "--allow-non-record",
            "--hardware", committed["hardware"], "--name", committed["name"], "--author", committed["author"],
            "--github-id", committed["github_id"], "--blurb", committed["blurb"]]
    assert run_main(args, capsys)[0] == 0
    fresh = json.loads((tmp_path / "submission.json").read_text())
    assert {k: v for k, v in fresh.items() if k != "date"} == {k: v for k, v in committed.items() if k != "date"}


def test_every_line_record_reads_comes_from_the_trainers_one_table(tmp_path):
    """train_gpt.RECORD_LINES holds every line this parser reads (the trainer writes them only through
    record_line): a log made of those formats, filled with known values, parses back to exactly those values."""
    import train_gpt as tg
    L = tg.record_line
    lines = ["Hyperparameters:", "  seed: 7", L("torch", "2.11.0+cu130", "3.12.3", "2.5.2", "13.0", "3.6.0"),
             L("hardware", name="NVIDIA H100 80GB HBM3", world_size=8),
             L("world", world_size=8, accum=1, micro=98304), L("transform", transform="caseops"),
             L("val_set", tokens=47851520, nbytes=151074768, docs=50000),
             L("train_step", step=4500, iterations=20000, loss=2.291, minutes=8.9, tok_s=6591079),
             L("val_step", step=4550, iterations=20000, loss=2.4422, bpb=1.1159),
             L("stop", ms=596123.4, step=4550, iterations=20000), L("peak", alloc=40029, reserved=44000),
             L("score", name="diagnostic pre-quantization post-ema", loss=2.34, bpb=1.07, ms=6889, tokens=47851520,
               nbytes=151074768),
             L("code_bytes", nbytes=27255, minified="minified"),
             L("model_bytes", compressor="brotli", nbytes=15950000),
             L("total_bytes", compressor="brotli", nbytes=15977255),
             L("score", name="diagnostic quantized", loss=2.36, bpb=1.08, ms=55988, tokens=47851520, nbytes=151074768),
             L("score", name="quantized_ttt_phased", loss=2.3373, bpb=1.0681, ms=488803, tokens=47851520,
               nbytes=151074768),
             L("eval_total", s=488.8), L("eval_wall", s=700.0)]
    assert set(tg.RECORD_LINES) == {"torch", "hardware", "world", "transform", "val_set", "train_step", "val_step",
                                    "stop", "peak", "score", "code_bytes", "model_bytes", "total_bytes",
                                    "eval_total", "eval_wall"}
    p = tmp_path / "formats.log"
    p.write_text("\n".join(lines) + "\n")
    r = record.parse_log(p)
    assert (r["torch_version"], r["hardware"], r["gpu_count"], r["world_size"], r["seed"]) == \
        ("2.11.0+cu130", "NVIDIA H100 80GB HBM3", 8, 8, 7)
    assert (r["transform"], r["val_tokens"], r["val_bytes"], r["val_docs"]) == ("caseops", 47851520, 151074768, 50000)
    assert (r["steps"], r["iterations"], r["train_time_s"], r["peak_mib"]) == (4550, 20000, pytest.approx(596.1234), 40029)
    assert r["pre"] == (2.34, 1.07) and r["quant"] == (2.36, 1.08) and r["ttt"] == (2.3373, 1.0681)
    assert (r["ttt_val_tokens"], r["code_bytes"], r["model_bytes"], r["artifact_bytes"]) == \
        (47851520, 27255, 15950000, 15977255)
    assert (r["eval_time_s"], r["eval_wall_s"]) == (488.8, 700.0)
