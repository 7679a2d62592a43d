"""`megascale plan` end to end, through real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from services.planner.hardware import load_profile
from services.planner.models import PRESETS, load_model
from services.planner.profile import predict_local


def plan(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", "plan", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_json_has_the_documented_fields():
    r = plan("--model", "Mixtral-8x22B", "--attention-gpu", "H20", "--expert-gpu", "L40S",
             "--json", "--simulate")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("attention_gpu", "expert_gpu", "tp_a", "tp_e", "n_a", "m", "batch", "tbt_ms",
                "tokens_per_s_per_gpu", "tokens_per_s_per_cost", "per_gpu_vs_colocated",
                "per_cost_vs_colocated"):
        assert key in out
    assert out["tbt_ms"] <= 150
    assert out["simulated_tbt_ms"] == pytest.approx(out["tbt_ms"], rel=1e-6)


def test_text_output_and_config_json(tmp_path):
    cfg = {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
           "num_hidden_layers": 32, "num_local_experts": 8, "num_experts_per_tok": 2,
           "intermediate_size": 14336, "vocab_size": 32000}  # Mixtral-8x7B
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    assert load_model(str(tmp_path)).expert_intermediate == 14336
    r = plan("--model", str(path), "--gpus", "64", "--slo-ms", "100")
    assert r.returncode == 0, r.stderr
    assert "vs colocated" in r.stdout and "TBT" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--model", "NoSuchModel"], "unknown model 'NoSuchModel'"),
    (["--model", "DBRX", "--attention-gpu", "B9000"], "unknown GPU 'B9000'"),
    (["--model", "DBRX", "--slo-ms", "1"], "no plan meets the 1 ms TBT SLO"),
    (["--model", "DBRX", "--slo-ms", "-5"], "--slo-ms must be positive"),
    (["--model", "DeepSeek-V3", "--attention-gpu", "L20", "--expert-gpu", "L20", "--gpus", "8"],
     "no plan for DeepSeek-V3 fits in 8 GPUs"),
    (["--model", "DBRX", "--hardware-profile", "/nonexistent.json"], "no such file"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    r = plan(*args)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_bad_config_json(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    r = plan("--model", str(bad))
    assert r.returncode == 2 and "not valid JSON" in r.stderr and "Traceback" not in r.stderr
    bad.write_text(json.dumps({"hidden_size": 4096}))
    r = plan("--model", str(bad))
    assert r.returncode == 2 and "missing num_attention_heads" in r.stderr


def test_plan_does_not_import_torch():
    code = ("import sys; from services.cli import main; "
            "rc = main(['plan', '--model', 'Mixtral-8x22B', '--json']); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_profile_then_plan_with_it(tmp_path):
    out = tmp_path / "hw.json"
    r = plan("--profile", "--profile-out", str(out), "--json", "--local-batch", "8")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["prediction"]["tokens_per_s"] > 0
    profile = load_profile(out)
    assert profile.model == "local-tiny-moe" and len(profile.attention_points) >= 2
    # Timings grow with batch at the large end (measured, so only a loose monotonicity check).
    assert profile.expert_points[-1][1] > profile.expert_points[0][1]
    pred = predict_local(profile, PRESETS["local-tiny-moe"], batch=8, m=2)
    assert pred["tokens_per_s"] == pytest.approx(8 / (pred["tbt_ms"] / 1e3))
    r = plan("--model", "local-tiny-moe", "--hardware-profile", str(out), "--seq-len", "128",
             "--json")
    assert r.returncode == 0, r.stderr
    planned = json.loads(r.stdout)
    assert planned["attention_gpu"] == "local-cpu" and planned["tp_a"] == 1


def test_profile_a_checkpoint_times_the_real_engine_path(tmp_path):
    from services.core.demo import write_random_checkpoint

    model = write_random_checkpoint(tmp_path / "m", "mixtral", tokenizer=False, layers=2,
                                    hidden=64, intermediate=64, experts=4, top_k=2, heads=4,
                                    kv_heads=2, vocab=128)
    out = tmp_path / "hw.json"
    r = plan("--profile", "--model", str(model), "--profile-out", str(out), "--json",
             "--local-batch", "16", "--local-m", "2", "--seq-len", "32")
    assert r.returncode == 0, r.stderr
    pred = json.loads(r.stdout)["prediction"]
    profile = load_profile(out)
    # T_c comes from real dispatch/combine round trips at every profiled batch size.
    tc = profile.extra["transfer_points"]
    assert [b for b, _ in tc] == [b for b, _ in profile.attention_points]
    assert all(0 < t < 1.0 for _, t in tc)
    assert pred["b_a"] == 8 and 0 < pred["t_c_ms"] < 1000 and pred["tokens_per_s"] > 0
    # Two CPUs here: both sides were timed again while the other side ran on the other CPU,
    # and an overlapped (m >= 2) prediction uses those points; m = 1 does not overlap.
    assert len(os.sched_getaffinity(0)) >= 2
    for key in ("attention_points_corun", "expert_points_corun"):
        points = profile.extra[key]
        assert [b for b, _ in points] == [b for b, _ in profile.attention_points]
        assert all(0 < t < 1.0 for _, t in points)
    assert pred["co_run"] is True
    shape = load_model(str(model))
    assert predict_local(profile, shape, batch=16, m=1)["co_run"] is False
