"""xpo.py: the reduction to dpo.py's loss at alpha = 0, the sign and hand value of the exploration bonus,
ties, the alpha schedule, re-padding of stored pairs, the frozen reference as the sampler of y~, a smoke
run and a learning check on the tiny toy models of the `toy_cache` fixture."""

import json
import math
from pathlib import Path

import pytest
import torch
import tyro
from safetensors.torch import load_file

import common
import data
import dpo
import toy
import training
import xpo


def random_logps(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [-torch.rand(n, generator=g, dtype=torch.float64) * 30 for _ in range(5)]


def test_alpha_zero_is_exactly_the_dpo_loss():
    chosen, rejected, ref_chosen, ref_rejected, tilde = random_logps()
    losses, dpo_losses, bonus, r_c, r_r = xpo.xpo_loss(
        chosen, rejected, ref_chosen, ref_rejected, tilde, beta=0.1, alpha=0.0
    )
    ref_losses, ref_r_c, ref_r_r = dpo.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1)
    assert torch.equal(losses, ref_losses) and torch.equal(dpo_losses, ref_losses)
    assert torch.equal(r_c, ref_r_c) and torch.equal(r_r, ref_r_r) and bonus.abs().max() == 0
    # alpha > 0 only adds alpha * log pi(y~); the DPO term is unchanged
    losses, dpo_losses, bonus, *_ = xpo.xpo_loss(chosen, rejected, ref_chosen, ref_rejected, tilde, beta=0.1, alpha=0.3)
    assert torch.equal(dpo_losses, ref_losses)
    torch.testing.assert_close(losses, ref_losses + 0.3 * tilde, rtol=0, atol=1e-12)


def test_bonus_hand_value():
    """By hand: alpha 1e-5, sum log pi_theta(y~) = -100 -> -0.001 added to the loss."""
    zero = torch.zeros(1, dtype=torch.float64)
    losses, dpo_losses, bonus, *_ = xpo.xpo_loss(
        zero, zero, zero, zero, torch.tensor([-100.0], dtype=torch.float64), beta=0.1, alpha=1e-5
    )
    assert bonus.item() == pytest.approx(-0.001, abs=1e-15)
    assert dpo_losses.item() == pytest.approx(math.log(2), abs=1e-15)
    assert losses.item() == pytest.approx(math.log(2) - 0.001, abs=1e-15)


def test_logged_rewards_are_detached():
    policy = torch.tensor([-3.0, -4.0], requires_grad=True)
    losses, _, bonus, r_c, r_r = xpo.xpo_loss(
        policy[:1], policy[1:], torch.tensor([-3.5]), torch.tensor([-3.0]), policy[1:], beta=0.1, alpha=0.1
    )
    assert losses.requires_grad and bonus.requires_grad and not r_c.requires_grad and not r_r.requires_grad


def tiny_batch(n=16, seed=0):
    torch.manual_seed(seed)
    tokenizer = toy.make_tokenizer()
    policy = common.load_model("toy-tiny")
    prompts = data.tokenize_prompts(tokenizer, toy.sft_dataset("test")["prompt"][:n], 32)
    prompt = data.pad(prompts, tokenizer.pad_token_id, "left")
    completion, _ = common.generate(policy, prompt, tokenizer, 8, temperature=1.0)
    return tokenizer, policy, prompt, completion


def test_one_sgd_step_on_the_bonus_lowers_log_pi_of_the_reference_sample():
    """The sign of the paper: +alpha log pi(y~) in the minimized loss pushes probability away from y~."""
    tokenizer, policy, prompt, tilde = tiny_batch()
    pad_id = tokenizer.pad_token_id
    before = common.completion_logprobs(policy, prompt, tilde, pad_id).sum(1)
    zeros = torch.zeros_like(before)
    _, _, bonus, _, _ = xpo.xpo_loss(zeros, zeros, zeros, zeros, before, beta=0.1, alpha=0.1)
    bonus.mean().backward()  # the bonus alone, no DPO term
    torch.optim.SGD(policy.parameters(), lr=1.0).step()
    with torch.no_grad():
        after = common.completion_logprobs(policy, prompt, tilde, pad_id).sum(1)
    assert after.mean() < before.mean() - 1e-3, (before.mean(), after.mean())


def test_ties_go_to_the_policy_sample():
    policy_scores = torch.tensor([1.0, 0.5, -1.0, 0.0])
    ref_scores = torch.tensor([1.0, 0.7, -2.0, 0.0])
    assert xpo.label_pairs(policy_scores, ref_scores).tolist() == [True, False, True, True]


def test_alpha_schedule_segments():
    alphas = (1e-2, 5e-3, 0.0)
    assert [xpo.alpha_at(alphas, u, 9) for u in range(1, 10)] == [1e-2] * 3 + [5e-3] * 3 + [0.0] * 3
    assert [xpo.alpha_at(alphas, u, 10) for u in range(1, 11)] == [1e-2] * 4 + [5e-3] * 3 + [0.0] * 3
    assert [xpo.alpha_at(alphas, u, 2) for u in (1, 2)] == [1e-2, 5e-3]  # fewer updates than values
    assert {xpo.alpha_at((0.5,), u, 7) for u in range(1, 8)} == {0.5}


def test_stored_pairs_re_padded_give_the_same_logps():
    """Pairs are stored unpadded (for replay) and re-padded per minibatch: log-probs must not change, and
    the policy/reference halves of the minibatch must come back in order."""
    tokenizer, policy, prompt, completion = tiny_batch(8)
    pad_id = tokenizer.pad_token_id
    _, _, tilde = tiny_batch(8, seed=1)[1:]
    with torch.no_grad():
        lp_y = common.completion_logprobs(policy, prompt, completion, pad_id).sum(1)
        lp_t = common.completion_logprobs(policy, prompt, tilde, pad_id).sum(1)
    won = torch.tensor([True, False] * 4)
    rows = xpo.to_rows(prompt, completion, tilde, won, lp_y, lp_t, pad_id)
    order = [5, 2, 7, 0]
    p, c, extra = xpo.collate([rows[i] for i in order], pad_id, "cpu")
    with torch.no_grad():
        y, t = common.completion_logprobs(policy, p, c, pad_id).sum(1).chunk(2)
    torch.testing.assert_close(y, lp_y[order], rtol=0, atol=1e-5)
    torch.testing.assert_close(t, lp_t[order], rtol=0, atol=1e-5)
    assert extra["policy_won"].tolist() == won[order].tolist() and extra["ref_tilde"].tolist() == lp_t[order].tolist()


def read_metrics(run_dir):
    return [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]


def test_reference_samples_come_from_the_frozen_reference(toy_cache, tmp_path, monkeypatch):
    """Record every generate() call: each update draws exactly one sample from a frozen model (y~), whose
    log-probs of its own samples do not move during training and whose weights equal the SFT checkpoint's
    after the run, while the policy's weights do change."""
    calls, generate = [], common.generate

    def recording_generate(model, prompt, tokenizer, *a, **kw):
        out = generate(model, prompt, tokenizer, *a, **kw)
        if not any(p.requires_grad for p in model.parameters()):
            with torch.no_grad():
                logps = common.completion_logprobs(model, prompt, out[0], tokenizer.pad_token_id, 1.0)
            calls.append((model, prompt, out[0], tokenizer.pad_token_id, logps))
        return out

    monkeypatch.setattr(common, "generate", recording_generate)
    args = xpo.Args(
        judge="toy:gold",
        output_dir=str(tmp_path),
        run_name="ref",
        total_episodes=96,
        batch_size=32,
        eval_prompts=16,
        lr=1e-3,
    )
    xpo.main(args)
    assert len(calls) == 3 and len({id(c[0]) for c in calls}) == 1  # one y~ batch per update, one frozen model
    ref_model = calls[0][0]
    assert not ref_model.training
    for model, prompt, completion, pad_id, logps in calls:
        with torch.no_grad():
            now = common.completion_logprobs(model, prompt, completion, pad_id, 1.0)
        assert torch.equal(now, logps)
    sft = load_file(str(toy_cache / "toy-sft" / "model.safetensors"))
    trained = load_file(str(tmp_path / "ref" / "model.safetensors"))
    state = ref_model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in sft.items())
    assert any(not torch.equal(trained[k], v) for k, v in sft.items())


def test_smoke_run_replay_gold_oracle_and_schedule(toy_cache, tmp_path):
    args = xpo.Args(
        judge="toy:gold",
        output_dir=str(tmp_path),
        run_name="smoke",
        total_episodes=64,
        batch_size=32,
        eval_prompts=16,
        replay=True,
        reward_model="toy-gold",
        alpha=(0.1, 0.0),
        max_new_tokens=2,  # some completions end without EOS
    )
    xpo.main(args)
    rows = read_metrics(tmp_path / "smoke")
    updates = [r for r in rows if "loss/dpo" in r]
    assert len(updates) == 2
    assert [u["buffer_size"] for u in updates] == [32, 64] and [u["alpha"] for u in updates] == [0.1, 0.0]
    assert updates[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # first batch: policy == reference
    assert updates[0]["loss/xpo"] < 0 and updates[1]["loss/xpo"] == 0.0
    for key in (
        "loss/dpo",
        "loss/xpo",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "objective/scores",
        "objective/ref_scores",
        "objective/kl",
        "objective/policy_win_rate",
        "objective/gold",
        "time/generation",
        "time/scoring",
        "time/update",
        "time/samples_per_second",
    ):
        assert math.isfinite(updates[0][key]), key
    # the gold oracle: policy sample scores are the gold rewards of the policy samples, the gold reward's own
    # missing-EOS term included (not --no-eos-score)
    assert updates[0]["val/model_contain_eos_token"] < 1
    assert updates[0]["objective/scores"] == pytest.approx(updates[0]["objective/gold"], abs=1e-6)
    final = json.load(open(tmp_path / "smoke" / "eval.json"))
    assert {"eval/win_rate", "eval/kl", "eval/score", "initial/win_rate", "time/update_last", "memory/peak_mb"} <= set(
        final
    )
    assert final["initial/kl"] == pytest.approx(0.0, abs=1e-4)
    assert (tmp_path / "smoke" / "model.safetensors").exists() and (tmp_path / "smoke" / "tokenizer.json").exists()


def test_input_mistakes_are_user_errors(toy_cache, tmp_path):
    with pytest.raises(training.UserError, match="--reward-model toy-gold needs --dataset toy"):
        xpo.main(xpo.Args(judge="toy:gold", output_dir=str(tmp_path), dataset="prefs.jsonl", reward_model="toy-gold"))
    with pytest.raises(training.UserError, match="--num-minibatches"):
        xpo.main(xpo.Args(judge="toy:gold", output_dir=str(tmp_path), batch_size=30, num_minibatches=4))


def test_flag_names():
    """One name per meaning: --update-epochs (epochs over each batch of pairs), --eval-every 16 updates by default;
    the oracle is --reward-model (toy-gold for the gold reward), no --oracle."""
    args = tyro.cli(xpo.Args, args=["--update-epochs", "2", "--reward-model", "toy-gold"])
    assert args.update_epochs == 2 and args.reward_model == "toy-gold" and args.eval_every == 16
    for gone in (["--epochs", "2"], ["--oracle", "gold"]):
        with pytest.raises(SystemExit):
            tyro.cli(xpo.Args, args=gone)


def test_learning_check(toy_cache, tmp_path):
    """On the tiny toy models, XPO (default alpha, learned reward model as the judge) raises the gold win
    rate against the reference summaries and the reward-model score over the SFT policy (step 0)."""
    args = xpo.Args(
        judge="toy:gold",
        output_dir=str(tmp_path),
        run_name="learn",
        total_episodes=64 * 16,
        batch_size=64,
        lr=3e-4,
        eval_prompts=200,
        eval_every=10**9,
    )
    xpo.main(args)
    final = json.load(open(tmp_path / "learn" / "eval.json"))
    assert final["eval/win_rate"] > final["initial/win_rate"] + 0.05, final
    assert final["eval/score"] > final["initial/score"], final
