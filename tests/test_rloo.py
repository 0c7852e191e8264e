"""rloo.py: leave-one-out advantages and the loss on hand values (k = 2, 4), REINFORCE's moving-average baseline,
the same advantages, loss and gradient as TRL's RLOOTrainer, groups kept together by the minibatches, a smoke run,
a learning check and --reward-fn."""

import copy
import json
import time
from pathlib import Path

import pytest
import torch
from test_reward_fn import CHECKER, gsm_file  # noqa: F401 (a fixture)

import common
import data
import rloo
import toy


def test_advantages_hand_values_k2():
    """Rows [y_1 of prompts 0, 1; y_2 of prompts 0, 1]: R = (1, 0.5; 3, 0.5). With k = 2 the other one's reward is
    the baseline: A = (1 - 3, 0.5 - 0.5; 3 - 1, 0.5 - 0.5); equal rewards give 0."""
    rewards = torch.tensor([1.0, 0.5, 3.0, 0.5])
    torch.testing.assert_close(rloo.rloo_advantages(rewards, k=2), torch.tensor([-2.0, 0.0, 2.0, 0.0]))


def test_advantages_hand_values_k4():
    """One prompt with R = (1, 2, 3, 6): the baselines are the means of the other three, (11/3, 10/3, 3, 2); the
    second prompt's four equal rewards give zero advantages."""
    first, second = [1.0, 2.0, 3.0, 6.0], [0.7] * 4
    rewards = torch.tensor([r for pair in zip(first, second) for r in pair])  # rows j * 2 + i
    advantages = rloo.rloo_advantages(rewards, k=4).view(4, 2)
    torch.testing.assert_close(advantages[:, 0], torch.tensor([1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0]))
    torch.testing.assert_close(advantages[:, 1], torch.zeros(4))
    torch.testing.assert_close(advantages.sum(0), torch.zeros(2))  # the leave-one-out advantages of a group sum to 0


def test_reinforce_baseline():
    """k = 1: A = R - b, with b the moving average of earlier rollouts."""
    torch.testing.assert_close(rloo.rloo_advantages(torch.tensor([1.0, -1.0]), 1, 0.25), torch.tensor([0.75, -1.25]))


def test_loss_hand_values():
    """-1/(kB) sum A_i log pi(y_i|x): A = (-2, 0, 2, 0), log pi = (-3, -1, -5, -2) -> -(6 + 0 - 10 + 0) / 4 = 1;
    with --cliprange on-policy (ratio 1) the value is -mean(A) = 0 and the gradient the same, -A / 4."""
    advantages = torch.tensor([-2.0, 0.0, 2.0, 0.0])
    for cliprange, value in ((0.0, 1.0), (0.2, 0.0)):
        logps = torch.tensor([-3.0, -1.0, -5.0, -2.0], requires_grad=True)
        loss, s = rloo.rloo_loss(logps, logps.detach(), advantages, cliprange)
        loss.backward()
        torch.testing.assert_close(loss, torch.tensor(value))
        torch.testing.assert_close(logps.grad, -advantages / 4)
        torch.testing.assert_close(s["ratio"], torch.ones(4))
    logps = torch.tensor([-1.0, -1.0], requires_grad=True)  # off-policy: ratio e^1 > 1.2 with A > 0 is clipped
    loss, s = rloo.rloo_loss(logps, torch.tensor([-2.0, -1.0]), torch.tensor([1.0, 1.0]), 0.2)
    torch.testing.assert_close(loss, torch.tensor(-(1.2 + 1.0) / 2))
    assert s["clipfrac"].tolist() == [1.0, 0.0]


def test_reward_hand_values():
    """R = s - beta * sum_t k_t: s 1.0, sum k 4 (entries past the mask do not count), beta 0.05 -> 0.8."""
    kl, mask = torch.tensor([[1.0, 1.0, 2.0, 7.0]]), torch.tensor([[True, True, True, False]])
    torch.testing.assert_close(rloo.sequence_rewards(torch.tensor([1.0]), kl, mask, 0.05), torch.tensor([0.8]))


@pytest.mark.parametrize("num_prompts,k,num_minibatches,micro", [(12, 2, 3, 2), (12, 4, 1, 5), (8, 1, 2, 64)])
def test_minibatches_keep_groups_together(num_prompts, k, num_minibatches, micro):
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        rows = []
        for minibatch in rloo.group_minibatches(num_prompts, k, num_minibatches, micro, g):
            for idx in minibatch:
                groups = idx.view(k, -1)  # [y_1 of each prompt; y_2 of each prompt; ...], same prompt order
                assert torch.equal(groups - groups[0], torch.arange(k)[:, None] * num_prompts + 0 * groups)
                rows += idx.tolist()
        assert sorted(rows) == list(range(k * num_prompts))


@pytest.mark.parametrize("k", [2, 4])
def test_matches_trl_rloo_trainer(k, toy_cache, tmp_path, monkeypatch, foreign_trainer):
    """TRL 1.12's RLOOTrainer on the same model, prompts, completions and scores, through its own methods
    (_generate_and_score_completions, _compute_loss), with its generation and reward calls replaced by ours. Its
    config matches ours: beta = kl_coef (k1 KL summed per sequence into the reward, rloo_trainer.py:1576-1580),
    normalize_advantages=False (rloo_trainer.py:1602), the temperature, the loss a mean over sequences
    (rloo_trainer.py:1739). Pinned differences: TRL puts a prompt's k completions in consecutive rows
    (rloo_trainer.py:1582), ours in rows j * B + i; TRL's loss is its clipped-ratio surrogate
    (rloo_trainer.py:1734-1739), valued -mean(A) on-policy as ours with --cliprange 0.2, while the paper's
    -mean(A log pi) (our default) has another value and the same gradient. Prompts of equal length: TRL passes no
    position ids (rloo_trainer.py:923, 975), so left padding would shift its positions and not ours. TRL embeds its
    padding: it gets EOS as pad (masked); ours is out of the vocabulary, so both softmaxes cover the same tokens."""
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    path, beta, temperature, B = str(toy_cache / "toy-sft"), 0.05, 0.7, 3
    tokenizer = data.load_tokenizer(path)
    pad_id = tokenizer.pad_token_id
    texts = toy.sft_dataset("test")["prompt"][:200]
    tokens = data.tokenize_prompts(tokenizer, texts, 32)
    same = [i for i, t in enumerate(tokens) if len(t) == len(tokens[0])][:B]
    prompt = data.pad([tokens[i] for i in same], pad_id, "left")
    torch.manual_seed(0)
    policy = common.load_model(path)
    completion, _ = common.generate(policy, prompt.repeat(k, 1), tokenizer, 6, temperature)
    scores = torch.randn(k * B, generator=torch.Generator().manual_seed(1))
    scores[[0, B]] = 0.5  # prompt 0: two equal scores

    # ours: rows j * B + i
    with torch.no_grad():
        ref = common.load_model(path, frozen=True)
        old = common.completion_logprobs(policy, prompt, completion, pad_id, temperature)
        kl = old - common.completion_logprobs(ref, prompt, completion, pad_id, temperature)
    mask = completion != pad_id
    advantages = rloo.rloo_advantages(rloo.sequence_rewards(scores, kl, mask, beta), k)
    new = common.completion_logprobs(policy, prompt, completion, pad_id, temperature).sum(1)
    loss, _ = rloo.rloo_loss(new, old.sum(1), advantages, cliprange=0.2)
    loss.backward()

    # TRL: row i * k + j
    trl_rows = torch.arange(k * B).view(k, B).T.reshape(-1)  # TRL row r is our row trl_rows[r]
    config = RLOOConfig(
        output_dir=str(tmp_path),
        beta=beta,
        num_generations=k,
        temperature=temperature,
        normalize_advantages=False,
        per_device_train_batch_size=k * B,
        report_to=[],
        use_cpu=True,
        bf16=False,
        logging_steps=1,
    )
    trl_tokenizer = copy.deepcopy(tokenizer)
    trl_tokenizer.pad_token = trl_tokenizer.eos_token
    trainer = RLOOTrainer(
        model=path,
        reward_funcs=lambda prompts, completions, **kw: [0.0] * len(prompts),
        args=config,
        train_dataset=Dataset.from_dict({"prompt": [texts[i] for i in same]}),
        processing_class=trl_tokenizer,
    )
    trl_completions = [completion[r][mask[r]].tolist() for r in trl_rows]
    prompt_lists = [prompt[r % B].tolist() for r in trl_rows]
    decoded = tokenizer.batch_decode(trl_completions, skip_special_tokens=True)
    monkeypatch.setattr(trainer, "_generate", lambda prompts: (prompt_lists, trl_completions, decoded))
    monkeypatch.setattr(trainer, "_calculate_rewards", lambda *a: scores[trl_rows][:, None].clone())
    trainer.model.train()
    inputs = [{"prompt": texts[same[r % B]]} for r in trl_rows.tolist()]
    out = trainer._generate_and_score_completions(inputs)
    torch.testing.assert_close(out["advantages"], advantages[trl_rows], rtol=1e-5, atol=1e-5)
    trl_loss = trainer._compute_loss(trainer.model, out)
    trl_loss.backward()
    torch.testing.assert_close(trl_loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(trl_loss, -advantages.mean(), rtol=1e-5, atol=1e-6)
    ours = dict(policy.named_parameters())
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(p.grad, ours[name].grad, rtol=1e-4, atol=1e-6)
    # the paper's loss (--cliprange 0): another value, the same gradient
    policy.zero_grad()
    new = common.completion_logprobs(policy, prompt, completion, pad_id, temperature).sum(1)
    paper_loss, _ = rloo.rloo_loss(new, old.sum(1), advantages, cliprange=0.0)
    paper_loss.backward()
    torch.testing.assert_close(paper_loss, -(advantages * new).mean())
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(p.grad, ours[name].grad, rtol=1e-4, atol=1e-6)


def read_metrics(run_dir):
    return [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]


@pytest.mark.parametrize("k", [2, 1])
def test_smoke_run(k, toy_cache, tmp_path):
    args = rloo.Args(
        judge="toy:gold", output_dir=str(tmp_path), run_name="smoke", total_episodes=32, batch_size=16, eval_prompts=16
    )
    args.k = k
    rloo.main(args)
    rows = read_metrics(tmp_path / "smoke")
    updates = [r for r in rows if "objective/kl" in r]
    assert len(updates) == 2
    assert updates[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # first rollout: policy == reference
    keys = ["objective/scores", "objective/rlhf_reward", "objective/gold", "loss/policy", "rloo/advantage"]
    keys += ["time/generation", "time/update", "time/samples_per_second"] + ["rloo/baseline"] * (k == 1)
    for key in keys:
        assert key in updates[0] and updates[0][key] == updates[0][key], key  # present and not NaN
    if k == 2:
        assert updates[0]["rloo/advantage"] == pytest.approx(0.0, abs=1e-5)  # leave-one-out advantages sum to 0
    final = json.load(open(tmp_path / "smoke" / "eval.json"))
    assert {"eval/win_rate", "eval/kl", "eval/score"} <= set(final)
    assert (tmp_path / "smoke" / "model.safetensors").exists()


@pytest.mark.parametrize("k", [2, 4, 1])
def test_learning_check(k, toy_cache, tmp_path):
    """On the tiny toy models, RLOO (k = 2, 4) and REINFORCE (k = 1) raise the greedy win rate against the references
    by at least 0.03 above the SFT start within 24 updates of 32 prompts (seed 1)."""
    start = time.time()
    args = rloo.Args(
        judge="toy:gold",
        output_dir=str(tmp_path),
        run_name="learn",
        total_episodes=32 * 24,
        batch_size=32,
        eval_prompts=200,
        eval_every=10**9,
        k=k,
    )
    rloo.main(args)
    rows = read_metrics(tmp_path / "learn")
    gold = [r["objective/gold"] for r in rows if "objective/gold" in r]
    final = json.load(open(tmp_path / "learn" / "eval.json"))
    print(f"initial {final['initial/win_rate']:.3f} final {final['eval/win_rate']:.3f} {time.time() - start:.0f}s")
    assert final["eval/win_rate"] >= final["initial/win_rate"] + 0.03, (final, gold)


def test_a_reward_function_is_the_reward_of_the_update(gsm_file, tiny_checkpoints, tmp_path, monkeypatch):  # noqa: F811
    """--reward-fn: the checker's scores (--no-eos-score without EOS) are the rewards of the update, with each
    completion's own row's answer, k = 2 completions of each prompt per call."""
    path, answers = gsm_file
    log = tmp_path / "calls.jsonl"
    (tmp_path / "checker.py").write_text(CHECKER.format(log=str(log)))
    seen, sequence_rewards = [], rloo.sequence_rewards

    def recording(scores, kl, mask, kl_coef):
        seen.append(scores.clone())
        return sequence_rewards(scores, kl, mask, kl_coef)

    monkeypatch.setattr(rloo, "sequence_rewards", recording)
    lm, _ = tiny_checkpoints["llama"]
    args = rloo.Args(
        output_dir=str(tmp_path),
        run_name="fn",
        model=lm,
        dataset=str(path),
        no_eos_score=-0.5,
        reward_fn=f"{tmp_path / 'checker.py'}:answer_checker",
        reward_model="/no/reward/model/is/loaded",
        total_episodes=16,
        batch_size=4,
        max_new_tokens=6,
        eval_prompts=3,
        eval_every=10**9,
    )
    rloo.main(args)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    training_calls = [c for c in calls if len(c["prompts"]) == 2 * 4]
    assert len(training_calls) == len(seen) == 4  # one per update
    for call, scores in zip(training_calls, seen):
        assert call["answer"] == [answers[p] for p in call["prompts"]]
        assert call["prompts"][:4] == call["prompts"][4:]  # rows j * B + i: k = 2 completions of each prompt
        assert all(s in (0.0, 1.0, -0.5) for s in scores.tolist())
        checked = [s for s, c in zip(scores.tolist(), call["scores"]) if s != -0.5]
        assert checked == [c for s, c in zip(scores.tolist(), call["scores"]) if s != -0.5]
