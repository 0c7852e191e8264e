"""DeepSpeed, for real, on this CPU machine: every training script under `accelerate launch --config_file
configs/zero2.yaml` and `zero3.yaml` with 2 processes (gloo). After each of two updates its trained models
equal those of the DDP run (torchrun, same arguments) to 1e-5; each update takes the number of optimizer
steps its flags ask for (counted); a run stopped and resumed from its DeepSpeed checkpoint (sharded under
ZeRO-3) ends where the uninterrupted one does. Slow (a few minutes): `pytest -m "not slow"` skips it."""

import importlib.util
import sys

import ddp_worker
import pytest
import torch
from conftest import RESUMED, ROOT, free_port, launch_two_processes

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(torch.cuda.is_available(), reason="the gloo CPU path"),
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="pip install deepspeed"),
]


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def zero(request, toy_cache, tmp_path_factory):
    """(stage, output directory, stdout) of every script under DeepSpeed ZeRO-<stage>."""
    out = tmp_path_factory.mktemp(f"zero{request.param}")
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "configs" / f"zero{request.param}.yaml"),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "--main_process_port",
        str(free_port()),
    ]
    result = launch_two_processes(launcher, out)
    return request.param, out, result.stdout


def expected_steps(name: str) -> int:
    """Optimizer steps per update, from the script's flags."""
    script, kw = ddp_worker.RUNS[name]
    args = script.Args(**kw)
    if name in ("ppo", "drpo", "rebel", "xpo", "rloo", "grpo"):
        return args.update_epochs * args.num_minibatches
    if name == "aihf-explicit":  # one policy step, then reward_steps steps of r_phi (policy_steps = 1)
        return 1 + args.reward_steps
    return 1


def test_the_launch_is_deepspeed(zero):
    stage, _, stdout = zero
    assert f"[setup] 2 processes, DeepSpeed ZeRO-{stage}, cpu, fp32" in stdout


@pytest.mark.parametrize("name", list(ddp_worker.RUNS))
def test_each_update_equals_the_ddp_run(name, zero, two_ranks):
    _, out, _ = zero
    ours = torch.load(out / f"{name}.rank0.pt", weights_only=True)
    ddp = torch.load(two_ranks / f"{name}.rank0.pt", weights_only=True)
    assert len(ours["updates"]) == len(ddp["updates"]) == 2
    for a, b in zip(ours["updates"], ddp["updates"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert not torch.equal(ours["updates"][0], ours["updates"][1])  # the update changed the weights
    assert (out / f"{name}-2" / "eval.json").exists() and (out / f"{name}-2" / "model.safetensors").exists()


@pytest.mark.parametrize("name", list(ddp_worker.RUNS))
def test_optimizer_steps_per_update_are_what_the_flags_say(name, zero, two_ranks):
    _, out, _ = zero
    for rank in (0, 1):
        assert torch.load(out / f"{name}.rank{rank}.pt", weights_only=True)["steps"] == [expected_steps(name)] * 2
    assert torch.load(two_ranks / f"{name}.rank0.pt", weights_only=True)["steps"] == [expected_steps(name)] * 2


@pytest.mark.parametrize("name", [r.removesuffix("-resume") for r in RESUMED])
def test_stopped_and_resumed_ends_where_the_uninterrupted_run_does(name, zero):
    stage, out, _ = zero
    full = torch.load(out / f"{name}.rank0.pt", weights_only=True)["updates"][-1]
    resumed = torch.load(out / f"{name}-resume.rank0.pt", weights_only=True)["updates"][-1]
    torch.testing.assert_close(resumed, full, rtol=0, atol=0)
    engine = out / f"{name}-resume-2" / "checkpoint" / "accelerator_0" / "pytorch_model"
    shards = sorted(p.name for p in engine.glob("*model_states.pt"))
    assert len(shards) == (2 if stage == 3 else 1)  # ZeRO-3 saves each process's shard of the weights
