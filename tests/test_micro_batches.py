"""--micro-batch-size is memory only: every training script takes the same update with the whole minibatch in one
forward/backward and with micro-batches that split it unevenly (3 + 3 + 2 rows of 8), on completions of different
lengths (different EOS positions; DR-PO with different reset points). Each loss is normalized over the whole
minibatch (its rows, or its tokens), never per micro-batch."""

import json

import pytest
import torch
from safetensors.torch import load_file

import aihf
import aihf_explicit
import dpo
import drpo
import grpo
import ppo
import rebel
import reward
import rloo
import sft
import xpo

# two updates for the scripts with a critic: the second rollout's advantages depend on the value loss of the first
RL = dict(total_episodes=16, batch_size=8, num_minibatches=1, update_epochs=2, eval_prompts=4, eval_every=10**9)
AIHF = dict(max_steps=2, batch_size=8, demo_batch_size=8, num_demonstrations=16, num_preferences=16)
CASES = {
    "sft": (sft, dict(model="toy-tiny", max_steps=2, batch_size=8, eval_prompts=4), "loss"),
    "reward": (reward, dict(max_steps=2, batch_size=8, eval_pairs=8), "loss"),
    "dpo": (dpo, dict(max_steps=2, batch_size=8, eval_prompts=4, eval_pairs=8, eval_every=10**9), "loss"),
    "ppo": (ppo, RL, "loss/value"),
    "drpo": (drpo, {**RL, "reset_prob": 0.5}, "loss/value"),
    "rebel": (rebel, RL, "loss/policy"),
    "xpo": (xpo, RL, "loss/total"),
    "rloo": (rloo, {**RL, "k": 2}, "loss/policy"),
    "grpo": (grpo, {**RL, "k": 2}, "loss/policy"),
    "aihf": (aihf, {**AIHF, "eval_prompts": 4, "eval_every": 10**9}, "loss"),
    # a reward phase at every update, so the second policy update reads r_phi's first step; no single "loss" logged
    "aihf_explicit": (
        aihf_explicit,
        {**AIHF, "eval_prompts": 4, "eval_every": 10**9, "policy_steps": 1},
        "loss/policy",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_micro_batches_take_the_whole_minibatch_step(toy_cache, tmp_path, name):
    module, kwargs, loss_key = CASES[name]
    for run_name, micro in (("whole", 8), ("micro", 3)):
        module.main(module.Args(output_dir=str(tmp_path), run_name=run_name, micro_batch_size=micro, lr=1e-3, **kwargs))
    whole, micro = (load_file(tmp_path / n / "model.safetensors") for n in ("whole", "micro"))
    assert whole.keys() == micro.keys()
    start = load_file(toy_cache / "toy-sft" / "model.safetensors")  # (sft.py starts from a fresh model instead)
    same = [k for k in start if k in whole and whole[k].shape == start[k].shape]
    assert max((whole[k] - start[k]).abs().max() for k in same) > 1e-4  # a real update, far above the tolerance
    for k in whole:
        torch.testing.assert_close(whole[k], micro[k], rtol=0, atol=1e-6)
    logs = [
        [json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in ("whole", "micro")
    ]
    last = [[row for row in rows if loss_key in row][-1] for rows in logs]
    assert last[0][loss_key] == pytest.approx(last[1][loss_key], abs=1e-5)
