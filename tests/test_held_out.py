"""A dataset without a test split (here a .jsonl file): every script trains on the rows that are not held
out and evaluates on the held-out ones only. Each script runs two updates on the file while the data it
asks data.load_data for is recorded."""

import json

import pytest

import aihf
import data
import dpo
import drpo
import grpo
import ppo
import rebel
import reward
import rloo
import sft
import toy
import xpo

N_ROWS, N_TEST = 60, 6  # the last 10% are held out

RL = dict(total_episodes=16, batch_size=8, num_minibatches=1, micro_batch_size=8, eval_prompts=8, eval_every=10**9)
ARGS = {
    "sft": (sft, dict(model="toy-tiny", max_steps=2, batch_size=8, eval_prompts=8)),
    "reward": (reward, dict(max_steps=2, batch_size=8, eval_pairs=8, reference_dataset=None)),
    "dpo": (dpo, dict(max_steps=2, batch_size=8, eval_prompts=8, eval_pairs=8, eval_every=10**9)),
    "ppo": (ppo, RL),
    "drpo": (drpo, RL),
    "rebel": (rebel, RL),
    "xpo": (xpo, RL),
    "rloo": (rloo, RL),
    "grpo": (grpo, dict(RL, k=2)),
    "aihf": (aihf, dict(max_steps=2, batch_size=4, demo_batch_size=4, eval_prompts=8, eval_every=10**9)),
}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """Toy preference rows with distinct prompts (SFT data: the chosen completions)."""
    rows, seen = [], set()
    for row in toy.preference_dataset("test"):
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
        if len(rows) == N_ROWS:
            break
    path = tmp_path_factory.mktemp("held_out") / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path), [r["prompt"] for r in rows]


@pytest.mark.parametrize("name", list(ARGS))
def test_no_evaluation_prompt_is_trained_on(toy_cache, data_file, tmp_path, monkeypatch, name):
    path, prompts = data_file
    loaded = []

    def recording_load_data(dataset, split, columns):
        rows = load_data(dataset, split, columns)
        loaded.append((dataset, split, rows["prompt"]))
        return rows

    load_data = data.load_data
    monkeypatch.setattr(data, "load_data", recording_load_data)
    module, kwargs = ARGS[name]
    dataset_args = {"preference_dataset": path} if name == "aihf" else {}
    module.main(module.Args(output_dir=str(tmp_path), run_name=name, dataset=path, **dataset_args, **kwargs))
    assert (tmp_path / name / "eval.json").exists()

    assert {split for dataset, split, _ in loaded if dataset == path} == {"train", "test"}
    for dataset, split, got in loaded:
        assert dataset == path
        assert got == (prompts[: N_ROWS - N_TEST] if split == "train" else prompts[N_ROWS - N_TEST :]), split
