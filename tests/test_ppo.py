"""ppo.py: GAE, reward placement, the first-minibatch ratio, a smoke run and a learning check."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from toy_batches import toy_batch

import common
import data
import drpo
import ppo
import toy
import training

ROOT = Path(__file__).resolve().parents[1]


def gae_loop(rewards, values, gamma, lam):
    """The textbook backward recursion, one token at a time."""
    B, C = rewards.shape
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype)
    for t in reversed(range(C)):
        next_value = values[:, t + 1] if t + 1 < C else torch.zeros(B, dtype=rewards.dtype)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    return advantages, advantages + values


def test_gae_hand_values():
    rewards, values = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.5, 0.5]])
    advantages, returns = ppo.compute_gae(rewards, values, gamma=1.0, lam=0.95)
    torch.testing.assert_close(advantages, torch.tensor([[0.45125, 0.475, 0.5]]))
    torch.testing.assert_close(returns, torch.tensor([[0.95125, 0.975, 1.0]]))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.9, 0.0)])
def test_gae_vectorized_equals_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(7, 13, generator=g, dtype=torch.float64)
    values = torch.randn(7, 13, generator=g, dtype=torch.float64)
    mask = torch.arange(13)[None] < torch.randint(1, 14, (7, 1), generator=g)  # ragged ends, zeros after
    rewards, values = rewards * mask, values * mask
    adv, ret = ppo.compute_gae(rewards, values, gamma, lam)
    adv_loop, ret_loop = gae_loop(rewards, values, gamma, lam)
    torch.testing.assert_close(adv, adv_loop, rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, ret_loop, rtol=0, atol=1e-12)
    assert (adv[~mask] == 0).all()  # nothing leaks past the end of a completion


def test_per_token_rewards_hand_values():
    kl = torch.tensor([[0.2, -0.1, 0.3]])
    rewards = ppo.per_token_rewards(kl, torch.tensor([2.0]), torch.ones(1, 3, dtype=torch.bool), kl_coef=0.05)
    torch.testing.assert_close(rewards, torch.tensor([[-0.01, 0.005, 1.985]]))


def test_score_goes_to_the_eos_index_and_nothing_after():
    pad, eos = 0, 2
    completion, has_eos = common.truncate_after_eos(torch.tensor([[5, 6, eos, 7, 8], [5, 6, 7, 8, 9]]), eos, pad)
    mask = completion != pad
    kl = torch.full((2, 5), 0.1).masked_fill(~mask, 0)
    rewards = ppo.per_token_rewards(kl, torch.tensor([1.0, -1.0]), mask, kl_coef=0.5)
    torch.testing.assert_close(rewards[0], torch.tensor([-0.05, -0.05, 0.95, 0.0, 0.0]))
    torch.testing.assert_close(rewards[1], torch.tensor([-0.05, -0.05, -0.05, -0.05, -1.05]))  # no EOS: last token
    assert has_eos.tolist() == [True, False]


@pytest.mark.parametrize("module", [ppo, drpo], ids=["ppo", "drpo"])
def test_critic_starts_at_the_reward_score(module, toy_cache):
    """The critic is a copy of the reward model whose normalization bias its values subtract, as N+'s critic
    does: at the start, the value of the state after the last token (the head on the EOS) is the score."""
    tokenizer = data.load_tokenizer("toy-sft")
    pad_id = tokenizer.pad_token_id
    prompt, completion = toy_batch(tokenizer)
    reward_model, critic = common.load_model("toy-rm", "reward"), common.load_model("toy-rm", "reward")
    assert abs(critic.config.reward_bias) > 0.1  # the toy reward model's bias: large enough to matter here
    scores = common.reward_scores(reward_model, prompt, completion, pad_id)
    model = module.PolicyAndCritic(common.load_model("toy-sft"), critic)
    padded = torch.nn.functional.pad(completion, (0, 1), value=pad_id)
    _, values = module.logprobs_and_values(model, prompt, padded, pad_id, 1.0)
    end = (completion != pad_id).sum(1)  # values[:, t] reads the hidden state of token t - 1
    torch.testing.assert_close(values[torch.arange(len(end)), end], scores)


@pytest.mark.parametrize("module", [ppo, drpo], ids=["ppo", "drpo"])
def test_a_critic_started_from_the_gold_oracle_predicts_zero(module, toy_cache):
    """`--reward-model toy-gold`: the critic is toy-rm's network with its head at 0, so its values start at 0 at
    every position instead of at toy-rm's scores, which are on another scale than the gold reward that trains it."""
    tokenizer = data.load_tokenizer("toy-sft")
    prompt, completion = toy_batch(tokenizer)
    model = module.PolicyAndCritic(common.load_model("toy-sft"), common.load_model("toy-gold", "reward"))
    with torch.no_grad():
        _, values = module.logprobs_and_values(model, prompt, completion, tokenizer.pad_token_id, 1.0)
    assert values.shape == completion.shape and not values.any()


@pytest.mark.parametrize("module", [ppo, drpo], ids=["ppo", "drpo"])
def test_whiten_rewards_hand_values(module):
    """--whiten-rewards: rewards [0, 0, 4] on the completion tokens keep their mean 4/3 and are divided by their
    standard deviation sqrt(16/3) (unbiased): (0 - 4/3) / 2.3094 + 4/3 = 0.75598; padding stays 0."""
    rewards, mask = torch.tensor([[0.0, 0.0, 4.0, 9.0]]), torch.tensor([[True, True, True, False]])
    expected = torch.tensor([[0.7559831, 0.7559831, 2.4880339, 0.0]])
    torch.testing.assert_close(module.whiten_rewards(rewards, mask), expected)


@pytest.mark.parametrize("module", [ppo, drpo], ids=["ppo", "drpo"])
def test_whiten_rewards_flag_whitens_each_rollout(module, toy_cache, tmp_path, monkeypatch):
    whitened, whiten = [], module.whiten_rewards
    monkeypatch.setattr(module, "whiten_rewards", lambda rewards, mask: whitened.append(mask) or whiten(rewards, mask))
    run = {"output_dir": str(tmp_path), "total_episodes": 16, "batch_size": 8, "eval_prompts": 4}
    module.main(module.Args(**run, run_name="plain"))
    assert whitened == []  # off by default (N+)
    module.main(module.Args(**run, run_name="whiten", whiten_rewards=True))
    assert len(whitened) == 2 and all(m.shape[0] == 8 for m in whitened)  # once per update, over its rollout


def tiny_models(seed=0):
    torch.manual_seed(seed)
    tokenizer = toy.make_tokenizer()
    policy = common.load_model("toy-tiny")
    value = common.load_model("toy-tiny", "reward", new_head="normal")
    return tokenizer, policy, value


def rollout_batch(old_logps, old_values, advantages, returns, mask):
    return dict(old_logps=old_logps, old_values=old_values, advantages=advantages, returns=returns, mask=mask)


def test_ratio_is_one_at_the_first_minibatch():
    """Old log-probs come from the rollout pass over the whole batch; the first minibatch recomputes them
    on a shuffled subset with gradients. Same temperature and position ids, so the ratio is 1."""
    tokenizer, policy, value = tiny_models()
    args = ppo.Args(judge="toy:gold")
    prompts = data.tokenize_prompts(tokenizer, toy.sft_dataset("test")["prompt"][:16], 32)
    prompt = data.pad(prompts, tokenizer.pad_token_id, "left")
    completion, _ = common.generate(policy, prompt, tokenizer, 8, temperature=0.7)
    pad_id = tokenizer.pad_token_id
    mask = completion != pad_id
    model = ppo.PolicyAndCritic(policy, value)
    with torch.no_grad():
        old_logps, old_values = ppo.logprobs_and_values(model, prompt, completion, pad_id, 0.7)
        old_values = old_values.masked_fill(~mask, 0)
    idx = torch.randperm(16, generator=torch.Generator().manual_seed(1))[:8]
    new_logps, new_values = ppo.logprobs_and_values(model, prompt[idx], completion[idx], pad_id, 0.7)
    advantages = torch.randn(8, completion.shape[1]).masked_fill(~mask[idx], 0)
    rollout = rollout_batch(old_logps[idx], old_values[idx], advantages, old_values[idx], mask[idx])
    pg_loss, vf_loss, stats = ppo.ppo_losses(new_logps, new_values, rollout, args, mask[idx].sum())
    ratio = torch.exp(new_logps - old_logps[idx])[mask[idx]]
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-5)
    assert stats["policy/clipfrac"].item() == 0.0 and stats["policy/approxkl"].item() < 1e-10
    assert vf_loss.item() < 1e-10  # values equal the rollout values, returns set to them
    # at ratio 1 the clipped surrogate is minus the mean advantage
    torch.testing.assert_close(pg_loss, -common.masked_mean(advantages, mask[idx]), rtol=0, atol=1e-5)


def test_clipping_hand_values():
    """Ratio 1.5 with A>0 is clipped at 1.2; ratio 0.5 with A<0 is clipped at 0.8."""
    args = ppo.Args(judge="toy:gold")
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 0.5]]))
    adv = torch.tensor([[1.0, -1.0]])
    zeros = torch.zeros(1, 2)
    rollout = rollout_batch(old, zeros, adv, zeros, torch.ones(1, 2, dtype=torch.bool))
    pg, _, stats = ppo.ppo_losses(new, zeros, rollout, args, n_tokens=2)
    # per-token max(-A r, -A clip(r)): token 0 -> max(-1.5, -1.2) = -1.2; token 1 -> max(0.5, 0.8) = 0.8
    torch.testing.assert_close(pg, torch.tensor((-1.2 + 0.8) / 2))
    assert stats["policy/clipfrac"].item() == 1.0


def test_value_clipping_hand_values():
    args = ppo.Args(judge="toy:gold")
    mask = torch.ones(1, 1, dtype=torch.bool)
    zero = torch.zeros(1, 1)
    # V_old 0, V_new 1, R 1: unclipped error 0, clipped V = 0.2 -> error 0.64; loss = 0.5 * max = 0.32
    rollout = rollout_batch(zero, zero, zero, torch.ones(1, 1), mask)
    _, vf, stats = ppo.ppo_losses(zero, torch.ones(1, 1), rollout, args, n_tokens=1)
    torch.testing.assert_close(vf, torch.tensor(0.32))
    assert stats["val/clipfrac"].item() == 1.0 and stats["loss/value"] is vf


def read_metrics(run_dir):
    return [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]


def test_smoke_run(toy_cache, tmp_path):
    args = ppo.Args(
        judge="toy:gold", output_dir=str(tmp_path), run_name="smoke", total_episodes=64, batch_size=32, eval_prompts=16
    )
    ppo.main(args)
    rows = read_metrics(tmp_path / "smoke")
    updates = [r for r in rows if "objective/kl" in r]
    assert len(updates) == 2
    assert updates[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # first rollout: policy == reference
    for key in (
        "objective/scores",
        "objective/entropy",
        "policy/clipfrac",
        "policy/approxkl",
        "loss/policy",
        "loss/value",
        "val/explained_variance",
        "time/generation",
        "time/scoring",
        "time/update",
        "time/samples_per_second",
    ):
        assert key in updates[0]
    final = json.load(open(tmp_path / "smoke" / "eval.json"))
    assert {"eval/win_rate", "eval/kl", "eval/score", "time/update_last", "memory/peak_mb"} <= set(final)
    assert (tmp_path / "smoke" / "model.safetensors").exists()


def test_cli_bad_batch_size(toy_cache, tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "ppo.py"),
        "--output-dir",
        str(tmp_path),
        "--batch-size",
        "30",
        "--num-minibatches",
        "4",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**__import__("os").environ}, timeout=120)
    assert out.returncode != 0
    assert out.stderr.strip().startswith("error:") and "--num-minibatches" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("module", [ppo, drpo], ids=["ppo", "drpo"])
def test_update_epochs_flag(module, tmp_path):
    """--update-epochs (epochs over each rollout) replaces --ppo-epochs and must be positive."""
    assert "ppo_epochs" not in vars(module.Args()) and module.Args().update_epochs == 4
    with pytest.raises(training.UserError, match="--update-epochs 0 must be > 0"):
        module.main(module.Args(output_dir=str(tmp_path), update_epochs=0))


def test_learning_check(toy_cache, tmp_path):
    """On the tiny toy models, PPO raises the reward-model score of its training samples (what it maximizes)
    and the greedy policy's gold reward and win rate. (The tiny reward model is weak: the gold reward of the
    sampled training completions rises within two or three updates, then wanders within about 0.05.)"""
    args = ppo.Args(
        judge="toy:gold",
        output_dir=str(tmp_path),
        run_name="learn",
        total_episodes=64 * 24,
        batch_size=64,
        lr=1e-4,
        eval_prompts=200,
        eval_every=10**9,
    )
    ppo.main(args)
    rows = read_metrics(tmp_path / "learn")
    scores = [r["objective/scores"] for r in rows if "objective/scores" in r]
    evals = [r for r in rows if "eval/win_rate" in r]
    assert sum(scores[-8:]) / 8 > sum(scores[:4]) / 4 + 0.2, scores
    assert evals[-1]["eval/judge_score"] > evals[0]["eval/judge_score"] + 0.05, evals
    assert evals[-1]["eval/win_rate"] > evals[0]["eval/win_rate"] + 0.1, evals


def test_one_forward_gives_the_policy_log_probs_and_the_critic_values():
    """PolicyAndCritic runs both in one forward: its log-probs are completion_logprobs', its values the
    critic's head read at the state before each completion token (common.token_scores)."""
    tokenizer, policy, value = tiny_models()
    prompt = data.pad(
        data.tokenize_prompts(tokenizer, toy.sft_dataset("test")["prompt"][:6], 32), tokenizer.pad_token_id, "left"
    )
    completion, _ = common.generate(policy, prompt, tokenizer, 6, temperature=1.0)
    pad_id, P = tokenizer.pad_token_id, prompt.shape[1]
    logps, values = ppo.logprobs_and_values(ppo.PolicyAndCritic(policy, value), prompt, completion, pad_id, 0.7)
    expected_logps = common.completion_logprobs(policy, prompt, completion, pad_id, 0.7)
    torch.testing.assert_close(logps, expected_logps, rtol=0, atol=1e-5)
    expected = common.token_scores(value, prompt, completion, pad_id)[:, P - 1 : -1]
    torch.testing.assert_close(values, expected, rtol=0, atol=1e-5)


def test_losses_of_micro_batches_add_up_to_the_minibatch_token_mean():
    """Rows of 3 and 1 completion tokens split into two micro-batches: each one's loss is its token sum over the 4
    tokens of the minibatch, so the two add up to the minibatch's token mean (a mean of the micro-batch means, as
    N+ takes, would give the lone token of the short row a weight of 1/2 instead of 1/4)."""
    args = ppo.Args(judge="toy:gold")
    mask = torch.tensor([[True, True, True], [True, False, False]])
    new = torch.tensor([[0.1, -0.2, 0.3], [0.05, 0.0, 0.0]])
    adv, returns = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, 0.0]]), torch.tensor([[0.3, 0.1, -0.2], [1.0, 0.0, 0.0]])
    rollout = rollout_batch(torch.zeros(2, 3), torch.zeros(2, 3), adv, returns, mask)
    whole = ppo.ppo_losses(new, torch.zeros(2, 3), rollout, args, n_tokens=4)
    parts = [
        ppo.ppo_losses(new[i : i + 1], torch.zeros(1, 3), {k: v[i : i + 1] for k, v in rollout.items()}, args, 4)
        for i in range(2)
    ]
    for j in range(2):  # the policy and the value loss
        torch.testing.assert_close(parts[0][j] + parts[1][j], whole[j])
    ratio = new.exp()
    surrogate = torch.max(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))  # PPO Eq. (7), by hand
    torch.testing.assert_close(whole[0], surrogate[mask].mean())
    torch.testing.assert_close(whole[1], 0.5 * ((0 - returns) ** 2)[mask].mean())  # V = V_old = 0: no clipping
