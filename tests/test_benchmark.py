"""benchmark.py: equal policy-sample budgets in the planned command lines, one-line errors for bad flags, and
an end-to-end `--quick` run at a tiny budget on the tiny toy models (tables, results.json, plots, progress)."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import benchmark
import toy

ROOT = Path(__file__).resolve().parents[1]
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def flag(argv, name):
    return int(argv[argv.index(name) + 1])


def test_online_methods_get_the_same_policy_sample_budget(tmp_path):
    args = benchmark.Args(output_dir=str(tmp_path), seeds=(1, 2), budget=1024, eval_every=256)
    jobs = benchmark.plan(args, tmp_path)
    online = [j for j in jobs if j.group in ("main", "gold", "reset") and j.label.split()[0] in benchmark.ONLINE]
    assert {j.label for j in online if j.group == "main"} == set(benchmark.ONLINE)
    for job in online:
        per_prompt = 2 if job.script == "rebel.py" else 1  # REBEL: two completions per prompt
        assert flag(job.argv, "--total-episodes") * per_prompt == 1024, job.argv
        assert flag(job.argv, "--batch-size") * per_prompt == 64, job.argv  # 64 policy samples per update
        assert flag(job.argv, "--eval-every") == 4, job.argv  # every 256 samples
    gold = [j for j in jobs if j.group == "gold"]
    assert gold and all(j.argv[j.argv.index("--reward-model") + 1] == "toy-gold" for j in gold)
    assert {j.argv[j.argv.index("--reset-prob") + 1] for j in jobs if j.group == "reset"} == {"0", "0.5"}
    odpo = next(j for j in jobs if j.label == "odpo")
    assert odpo.script == "xpo.py" and odpo.argv[odpo.argv.index("--alpha") + 1] == "0"
    # the aihf mode: each RL run reads the reward model trained on the same N pairs, after it
    for job in (j for j in jobs if j.label.startswith("rm+ppo")):
        rm = next(j for j in jobs if j.key == job.after)
        assert job.argv[job.argv.index("--reward-model") + 1] == str(rm.dir) and rm.label == job.label.replace(
            "rm+ppo", "rm"
        )
    # the alpha mode: XPO at the other alphas, beside the main runs' default 0.01 and online DPO's 0
    assert {j.argv[j.argv.index("--alpha") + 1] for j in jobs if j.group == "alpha"} == {"0.001", "0.1"}
    rms = [j for j in jobs if j.script == "reward.py"]  # the RM sees the same first N pairs as DPO and AIHF
    assert {flag(j.argv, "--num-preferences") for j in rms} == set(args.num_preferences)
    assert len({j.key for j in jobs}) == len(jobs)  # run directories never collide
    assert not any("--dataset" in j.argv for j in jobs)  # the short tier: every script's default


def test_the_long_tier_runs_every_script_on_it(tmp_path):
    args = benchmark.Args(output_dir=str(tmp_path), dataset="toy-long", seeds=(1,))
    jobs = benchmark.plan(args, tmp_path)
    assert {j.script for j in jobs} == {
        "sft.py",
        "ppo.py",
        "drpo.py",
        "rebel.py",
        "xpo.py",
        "dpo.py",
        "aihf.py",
        "reward.py",
    }
    assert all(j.argv[j.argv.index("--dataset") + 1] == "toy-long" for j in jobs)
    # the tables name each tier's own demonstration set: the SFT data and AIHF's demonstrations
    assert benchmark.demonstrations(args) == len(toy.sft_dataset("train", tier="toy-long")) == 38_400
    assert benchmark.demonstrations(benchmark.Args()) == len(toy.sft_dataset("train")) == 20_000


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--bogus"], "--bogus"),
        (["--budget", "100"], "multiples of 64"),
        (["--methods", "sfx"], "sfx"),
        (["--jobs", "0"], "--jobs"),
    ],
)
def test_bad_flags_give_one_line_errors(tmp_path, argv, needle):
    cmd = [sys.executable, str(ROOT / "benchmark.py"), "--output-dir", str(tmp_path), "--no-plots", *argv]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], out.stderr


def test_quick_run(toy_cache, tmp_path):
    """The whole pipeline at a tiny budget: 64 policy samples, 16 eval prompts, 7 runs of the real scripts."""
    cmd = [
        sys.executable,
        str(ROOT / "benchmark.py"),
        "--quick",
        "--output-dir",
        str(tmp_path),
        "--modes",
        "main",
        "gold",
        "aihf",
        "--methods",
        "ppo",
        "dpo",
        "--budget",
        "64",
        "--eval-prompts",
        "16",
        "--num-preferences",
        "100",
        "--jobs",
        "2",
    ]
    if not HAS_MATPLOTLIB:
        cmd.append("--no-plots")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    progress = [ln for ln in out.stdout.splitlines() if ln.startswith("[bench] ") and "ETA" in ln]
    assert len(progress) == 7, out.stdout  # one line per finished run: 2 main, 1 gold, 4 aihf

    results = json.loads((tmp_path / "results.json").read_text())
    runs = results["runs"]
    assert len(runs) == 7 and all(r["ok"] for r in runs)
    for r in runs:
        final = r["final"]
        if r["label"].startswith("rm "):
            assert 0.0 <= final["eval/accuracy"] <= 1.0
            continue
        assert 0.0 <= final["eval/win_rate"] <= 1.0 and -1.0 <= final["eval/judge_score"] <= 1.0, r
        assert math.isfinite(final["eval/kl"]) and 1.0 <= final["eval/length"] <= 8.0, r
        assert r["wall_s"] > 0 and len(r["curve"]) >= 2 and r["curve"][0]["x"] == 0, r
    ppo = next(r for r in runs if r["group"] == "main" and r["label"] == "ppo")
    assert [p["x"] for p in ppo["curve"]] == [0, 64]  # one evaluation per 64 policy samples, in samples
    gold_ppo = next(r for r in runs if r["group"] == "gold" and r["label"] == "ppo")
    assert "--reward-model toy-gold" in gold_ppo["command"]

    table = (tmp_path / "results.md").read_text()
    for needle in (
        "| PPO | 64 samples |",
        "| DPO |",
        "SFT checkpoint",
        "Gold reward as the RL reward",
        "| 100 | AIHF-DPO",
        "| 100 | SFT → RM → PPO",
        "peak memory",
    ):
        assert needle in table, needle
    row = next(ln for ln in table.splitlines() if ln.startswith("| PPO | 64 samples |"))
    win = float(row.split("|")[3])
    assert win == pytest.approx(ppo["final"]["eval/win_rate"], abs=5e-4)  # the table shows the run's number
    if HAS_MATPLOTLIB:
        for name in ("curves.png", "frontier.png", "oracle.png", "aihf.png"):
            data = (tmp_path / name).read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name

    # a second call reuses the finished runs (same commands) and only redraws
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ})
    assert (
        again.returncode == 0
        and json.loads((tmp_path / "results.json").read_text())["runs"][0]["final"] == runs[0]["final"]
    )
