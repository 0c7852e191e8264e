"""grpo.py: group advantages, the three loss aggregations and the k3 KL on hand values, ratio 1 at the first
minibatch, micro-batches adding up to the minibatch, numerics against TRL's GRPOTrainer, a smoke run, a learning check
on the toy task and a run against a regex reward function."""

import json
import re
from pathlib import Path

import pytest
import torch

import common
import data
import grpo
import toy


def read_metrics(run_dir):
    return [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]


def test_advantages_hand_values():
    """k = 3, B = 2 (rows [k, B]): group 0 rewards 1, 2, 3 (mean 2, unbiased std 1); group 1 all 5 -> A = 0."""
    rewards = torch.tensor([1.0, 5.0, 2.0, 5.0, 3.0, 5.0])
    scaled = grpo.group_advantages(rewards, 3, scale_rewards=True)
    torch.testing.assert_close(scaled, torch.tensor([-1 / 1.0001, 0.0, 0.0, 0.0, 1 / 1.0001, 0.0]))
    unscaled = grpo.group_advantages(rewards, 3, scale_rewards=False)  # Dr. GRPO: r_i - mean(r)
    torch.testing.assert_close(unscaled, torch.tensor([-1.0, 0.0, 0.0, 0.0, 1.0, 0.0]))
    same = grpo.group_advantages(torch.full((4,), 0.1), 4)  # a mean with rounding residue still gives exactly 0
    assert torch.equal(same, torch.zeros(4))


def example():
    """Two sequences of lengths 2 and 4 (C = 4), advantages +1 and -0.25, pi = pi_old (rho = 1), log pi_ref - log pi
    = log 2 everywhere: the k3 KL per token is 2 - log 2 - 1."""
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    logps = torch.full((2, 4), -1.0).masked_fill(~mask, 0)
    part = dict(old_logps=logps, ref_logps=logps + torch.log(torch.tensor(2.0)), advantages=torch.tensor([1.0, -0.25]))
    return mask, logps, part


@pytest.mark.parametrize(
    "loss_type,pg",
    [
        ("grpo", (-1.0 + 0.25) / 2),  # (1/G) sum_i (1/|o_i|) sum_t: (-(2/2) + (1/4)) / 2
        ("dapo", (-2.0 + 1.0) / 6),  # sum_i sum_t / sum_i |o_i|
        ("dr_grpo", (-2.0 + 1.0) / (2 * 4)),  # sum_i sum_t / (G * max_new_tokens)
    ],
)
def test_loss_aggregations_and_kl_hand_values(loss_type, pg):
    mask, logps, part = example()
    k3 = 2 - torch.log(torch.tensor(2.0)).item() - 1  # pi_ref/pi - log(pi_ref/pi) - 1 with pi_ref/pi = 2
    part["weights"] = grpo.token_weights(mask, loss_type, max_new_tokens=4)
    loss, s = grpo.grpo_losses(logps, part, cliprange=0.2, kl_coef=0.04)
    assert s["loss/policy"].item() == pytest.approx(pg)
    kl = {"grpo": k3, "dapo": k3, "dr_grpo": k3 * 6 / 8}[loss_type]  # the KL's tokens take the same weights
    assert s["loss/kl"].item() == pytest.approx(kl, rel=1e-6)
    assert loss.item() == pytest.approx(pg + 0.04 * kl, rel=1e-6)
    assert s["policy/ratio"].item() == pytest.approx(part["weights"].sum().item())  # rho = 1 on every token


def test_clipping_hand_values():
    """rho = 1.5 with A = +1 is clipped to 1.2 (no gradient); with A = -1 the unclipped -1.5 is the min."""
    mask = torch.ones(2, 1, dtype=torch.bool)
    new = torch.log(torch.tensor([[1.5], [1.5]])).requires_grad_()
    part = dict(old_logps=torch.zeros(2, 1), ref_logps=torch.zeros(2, 1), advantages=torch.tensor([1.0, -1.0]))
    part["weights"] = grpo.token_weights(mask, "grpo", 1)
    loss, s = grpo.grpo_losses(new, part, cliprange=0.2, kl_coef=0.0)
    assert loss.item() == pytest.approx((-1.2 + 1.5) / 2)
    loss.backward()
    assert new.grad[0].item() == 0.0 and new.grad[1].item() == pytest.approx(0.5 * 1.5)
    assert s["policy/clipfrac"].item() == pytest.approx(0.5)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_micro_batches_add_up_to_the_minibatch(loss_type):
    """Weights from the whole minibatch: any split of its rows gives the same loss and gradient."""
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(8, 5, generator=g) < 0.7
    mask[:, 0] = True
    new = torch.randn(8, 5, generator=g, dtype=torch.float64).requires_grad_()
    part = dict(
        old_logps=new.detach() + 0.3 * torch.randn(8, 5, generator=g, dtype=torch.float64),
        ref_logps=torch.randn(8, 5, generator=g, dtype=torch.float64),
        advantages=torch.randn(8, generator=g, dtype=torch.float64),
        weights=grpo.token_weights(mask, loss_type, 5).double(),
    )
    whole, _ = grpo.grpo_losses(new, part, 0.2, 0.04)
    (grad_whole,) = torch.autograd.grad(whole, new)
    total = 0
    for rows in (torch.tensor([0, 5]), torch.tensor([1, 2, 3]), torch.tensor([4, 6, 7])):
        total = total + grpo.grpo_losses(new[rows], {n: v[rows] for n, v in part.items()}, 0.2, 0.04)[0]
    (grad_parts,) = torch.autograd.grad(total, new)
    torch.testing.assert_close(total, whole)
    torch.testing.assert_close(grad_parts, grad_whole)


def test_ratio_is_one_at_the_first_minibatch():
    """pi_old's log-probs from the rollout's pass over all k*B rows; the first minibatch recomputes a subset of
    groups with gradients: rho = 1 on every token, no clipping."""
    torch.manual_seed(0)
    tokenizer, policy = toy.make_tokenizer(), common.load_model("toy-tiny")
    pad_id, B, k = tokenizer.pad_token_id, 6, 3
    prompts = data.tokenize_prompts(tokenizer, toy.sft_dataset("test")["prompt"][:B], 32)
    prompt = data.pad(prompts * k, pad_id, "left")
    completion, _ = common.generate(policy, prompt, tokenizer, 8, temperature=0.7)
    mask = completion != pad_id
    with torch.no_grad():
        old = common.completion_logprobs(policy, prompt[:B], completion, pad_id, 0.7)
    idx = torch.tensor([4, 1])
    rows = torch.cat([idx + j * B for j in range(k)])
    new = common.completion_logprobs(policy, prompt[idx], completion[rows], pad_id, 0.7)
    part = dict(old_logps=old[rows], ref_logps=old[rows], advantages=torch.randn(len(rows)))
    part["weights"] = grpo.token_weights(mask[rows], "grpo", 8)
    loss, s = grpo.grpo_losses(new, part, 0.2, 0.04)
    torch.testing.assert_close((new - old[rows]).masked_fill(~mask[rows], 0), torch.zeros_like(new), rtol=0, atol=1e-5)
    assert s["policy/clipfrac"].item() == 0.0 and s["policy/ratio"].item() == pytest.approx(1.0, abs=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in policy.parameters() if p.requires_grad)


def test_smoke_run(toy_cache, tmp_path):
    args = grpo.Args(
        judge="toy:gold", output_dir=str(tmp_path), run_name="smoke", total_episodes=16, batch_size=8, eval_prompts=16
    )
    grpo.main(args)
    updates = [r for r in read_metrics(tmp_path / "smoke") if "objective/kl" in r]
    assert len(updates) == 2
    assert updates[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # first rollout: policy == reference
    for key in ("objective/scores", "objective/gold", "loss/policy", "loss/kl", "policy/ratio", "grpo/advantage_abs"):
        assert key in updates[0] and updates[0][key] == updates[0][key], key  # present and not NaN
    final = json.load(open(tmp_path / "smoke" / "eval.json"))
    assert {"eval/win_rate", "eval/kl", "eval/score"} <= set(final)
    assert (tmp_path / "smoke" / "model.safetensors").exists()


def test_learning_check(toy_cache, tmp_path):
    """On the tiny toy models, GRPO raises the greedy win rate within a few updates."""
    args = grpo.Args(
        judge="toy:gold",
        output_dir=str(tmp_path),
        run_name="learn",
        total_episodes=16 * 20,
        lr=1e-4,
        eval_prompts=200,
        eval_every=10**9,
    )
    grpo.main(args)
    rows = read_metrics(tmp_path / "learn")
    evals = [r for r in rows if "eval/win_rate" in r]
    assert evals[-1]["eval/win_rate"] >= evals[0]["eval/win_rate"] + 0.03, evals


WORD_CHECKER = '''import re


def names_the_word(prompts, completions, answer, **columns):
    """1 where the completion names the row's answer word (a regex on word boundaries), else 0."""
    return [float(re.search(rf"\\b{a}\\b", c) is not None) for c, a in zip(completions, answer)]
'''


def test_a_regex_reward_function_rises(toy_cache, tmp_path):
    """A reward function of the toy vocabulary: 1 when the completion names the post's LAST topic word. The toy SFT
    model often stops one word early (its references drop the last topic word 70% of the time), so the reward
    starts well below 1 and GRPO can raise it. The file has the GSM8K-like layout (prompt, completion, answer)."""
    rows = [dict(r, answer=toy.topic_words(toy.post_words(r["prompt"]))[-1]) for r in toy.sft_dataset("test")]
    path = tmp_path / "words.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "checker.py").write_text(WORD_CHECKER)
    assert re.search(r"\bcat\b", "rain cat") and not re.search(r"\bcat\b", "rain cats")
    args = grpo.Args(
        output_dir=str(tmp_path),
        run_name="fn",
        dataset=str(path),
        reward_fn=f"{tmp_path / 'checker.py'}:names_the_word",
        total_episodes=16 * 16,
        lr=1e-4,
        eval_prompts=100,
        eval_every=10**9,
    )
    grpo.main(args)
    metrics = read_metrics(tmp_path / "fn")
    scores = [m["objective/scores"] for m in metrics if "objective/scores" in m]
    evals = [m["eval/score"] for m in metrics if "eval/score" in m]
    assert sum(scores[-4:]) / 4 > sum(scores[:4]) / 4 + 0.1, scores
    assert evals[-1] > evals[0] + 0.05, evals


@pytest.mark.parametrize("scale_rewards", [True, False])
def test_against_trl(tmp_path, scale_rewards, foreign_trainer):
    """TRL 1.12's GRPOTrainer on the same tiny model, prompts, completions and rewards: its advantages
    (`_generate_and_score_completions`, with `_generate` returning our completions) and, for each loss type, its
    `_compute_loss` (with `_get_per_token_logps_and_entropies` returning our log-probs) and the loss's gradient.
    Conventions pinned (trl/trainer/grpo_trainer.py): TRL's rows are prompt-major, a group contiguous (2787:
    `rewards.view(-1, num_generations)`), ours [k, B]; std unbiased with eps 1e-4 (2792, 2809; trl/trainer/utils.py
    nanstd); TRL's defaults differ from the paper's: loss_type "dapo", beta 0.0 (grpo_config.py 795, 675); its dapo
    normalizer is the generation batch's token count (3260), ours the minibatch's (the same with one minibatch); its
    KL is multiplied by rho by default (3193, DeepSeek-V3.2), which Eq. (3) does not: turned off here."""
    import datasets
    import trl

    torch.manual_seed(0)
    tok, policy = toy.make_tokenizer(), common.load_model("toy-tiny")
    pad_id, B, G, C = tok.pad_token_id, 2, 4, 6
    texts = toy.sft_dataset("test")["prompt"][:B]
    prompt = data.pad(data.tokenize_prompts(tok, texts, 32) * G, pad_id, "left")
    completion, _ = common.generate(policy, prompt, tok, C, temperature=1.0)
    to_trl = torch.arange(B * G).view(G, B).T.reshape(-1)  # TRL's row r is our row to_trl[r]
    trl_rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.3, 0.3, 0.3, 0.3])  # group 2 all equal
    config = trl.GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=B * G,
        num_generations=G,
        beta=0.0,
        report_to=[],
        max_completion_length=C,
        use_cpu=True,
        bf16=False,
        scale_rewards="group" if scale_rewards else "none",
        use_bias_correction_kl=False,  # TRL 1.12 default True (grpo_config.py 966): the KL times rho, not in Eq. (3)
    )
    trainer = trl.GRPOTrainer(
        model=policy,
        reward_funcs=lambda prompts, completions, **kw: trl_rewards.tolist(),
        args=config,
        train_dataset=datasets.Dataset.from_dict({"prompt": texts}),
        processing_class=tok,
    )
    unpad = lambda rows: [[t for t in row.tolist() if t != pad_id] for row in rows]  # noqa: E731
    decoded = tok.batch_decode(completion[to_trl], skip_special_tokens=True)
    trainer._generate = lambda p: (
        unpad(prompt[to_trl]),
        unpad(completion[to_trl]),
        None,
        decoded,
        None,
        {},
        None,
        None,
    )
    inputs = trainer._generate_and_score_completions([{"prompt": texts[r // G]} for r in range(B * G)])
    ours = grpo.group_advantages(trl_rewards.view(B, G).T.reshape(-1), G, scale_rewards)
    torch.testing.assert_close(ours[to_trl], inputs["advantages"])

    mask = completion != pad_id
    W = inputs["completion_ids"].shape[1]  # TRL pads to the longest completion
    assert torch.equal(mask[to_trl][:, :W], inputs["completion_mask"].bool()) and not mask[:, W:].any()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        old = common.completion_logprobs(policy, prompt[:B], completion, pad_id)
    new = (old + 0.3 * torch.randn(old.shape, generator=g)).masked_fill(~mask, 0).requires_grad_()
    ref = (old + 0.2 * torch.randn(old.shape, generator=g)).masked_fill(~mask, 0)
    trainer.beta, trainer.current_gradient_accumulation_steps = 0.04, 1  # beta > 0 would load a second model
    trainer._get_per_token_logps_and_entropies = lambda *a, **kw: (new[to_trl][:, :W], torch.zeros(B * G, W), None)
    inputs |= dict(old_per_token_logps=old[to_trl][:, :W], ref_per_token_logps=ref[to_trl][:, :W])
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        trainer.loss_type = loss_type
        (trl_grad,) = torch.autograd.grad(trl_loss := trainer._compute_loss(trainer.model, inputs), new)
        part = dict(old_logps=old, ref_logps=ref, advantages=ours, weights=grpo.token_weights(mask, loss_type, C))
        loss, _ = grpo.grpo_losses(new, part, cliprange=0.2, kl_coef=0.04)
        (grad,) = torch.autograd.grad(loss, new)
        torch.testing.assert_close(loss, trl_loss, msg=loss_type)
        torch.testing.assert_close(grad, trl_grad, msg=loss_type)
