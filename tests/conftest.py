"""Shared fixtures. Tests never touch the network: the offline flags are set before any HF import, and
the toy SFT / reward models that the scripts' defaults ask for are tiny ones trained here once per
session (in a temporary RLHF_TOY_CACHE), so every script runs with its default arguments."""

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/tiny_models.py

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models gain nothing from a second thread; other processes may need the core


@pytest.fixture(scope="session")
def toy_cache(tmp_path_factory):
    """A toy cache with tiny SFT and reward models (~0.1M parameters), trained for a few seconds each.
    Sets RLHF_TOY_CACHE so `--model toy-sft` / `--reward-model toy-rm` resolve to them."""
    import reward
    import sft

    cache = tmp_path_factory.mktemp("toy_cache")
    os.environ["RLHF_TOY_CACHE"] = str(cache)
    sft.main(sft.Args(model="toy-tiny", output_dir=str(cache), run_name="toy-sft", max_steps=300, lr=3e-3,
                      eval_every=10**9, eval_prompts=64))  # fmt: skip
    reward.main(reward.Args(model=str(cache / "toy-sft"), output_dir=str(cache), run_name="toy-rm", max_steps=156,
                            lr=2e-3, eval_every=10**9, eval_pairs=200))  # fmt: skip
    return cache


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """Tiny GPT-2, GPT-NeoX, Llama and Qwen2 checkpoints with their own BPE tokenizers (tests/tiny_models.py):
    {arch: (causal LM dir, reward model dir)}."""
    import tiny_models

    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: tiny_models.save_tiny(root, arch) for arch in tiny_models.ARCHS}
