"""More than one process: every script under `torchrun --nproc_per_node 2` on CPU (gloo) completes two
updates with identical parameters on both ranks after every optimizer step, writes its files once;
dpo.py's first update with 2 processes x B/2 pairs equals one process with B pairs; and a two-process
run stopped and resumed from its checkpoint ends exactly where the uninterrupted one does."""

import os
import subprocess
import sys

import ddp_worker
import pytest
import torch
from conftest import RESUMED, ROOT

pytestmark = [pytest.mark.slow, pytest.mark.skipif(torch.cuda.is_available(), reason="the gloo CPU path")]


@pytest.mark.parametrize("name", list(ddp_worker.RUNS))
def test_ranks_hold_identical_parameters(name, two_ranks):
    ranks = [torch.load(two_ranks / f"{name}.rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert len(ranks[0]["hashes"]) >= 2  # two updates (more optimizer steps for the minibatched ones)
    assert ranks[0]["hashes"] == ranks[1]["hashes"]
    run_dir = two_ranks / f"{name}-2"
    assert (run_dir / "eval.json").exists() and (run_dir / "model.safetensors").exists()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines))  # written by one rank only


def test_dpo_two_halves_equal_one_batch(two_ranks, tmp_path):
    """Gradients are averaged across processes: 2 x 4 pairs give the step that 1 x 8 pairs give."""
    ddp_worker.main(tmp_path, ["dpo"])
    one = torch.load(tmp_path / "dpo.rank0.pt", weights_only=True)["first_step"]
    two = torch.load(two_ranks / "dpo.rank0.pt", weights_only=True)["first_step"]
    torch.testing.assert_close(two, one, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", [r.removesuffix("-resume") for r in RESUMED])
def test_interrupted_and_resumed_on_two_ranks_ends_where_the_uninterrupted_run_does(name, two_ranks):
    """Each rank saves and restores its own random state and data position; the resumed two-process run
    takes exactly the optimizer steps of the uninterrupted one."""
    for rank in (0, 1):
        full = torch.load(two_ranks / f"{name}.rank{rank}.pt", weights_only=True)["hashes"]
        resumed = torch.load(two_ranks / f"{name}-resume.rank{rank}.pt", weights_only=True)["hashes"]
        assert resumed == full
    ckpt = two_ranks / f"{name}-resume-2" / "checkpoint"
    assert sorted(p.name for p in ckpt.glob("state_*.pt")) == ["state_0.pt", "state_1.pt"]


@pytest.mark.parametrize("argv", [["--batch-size", "3"], ["--eval-every=-1"]], ids=["batch-not-divisible", "range"])
def test_an_input_mistake_is_printed_once_under_two_processes(argv, toy_cache, tmp_path):
    """Both processes meet the mistake and stop with exit code 2; one line says it, the first process's."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(ROOT / "rebel.py"), "--output-dir", str(tmp_path), *argv]
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error:")]
    assert result.returncode != 0 and len(errors) == 1, (result.stdout[-2000:], result.stderr[-3000:])
    assert "exitcode: 2" in result.stderr  # torchrun's report of the first process's exit code
