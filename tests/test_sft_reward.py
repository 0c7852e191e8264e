"""Tests of sft.py and reward.py: the losses by hand, the masks and collators, smoke runs (in process and
from the command line), the run outputs and saved models, input mistakes on the command line, and a
learning check on the toy task (the models that conftest's `toy_cache` fixture trains)."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import common
import data
import reward
import sft
import toy

REPO = Path(__file__).resolve().parents[1]
RUN_FILES = [
    "args.json",
    "metrics.jsonl",
    "eval.json",
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# Losses, masks and collators by hand
# ---------------------------------------------------------------------------------------------


def test_bradley_terry_loss_hand_values():
    bt = reward.bradley_terry_loss
    assert bt(torch.tensor([0.0]), torch.tensor([0.0])).item() == pytest.approx(math.log(2))  # margin 0
    assert bt(torch.tensor([1.0]), torch.tensor([0.0])).item() == pytest.approx(0.313262, abs=1e-6)  # margin 1
    extreme = bt(torch.tensor([-100.0]), torch.tensor([100.0])).item()  # margin -200: logsigmoid, not log(sigmoid)
    assert math.isfinite(extreme) and extreme == pytest.approx(200.0)
    assert bt(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.0])).item() == pytest.approx(
        (math.log(2) + 0.313262) / 2, abs=1e-6
    )
    assert (
        bt(torch.tensor([1.0], dtype=torch.bfloat16), torch.tensor([0.0], dtype=torch.bfloat16)).dtype == torch.float32
    )


def test_bradley_terry_gradient_at_zero_margin():
    # d/dm -log sigmoid(m) = -(1 - sigmoid(m)) = -0.5 at m = 0: push the chosen score up, the rejected down
    chosen, rejected = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    reward.bradley_terry_loss(chosen, rejected).backward()
    assert (chosen.grad.item(), rejected.grad.item()) == pytest.approx((-0.5, 0.5))


def test_reward_tokenize_and_collate_pairs():
    """Chosen and rejected share the left-padded prompt; completions are right-padded to one width, so
    both completion masks exclude the prompt."""
    tok = toy.make_tokenizer()
    pairs = {"prompt": ["POST: rain cat TL;DR:"], "chosen": [" rain cat"], "rejected": [" cat"]}
    args = reward.Args()
    # toy ids: <bos> 0, <eos> 1, POST: 3, TL;DR: 4, rain 5, cat 6; <|pad|> 45
    assert data.tokenize_pairs(tok, pairs, args.max_prompt_length, args.max_completion_length) == [
        {"prompt": [0, 3, 5, 6, 4], "chosen": [5, 6, 1], "rejected": [6, 1]}
    ]
    P = tok.pad_token_id
    rows = [
        {"prompt": [1, 2, 3], "chosen": [4, 5], "rejected": [6]},
        {"prompt": [7, 8], "chosen": [9, 10], "rejected": [11, 12, 13]},
    ]
    prompt, completion = reward.collate(rows, pad_id=P)
    assert prompt.tolist() == [[1, 2, 3], [P, 7, 8], [1, 2, 3], [P, 7, 8]]
    assert completion.tolist() == [[4, 5, P], [9, 10, P], [6, P, P], [11, 12, 13]]
    assert (completion != P).long().tolist() == [[1, 1, 0], [1, 1, 0], [1, 0, 0], [1, 1, 1]]


def test_pair_scores_read_each_completion_at_its_own_eos():
    torch.manual_seed(0)
    config = toy.model_config("tiny")
    config.num_labels = 1
    rm = AutoModelForSequenceClassification.from_config(config).eval()
    torch.nn.init.normal_(rm.score.weight, std=1.0)
    # "POST: rain cat TL;DR:" -> " rain cat" / " cat"; "POST: train TL;DR:" -> " train" / " very train then"
    rows = [
        {"prompt": [0, 3, 5, 6, 4], "chosen": [5, 6, 1], "rejected": [6, 1]},
        {"prompt": [0, 3, 7, 4], "chosen": [7, 1], "rejected": [17, 7, 18, 1]},
    ]
    pad_id = toy.make_tokenizer().pad_token_id  # 45: outside the model's vocabulary, never embedded
    with torch.no_grad():
        chosen, rejected = reward.pair_scores(rm, *reward.collate(rows, pad_id=pad_id), pad_id=pad_id)
        for i, r in enumerate(rows):  # HF's own head on each unpadded sequence ending at its EOS
            assert chosen[i].item() == pytest.approx(
                rm(torch.tensor([r["prompt"] + r["chosen"]])).logits.item(), abs=1e-5
            )
            assert rejected[i].item() == pytest.approx(
                rm(torch.tensor([r["prompt"] + r["rejected"]])).logits.item(), abs=1e-5
            )


def test_sft_loss_mask_covers_eos_and_excludes_the_prompt():
    """sft.py's loss, -masked_mean(completion_logprobs, completion != pad), is the HF causal-LM loss with
    labels -100 on the prompt and on padding; the EOS of every row is inside the mask."""
    tok = toy.make_tokenizer()
    pairs = [
        data.tokenize_pair(tok, "POST: rain very cat then rain so cat maybe TL;DR:", " rain cat", 32, 16),
        data.tokenize_pair(tok, "POST: dog so dog TL;DR:", " dog", 32, 16),
    ]
    prompt, completion = sft.collate([{"prompt_ids": p, "completion_ids": c} for p, c in pairs], tok.pad_token_id)
    P = tok.pad_token_id  # 45
    assert prompt.tolist() == [[0, 3, 5, 17, 6, 18, 5, 19, 6, 20, 4], [P] * 5 + [0, 3, 13, 19, 13, 4]]
    assert completion.tolist() == [[5, 6, 1], [13, 1, P]]
    mask = completion != tok.pad_token_id
    assert mask.long().tolist() == [[1, 1, 1], [1, 1, 0]]  # EOS included, prompt excluded
    torch.manual_seed(0)
    model = common.load_model("toy-tiny")
    ours = -common.masked_mean(common.completion_logprobs(model, prompt, completion, tok.pad_token_id), mask)
    ids = torch.cat([prompt, completion], 1)
    attention = ids != tok.pad_token_id
    labels = torch.cat([torch.full_like(prompt, -100), completion.masked_fill(~mask, -100)], 1)
    # the pad has no embedding row: the oracle feeds any real id (0) at the masked positions
    hf = model(
        input_ids=ids.masked_fill(~attention, 0),
        attention_mask=attention.long(),
        position_ids=(attention.cumsum(1) - 1).clamp(min=0),
        labels=labels,
    ).loss
    assert ours.item() == pytest.approx(hf.item(), abs=1e-5)


# ---------------------------------------------------------------------------------------------
# Smoke runs in process
# ---------------------------------------------------------------------------------------------


def test_sft_smoke(tmp_path):
    sft.main(
        sft.Args(
            judge="toy:gold",
            model="toy-tiny",
            output_dir=str(tmp_path),
            run_name="sft",
            max_steps=1,
            batch_size=16,
            eval_prompts=16,
        )
    )
    run = tmp_path / "sft"
    for name in RUN_FILES + ["samples.jsonl"]:
        assert (run / name).exists(), name
    args = json.loads((run / "args.json").read_text())
    assert (args["model"], args["max_steps"], args["batch_size"]) == ("toy-tiny", 1, 16)
    # update 1 logs the loss of the weights it starts from: a fresh model is near uniform over 45 tokens (no <|pad|>)
    assert read_jsonl(run / "metrics.jsonl")[0]["step"] == 1
    assert read_jsonl(run / "metrics.jsonl")[0]["loss"] == pytest.approx(math.log(45), abs=0.05)
    assert len(read_jsonl(run / "samples.jsonl")) == 16
    final = json.loads((run / "eval.json").read_text())
    assert {"eval/win_rate", "eval/judge_score", "eval/eos", "eval/length", "time/total"} <= set(final)
    assert final["eval/win_rate"] < 0.1  # an untrained policy does not beat the references
    # the next stage reloads the saved model and tokenizer with plain transformers; EOS pads (<|pad|> has no row)
    model, tok = AutoModelForCausalLM.from_pretrained(run), AutoTokenizer.from_pretrained(run)
    assert model.config.vocab_size == 45 and sum(p.numel() for p in model.parameters()) == 85_120  # see test_toy
    assert (tok.pad_token_id, tok.eos_token_id, len(tok), model.config.pad_token_id) == (1, 1, 45, 1)
    assert tok("POST: rain TL;DR:")["input_ids"] == [0, 3, 5, 4]


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, toy_cache):
    """reward.py with its defaults (backbone `toy-sft` from the toy cache), 3 updates."""
    out = tmp_path_factory.mktemp("reward")
    args = reward.Args(output_dir=str(out), run_name="rm", max_steps=3, batch_size=32, eval_pairs=100)
    reward.main(args)
    return out / "rm", args


def test_reward_smoke_outputs(reward_run):
    run, _ = reward_run
    for name in RUN_FILES:
        assert (run / name).exists(), name
    assert read_jsonl(run / "metrics.jsonl")[-1]["step"] == 3
    final = json.loads((run / "eval.json").read_text())
    assert {
        "eval/accuracy",
        "eval/gold_agreement_sft_samples",
        "reward_bias",
        "eval/reference_score",
        "eval/gold_accuracy_ceiling",
    } <= set(final)
    rm = AutoModelForSequenceClassification.from_pretrained(run)
    assert rm.config.num_labels == 1 and rm.config.reward_bias == pytest.approx(final["reward_bias"])
    # the saved reward model keeps its pad (45), with an embedding row now, and names it in its config: transformers'
    # pooling then reads the last token that is not padding (the scripts read the same token themselves)
    assert rm.config.pad_token_id == 45 and rm.config.vocab_size == 46
    tok = AutoTokenizer.from_pretrained(run)
    assert (tok.pad_token_id, tok.padding_side) == (45, "right")


def test_reward_normalization_centers_the_references(reward_run):
    """The saved model's mean score on the reference completions (the toy SFT train split, the 2000 that
    reward.py draws) is 0 after the stored bias is subtracted."""
    run, args = reward_run
    assert abs(json.loads((run / "eval.json").read_text())["eval/reference_score"]) < 1e-4
    rm, tok = common.load_model(str(run), kind="reward").eval(), data.load_tokenizer(str(run))
    assert rm.config.reward_bias != 0.0
    refs = toy.sft_dataset("train").shuffle(seed=args.seed).select(range(2000))
    pairs = [
        data.tokenize_pair(tok, p, c, args.max_prompt_length, args.max_completion_length)
        for p, c in zip(refs["prompt"], refs["completion"])
    ]
    prompt = data.pad([p for p, _ in pairs], tok.pad_token_id, "left")
    completion = data.pad([c for _, c in pairs], tok.pad_token_id, "right")
    with torch.no_grad():
        scores = common.reward_scores(rm, prompt, completion, tok.pad_token_id)
    assert abs(scores.mean().item()) < 1e-4
    assert scores.std().item() > 1e-3  # centered, not collapsed


# ---------------------------------------------------------------------------------------------
# Micro-batches: the accumulated gradient is the whole batch's
# ---------------------------------------------------------------------------------------------


def test_reward_micro_batches_keep_chosen_and_rejected_together():
    rows = [{"prompt": [3, i], "chosen": [5, 1], "rejected": [6, 7, 1]} for i in range(5)]
    parts = list(reward.micro_batches(*reward.collate(rows, pad_id=45), 2))
    assert [len(p) for p, _ in parts] == [4, 4, 2]
    for prompt, completion in parts:
        n = len(prompt) // 2
        assert prompt[:n].tolist() == prompt[n:].tolist()  # each pair's two rows share its prompt
        assert (completion[:n, :2] == torch.tensor([5, 1])).all() and (completion[n:] == torch.tensor([6, 7, 1])).all()
    assert [p[0, 1].item() for p, _ in parts] == [0, 2, 4]


# ---------------------------------------------------------------------------------------------
# Learning check (the toy_cache fixture: toy-tiny SFT 300 updates at lr 3e-3, reward model 156 updates)
# ---------------------------------------------------------------------------------------------


def test_sft_learns_the_toy_task(toy_cache):
    tok, prompts = toy.make_tokenizer(), toy.sft_dataset("test").select(range(64))
    torch.manual_seed(0)
    args = sft.Args(judge="toy:gold")
    before, _ = common.evaluate(common.load_model("toy-tiny"), tok, prompts, args, judge=common.load_judge(args))
    after = json.loads((toy_cache / "toy-sft" / "eval.json").read_text())  # the same 64 test prompts
    assert before["eval/win_rate"] < 0.05
    assert after["eval/win_rate"] > 0.3 and after["eval/eos"] > 0.9 and after["eval/judge_score"] > 0.5


def test_reward_model_learns_the_toy_preferences(toy_cache):
    final = json.loads((toy_cache / "toy-rm" / "eval.json").read_text())
    # held-out accuracy on the noisy labels; the gold reward itself reaches ~0.75 on them
    assert final["eval/accuracy"] > 0.6
    assert final["eval/gold_accuracy_ceiling"] > final["eval/accuracy"] - 0.05
    assert abs(final["eval/reference_score"]) < 1e-4


# ---------------------------------------------------------------------------------------------
# Command line: smoke runs and input mistakes (started together: each spends most of its time importing)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli(tmp_path_factory, toy_cache):
    out = tmp_path_factory.mktemp("cli")
    bad = out / "no_completion.jsonl"
    bad.write_text('{"prompt": "POST: rain so rain TL;DR:", "answer": " rain"}\n' * 2)
    commands = {
        "sft": ["sft.py", "--model", "toy-tiny", "--max-steps", "3", "--batch-size", "16", "--eval-prompts", "8"],
        "reward": ["reward.py", "--max-steps", "3", "--batch-size", "16", "--eval-pairs", "50"],
        "missing_column": ["sft.py", "--model", "toy-tiny", "--dataset", str(bad)],
        "offline_dataset": ["sft.py", "--model", "toy-tiny", "--dataset", "someone/does-not-exist"],
    }
    # one thread each: several processes with 2 busy-waiting OpenMP threads each on 2 cores crawl
    env = {
        **os.environ,
        "RLHF_TOY_CACHE": str(toy_cache),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    procs = {
        name: subprocess.Popen(
            [sys.executable, *cmd, "--output-dir", str(out), "--run-name", name],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, cmd in commands.items()
    }
    results = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return out, results


def test_sft_command_line(cli):
    out, results = cli
    assert results["sft"].returncode == 0, results["sft"].stderr[-3000:]
    for name in RUN_FILES + ["samples.jsonl"]:
        assert (out / "sft" / name).exists(), name
    assert read_jsonl(out / "sft" / "metrics.jsonl")[-1]["step"] == 3


def test_reward_command_line(cli):
    out, results = cli
    assert results["reward"].returncode == 0, results["reward"].stderr[-3000:]
    for name in RUN_FILES:
        assert (out / "reward" / name).exists(), name
    config = json.loads((out / "reward" / "config.json").read_text())
    assert config["reward_bias"] == pytest.approx(json.loads((out / "reward" / "eval.json").read_text())["reward_bias"])


@pytest.mark.parametrize(
    "name, expected",
    [
        ("missing_column", "lacks column(s) ['completion']"),
        ("offline_dataset", "'someone/does-not-exist'"),
    ],
)
def test_input_mistakes_give_one_error_line(cli, name, expected):
    result = cli[1][name]
    # stderr may also hold `datasets` progress bars ("... [00:00, 563.07 examples/s]"); nothing else
    lines = [line for line in result.stderr.splitlines() if line.strip() and not re.search(r"/s\]$", line)]
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], result.stderr[-3000:]
