"""--gradient-checkpointing in every training script: the trained models (policy, critic, trained reward
model) run their update passes in training mode, where transformers checkpoints, so each decoder layer's
forward runs twice per forward + backward (once more in the backward pass), and the gradients equal those
of the same run without the flag."""

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from transformers.modeling_layers import GradientCheckpointingLayer

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

RL = dict(total_episodes=8, batch_size=8, num_minibatches=1, eval_prompts=4)
AIHF = dict(max_steps=1, batch_size=4, demo_batch_size=4, num_demonstrations=8, num_preferences=8, eval_prompts=4)
SCRIPTS = {
    "sft": (sft, dict(model="toy-sft", max_steps=1, batch_size=8, eval_prompts=4)),
    "reward": (reward, dict(max_steps=1, batch_size=8, eval_pairs=8)),
    "dpo": (dpo, dict(max_steps=1, batch_size=8, eval_prompts=4, eval_pairs=8)),
    "ppo": (ppo, dict(RL, update_epochs=1)),
    "drpo": (drpo, dict(RL, update_epochs=1)),
    "rebel": (rebel, dict(RL, update_epochs=1)),
    "xpo": (xpo, dict(RL, update_epochs=1)),
    "rloo": (rloo, dict(RL, update_epochs=1)),
    "grpo": (grpo, dict(RL, update_epochs=1, k=2)),
    "aihf-dpo": (aihf, AIHF),
    "aihf-explicit": (aihf_explicit, dict(AIHF, policy_steps=1, rollout_prompts=4, center_demos=4)),
}
TWO_TRAINED = ("ppo", "drpo", "aihf-explicit")  # policy and critic, or policy and reward model


def run_counted(name, checkpointing, tmp_path, monkeypatch):
    """One short run of the script. For each model that common.trainable() prepares, the number of forward
    calls of its backbone and of one decoder layer's MLP made with gradients enabled (a checkpointed layer runs
    again in the backward pass, the backbone's forward does not); and the gradients at every optimizer step."""
    counts, grads = [], []
    trainable = common.trainable

    def counting(model, args):
        model = trainable(model, args)
        layer = next(m for m in model.modules() if isinstance(m, GradientCheckpointingLayer))
        c = {"model": 0, "layer": 0}
        # the backbone: PPO's critic runs it and its head, not its own forward (PolicyAndCritic in ppo.py)
        model.base_model.register_forward_pre_hook(lambda *_: c.update(model=c["model"] + torch.is_grad_enabled()))
        layer.mlp.register_forward_pre_hook(lambda *_: c.update(layer=c["layer"] + torch.is_grad_enabled()))
        counts.append(c)
        return model

    def record(optimizer, *_):
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        grads.append(torch.cat([p.grad.flatten() for p in params]))

    module, kw = SCRIPTS[name]
    run_name = f"gc{int(checkpointing)}"
    args = module.Args(output_dir=str(tmp_path), run_name=run_name, gradient_checkpointing=checkpointing, **kw)
    handle = register_optimizer_step_pre_hook(record)
    with monkeypatch.context() as patch:
        patch.setattr(common, "trainable", counting)
        try:
            module.main(args)
        finally:
            handle.remove()
    return counts, grads


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_checkpointing_recomputes_and_keeps_gradients(name, toy_cache, tmp_path, monkeypatch):
    plain, plain_grads = run_counted(name, False, tmp_path, monkeypatch)
    checkpointed, checkpointed_grads = run_counted(name, True, tmp_path, monkeypatch)
    assert len(plain) == len(checkpointed) == (2 if name in TWO_TRAINED else 1)
    for c in plain:  # without the flag each layer runs once per forward
        assert c["model"] > 0 and c["layer"] == c["model"], plain
    for c in checkpointed:  # with it, once more in the backward pass
        assert c["model"] > 0 and c["layer"] == 2 * c["model"], checkpointed
    assert len(plain_grads) == len(checkpointed_grads) > 0
    for a, b in zip(plain_grads, checkpointed_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
