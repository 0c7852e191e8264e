"""drpo.py: the dataset reset (prefix, h, masks), the reduction to ppo.py, a smoke run and a learning check."""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import torch

import common
import data
import drpo
import ppo
import toy

ROOT = Path(__file__).resolve().parents[1]


def test_h_is_uniform_on_1_to_L_minus_1():
    g = torch.Generator().manual_seed(0)
    lengths = torch.full((20000,), 5)  # 4 tokens + EOS
    h = drpo.sample_resets(lengths, 1.0, g)
    counts = Counter(h.tolist())
    assert set(counts) == {1, 2, 3, 4}  # never 0 (no reset) and never L (the policy must at least emit EOS)
    for k in (1, 2, 3, 4):
        assert abs(counts[k] / 20000 - 0.25) < 0.015


def test_reset_probability_and_short_references():
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([1, 2, 3] * 2000)
    h = drpo.sample_resets(lengths, 1.0, g)
    assert (h[lengths == 1] == 0).all()  # a reference that is only EOS cannot be reset
    assert (h[lengths == 2] == 1).all()
    assert set(h[lengths == 3].tolist()) == {1, 2}
    assert (drpo.sample_resets(lengths, 0.0, g) == 0).all()
    half = drpo.sample_resets(torch.full((20000,), 4), 0.5, g)
    assert abs((half > 0).float().mean().item() - 0.5) < 0.02


def test_reset_prefix_equals_reference_tokens():
    torch.manual_seed(0)
    tokenizer = toy.make_tokenizer()
    policy = common.load_model("toy-tiny")  # untrained: without forcing it would almost never copy the reference
    rows = toy.sft_dataset("test").select(range(32))
    pairs = [data.tokenize_pair(tokenizer, p, c, 32, 8) for p, c in zip(rows["prompt"], rows["completion"])]
    prompt = data.pad([p for p, _ in pairs], tokenizer.pad_token_id, "left")
    reference = data.pad([c for _, c in pairs], tokenizer.pad_token_id, "right")
    lengths = (reference != tokenizer.pad_token_id).sum(1)
    h = drpo.sample_resets(lengths, 1.0, torch.Generator().manual_seed(0))
    assert (h >= 1).all() and (h <= lengths - 1).all()
    completion, _ = common.generate(
        policy,
        prompt,
        tokenizer,
        8,
        temperature=0.7,
        logits_processor=[drpo.ForcePrefix(reference, h, prompt.shape[1])],
    )
    for b in range(32):
        assert completion[b, : h[b]].tolist() == reference[b, : h[b]].tolist()
    assert completion.shape[1] > h.max()  # the policy continues after the prefix


def test_policy_gradient_ignores_forced_tokens_only():
    """d L_pg / d log pi is 0 at forced positions and non-zero elsewhere; the value loss sees every token."""
    args = drpo.Args(judge="toy:gold")
    mask = torch.tensor([[True, True, True, True, False]])
    forced = torch.tensor([[True, True, False, False, False]])
    new_logps = torch.zeros(1, 5, requires_grad=True)
    new_values = torch.zeros(1, 5, requires_grad=True)
    advantages, returns = torch.ones(1, 5), torch.full((1, 5), 0.1)
    zeros = torch.zeros(1, 5)
    rollout = dict(old_logps=zeros, old_values=zeros, advantages=advantages, returns=returns, mask=mask)
    pg, vf, _ = drpo.ppo_losses(new_logps, new_values, {**rollout, "free": mask & ~forced}, args, 4, 2)
    pg.backward()
    assert new_logps.grad[0].tolist() == [0.0, 0.0, -0.5, -0.5, 0.0]  # -A / n_free on the two free tokens
    vf.backward()
    assert (new_values.grad[0, :4] != 0).all() and new_values.grad[0, 4] == 0


def read(run_dir):
    return [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]


def test_reset_prob_zero_reproduces_ppo(toy_cache, tmp_path):
    kw = dict(output_dir=str(tmp_path), total_episodes=96, batch_size=32, eval_prompts=16, seed=3)
    ppo.main(ppo.Args(judge="toy:gold", run_name="ppo", **kw))
    drpo.main(drpo.Args(judge="toy:gold", run_name="drpo", reset_prob=0.0, **kw))
    a, b = read(tmp_path / "ppo"), read(tmp_path / "drpo")
    assert len(a) == len(b) == 5  # 3 updates + evals at 0 and the end
    for x, y in zip(a, b):
        for key, value in x.items():
            if not key.startswith("time/"):
                assert y[key] == value, (x["step"], key)


def test_smoke_run_logs_resets(toy_cache, tmp_path):
    drpo.main(
        drpo.Args(
            judge="toy:gold",
            output_dir=str(tmp_path),
            run_name="smoke",
            total_episodes=64,
            batch_size=32,
            eval_prompts=16,
        )
    )
    updates = [r for r in read(tmp_path / "smoke") if "reset/fraction" in r]
    assert len(updates) == 2 and all(r["reset/fraction"] == 1.0 for r in updates)
    assert all(1.0 <= r["reset/mean_h"] <= 7.0 for r in updates)
    assert (tmp_path / "smoke" / "model.safetensors").exists()


def test_cli_rejects_reset_prob_out_of_range(toy_cache, tmp_path):
    cmd = [sys.executable, str(ROOT / "drpo.py"), "--output-dir", str(tmp_path), "--reset-prob", "1.5"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == "error: --reset-prob 1.5 must be in [0, 1]"


def test_learning_check(toy_cache, tmp_path):
    """On the tiny toy models, DR-PO raises the reward-model score of its rollouts and the greedy win rate from
    the bare prompt. (The gold reward of reset rollouts starts high, from the reference prefix, and is noisy.)"""
    drpo.main(
        drpo.Args(
            judge="toy:gold",
            output_dir=str(tmp_path),
            run_name="learn",
            total_episodes=64 * 24,
            batch_size=64,
            lr=1e-4,
            eval_prompts=200,
            eval_every=10**9,
        )
    )
    rows = read(tmp_path / "learn")
    scores = [r["objective/scores"] for r in rows if "objective/scores" in r]
    evals = [r for r in rows if "eval/win_rate" in r]
    assert sum(scores[-8:]) / 8 > sum(scores[:4]) / 4 + 0.1, scores
    assert evals[-1]["eval/win_rate"] > evals[0]["eval/win_rate"] + 0.1, evals
