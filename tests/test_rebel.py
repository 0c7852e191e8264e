"""rebel.py: the regression loss and reward on hand values, the first-minibatch invariant, swap symmetry,
pairs kept together by the minibatch construction, a smoke run and a learning check."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import tyro

import common
import data
import rebel
import toy

ROOT = Path(__file__).resolve().parents[1]


def test_loss_hand_values():
    """By hand: log pi_theta / log pi_t = -10 / -11 for y, -12 / -12 for y'; R = 0.5, -0.3; eta 1."""
    new, old, rewards = torch.tensor([-10.0, -12.0]), torch.tensor([-11.0, -12.0]), torch.tensor([0.5, -0.3])
    loss, s = rebel.rebel_loss(new, old, rewards, eta=1.0)
    torch.testing.assert_close(s["delta_logratio"], torch.tensor([1.0]))
    torch.testing.assert_close(s["target"], torch.tensor([0.8]))
    torch.testing.assert_close(loss, torch.tensor(0.04))
    loss2, _ = rebel.rebel_loss(new, old, rewards, eta=2.0)  # residual 1 - 1.6 = -0.6
    torch.testing.assert_close(loss2, torch.tensor(0.36))


def test_reward_hand_values():
    """R = s - beta_KL * sum_t k_t: s 1.0, sum k 4, beta 0.05 -> 0.8; entries past the mask do not count."""
    kl = torch.tensor([[1.0, 1.0, 2.0, 7.0]])
    mask = torch.tensor([[True, True, True, False]])
    torch.testing.assert_close(rebel.sequence_rewards(torch.tensor([1.0]), kl, mask, kl_coef=0.05), torch.tensor([0.8]))


def test_chat_reward_hand_values():
    """REBEL's official chat reward: RM score / 1000 (--reward-scale 0.001), then -4 without EOS (not scaled),
    then - 0.05 * sum_t k_t."""
    raw, has_eos = torch.tensor([2500.0, -800.0, 3000.0]), torch.tensor([True, True, False])
    scores = rebel.scaled_scores(raw, has_eos, reward_scale=0.001, no_eos_score=-4.0)
    torch.testing.assert_close(scores, torch.tensor([2.5, -0.8, -4.0]))
    kl = torch.tensor([[1.0, 3.0], [0.5, 9.0], [2.0, 2.0]])
    mask = torch.tensor([[True, True], [True, False], [True, True]])
    rewards = rebel.sequence_rewards(scores, kl, mask, kl_coef=0.05)
    torch.testing.assert_close(rewards, torch.tensor([2.3, -0.825, -4.2]))


def test_reward_scale_comes_before_the_missing_eos_rule(toy_cache, tmp_path, monkeypatch):
    """A run with every raw score 2 and --reward-scale 0.5: completions with EOS score 1, the others -1."""
    monkeypatch.setattr(
        common, "reward_scores", lambda rm, prompt, completion, *a, **k: torch.full((len(completion),), 2.0)
    )
    run = {"output_dir": str(tmp_path), "run_name": "scale", "total_episodes": 16, "batch_size": 16, "eval_prompts": 4}
    rebel.main(rebel.Args(judge="toy:gold", **run, reward_scale=0.5, max_new_tokens=3))
    update = next(r for r in read_metrics(tmp_path / "scale") if "objective/scores" in r)
    eos = update["objective/eos_rate"]
    assert 0 < eos < 1  # both kinds of completion occur (3 new tokens)
    assert update["objective/scores"] == pytest.approx(eos * 1.0 + (1 - eos) * -1.0, abs=1e-6)


def test_swapping_y_and_y_prime_leaves_the_loss_unchanged():
    g = torch.Generator().manual_seed(0)
    new, old, rewards = (torch.randn(10, generator=g, dtype=torch.float64) for _ in range(3))
    swap = torch.cat([torch.arange(5, 10), torch.arange(5)])
    loss, s = rebel.rebel_loss(new, old, rewards, eta=1.5)
    loss_swapped, s_swapped = rebel.rebel_loss(new[swap], old[swap], rewards[swap], eta=1.5)
    torch.testing.assert_close(loss, loss_swapped, rtol=0, atol=1e-12)
    torch.testing.assert_close(s["residual"], -s_swapped["residual"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("num_pairs,num_minibatches,micro_pairs", [(12, 3, 2), (12, 1, 5), (8, 2, 64)])
def test_minibatches_keep_pairs_together(num_pairs, num_minibatches, micro_pairs):
    g = torch.Generator().manual_seed(0)
    epochs = [rebel.pair_minibatches(num_pairs, num_minibatches, micro_pairs, g) for _ in range(3)]
    for minibatches in epochs:
        assert len(minibatches) == num_minibatches
        rows = []
        for minibatch in minibatches:
            assert sum(len(idx) for idx in minibatch) == 2 * num_pairs // num_minibatches
            for idx in minibatch:
                y, y2 = idx.chunk(2)  # [y of each pair; y' of each pair], in the same order
                assert (y < num_pairs).all() and torch.equal(y2, y + num_pairs)
                assert len(idx) <= 2 * micro_pairs
                rows += idx.tolist()
        assert sorted(rows) == list(range(2 * num_pairs))  # every row exactly once per epoch
    orders = [torch.cat([idx for mb in minibatches for idx in mb]).tolist() for minibatches in epochs]
    assert orders[0] != orders[1] or orders[1] != orders[2]  # prompts are shuffled between epochs


def test_first_minibatch_logratio_is_zero():
    """pi_t's log-probs come from the rollout pass over the whole batch; the first minibatch recomputes them
    on a shuffled subset with gradients. Same temperature and position ids, so the log-ratio difference is 0
    and the loss is mean((eta * delta R)^2)."""
    torch.manual_seed(0)
    tokenizer, policy = toy.make_tokenizer(), common.load_model("toy-tiny")
    pad_id, n = tokenizer.pad_token_id, 8
    prompts = data.tokenize_prompts(tokenizer, toy.sft_dataset("test")["prompt"][:n], 32)
    prompt = data.pad(prompts, pad_id, "left")
    prompt = torch.cat([prompt, prompt])
    completion, _ = common.generate(policy, prompt, tokenizer, 8, temperature=0.7)
    with torch.no_grad():
        old = common.completion_logprobs(policy, prompt, completion, pad_id, 0.7).sum(1)
    rewards = torch.randn(2 * n, generator=torch.Generator().manual_seed(1))
    idx = rebel.pair_minibatches(n, 2, n, torch.Generator().manual_seed(2))[0][0]
    new = common.completion_logprobs(policy, prompt[idx], completion[idx], pad_id, 0.7).sum(1)
    loss, s = rebel.rebel_loss(new, old[idx], rewards[idx], eta=2.0)
    torch.testing.assert_close(s["delta_logratio"], torch.zeros(n // 2), rtol=0, atol=1e-5)
    y, y2 = rewards[idx].chunk(2)
    torch.testing.assert_close(loss, ((2.0 * (y - y2)) ** 2).mean(), rtol=1e-4, atol=1e-5)
    loss.backward()  # gradients flow through pi_theta only
    assert all(p.grad is not None for p in policy.parameters() if p.requires_grad)


def read_metrics(run_dir):
    return [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]


def test_smoke_run(toy_cache, tmp_path):
    args = rebel.Args(
        judge="toy:gold", output_dir=str(tmp_path), run_name="smoke", total_episodes=32, batch_size=16, eval_prompts=16
    )
    rebel.main(args)
    rows = read_metrics(tmp_path / "smoke")
    updates = [r for r in rows if "objective/kl" in r]
    assert len(updates) == 2
    assert updates[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # first rollout: policy == reference
    for key in (
        "objective/scores",
        "objective/rlhf_reward",
        "objective/entropy",
        "objective/gold",
        "loss/policy",
        "rebel/residual",
        "rebel/delta_logratio",
        "rebel/eta_delta_reward",
        "rebel/correlation",
        "time/generation",
        "time/scoring",
        "time/update",
        "time/samples_per_second",
    ):
        assert key in updates[0] and updates[0][key] == updates[0][key], key  # present and not NaN
    final = json.load(open(tmp_path / "smoke" / "eval.json"))
    assert {"eval/win_rate", "eval/kl", "eval/score", "time/update_last", "memory/peak_mb"} <= set(final)
    assert (tmp_path / "smoke" / "model.safetensors").exists()


def test_cli_bad_batch_size(toy_cache, tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "rebel.py"),
        "--output-dir",
        str(tmp_path),
        "--batch-size",
        "30",
        "--num-minibatches",
        "4",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ}, timeout=120)
    assert out.returncode != 0
    assert out.stderr.strip().startswith("error:") and "--num-minibatches" in out.stderr
    assert "Traceback" not in out.stderr


def test_flag_names():
    """--update-epochs (epochs over each rollout, was --rebel-epochs); --eval-every 16 updates by default."""
    args = tyro.cli(rebel.Args, args=["--update-epochs", "2"])
    assert args.update_epochs == 2 and args.eval_every == 16
    with pytest.raises(SystemExit):
        tyro.cli(rebel.Args, args=["--rebel-epochs", "2"])


def test_learning_check(toy_cache, tmp_path):
    """On the tiny toy models, REBEL raises the gold reward of its training samples and the greedy win rate within
    a few updates."""
    args = rebel.Args(
        judge="toy:gold",
        output_dir=str(tmp_path),
        run_name="learn",
        total_episodes=32 * 24,
        batch_size=32,
        lr=1e-4,
        eval_prompts=200,
        eval_every=10**9,
    )
    rebel.main(args)
    rows = read_metrics(tmp_path / "learn")
    gold = [r["objective/gold"] for r in rows if "objective/gold" in r]
    evals = [r for r in rows if "eval/win_rate" in r]
    # the tiny reward model is noisy (gold peaks, then wobbles): average the late updates, compare with the first two
    assert sum(gold[-8:]) / 8 > sum(gold[:2]) / 2 + 0.03, gold
    assert evals[-1]["eval/win_rate"] > evals[0]["eval/win_rate"] + 0.1, evals
