"""aihf.py (AIHF-DPO, Self-Play AIHF) and aihf_explicit.py (r_phi and the policy, RLOO): the reductions of the
reconstructed losses listed in docs/aihf.md §7, (R1)-(R8), the RLOO baseline, smoke runs of both scripts and of
self-play, an interrupted and resumed explicit run, and a learning check on the tiny toy models of `toy_cache`."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import aihf
import aihf_explicit
import common
import data
import dpo
import reward
import training

ROOT = Path(__file__).resolve().parents[1]
LN2 = math.log(2)


def random_logps(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g, dtype=torch.float64) * 20 - 30 for _ in range(4)]


# ---- AIHF-DPO: the loss, docs/aihf.md (A8), (A10) ------------------------------------------------


@pytest.mark.parametrize("w_pref", [1.0, 0.5])
def test_w_demo_zero_is_exactly_the_dpo_loss(w_pref):
    """docs/aihf.md (R1): w_pref times dpo.py's loss; a demonstration batch is ignored at weight 0."""
    pref, demo = random_logps(16, 0), random_logps(16, 1)
    expected = dpo.dpo_loss(*pref, beta=0.1)[0].mean()
    for demo_logps in (None, demo):
        loss, stats = aihf.aihf_dpo_loss(pref, demo_logps, beta=0.1, w_pref=w_pref, w_demo=0.0)
        assert torch.equal(loss, w_pref * expected)
        assert "loss/demo" not in stats and stats["loss/pref"] == expected


def test_w_demo_zero_is_the_dpo_loss_on_a_real_batch(toy_cache):
    """docs/aihf.md (R1) on token ids: aihf's collation (both completions of a pair share the prompt's forward) and
    summed log-probs give the DPO loss of each completion scored by a separate plain forward."""
    tokenizer = data.load_tokenizer("toy-sft")
    pad_id = tokenizer.pad_token_id
    policy, ref = common.load_model("toy-sft"), common.load_model("toy-sft").eval().requires_grad_(False)
    with torch.no_grad():  # move the policy away from the reference so the loss is not ln 2
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pairs = data.load_data("toy", "test", aihf.PREFERENCE_COLUMNS).select(range(12))
    rows = data.tokenize_pairs(tokenizer, pairs, 32, 16)
    with torch.no_grad():
        prompt = data.pad([r["prompt"] for r in rows], pad_id, "left")
        plain = [  # one completion per prompt: no shared forward
            common.completion_logprobs(model, prompt, data.pad([r[k] for r in rows], pad_id, "right"), pad_id).sum(1)
            for model in (policy, ref)
            for k in ("chosen", "rejected")
        ]
        expected = dpo.dpo_loss(*plain, beta=0.1)[0].mean()
        loss, _ = aihf.aihf_dpo_loss(aihf.preference_logps(policy, ref, rows, pad_id, "cpu"), None, 0.1, 1.0, 0.0)
    assert abs(expected.item() - LN2) > 1e-3
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-5)


def test_w_pref_zero_self_play_is_the_spin_loss_hand_values():
    """docs/aihf.md (R2): -log sigmoid(beta [(log pi - log pi_opp)(y_E) - (log pi - log pi_opp)(y_gen)])."""
    policy_demo, policy_gen = torch.tensor([-3.0, -10.0]), torch.tensor([-5.0, -2.0])
    opp_demo, opp_gen = torch.tensor([-4.0, -10.0]), torch.tensor([-4.5, -4.0])
    # row 0: (1) - (-0.5) = 1.5 -> log(1 + e^-0.15); row 1: (0) - (2) = -2 -> log(1 + e^0.2)
    expected = (math.log1p(math.exp(-0.15)) + math.log1p(math.exp(0.2))) / 2
    assert expected == pytest.approx((0.6209571 + 0.7981389) / 2, abs=1e-6)
    demo = (policy_demo, policy_gen, opp_demo, opp_gen)
    loss, stats = aihf.aihf_dpo_loss(None, demo, beta=0.1, w_pref=0.0, w_demo=1.0)
    assert loss.item() == pytest.approx(expected, abs=1e-6) and "loss/pref" not in stats
    assert stats["rewards/demo"].item() == pytest.approx(0.05)
    assert stats["rewards/generated"].item() == pytest.approx(0.075)
    assert stats["rewards/demo_margin"].item() == pytest.approx(-0.025) and stats["rewards/demo_accuracy"].item() == 0.5


def test_loss_at_init_is_weighted_ln2():
    """docs/aihf.md (R3): at pi_theta = reference every term is -log sigmoid(0) = ln 2."""
    (chosen, rejected, _, _), (demo, gen, _, _) = random_logps(8, 2), random_logps(8, 3)
    pref = (chosen.requires_grad_(), rejected, chosen.detach().clone(), rejected.clone())
    loss, stats = aihf.aihf_dpo_loss(pref, (demo, gen, demo.clone(), gen.clone()), beta=0.1, w_pref=0.7, w_demo=1.3)
    assert loss.item() == pytest.approx(2.0 * LN2, abs=1e-12)
    assert stats["loss/pref"].item() == pytest.approx(LN2, abs=1e-12)
    assert stats["loss/demo"].item() == pytest.approx(LN2, abs=1e-12)
    assert loss.requires_grad and not any(v.requires_grad for v in stats.values() if torch.is_tensor(v))  # detached


def test_draws_resume_where_they_stopped():
    """The data position of a checkpoint: a sampler rebuilt with `drawn` continues the same stream, epochs included."""
    full = aihf.Draws(list(range(7)), seed=3)
    first, rest = full.take(10), full.take(9)
    assert sorted(first[:7]) == list(range(7)) and aihf.Draws(list(range(7)), seed=3, drawn=10).take(9) == rest


# ---- explicit variant: reward phase and RLOO, docs/aihf.md (A13)-(A17) ----------------------------


def test_reward_phase_w_demo_zero_is_exactly_bradley_terry():
    """docs/aihf.md (R4): reward.py's Bradley-Terry loss, no demonstration term."""
    g = torch.Generator().manual_seed(4)
    chosen, rejected = torch.randn(32, generator=g), torch.randn(32, generator=g)
    loss, stats = aihf_explicit.reward_loss(chosen, rejected, None, None, w_pref=1.0, w_demo=0.0)
    assert torch.equal(loss, reward.bradley_terry_loss(chosen, rejected)) and "rm/demo_gap" not in stats
    zero = aihf_explicit.reward_loss(torch.zeros(3), torch.zeros(3), None, None, 1.0, 0.0)[0]
    one = aihf_explicit.reward_loss(torch.ones(3), torch.zeros(3), None, None, 1.0, 0.0)[0]
    assert zero.item() == pytest.approx(LN2) and one.item() == pytest.approx(0.313262, abs=1e-6)  # -log sigmoid(1)


def test_reward_phase_demonstration_term_hand_values():
    """docs/aihf.md (R5): -w_demo/n on each demonstration score, +w_demo/n on each policy sample's score."""
    demo, policy = torch.tensor([1.0, 2.0], requires_grad=True), torch.tensor([0.0, 0.5], requires_grad=True)
    loss, stats = aihf_explicit.reward_loss(torch.ones(2), torch.zeros(2), demo, policy, w_pref=1.0, w_demo=2.0)
    assert stats["rm/demo_gap"].item() == pytest.approx(1.25)  # mean r(y_E) - mean r(y_pi)
    assert loss.item() == pytest.approx(0.313262 - 2.0 * 1.25, abs=1e-6)
    loss.backward()  # the IRL gradient of docs/aihf.md (A4): up on demonstrations, down on policy samples
    assert demo.grad.tolist() == [-1.0, -1.0] and policy.grad.tolist() == [1.0, 1.0]


def test_rloo_advantages_hand_values_and_loop():
    """docs/aihf.md (R6): the leave-one-out baseline (A16) by an explicit loop; advantages sum to 0 per prompt."""
    rewards = torch.tensor([[1.0, 2, 3], [2, 3, 4], [5, 6, 7], [8, 9, 10]])  # k = 4 samples x 3 prompts
    adv = aihf_explicit.rloo_advantages(rewards)
    assert adv[0, 0].item() == pytest.approx(1 - (2 + 5 + 8) / 3)
    assert adv[2, 1].item() == pytest.approx(6 - (2 + 3 + 9) / 3)
    loop = [[rewards[j, i] - sum(rewards[m, i] for m in range(4) if m != j) / 3 for i in range(3)] for j in range(4)]
    torch.testing.assert_close(adv, torch.tensor(loop))
    torch.testing.assert_close(adv.sum(0), torch.zeros(3))


# ---- runs ----------------------------------------------------------------------------------------


def read_metrics(run_dir):
    return [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]


def without_times(run_dir):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_metrics(run_dir)]


SMALL = dict(num_demonstrations=400, num_preferences=300, eval_prompts=16, batch_size=8, demo_batch_size=8)
EXPLICIT = dict(policy_steps=2, reward_lr=1e-3, rollout_prompts=4, rloo_k=2, center_demos=32, eval_every=10**9)


def test_smoke_aihf_dpo(toy_cache, tmp_path):
    aihf.main(
        aihf.Args(judge="toy:gold", output_dir=str(tmp_path), run_name="smoke", max_steps=3, eval_every=2, **SMALL)
    )
    rows = read_metrics(tmp_path / "smoke")
    steps = [r for r in rows if "loss/pref" in r]
    assert len(steps) == 3 and steps[0]["loss"] == pytest.approx(2 * LN2, abs=1e-5)  # (R3): pi_theta = pi_ref
    keys = ("loss/demo", "w_pref", "w_demo", "rewards/demo", "rewards/generated", "rewards/demo_margin", "round")
    for key in (*keys, "rewards/demo_accuracy", "rewards/pref_accuracy", "time/update", "time/samples_per_second"):
        assert key in steps[0], key
    assert [r["step"] for r in rows if "objective/gold" in r and "time/generation" in r] == [1]  # y_gen drawn once
    assert [r["step"] for r in rows if "eval/win_rate" in r] == [0, 2, 3]  # --eval-every counts updates
    final = json.load(open(tmp_path / "smoke" / "eval.json"))
    assert {"eval/win_rate", "eval/kl", "eval/score", "initial/win_rate", "time/update_last", "memory/peak_mb"} <= set(
        final
    )
    assert final["initial/kl"] == pytest.approx(0.0, abs=1e-5)
    assert (tmp_path / "smoke" / "model.safetensors").exists() and (tmp_path / "smoke" / "tokenizer.json").exists()


def test_smoke_self_play_each_round_starts_at_2ln2(toy_cache, tmp_path):
    """docs/aihf.md (R3), (A11): each round the previous iterate becomes pi_opp, the reference of both terms, so
    the first loss of every round is 2 ln 2 exactly, whatever the policy learned before."""
    args = dict(self_play=True, rounds=2, max_steps=5, lr=1e-3, eval_every=10**9)  # 5 // 2: 2 rounds of 2
    aihf.main(aihf.Args(judge="toy:gold", output_dir=str(tmp_path), run_name="sp", **args, **SMALL))
    steps = [r for r in read_metrics(tmp_path / "sp") if "loss/pref" in r]
    assert [r["round"] for r in steps] == [0, 0, 1, 1]
    assert [r["step"] for r in steps if "time/generation" in r] == [1, 3]  # y_gen re-drawn at each round
    assert steps[0]["loss"] == pytest.approx(2 * LN2, abs=1e-5) and steps[2]["loss"] == pytest.approx(2 * LN2, abs=1e-5)
    assert steps[1]["loss"] != pytest.approx(2 * LN2, abs=1e-5)  # mid-round the policy has moved away from pi_opp


def test_smoke_explicit_recentres_the_reward(toy_cache, tmp_path):
    """docs/aihf.md (A18) schedule and (R8): after the last reward phase the first --center-demos demonstrations
    score 0 on average."""
    aihf_explicit.main(
        aihf_explicit.Args(judge="toy:gold", output_dir=str(tmp_path), run_name="ex", max_steps=4, **EXPLICIT, **SMALL)
    )
    steps = [r for r in read_metrics(tmp_path / "ex") if "objective/scores" in r]
    assert len(steps) == 4 and steps[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    for key in ("objective/gold", "objective/eos_rate", "loss/policy", "time/generation", "time/scoring"):
        assert key in steps[0] and "time/update" in steps[0], key
    for key in ("rm/bt_loss", "rm/accuracy", "rm/demo_gap", "rm/bias", "loss/pref", "loss/demo", "time/reward"):
        assert key in steps[1] and key not in steps[0], key  # a reward phase every --policy-steps 2 updates
    run = tmp_path / "ex"
    rm = common.load_model(str(run / "reward_model"), "reward")
    tokenizer = data.load_tokenizer(str(run / "reward_model"))
    demos = data.load_data("toy", "train", ("prompt", "completion")).select(range(32))
    rows = [
        dict(zip(("prompt", "demo"), data.tokenize_pair(tokenizer, p, c, 32, 16)))
        for p, c in zip(demos["prompt"], demos["completion"])
    ]
    pad_id = tokenizer.pad_token_id
    with torch.no_grad():
        scores = common.reward_scores(rm, *aihf_explicit.collate(rows, "demo", "demo", pad_id, "cpu"), pad_id)
    assert abs(scores.mean().item()) < 1e-4
    assert (run / "model.safetensors").exists() and json.load(open(run / "eval.json"))["eval/score"] is not None


def test_explicit_w_demo_zero_never_samples_for_the_reward(toy_cache, tmp_path, monkeypatch):
    """docs/aihf.md (R4), (R7): with w_demo = 0 the reward phase reads no policy sample (SFT -> RM -> RLOO); with
    --reward-lr 0 r_phi's weights stay those of --reward-model."""
    sizes, generate = [], common.generate

    def recording_generate(model, prompt, *args, **kwargs):
        sizes.append(len(prompt))
        return generate(model, prompt, *args, **kwargs)

    monkeypatch.setattr(common, "generate", recording_generate)
    base = dict(output_dir=str(tmp_path), max_steps=2, policy_steps=1, rollout_prompts=4, rloo_k=2, eval_every=10**9)
    base.update({**SMALL, "demo_batch_size": 6, "eval_prompts": 10})
    aihf_explicit.main(aihf_explicit.Args(judge="toy:gold", run_name="w0", w_demo=0.0, reward_lr=0.0, **base))
    assert 6 not in sizes and sizes.count(8) == 2  # two policy updates of 4 prompts x 2, no reward-phase sample
    rm0 = common.load_model("toy-rm", "reward").state_dict()
    rm1 = common.load_model(str(tmp_path / "w0" / "reward_model"), "reward").state_dict()
    assert all(torch.equal(rm0[k], rm1[k]) for k in rm0)
    sizes.clear()
    aihf_explicit.main(aihf_explicit.Args(judge="toy:gold", run_name="w1", **base))
    assert sizes.count(6) == 2  # one fresh policy sample per reward phase


def test_explicit_interrupted_and_resumed_is_exact(toy_cache, tmp_path, monkeypatch):
    """r_phi from a causal LM (no bias yet) stopped at update 1, before its first reward phase, and resumed: the
    same run as an uninterrupted one (weights of both models, metrics, r_phi's bias of docs/aihf.md (A14))."""
    kw = dict(output_dir=str(tmp_path), reward_init="toy-sft", max_steps=3, **EXPLICIT, **SMALL)
    aihf_explicit.main(aihf_explicit.Args(judge="toy:gold", run_name="full", **kw))
    real_step_done = training.Run.step_done

    def stop_at_1(self, update, state):
        self.stop_signal = "SIGINT" if update == 1 else None
        return real_step_done(self, update, state)

    with monkeypatch.context() as m:
        m.setattr(training.Run, "step_done", stop_at_1)
        with pytest.raises(training.Interrupted):
            aihf_explicit.main(aihf_explicit.Args(judge="toy:gold", run_name="cut", **kw))
    aihf_explicit.main(
        training.resume_args(aihf_explicit.Args, aihf_explicit.Args(judge="toy:gold", resume=str(tmp_path / "cut")))
    )
    assert without_times(tmp_path / "cut") == without_times(tmp_path / "full")
    for part in ("model.safetensors", "reward_model/model.safetensors", "reward_model/config.json"):
        assert (tmp_path / "cut" / part).read_bytes() == (tmp_path / "full" / part).read_bytes(), part


@pytest.mark.parametrize(
    "script, flags",
    [("aihf.py", ["--w-pref", "0", "--w-demo", "0"]), ("aihf_explicit.py", ["--rloo-k", "1"])],
)
def test_cli_error_is_one_line(toy_cache, tmp_path, script, flags):
    cmd = [sys.executable, str(ROOT / script), "--output-dir", str(tmp_path), *flags]
    env = {**os.environ, "RLHF_TOY_CACHE": str(toy_cache)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().startswith("error:") and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_learning_check(toy_cache, tmp_path):
    """A short AIHF-DPO run on the tiny toy SFT model raises the gold win rate against the references."""
    args = dict(max_steps=60, batch_size=32, demo_batch_size=32, lr=2e-3, beta=0.3, num_demonstrations=4000)
    aihf.main(
        aihf.Args(
            judge="toy:gold", output_dir=str(tmp_path), run_name="learn", eval_prompts=200, eval_every=10**9, **args
        )
    )
    final = json.load(open(tmp_path / "learn" / "eval.json"))
    assert final["eval/win_rate"] > final["initial/win_rate"] + 0.05, final
    assert final["eval/score"] > final["initial/score"]
