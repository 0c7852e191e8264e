"""dpo.py: the loss against hand-computed values, the [chosen; rejected] collator's
completion masks, detached rewards, the loss at initialization on a real batch, smoke runs (function
and CLI) and a learning check on the tiny toy models of the `toy_cache` fixture."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common
import data
import dpo
import toy

ROOT = Path(__file__).resolve().parents[1]


def loss4(*values, dtype=torch.float32, **kwargs):
    """dpo_loss on four lists: policy chosen, policy rejected, ref chosen, ref rejected."""
    return dpo.dpo_loss(*(torch.tensor(v, dtype=dtype) for v in values), **kwargs)


def test_loss_at_init_is_ln2():
    logps = torch.randn(2, 5) * 30
    for dtype, expected in ((torch.float64, 0.6931471805599453), (torch.float32, 0.6931471824645996)):
        chosen, rejected = logps.to(dtype)
        losses, r_c, r_r = dpo.dpo_loss(chosen, rejected, chosen.clone(), rejected.clone(), beta=0.1)
        assert losses.tolist() == [expected] * 5
        assert r_c.abs().max() == 0 and r_r.abs().max() == 0


def test_loss_extreme_logps_are_finite():
    losses, r_c, r_r = loss4([410.0, 0.1], [810.5, 0.2], [-610.0, -0.1], [110.6, 0.5], beta=0.1, dtype=torch.float64)
    assert torch.allclose(r_c - r_r, 0.1 * torch.tensor([320.1, 0.5], dtype=torch.float64))  # beta * h
    assert losses[0].item() == pytest.approx(1.2538e-14, rel=1e-4)
    assert losses[1].item() == pytest.approx(0.668460, abs=1e-6)
    assert losses.mean().item() == pytest.approx(0.334230, abs=1e-6)
    losses32, *_ = loss4([410.0, 0.1], [810.5, 0.2], [-610.0, -0.1], [110.6, 0.5], beta=0.1)
    assert torch.isfinite(losses32).all() and torch.allclose(losses32.double(), losses, rtol=1e-4, atol=1e-7)


def test_loss_is_stable_at_large_negative_margin():
    losses, *_ = loss4([-200.0], [0.0], [0.0], [0.0], beta=1.0)  # h = -200
    assert losses.item() == 200.0
    assert torch.isinf(-torch.log(torch.sigmoid(torch.tensor(-200.0))))  # what logsigmoid avoids


def test_label_smoothing_and_ipo_hand_values():
    # cDPO, beta h = 1, eps 0.1: 0.9 * log(1 + e^-1) + 0.1 * log(1 + e^1)
    losses, *_ = loss4([10.0], [0.0], [0.0], [0.0], beta=0.1, label_smoothing=0.1, dtype=torch.float64)
    assert losses.item() == pytest.approx(0.9 * math.log1p(math.exp(-1)) + 0.1 * math.log1p(math.exp(1)), abs=1e-12)
    assert losses.item() == pytest.approx(0.4132617, abs=1e-7)
    losses, *_ = loss4([10.0], [0.0], [0.0], [0.0], beta=0.1, label_smoothing=0.0, dtype=torch.float64)
    assert losses.item() == pytest.approx(0.3132617, abs=1e-7)  # Bradley-Terry at margin 1
    # IPO, beta 0.1, h = 2: (2 - 1/(2*0.1))^2 = 9
    losses, *_ = loss4([1.0, 5.0], [-1.0, 0.0], [0.0, 0.0], [0.0, 0.0], beta=0.1, loss_type="ipo", dtype=torch.float64)
    assert losses.tolist() == pytest.approx([9.0, 0.0])
    with pytest.raises(ValueError):
        loss4([0.0], [0.0], [0.0], [0.0], beta=0.1, loss_type="hinge")


def test_logged_rewards_are_detached():
    policy = torch.tensor([-3.0, -4.0], requires_grad=True)
    losses, r_c, r_r = dpo.dpo_loss(policy[:1], policy[1:], torch.tensor([-3.5]), torch.tensor([-3.0]), beta=0.1)
    assert losses.requires_grad and not r_c.requires_grad and not r_r.requires_grad
    metrics = dpo.pair_metrics(losses, r_c, r_r, policy[:1], policy[1:])
    assert metrics["rewards/margins"] == pytest.approx(0.1 * (0.5 - (-1.0)))
    assert metrics["rewards/accuracies"] == 1.0 and metrics["logps/rejected"] == -4.0


def test_collator_completion_masks_exclude_each_prompt():
    """The preference collator, read in that oracle's right-padded layout."""
    rows = [
        {"prompt": [1, 2, 3], "chosen": [4, 5], "rejected": [6]},
        {"prompt": [7, 8], "chosen": [9, 10], "rejected": [11, 12, 13]},
    ]
    batch = dpo.collate(rows, pad_id=0)
    assert batch["prompt"].tolist() == [[1, 2, 3], [0, 7, 8]]  # left-padded, once for both completions
    prompt = batch["prompt"].repeat(2, 1)  # the [chosen; rejected] sequences the shared forward computes
    ids = torch.cat([prompt, batch["completion"]], 1)
    completion_mask = torch.cat([torch.zeros_like(prompt), batch["completion"] != 0], 1)
    real = ids != 0
    flush = [(ids[i][real[i]].tolist(), completion_mask[i][real[i]].long().tolist()) for i in range(4)]
    assert [r + [0] * (5 - len(r)) for r, _ in flush] == [
        [1, 2, 3, 4, 5],
        [7, 8, 9, 10, 0],
        [1, 2, 3, 6, 0],
        [7, 8, 11, 12, 13],
    ]
    assert [m + [0] * (5 - len(m)) for _, m in flush] == [
        [0, 0, 0, 1, 1],
        [0, 0, 1, 1, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 1, 1, 1],
    ]


def test_collator_carries_precomputed_ref_logps():
    rows = [
        {"prompt": [1], "chosen": [2], "rejected": [3], "ref_logps": (-1.0, -2.0)},
        {"prompt": [1], "chosen": [2], "rejected": [3], "ref_logps": (-3.0, -4.0)},
    ]
    chosen, rejected = dpo.collate(rows, pad_id=0)["ref_logps"].chunk(2)
    assert chosen.tolist() == [-1.0, -3.0] and rejected.tolist() == [-2.0, -4.0]


def test_loss_is_ln2_on_a_real_batch_with_a_frozen_copy(toy_cache):
    tokenizer = data.load_tokenizer("toy-sft")
    policy, ref = common.load_model("toy-sft"), common.load_model("toy-sft").eval().requires_grad_(False)
    pairs = data.load_data("toy", "test", dpo.PREFERENCE_COLUMNS).select(range(16))
    batch = dpo.collate(data.tokenize_pairs(tokenizer, pairs, 32, 16), tokenizer.pad_token_id)
    chosen, rejected = dpo.sequence_logps(policy, batch, tokenizer.pad_token_id)
    with torch.no_grad():
        ref_chosen, ref_rejected = dpo.sequence_logps(ref, batch, tokenizer.pad_token_id)
    losses, *_ = dpo.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1)
    assert losses.mean().item() == pytest.approx(math.log(2), abs=1e-6)
    losses.mean().backward()  # the gradient flows into the policy only
    assert all(p.grad is None for p in ref.parameters()) and policy.model.embed_tokens.weight.grad is not None


def test_smoke_main(toy_cache, tmp_path):
    args = dpo.Args(
        judge="toy:gold",
        output_dir=str(tmp_path),
        run_name="smoke",
        max_steps=3,
        batch_size=16,
        eval_every=2,
        eval_prompts=16,
        eval_pairs=32,
    )
    dpo.main(args)
    run = tmp_path / "smoke"
    final = json.loads((run / "eval.json").read_text())
    for key in (
        "eval/win_rate",
        "eval/kl",
        "eval/score",
        "eval/rewards/accuracies",
        "initial/win_rate",
        "time/update_mean",
        "memory/peak_mb",
    ):
        assert math.isfinite(final[key]), key
    assert final["initial/kl"] == pytest.approx(0.0, abs=1e-4)  # pi_theta = pi_ref before the first step
    assert final["initial/loss"] == pytest.approx(math.log(2), abs=1e-5)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged if "eval/win_rate" in m] == [0, 2, 3]
    train = [m for m in logged if "rewards/chosen" in m]
    assert train and all(
        k in train[-1] for k in ("loss", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")
    )
    assert (run / "model.safetensors").exists() and (run / "tokenizer.json").exists()


def test_cli_on_a_preference_file(toy_cache, tmp_path):
    """The CLI on a small .jsonl preference file (no test split: its last rows; no gold reward, no toy RM),
    with precomputed reference log-probs and the IPO loss; an input mistake is a one-line error."""
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in toy.preference_dataset("test").select(range(80))))
    cmd = [
        sys.executable,
        str(ROOT / "dpo.py"),
        "--output-dir",
        str(tmp_path),
        "--run-name",
        "cli",
        "--dataset",
        str(data),
        "--max-steps",
        "2",
        "--batch-size",
        "8",
        "--precompute-ref-logps",
        "--loss-type",
        "ipo",
    ]
    env = {**os.environ, "RLHF_TOY_CACHE": str(toy_cache)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[dpo] last update: time/update" in out.stdout
    final = json.loads((tmp_path / "cli" / "eval.json").read_text())
    assert "eval/win_rate" not in final and "eval/score" not in final and math.isfinite(final["eval/kl"])
    bad = subprocess.run(cmd[:2] + ["--dataset", "missing.jsonl"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: dataset file")


def test_learning_check(toy_cache, tmp_path):
    """A short DPO run on the tiny toy SFT model raises the gold win rate against the reference summaries."""
    args = dpo.Args(
        judge="toy:gold",
        output_dir=str(tmp_path),
        run_name="learn",
        max_steps=60,
        batch_size=32,
        lr=1e-3,
        eval_every=10**9,
        eval_prompts=200,
        eval_pairs=64,
    )
    dpo.main(args)
    final = json.loads((tmp_path / "learn" / "eval.json").read_text())
    assert final["eval/win_rate"] > final["initial/win_rate"] + 0.05, final
    assert final["eval/rewards/accuracies"] > 0.6 and final["eval/score"] > final["initial/score"]


def test_micro_batches_keep_pairs_and_precomputed_ref_logps_aligned():
    batch = dpo.collate(
        [{"prompt": [3, i], "chosen": [5, 1], "rejected": [6, 7, 1], "ref_logps": (-i, -10.0 - i)} for i in range(5)],
        45,
    )
    parts = list(dpo.micro_batches(batch, 2))
    assert [len(p["prompt"]) for p in parts] == [2, 2, 1] and [len(p["completion"]) for p in parts] == [4, 4, 2]
    for p in parts:
        assert (p["completion"][: len(p["prompt"]), :2] == torch.tensor([5, 1])).all()  # [chosen; rejected]
        assert p["prompt"][:, 1].tolist() == (-p["ref_logps"][: len(p["prompt"])]).long().tolist()  # its own pair
        chosen_ref, rejected_ref = p["ref_logps"].chunk(2)
        torch.testing.assert_close(rejected_ref, chosen_ref - 10.0)
