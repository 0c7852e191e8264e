"""One precision from sampling to update. accelerate's setting decides it (`accelerate launch --mixed_precision bf16`
exports ACCELERATE_MIXED_PRECISION=bf16; CPU autocast has bf16, so the path a GPU user takes runs here): every script
runs two updates under bf16 while every forward of every model it loads is recorded, and each one, in sampling,
scoring, the update and evaluation alike, ran under the same bf16 autocast."""

import json

import pytest
import torch
from accelerate.state import AcceleratorState

import aihf
import aihf_explicit
import common
import dpo
import drpo
import grpo
import ppo
import rebel
import reward
import rloo
import sft
import xpo

RL = dict(total_episodes=16, batch_size=8, num_minibatches=2, eval_prompts=4, eval_every=1)
AIHF = dict(max_steps=2, batch_size=4, demo_batch_size=4, num_demonstrations=8, num_preferences=8, eval_prompts=4)
SCRIPTS = {
    "sft": (sft, dict(model="toy-tiny", max_steps=2, batch_size=8, eval_every=1, eval_prompts=4)),
    "reward": (reward, dict(max_steps=2, batch_size=8, eval_every=1, eval_pairs=8)),
    "dpo": (dpo, dict(max_steps=2, batch_size=8, eval_every=1, eval_prompts=4, eval_pairs=8)),
    "ppo": (ppo, RL),
    "drpo": (drpo, {**RL, "reset_prob": 0.5}),
    "rebel": (rebel, RL),
    "xpo": (xpo, RL),
    "rloo": (rloo, RL),
    "grpo": (grpo, {**RL, "k": 2}),
    "aihf": (aihf, {**AIHF, "eval_every": 1}),
    "aihf_explicit": (aihf_explicit, {**AIHF, "eval_every": 1}),
}


@pytest.fixture
def bf16(monkeypatch):
    """ACCELERATE_MIXED_PRECISION=bf16 for one test; accelerate's process-wide state is rebuilt before and after."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def autocast_dtype():
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None


def record_forwards(monkeypatch) -> list:
    """Every model that common.load_model returns records, at each forward, the autocast it runs under."""
    calls, load_model = [], common.load_model

    def recording_load_model(*args, **kwargs):
        model = load_model(*args, **kwargs)
        model.register_forward_pre_hook(lambda module, inputs: calls.append(autocast_dtype()))
        return model

    monkeypatch.setattr(common, "load_model", recording_load_model)
    return calls


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_every_forward_runs_under_the_same_bf16_autocast(toy_cache, tmp_path, monkeypatch, bf16, name, capsys):
    module, kwargs = SCRIPTS[name]
    calls = record_forwards(monkeypatch)
    module.main(module.Args(output_dir=str(tmp_path), run_name=name, **kwargs))
    assert "[setup] 1 process, single process, cpu, bf16" in capsys.readouterr().out
    assert len(calls) >= 10 and set(calls) == {torch.bfloat16}, f"{calls.count(None)} of {len(calls)} forwards in fp32"
    final = json.loads((tmp_path / name / "eval.json").read_text())
    assert all(torch.isfinite(torch.tensor(v)) for v in final.values())


def test_ppo_first_ratio_is_one_under_bf16(toy_cache, tmp_path, monkeypatch, bf16):
    """The rollout's log pi_old (no gradients, the whole batch) and the first minibatch's log pi (with gradients, a
    shuffled half) come from the same weights in the same numerics: their ratio is 1 within bf16's resolution."""
    seen, ppo_losses = [], ppo.ppo_losses

    def recording_ppo_losses(new_logps, new_values, rollout, *args):
        seen.append((new_logps.detach(), rollout["old_logps"], rollout["mask"]))
        return ppo_losses(new_logps, new_values, rollout, *args)

    monkeypatch.setattr(ppo, "ppo_losses", recording_ppo_losses)
    ppo.main(ppo.Args(output_dir=str(tmp_path), run_name="ppo", **{**RL, "total_episodes": 8, "eval_every": 10**9}))
    new_logps, old_logps, mask = seen[0]
    assert new_logps.dtype == old_logps.dtype == torch.float32  # log-softmax in fp32 from bf16 logits
    ratio = (new_logps - old_logps)[mask].exp()
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=2e-2)  # bf16: 8 bits of mantissa
