"""The path a GPU user takes, on one CUDA GPU (skipped without one): every script two updates from its command line
on the tiny toy models, in bf16 (the default on a GPU that has it), one of them under DeepSpeed ZeRO-2 through
`accelerate launch`; each saved model loads back with transformers, and each run's peak GPU memory is printed
(`pytest -s tests/test_gpu.py` shows it)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from test_precision import SCRIPTS
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def command_line(kwargs: dict) -> list[str]:
    return [x for k, v in kwargs.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def run_script(launcher: list[str], script: str, kwargs: dict, out) -> dict:
    cmd = [*launcher, str(ROOT / f"{script}.py"), "--output-dir", str(out), "--run-name", script, *command_line(kwargs)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ}, cwd=ROOT)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    assert ", cuda, bf16" in result.stdout, result.stdout[:2000]  # the [setup] line: one GPU, bf16 autocast
    final = json.loads((out / script / "eval.json").read_text())
    cls = AutoModelForSequenceClassification if script == "reward" else AutoModelForCausalLM
    model = cls.from_pretrained(out / script)  # the saved model loads back
    assert all(p.isfinite().all() for p in model.parameters())
    how = "ZeRO-2" if "accelerate.commands.launch" in launcher else "one process"
    print(f"\n[gpu] {script} ({how}): peak {final['memory/peak_mb']:.0f} MiB, {final['time/total']:.1f} s")
    return final


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_two_updates_on_one_gpu_in_bf16(toy_cache, tmp_path, script):
    module, kwargs = SCRIPTS[script]
    run_script([sys.executable], script, kwargs, tmp_path)


def test_zero2_under_accelerate_launch_on_one_gpu(toy_cache, tmp_path):
    pytest.importorskip("deepspeed")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs/zero2.yaml")]
    launcher += ["--num_processes", "1"]
    run_script(launcher, "ppo", SCRIPTS["ppo"][1], tmp_path)
