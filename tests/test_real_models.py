"""Every script, two updates, on tiny checkpoints of real architectures (tests/tiny_models.py). First on every
architecture with TL;DR-style text (the full matrix), then once each on data files in real Hub layouts, spread so
that every architecture, every pad case and every data layout is covered:

| script | policy (tokenizer case)            | data                                                        |
| ------ | ---------------------------------- | ----------------------------------------------------------- |
| sft    | Qwen2 (ChatML, in-vocabulary pad)  | ultrafeedback_binarized `messages` (train_sft / test_sft)   |
| reward | GPT-NeoX (pad == EOS)              | tldr-preference (train / validation), tldr references       |
| dpo    | Llama (chat template writes BOS)   | ultrafeedback_binarized preferences (train_prefs / test_prefs) |
| ppo    | GPT-2 (no pad)                     | tldr prompts (jsonl)                                        |
| drpo   | GPT-NeoX                           | tldr prompt/completion (parquet)                            |
| rebel  | Llama, reward model GPT-2 (another tokenizer: re-tokenized) | Anthropic HH transcripts (jsonl)   |
| xpo    | Qwen2                              | ultrafeedback-prompt (conversational prompts only)          |
| aihf   | GPT-2                              | Anthropic HH: chosen replies as demonstrations, and pairs   |
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file
from test_formats import HH_ROWS, tldr_prompt, ultrafeedback_row, write_jsonl

import aihf
import dpo
import drpo
import ppo
import rebel
import reward
import sft
import xpo

TINY = dict(max_prompt_length=64, eval_prompts=4)  # every script


@pytest.fixture(scope="module")
def hub_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub_files")
    tldr = [{"prompt": tldr_prompt(i), "completion": f" Roommate {i} is late."} for i in range(12)]
    pref = [{"prompt": tldr_prompt(i), "chosen": " Rent is late.", "rejected": " I like dogs."} for i in range(12)]
    uf = {
        f"{s}_{k}": datasets.Dataset.from_list([ultrafeedback_row(i) for i in range(12 if s == "train" else 4)])
        for s in ("train", "test")
        for k in ("prefs", "sft", "gen")
    }
    datasets.DatasetDict(uf).save_to_disk(root / "uf")
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(pref[:8]), "validation": datasets.Dataset.from_list(pref[8:])}
    ).save_to_disk(root / "pref")
    datasets.Dataset.from_list(tldr).to_parquet(root / "tldr.parquet")
    uf_prompts = [{"prompt": [{"role": "user", "content": f"How do I talk to my roommate {i}?"}]} for i in range(12)]
    return {
        "tldr": write_jsonl(root / "tldr.jsonl", tldr),
        "tldr.parquet": str(root / "tldr.parquet"),
        "pref": str(root / "pref"),
        "uf": str(root / "uf"),
        "hh": write_jsonl(root / "hh.jsonl", HH_ROWS * 4),
        "uf-prompt": write_jsonl(root / "uf_prompt.jsonl", uf_prompts),
    }


def runs(tiny_checkpoints, hub_files):
    """(module, Args) of every script; the table in the module docstring."""
    lm, rm = {a: p[0] for a, p in tiny_checkpoints.items()}, {a: p[1] for a, p in tiny_checkpoints.items()}
    rl = dict(total_episodes=8, batch_size=4, num_minibatches=2, max_new_tokens=4, eval_every=10**9, **TINY)
    return {
        "sft": sft.Args(
            model=lm["qwen2"], dataset=hub_files["uf"], max_steps=2, batch_size=4, max_new_tokens=4, **TINY
        ),
        "reward": reward.Args(
            model=lm["gpt_neox"],
            dataset=hub_files["pref"],
            reference_dataset=hub_files["tldr"],
            max_steps=2,
            batch_size=4,
            eval_pairs=4,
            max_prompt_length=64,
        ),
        "dpo": dpo.Args(
            model=lm["llama"],
            reward_model=rm["llama"],
            dataset=hub_files["uf"],
            max_steps=2,
            batch_size=4,
            eval_pairs=4,
            max_new_tokens=4,
            **TINY,
        ),
        "ppo": ppo.Args(model=lm["gpt2"], reward_model=rm["gpt2"], dataset=hub_files["tldr"], **rl),
        "drpo": drpo.Args(model=lm["gpt_neox"], reward_model=rm["gpt_neox"], dataset=hub_files["tldr.parquet"], **rl),
        "rebel": rebel.Args(model=lm["llama"], reward_model=rm["gpt2"], dataset=hub_files["hh"], **rl),
        "xpo": xpo.Args(model=lm["qwen2"], reward_model=rm["qwen2"], dataset=hub_files["uf-prompt"], **rl),
        "aihf": aihf.Args(
            model=lm["gpt2"],
            reward_model=rm["gpt2"],
            dataset=hub_files["hh"],
            preference_dataset=hub_files["hh"],
            max_steps=2,
            batch_size=4,
            demo_batch_size=4,
            max_new_tokens=4,
            eval_every=10**9,
            **TINY,
        ),
    }


SCRIPTS = {"sft": sft, "reward": reward, "dpo": dpo, "ppo": ppo, "drpo": drpo, "rebel": rebel, "xpo": xpo, "aihf": aihf}


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_two_updates_on_a_real_architecture(tiny_checkpoints, hub_files, tmp_path, name):
    args = runs(tiny_checkpoints, hub_files)[name]
    args.output_dir, args.run_name = str(tmp_path), name
    SCRIPTS[name].main(args)
    run = tmp_path / name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 2
    for r in rows:
        assert all(math.isfinite(v) for v in r.values()), r
    final = json.loads((run / "eval.json").read_text())
    assert all(math.isfinite(v) for v in final.values()), final
    assert (run / "model.safetensors").exists()
    if name != "reward":  # the samples show the prompt as the policy saw it: chat prompts rendered by the template
        prompt = json.loads((run / "samples.jsonl").read_text().splitlines()[0])["prompt"]
        assert isinstance(prompt, str)
        if name in ("sft", "xpo"):
            assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_start|>assistant\n")


def test_chat_data_without_a_chat_template_is_one_error_line(tiny_checkpoints, hub_files, tmp_path):
    """UltraFeedback's messages for a GPT-2 tokenizer (no chat template): exit 2 and one line, no traceback."""
    script = Path(__file__).resolve().parents[1] / "sft.py"
    cmd = [
        sys.executable,
        str(script),
        "--model",
        tiny_checkpoints["gpt2"][0],
        "--dataset",
        hub_files["uf"],
        "--output-dir",
        str(tmp_path),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ}, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "error: conversational data (lists of messages) needs a tokenizer with a chat template; this one has none"
    ]


def plain_text_runs(lm, rm, hub_files):
    """Every script on TL;DR-style plain text, which every tokenizer reads (chat data needs a template)."""
    rl = dict(total_episodes=8, batch_size=4, num_minibatches=2, max_new_tokens=4, eval_every=10**9, **TINY)
    return {
        "sft": sft.Args(model=lm, dataset=hub_files["tldr"], max_steps=2, batch_size=4, max_new_tokens=4, **TINY),
        "reward": reward.Args(
            model=lm,
            dataset=hub_files["pref"],
            reference_dataset=hub_files["tldr"],
            max_steps=2,
            batch_size=4,
            eval_pairs=4,
            max_prompt_length=64,
        ),
        "dpo": dpo.Args(
            model=lm,
            reward_model=rm,
            dataset=hub_files["pref"],
            max_steps=2,
            batch_size=4,
            eval_pairs=4,
            max_new_tokens=4,
            **TINY,
        ),
        "ppo": ppo.Args(model=lm, reward_model=rm, dataset=hub_files["tldr"], **rl),
        "drpo": drpo.Args(model=lm, reward_model=rm, dataset=hub_files["tldr"], **rl),
        "rebel": rebel.Args(model=lm, reward_model=rm, dataset=hub_files["tldr"], **rl),
        "xpo": xpo.Args(model=lm, reward_model=rm, dataset=hub_files["tldr"], **rl),
        "aihf": aihf.Args(
            model=lm,
            reward_model=rm,
            dataset=hub_files["tldr"],
            preference_dataset=hub_files["pref"],
            max_steps=2,
            batch_size=4,
            demo_batch_size=4,
            max_new_tokens=4,
            eval_every=10**9,
            **TINY,
        ),
    }


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama", "qwen2"])
@pytest.mark.parametrize("name", list(SCRIPTS))
def test_every_script_on_every_architecture(tiny_checkpoints, hub_files, tmp_path, name, arch):
    """The full matrix: GPT-2 and Llama (no pad token), GPT-NeoX (pad == EOS), Qwen2 (its own pad)."""
    lm, rm = tiny_checkpoints[arch]
    args = plain_text_runs(lm, rm, hub_files)[name]
    args.output_dir, args.run_name = str(tmp_path), f"{name}-{arch}"
    SCRIPTS[name].main(args)
    run = tmp_path / f"{name}-{arch}"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 2 and all(math.isfinite(v) for r in rows for v in r.values())
    assert all(math.isfinite(v) for v in json.loads((run / "eval.json").read_text()).values())


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_lr_0_leaves_the_weights_unchanged(tiny_checkpoints, hub_files, tmp_path, name):
    """--lr 0 is a legitimate value (parity checks): every script runs, and the saved model holds the weights it
    started from (the reward model: its backbone, whose embedding has one more row, for the pad)."""
    lm, rm = tiny_checkpoints["gpt2"]
    args = plain_text_runs(lm, rm, hub_files)[name]
    args.output_dir, args.run_name, args.lr = str(tmp_path), name, 0.0
    SCRIPTS[name].main(args)
    before, after = load_file(f"{lm}/model.safetensors"), load_file(tmp_path / name / "model.safetensors")
    assert set(after) - set(before) == ({"score.weight"} if name == "reward" else set())
    for key, weight in after.items():
        if key in before:
            assert torch.equal(weight[: len(before[key])], before[key]), key
