"""--reward-fn: a Python reward function instead of a reward model, with TRL's signature
fn(prompts, completions, **columns) -> list[float]. A tiny Llama trains on a local file in a GSM8K-like layout
(`prompt` a question, `answer` its number) against a regex answer checker, in every script that samples: the
function sees the decoded completions with the `answer` of each one's own row (k completions per prompt), and
what it returns, with --no-eos-score where a completion has no EOS, is the reward of the update."""

import json
import random

import pytest
import torch

import common
import drpo
import grpo
import ppo
import rebel
import rloo
import training
import xpo

CHECKER = '''import json
import re


def answer_checker(prompts, completions, answer, **columns):
    """1 where the first number in the completion is the row's answer, else 0 (a GSM8K-style checker)."""
    numbers = [re.search(r"-?\\d+", c) for c in completions]
    scores = [float(m is not None and m.group() == a) for m, a in zip(numbers, answer)]
    with open({log!r}, "a") as f:
        f.write(json.dumps(dict(prompts=prompts, completions=completions, answer=answer, scores=scores)) + "\\n")
    return scores
'''
RL = dict(total_episodes=16, batch_size=4, num_minibatches=2, max_new_tokens=6, eval_prompts=3, eval_every=10**9)
SCRIPTS = {"ppo": ppo, "drpo": drpo, "rebel": rebel, "xpo": xpo, "rloo": rloo, "grpo": grpo}
K = {"ppo": 1, "drpo": 1, "rebel": 2, "xpo": 2, "rloo": 2, "grpo": 4}  # completions scored per prompt (XPO: y and y~)


@pytest.fixture(scope="module")
def gsm_file(tmp_path_factory):
    """Arithmetic questions with their numeric answer and a worked reference completion (DR-PO resets to it)."""
    rng, rows = random.Random(0), []
    for _ in range(40):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        rows.append(
            {"prompt": f"Question: what is {a} plus {b}? Answer:", "completion": f" {a + b}", "answer": str(a + b)}
        )
    path = tmp_path_factory.mktemp("gsm") / "gsm.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, {r["prompt"]: r["answer"] for r in rows}


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_a_reward_function_is_the_reward_of_the_update(name, gsm_file, tiny_checkpoints, tmp_path, monkeypatch):
    path, answers = gsm_file
    log = tmp_path / "calls.jsonl"
    (tmp_path / "checker.py").write_text(CHECKER.format(log=str(log)))
    scored, reward_scores = [], common.reward_scores

    def recording_reward_scores(reward, prompt, completion, pad_id, has_eos=None, no_eos_score=None, *rest, **kw):
        scores = reward_scores(reward, prompt, completion, pad_id, has_eos, no_eos_score, *rest, **kw)
        scored.append((has_eos, scores))
        return scores

    monkeypatch.setattr(common, "reward_scores", recording_reward_scores)
    module = SCRIPTS[name]
    lm, _ = tiny_checkpoints["llama"]
    checker = f"{tmp_path / 'checker.py'}:answer_checker"
    args = dict(output_dir=str(tmp_path), run_name=name, model=lm, dataset=str(path), no_eos_score=-0.5, **RL)
    args.update(reward_fn=checker, reward_model="/no/reward/model/is/loaded")
    module.main(module.Args(**args))
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    metrics = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    updates = [m for m in metrics if "objective/scores" in m]
    assert len(updates) == 4 and len(calls) == len(scored)
    for call, (has_eos, scores) in zip(calls, scored):
        assert len(call["prompts"]) == len(call["completions"]) == len(call["answer"]) == len(scores)
        assert all(isinstance(c, str) for c in call["completions"])
        assert call["answer"] == [answers[p] for p in call["prompts"]]  # each completion with its own row's answer
        expected = [s if e else -0.5 for s, e in zip(call["scores"], has_eos.tolist())] if has_eos is not None else None
        if expected is not None:
            torch.testing.assert_close(scores.cpu(), torch.tensor(expected))  # --no-eos-score where EOS is missing
    training_calls = [c for c in calls if len(c["prompts"]) == K[name] * RL["batch_size"]]
    assert len(training_calls) == 4  # one per update (an evaluation scores 3 test prompts once each)
    for call in training_calls:
        per_prompt = {p: call["prompts"].count(p) for p in call["prompts"]}
        assert set(per_prompt.values()) == {K[name]}  # k completions of each prompt, each with its answer
    first_update = scored[1][1]  # scored[0]: the evaluation before the first update
    samples = first_update[: RL["batch_size"]] if name == "xpo" else first_update  # XPO logs y's, not y~'s
    if name != "rebel":  # the logged objective/scores is the mean of the policy samples' rewards (REBEL's are scaled)
        assert updates[0]["objective/scores"] == pytest.approx(samples.mean().item(), abs=1e-6)


def test_a_missing_reward_function_is_one_error_line(tmp_path):
    with pytest.raises(training.UserError, match="cannot import"):
        training.load_function(str(tmp_path / "nowhere.py") + ":fn", "--reward-fn")
    with pytest.raises(training.UserError, match="has no function 'nope'"):
        training.load_function("json:nope", "--reward-fn")


def test_the_critic_of_a_reward_function_starts_from_the_policy_at_zero(tiny_checkpoints):
    """With --reward-fn, PPO's and DR-PO's critic is --model with a value head of zeros: V = 0 everywhere."""
    lm, _ = tiny_checkpoints["llama"]
    critic = common.load_model(lm, "reward", new_head="zero")
    values = critic(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert torch.equal(critic.score.weight, torch.zeros_like(critic.score.weight)) and values.abs().max() == 0
