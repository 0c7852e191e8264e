"""Shared fixtures. Tests never touch the network: the offline flags are set before any HF import, and
the toy SFT / reward models that the scripts' defaults ask for are tiny ones trained here once per
session (in a temporary RLHF_TOY_CACHE), so every script runs with its default arguments."""

import os
import socket
import subprocess
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


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: several processes (DDP, DeepSpeed); `pytest -m 'not slow'` skips them")


@pytest.fixture(scope="session")
def toy_cache(tmp_path_factory):
    """A toy cache with tiny SFT and reward models (~0.1M parameters), trained for a few seconds each.
    Sets RLHF_TOY_CACHE so `--model toy-sft` / `--reward-model toy-rm` resolve to them."""
    import reward
    import sft

    cache = tmp_path_factory.mktemp("toy_cache")
    os.environ["RLHF_TOY_CACHE"] = str(cache)
    sft.main(
        sft.Args(
            judge="toy:gold",
            model="toy-tiny",
            output_dir=str(cache),
            run_name="toy-sft",
            max_steps=300,
            lr=3e-3,
            eval_every=10**9,
            eval_prompts=64,
        )
    )
    reward.main(
        reward.Args(
            model=str(cache / "toy-sft"),
            output_dir=str(cache),
            run_name="toy-rm",
            max_steps=156,
            lr=2e-3,
            eval_every=10**9,
            eval_pairs=200,
        )
    )
    return cache


@pytest.fixture
def foreign_trainer():
    """For a test that builds another library's trainer (TRL's): accelerate's process-wide state and the environment
    are rebuilt afterwards, so none of its settings (bf16, its Accelerator) reaches the tests that follow."""
    from accelerate.state import AcceleratorState

    environ = dict(os.environ)
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    os.environ.clear()
    os.environ.update(environ)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """Tiny GPT-2, GPT-NeoX, Llama and Qwen2 checkpoints with their own BPE tokenizers (tests/tiny_models.py):
    {arch: (causal LM dir, reward model dir)}."""
    import tiny_models

    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: tiny_models.save_tiny(root, arch) for arch in tiny_models.ARCHS}


ROOT = Path(__file__).resolve().parents[1]
RESUMED = ["rebel-resume", "ppo-resume", "aihf-explicit-resume"]  # one script of each shape, stopped and resumed


def launch_two_processes(launcher: list[str], out: Path) -> subprocess.CompletedProcess:
    """tests/ddp_worker.py under `launcher` (2 processes): every script for two updates, then RESUMED."""
    import ddp_worker

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*launcher, str(ROOT / "tests" / "ddp_worker.py"), str(out), *ddp_worker.RUNS, *RESUMED]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-6000:])
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def two_ranks(toy_cache, tmp_path_factory):
    """Every script under `torchrun --nproc_per_node 2` (gloo, DDP): the reference for the DeepSpeed runs."""
    out = tmp_path_factory.mktemp("ddp")
    launch_two_processes([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], out)
    return out
