"""aihf.py: the reductions of its reconstructed losses (w_demo = 0 is dpo.py's loss / reward.py's Bradley-Terry
loss, w_pref = 0 with self-play is SPIN's loss, (w_pref + w_demo) ln 2 at pi_theta = pi_ref), the RLOO
baseline, the reward phase never reading policy samples when w_demo = 0, smoke runs of both variants
and of self-play, and a learning check on the tiny toy models of the `toy_cache` fixture."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import aihf
import common
import dpo
import reward

ROOT = Path(__file__).resolve().parents[1]
LN2 = math.log(2)


def random_logps(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g, dtype=torch.float64) * 20 - 30 for _ in range(4)]


# ---- AIHF-DPO: the loss -------------------------------------------------------------------------


@pytest.mark.parametrize("w_pref", [1.0, 0.5])
def test_w_demo_zero_is_exactly_the_dpo_loss(w_pref):
    pref, demo = random_logps(16, 0), random_logps(16, 1)
    expected = dpo.dpo_loss(*pref, beta=0.1)[0].mean()
    for demo_logps in (None, demo):  # the demonstration batch, when given, must not count at weight 0
        loss, stats = aihf.aihf_dpo_loss(pref, demo_logps, beta=0.1, w_pref=w_pref, w_demo=0.0)
        assert torch.equal(loss, w_pref * expected)
        assert "loss/demo" not in stats and stats["loss/pref"] == expected


def test_w_demo_zero_is_the_dpo_loss_on_a_real_batch(toy_cache):
    """aihf's pair tokenization, collation and summed log-probs give dpo.py's loss on the same pairs."""
    tokenizer = common.load_tokenizer("toy-sft")
    pad_id = tokenizer.pad_token_id
    policy, ref = common.load_model("toy-sft"), common.load_model("toy-sft").eval().requires_grad_(False)
    with torch.no_grad():  # move the policy away from the reference so the loss is not ln 2
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    data = common.load_data("toy", "test", dpo.PREFERENCE_COLUMNS).select(range(12))
    batch = dpo.collate(dpo.tokenize_pairs(tokenizer, data, dpo.Args()), pad_id)
    with torch.no_grad():
        expected = dpo.dpo_loss(
            *dpo.sequence_logps(policy, batch, pad_id), *dpo.sequence_logps(ref, batch, pad_id), beta=0.1
        )[0].mean()
        prompt, completion = aihf.collate(
            aihf.tokenize_pairs(tokenizer, data, aihf.Args()), "chosen", "rejected", pad_id, "cpu"
        )
        pref = (
            *aihf.sequence_logps(policy, prompt, completion, pad_id),
            *aihf.sequence_logps(ref, prompt, completion, pad_id),
        )
        loss, _ = aihf.aihf_dpo_loss(pref, None, beta=0.1, w_pref=1.0, w_demo=0.0)
    assert abs(expected.item() - LN2) > 1e-3
    assert torch.equal(loss, expected)


def test_w_pref_zero_self_play_is_the_spin_loss_hand_values():
    """SPIN: -log sigmoid(beta [(log pi - log pi_opp)(y_E) - (log pi - log pi_opp)(y_gen)])."""
    policy_demo, policy_gen = torch.tensor([-3.0, -10.0]), torch.tensor([-5.0, -2.0])
    opp_demo, opp_gen = torch.tensor([-4.0, -10.0]), torch.tensor([-4.5, -4.0])
    # row 0: (1) - (-0.5) = 1.5 -> log(1 + e^-0.15); row 1: (0) - (2) = -2 -> log(1 + e^0.2)
    expected = (math.log1p(math.exp(-0.15)) + math.log1p(math.exp(0.2))) / 2
    assert expected == pytest.approx((0.6209571 + 0.7981389) / 2, abs=1e-6)
    loss, stats = aihf.aihf_dpo_loss(
        None, (policy_demo, policy_gen, opp_demo, opp_gen), beta=0.1, w_pref=0.0, w_demo=1.0
    )
    assert loss.item() == pytest.approx(expected, abs=1e-6) and "loss/pref" not in stats
    assert stats["rewards/demo"].item() == pytest.approx(0.05) and stats["rewards/generated"].item() == pytest.approx(
        0.075
    )
    assert stats["rewards/demo_margin"].item() == pytest.approx(-0.025) and stats["rewards/demo_accuracy"].item() == 0.5


def test_loss_at_init_is_weighted_ln2():
    (chosen, rejected, _, _), (demo, gen, _, _) = random_logps(8, 2), random_logps(8, 3)
    pref = (chosen.requires_grad_(), rejected, chosen.detach().clone(), rejected.clone())
    loss, stats = aihf.aihf_dpo_loss(pref, (demo, gen, demo.clone(), gen.clone()), beta=0.1, w_pref=0.7, w_demo=1.3)
    assert loss.item() == pytest.approx(2.0 * LN2, abs=1e-12)
    assert stats["loss/pref"].item() == pytest.approx(LN2, abs=1e-12) and stats["loss/demo"].item() == pytest.approx(
        LN2, abs=1e-12
    )
    assert loss.requires_grad and not any(
        v.requires_grad for v in stats.values() if torch.is_tensor(v)
    )  # metrics detached


# ---- explicit variant: reward phase and RLOO -----------------------------------------------------


def test_reward_phase_w_demo_zero_is_exactly_bradley_terry():
    g = torch.Generator().manual_seed(4)
    chosen, rejected = torch.randn(32, generator=g), torch.randn(32, generator=g)
    loss, stats = aihf.reward_loss(chosen, rejected, None, None, w_pref=1.0, w_demo=0.0)
    assert torch.equal(loss, reward.bradley_terry_loss(chosen, rejected)) and "rm/demo_gap" not in stats
    zero = aihf.reward_loss(torch.zeros(3), torch.zeros(3), None, None, 1.0, 0.0)[0]
    one = aihf.reward_loss(torch.ones(3), torch.zeros(3), None, None, 1.0, 0.0)[0]
    assert zero.item() == pytest.approx(LN2) and one.item() == pytest.approx(
        0.313262, abs=1e-6
    )  # -log sigmoid(1) by hand


def test_reward_phase_demonstration_term_hand_values():
    demo, policy = torch.tensor([1.0, 2.0], requires_grad=True), torch.tensor([0.0, 0.5], requires_grad=True)
    loss, stats = aihf.reward_loss(torch.ones(2), torch.zeros(2), demo, policy, w_pref=1.0, w_demo=2.0)
    assert stats["rm/demo_gap"].item() == pytest.approx(1.25)  # mean r(y_E) - mean r(y_pi)
    assert loss.item() == pytest.approx(0.313262 - 2.0 * 1.25, abs=1e-6)
    loss.backward()  # the IRL gradient: up on demonstrations, down on policy samples, per-source means
    assert demo.grad.tolist() == [-1.0, -1.0] and policy.grad.tolist() == [1.0, 1.0]


def test_rloo_advantages_hand_values_and_loop():
    rewards = torch.tensor([[1.0, 2, 3], [2, 3, 4], [5, 6, 7], [8, 9, 10]])  # k = 4 samples x 3 prompts
    adv = aihf.rloo_advantages(rewards)
    assert adv[0, 0].item() == pytest.approx(1 - (2 + 5 + 8) / 3) and adv[2, 1].item() == pytest.approx(
        6 - (2 + 3 + 9) / 3
    )
    loop = torch.tensor(
        [[rewards[j, i] - sum(rewards[m, i] for m in range(4) if m != j) / 3 for i in range(3)] for j in range(4)]
    )
    torch.testing.assert_close(adv, loop)
    torch.testing.assert_close(adv.sum(0), torch.zeros(3))  # the baseline is unbiased: advantages sum to 0 per prompt


# ---- runs ----------------------------------------------------------------------------------------


def read_metrics(run_dir):
    return [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]


SMALL = dict(num_demonstrations=400, num_preferences=300, eval_prompts=16, batch_size=8, demo_batch_size=8)


def test_smoke_aihf_dpo(toy_cache, tmp_path):
    aihf.main(aihf.Args(output_dir=str(tmp_path), run_name="smoke", total_steps=3, eval_every=2, **SMALL))
    rows = read_metrics(tmp_path / "smoke")
    steps = [r for r in rows if "loss/pref" in r]
    assert len(steps) == 3 and steps[0]["loss"] == pytest.approx(2 * LN2, abs=1e-5)  # pi_theta = pi_ref at step 1
    for key in (
        "loss/demo",
        "w_pref",
        "w_demo",
        "rewards/demo",
        "rewards/generated",
        "rewards/demo_margin",
        "rewards/demo_accuracy",
        "rewards/pref_accuracy",
        "time/update",
        "time/samples_per_second",
    ):
        assert key in steps[0], key
    assert any("objective/gold" in r and "time/round_generation" in r for r in rows)
    assert [r["step"] for r in rows if "eval/win_rate" in r] == [0, 2, 3]
    final = json.load(open(tmp_path / "smoke" / "eval.json"))
    assert {"eval/win_rate", "eval/kl", "eval/score", "initial/win_rate", "time/update_last", "memory/peak_mb"} <= set(
        final
    )
    assert final["initial/kl"] == pytest.approx(0.0, abs=1e-5)
    assert (tmp_path / "smoke" / "model.safetensors").exists() and (tmp_path / "smoke" / "tokenizer.json").exists()


def test_smoke_self_play_each_round_starts_at_2ln2(toy_cache, tmp_path):
    """Each round the previous iterate becomes pi_opp, the reference of both terms: the first loss of every
    round is 2 ln 2 exactly, whatever the policy learned before."""
    aihf.main(
        aihf.Args(
            output_dir=str(tmp_path),
            run_name="sp",
            self_play=True,
            rounds=2,
            total_steps=4,
            lr=1e-3,
            eval_every=10**9,
            **SMALL,
        )
    )
    rows = read_metrics(tmp_path / "sp")
    steps = [r for r in rows if "loss/pref" in r]
    assert [r["round"] for r in rows if "round" in r] == [0, 1]
    assert steps[0]["loss"] == pytest.approx(2 * LN2, abs=1e-5) and steps[2]["loss"] == pytest.approx(2 * LN2, abs=1e-5)
    assert steps[1]["loss"] != pytest.approx(2 * LN2, abs=1e-5)  # mid-round the policy has moved away from pi_opp


def test_smoke_explicit_recentres_the_reward(toy_cache, tmp_path):
    aihf.main(
        aihf.Args(
            output_dir=str(tmp_path),
            run_name="ex",
            variant="explicit",
            total_steps=4,
            policy_steps=2,
            reward_lr=1e-3,
            rollout_prompts=4,
            rloo_k=2,
            center_demos=32,
            eval_every=10**9,
            **SMALL,
        )
    )
    rows = read_metrics(tmp_path / "ex")
    steps = [r for r in rows if "objective/scores" in r]
    assert len(steps) == 4 and steps[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    for key in (
        "objective/gold",
        "objective/eos_rate",
        "loss/policy",
        "time/generation",
        "time/scoring",
        "time/update",
    ):
        assert key in steps[0], key
    for key in ("rm/bt_loss", "rm/accuracy", "rm/demo_gap", "rm/bias", "loss/pref", "loss/demo", "time/reward"):
        assert key in steps[1] and key not in steps[0], key
    # after the last reward phase, the first center_demos demonstrations score 0 on average
    run = tmp_path / "ex"
    rm = common.load_model(str(run / "reward_model"), "reward")
    tokenizer = common.load_tokenizer(str(run / "reward_model"))
    demos = common.load_data("toy", "train", ("prompt", "completion")).select(range(32))
    rows_c = [
        dict(zip(("prompt", "demo"), common.tokenize_pair(tokenizer, p, c, 32, 16)))
        for p, c in zip(demos["prompt"], demos["completion"])
    ]
    with torch.no_grad():
        scores = common.reward_scores(
            rm, *aihf.collate(rows_c, "demo", "demo", tokenizer.pad_token_id, "cpu"), tokenizer.pad_token_id
        )
    assert abs(scores.mean().item()) < 1e-4
    assert (run / "model.safetensors").exists()


def test_explicit_w_demo_zero_never_samples_for_the_reward(toy_cache, tmp_path, monkeypatch):
    """With w_demo = 0 the reward phase reads no policy sample (two-stage RLHF); with reward lr 0 r_phi's
    weights stay those of --reward-model."""
    sizes = []
    generate = common.generate
    monkeypatch.setattr(
        common, "generate", lambda model, prompt, *a, **k: sizes.append(len(prompt)) or generate(model, prompt, *a, **k)
    )
    base = dict(
        output_dir=str(tmp_path),
        variant="explicit",
        total_steps=2,
        policy_steps=1,
        rollout_prompts=4,
        rloo_k=2,
        eval_every=10**9,
        **{**SMALL, "demo_batch_size": 6, "eval_prompts": 10},
    )
    aihf.main(aihf.Args(run_name="w0", w_demo=0.0, reward_lr=0.0, **base))
    assert 6 not in sizes and sizes.count(8) == 2  # two policy updates of 4 prompts x 2, no reward-phase sample
    rm0 = common.load_model("toy-rm", "reward").state_dict()
    rm1 = common.load_model(str(tmp_path / "w0" / "reward_model"), "reward").state_dict()
    assert all(torch.equal(rm0[k], rm1[k]) for k in rm0)
    sizes.clear()
    aihf.main(aihf.Args(run_name="w1", **base))
    assert sizes.count(6) == 2  # one fresh policy sample per reward phase


def test_cli_error_is_one_line(toy_cache, tmp_path):
    cmd = [sys.executable, str(ROOT / "aihf.py"), "--output-dir", str(tmp_path), "--variant", "explicit", "--self-play"]
    out = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "RLHF_TOY_CACHE": str(toy_cache)}, timeout=120
    )
    assert out.returncode == 2 and out.stderr.strip().startswith("error:") and "Traceback" not in out.stderr


def test_learning_check(toy_cache, tmp_path):
    """A short AIHF-DPO run on the tiny toy SFT model raises the gold win rate against the references."""
    aihf.main(
        aihf.Args(
            output_dir=str(tmp_path),
            run_name="learn",
            total_steps=60,
            batch_size=32,
            demo_batch_size=32,
            lr=2e-3,
            beta=0.3,
            num_demonstrations=4000,
            eval_prompts=200,
            eval_every=10**9,
        )
    )
    final = json.load(open(tmp_path / "learn" / "eval.json"))
    assert final["eval/win_rate"] > final["initial/win_rate"] + 0.05, final
    assert final["eval/score"] > final["initial/score"]
