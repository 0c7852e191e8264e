"""Checkpoints, resume, determinism, the non-finite guard and the catalogue of input mistakes.

Every script is run on the tiny toy models for a few steps: uninterrupted, then stopped after a
checkpoint (a simulated Ctrl-C in-process, a real SIGKILL or SIGINT in a subprocess) and resumed. The
resumed run must end with exactly the weights, final metrics and metrics.jsonl of the uninterrupted one
(wall-time and memory entries aside)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import aihf
import aihf_explicit
import common
import data
import dpo
import drpo
import grpo
import ppo
import rebel
import reward
import rloo
import sft
import training
import xpo

ROOT = Path(__file__).resolve().parents[1]

# (module, tiny arguments): 4 steps each, a checkpoint every 2, an evaluation every 2
TINY = {
    "sft": (sft, dict(model="toy-tiny", max_steps=4, batch_size=16, eval_every=2, eval_prompts=8)),
    "reward": (reward, dict(max_steps=4, batch_size=16, eval_every=2, eval_pairs=32)),
    "dpo": (dpo, dict(max_steps=4, batch_size=8, eval_every=2, eval_prompts=8, eval_pairs=16)),
    "ppo": (ppo, dict(total_episodes=32, batch_size=8, num_minibatches=2, eval_every=2, eval_prompts=8)),
    "drpo": (
        drpo,
        dict(total_episodes=32, batch_size=8, num_minibatches=2, eval_every=2, eval_prompts=8, reset_prob=0.5),
    ),
    "rebel": (rebel, dict(total_episodes=32, batch_size=8, num_minibatches=2, eval_every=2, eval_prompts=8)),
    "xpo": (xpo, dict(total_episodes=32, batch_size=8, num_minibatches=2, eval_every=2, eval_prompts=8, replay=True)),
    "rloo": (rloo, dict(total_episodes=32, batch_size=8, num_minibatches=2, eval_every=2, eval_prompts=8)),
    "reinforce": (rloo, dict(k=1, total_episodes=32, batch_size=8, eval_every=2, eval_prompts=8)),  # its baseline
    "grpo": (grpo, dict(k=2, total_episodes=32, batch_size=8, num_minibatches=2, eval_every=2, eval_prompts=8)),
    "aihf": (
        aihf,
        dict(
            max_steps=4,
            batch_size=4,
            demo_batch_size=4,
            num_demonstrations=64,
            num_preferences=64,
            eval_every=2,
            eval_prompts=8,
        ),
    ),
    "aihf-self-play": (
        aihf,
        dict(
            self_play=True,
            rounds=2,
            max_steps=4,
            batch_size=4,
            demo_batch_size=4,
            num_demonstrations=64,
            num_preferences=64,
            eval_every=2,
            eval_prompts=8,
        ),
    ),
    "aihf-explicit": (
        aihf_explicit,
        dict(
            max_steps=4,
            policy_steps=1,
            rollout_prompts=4,
            batch_size=4,
            demo_batch_size=4,
            center_demos=8,
            num_demonstrations=64,
            num_preferences=64,
            eval_every=2,
            eval_prompts=8,
        ),
    ),
}


def comparable(path: Path) -> list[dict]:
    """metrics.jsonl without wall-time and memory entries (they differ between any two runs)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "memory/"))} for r in rows]


def final_metrics(run_dir: Path) -> dict:
    return {
        k: v
        for k, v in json.loads((run_dir / "eval.json").read_text()).items()
        if not k.startswith(("time/", "memory/"))
    }


def assert_same_run(a: Path, b: Path):
    assert final_metrics(a) == final_metrics(b)
    assert comparable(a / "metrics.jsonl") == comparable(b / "metrics.jsonl")
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def stop_at(monkeypatch, step: int):
    """Simulate Ctrl-C during step `step`: the signal handler's flag is up when the step ends."""
    original = training.Run.step_done

    def step_done(self, s, state):
        if s == step:
            self.stop_signal = "SIGINT"
        return original(self, s, state)

    monkeypatch.setattr(training.Run, "step_done", step_done)


@pytest.mark.parametrize("name", list(TINY))
def test_interrupt_and_resume_is_exact(name, toy_cache, tmp_path, monkeypatch):
    """Ctrl-C at update 3 saves a checkpoint (the --save-every 2 one of update 2 is replaced) and stops;
    --resume continues to the same end as an uninterrupted run, update for update."""
    module, kw = TINY[name]
    module.main(module.Args(output_dir=str(tmp_path), run_name="full", save_every=2, **kw))
    with monkeypatch.context() as m:
        stop_at(m, 3)
        with pytest.raises(training.Interrupted, match="at update 3"):
            module.main(module.Args(output_dir=str(tmp_path), run_name="cut", save_every=2, **kw))
    cut = tmp_path / "cut"
    assert json.loads((cut / "checkpoint" / "meta.json").read_text())["step"] == 3
    assert not (cut / "eval.json").exists() and not (cut / "model.safetensors").exists()
    module.main(training.resume_args(module.Args, module.Args(resume=str(cut))))
    assert_same_run(tmp_path / "full", cut)


def run_script(script: str, *args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(ROOT / script), *args],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **popen,
    )


def wait_for_checkpoint(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120):
    meta = run_dir / "checkpoint" / "meta.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if meta.exists() and json.loads(meta.read_text())["step"] >= step:
            return
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint at step {step} in {timeout} s")


# PPO holds the most state (policy, critic, two generators); DPO reads its data through a DataLoader
SIGKILL_ARGS = {
    "ppo.py": [
        "--total-episodes",
        "96",
        "--batch-size",
        "8",
        "--num-minibatches",
        "2",
        "--eval-every",
        "4",
        "--eval-prompts",
        "8",
    ],
    "dpo.py": [
        "--max-steps",
        "12",
        "--batch-size",
        "8",
        "--eval-every",
        "4",
        "--eval-prompts",
        "8",
        "--eval-pairs",
        "16",
    ],
}


@pytest.mark.parametrize("script", list(SIGKILL_ARGS))
def test_sigkill_after_a_checkpoint_then_resume_is_exact(script, toy_cache, tmp_path):
    args = [*SIGKILL_ARGS[script], "--output-dir", str(tmp_path), "--save-every", "2"]
    full = run_script(script, *args, "--run-name", "full")
    killed = run_script(script, *args, "--run-name", "killed")
    wait_for_checkpoint(tmp_path / "killed", 2, killed)
    killed.kill()  # SIGKILL: no handler runs, nothing is flushed
    killed.wait()
    assert full.wait() == 0, full.stderr.read()[-2000:]
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "eval.json").exists()
    resumed = run_script(script, "--resume", str(tmp_path / "killed"))
    out, err = resumed.communicate()
    assert resumed.returncode == 0, err[-2000:]
    assert "[run] resumed" in out
    assert_same_run(tmp_path / "full", tmp_path / "killed")


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(toy_cache, tmp_path):
    proc = run_script(
        "rebel.py",
        "--total-episodes",
        "4096",
        "--batch-size",
        "8",
        "--eval-prompts",
        "8",
        "--output-dir",
        str(tmp_path),
        "--run-name",
        "r",
    )
    metrics = tmp_path / "r" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and '"step": 1,' in metrics.read_text()):  # training has started
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("stopped: at update ") and "--resume" in err
    step = json.loads((tmp_path / "r" / "checkpoint" / "meta.json").read_text())["step"]
    assert step >= 1 and not (tmp_path / "r" / "checkpoint.tmp").exists()
    assert max(json.loads(x)["step"] for x in metrics.read_text().splitlines()) == step


def test_second_signal_stops_at_once(toy_cache, tmp_path):
    args = rebel.Args(output_dir=str(tmp_path), run_name="r")
    run = training.Run(args, common.setup(args), total=1)
    os.kill(os.getpid(), signal.SIGINT)
    assert run.stop_signal == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
    run.close()


def test_same_seed_same_metrics(toy_cache, tmp_path):
    """Determinism on CPU: two runs with one seed write identical metrics.jsonl (wall times aside)."""
    _, kw = TINY["ppo"]
    for name in ("a", "b"):
        ppo.main(ppo.Args(output_dir=str(tmp_path), run_name=name, **kw))
    assert comparable(tmp_path / "a" / "metrics.jsonl") == comparable(tmp_path / "b" / "metrics.jsonl")
    ppo.main(ppo.Args(output_dir=str(tmp_path), run_name="c", seed=2, **kw))
    assert comparable(tmp_path / "a" / "metrics.jsonl") != comparable(tmp_path / "c" / "metrics.jsonl")


def test_checkpoint_swap_survives_a_crash_between_renames(toy_cache, tmp_path):
    """A crash after checkpoint/ became checkpoint.old/ and before checkpoint.tmp/ took its place: the
    old one is found, and the next save finishes the swap."""
    _, kw = TINY["rebel"]
    with pytest.MonkeyPatch.context() as m:
        stop_at(m, 2)
        with pytest.raises(training.Interrupted):
            rebel.main(rebel.Args(output_dir=str(tmp_path), run_name="r", **kw))
    run_dir = tmp_path / "r"
    (run_dir / "checkpoint").rename(run_dir / "checkpoint.old")
    (run_dir / "checkpoint.tmp").mkdir()  # an incomplete new one
    assert training.find_checkpoint(run_dir) == (2, run_dir / "checkpoint.old")
    rebel.main(training.resume_args(rebel.Args, rebel.Args(resume=str(run_dir), save_every=1)))
    assert sorted(p.name for p in run_dir.glob("checkpoint*")) == ["checkpoint"]
    assert json.loads((run_dir / "checkpoint" / "meta.json").read_text())["step"] == 4


# ---- the non-finite guard ----

# the function whose output turns NaN from step 2 on: the loss (or, for the RL scripts, the reward)
NAN_AT = {
    "sft": (common, "completion_logprobs"),
    "reward": (reward, "bradley_terry_loss"),
    "dpo": (dpo, "dpo_loss"),
    "ppo": (common, "reward_scores"),
    "drpo": (drpo, "ppo_losses"),
    "rebel": (rebel, "rebel_loss"),
    "xpo": (xpo, "xpo_loss"),
    "rloo": (rloo, "rloo_loss"),
    "reinforce": (rloo, "rloo_loss"),
    "grpo": (grpo, "grpo_losses"),
    "aihf": (aihf, "aihf_dpo_loss"),
    "aihf-explicit": (aihf_explicit, "rloo_advantages"),
}


@pytest.mark.parametrize("name", list(NAN_AT))
def test_non_finite_loss_or_reward_stops_the_run(name, toy_cache, tmp_path, monkeypatch):
    module, kw = TINY[name]
    owner, fn_name = NAN_AT[name]
    original, steps_done = getattr(owner, fn_name), []
    real_step_done = training.Run.step_done

    def step_done(self, step, state):
        steps_done.append(step)
        return real_step_done(self, step, state)

    def poisoned(*a, **k):
        out = original(*a, **k)
        if not steps_done:  # step 1 (and the step-0 evaluation) run clean
            return out
        first, *rest = out if isinstance(out, tuple) else (out,)
        return (first * float("nan"), *rest) if rest else first * float("nan")

    monkeypatch.setattr(training.Run, "step_done", step_done)
    monkeypatch.setattr(owner, fn_name, poisoned)
    with pytest.raises(training.TrainingError) as e:
        module.main(module.Args(output_dir=str(tmp_path), run_name="nan", save_every=1, **kw))
    run_dir = tmp_path / "nan"
    assert "non-finite" in str(e.value) and "at update 2" in str(e.value)
    assert f"{run_dir / 'checkpoint'} (update 1)" in str(e.value)
    assert not (run_dir / "model.safetensors").exists() and not (run_dir / "eval.json").exists()
    assert json.loads((run_dir / "checkpoint" / "meta.json").read_text())["step"] == 1
    assert all(t.isfinite().all() for t in load_file(next((run_dir / "checkpoint").rglob("*.safetensors"))).values())


def test_non_finite_weights_are_never_checkpointed(toy_cache, tmp_path, monkeypatch):
    """A NaN that reaches the weights without a non-finite loss (say, an overflow in the optimizer) is
    caught when saving: no checkpoint is written."""
    real_step = torch.optim.AdamW.step

    def step(self, *a, **k):
        out = real_step(self, *a, **k)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(training.TrainingError, match="non-finite weights at update 1: no checkpoint"):
        sft.main(sft.Args(output_dir=str(tmp_path), run_name="w", save_every=1, **TINY["sft"][1]))
    assert not (tmp_path / "w" / "checkpoint").exists()


# ---- the catalogue of input mistakes: one line on stderr, exit code 2, nothing written where it matters ----


def cli(module, argv, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *argv])
    with pytest.raises(SystemExit) as e:
        training.run_cli(module.Args, module.main)
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip() and not x.rstrip().endswith("/s]")]  # datasets progress bars
    return e.value.code, lines


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


CATALOGUE = [
    # (name, script, arguments, expected text in the error line)
    ("missing column", sft, ["--dataset", "{other}"], "lacks column(s) ['prompt', 'completion']"),
    ("empty dataset", dpo, ["--dataset", "{empty}"], "empty"),
    ("one-row dataset", sft, ["--dataset", "{one_row}"], "has 1 row and no test split"),
    ("dataset file missing", rebel, ["--dataset", "/nonexistent/prompts.jsonl"], "does not exist"),
    ("hub dataset offline", sft, ["--dataset", "someone/does-not-exist"], "offline"),
    ("hub model offline", ppo, ["--model", "someone/no-such-model"], "offline"),
    ("tokenizer without eos", sft, ["--model", "{no_eos}"], "no EOS token"),
    ("model without tokenizer", ppo, ["--model", "{no_tokenizer}"], "has a model but no tokenizer"),
    ("policy as reward model", xpo, ["--reward-model", "{policy}"], "looks like a policy, not a reward model"),
    ("policy as ppo's critic", ppo, ["--reward-model", "{policy}"], "looks like a policy, not a reward model"),
    ("batch not divisible", ppo, ["--batch-size", "30", "--num-minibatches", "4"], "--num-minibatches"),
    ("zero batch size", rebel, ["--batch-size", "0"], "--batch-size 0 must be > 0"),
    ("zero minibatches", ppo, ["--num-minibatches", "0"], "--num-minibatches 0 must be > 0"),
    ("negative eval interval", rebel, ["--eval-every", "-1"], "--eval-every -1 must be >= 0"),
    ("batch larger than data", dpo, ["--batch-size", "100000"], "larger than the training set"),
    ("batch larger than episodes", rebel, ["--total-episodes", "16", "--batch-size", "32"], "--total-episodes"),
    ("reset_prob above 1", drpo, ["--reset-prob", "1.5"], "--reset-prob 1.5 must be in [0, 1]"),
    ("negative beta", dpo, ["--beta", "-0.1"], "--beta -0.1 must be > 0"),
    ("zero eta", rebel, ["--eta", "0"], "--eta 0.0 must be > 0"),
    ("gamma above 1", ppo, ["--gamma", "1.5"], "--gamma 1.5 must be in [0, 1]"),
    ("negative kl_coef", rebel, ["--kl-coef", "-1"], "--kl-coef -1.0 must be >= 0"),
    ("negative alpha", xpo, ["--alpha", "0.1", "-1"], "--alpha 0.1 -1.0 must be >= 0"),
    ("nan learning rate", sft, ["--lr", "nan"], "--lr nan must be >= 0"),
    ("zero temperature", ppo, ["--temperature", "0"], "--temperature 0.0 must be > 0"),
    ("label smoothing 0.5", dpo, ["--label-smoothing", "0.5"], "--label-smoothing 0.5 must be in [0, 0.5)"),
    ("negative demo weight", aihf, ["--w-demo", "-1"], "--w-demo -1.0 must be >= 0"),
    ("negative lora rank", dpo, ["--lora-r", "-4"], "--lora-r -4 must be >= 0"),
    ("resume: not a run", rebel, ["--resume", "{tmp}"], "not a run directory"),
    ("resume: no checkpoint", rebel, ["--resume", "{no_ckpt}"], "no checkpoint"),
    ("resume: corrupt checkpoint", rebel, ["--resume", "{corrupt}"], "corrupt checkpoint"),
    ("resume: finished run", rebel, ["--resume", "{finished}"], "has finished"),
    ("resume: another script's run", ppo, ["--resume", "{finished}"], "a run of another script"),
    ("resume: changed argument", rebel, ["--resume", "{corrupt}", "--lr", "0.5"], "--lr 0.5 differs"),
    ("output dir holds a run", rebel, ["--output-dir", "{tmp}", "--run-name", "finished"], "already holds a run"),
]


@pytest.fixture(scope="module")
def mistakes(toy_cache, tmp_path_factory):
    """The files the catalogue points at: data files, a tokenizer without EOS, and runs in various states."""
    tmp = tmp_path_factory.mktemp("mistakes")
    paths = {"tmp": str(tmp)}
    paths["other"] = write_jsonl(tmp / "other.jsonl", [{"question": "POST: a TL;DR:", "answer": "a"}] * 20)
    paths["empty"] = str(tmp / "empty.jsonl")
    paths["one_row"] = write_jsonl(tmp / "one_row.jsonl", [{"prompt": "POST: a TL;DR:", "completion": " a"}])
    Path(paths["empty"]).write_text("")
    tok = data.load_tokenizer(str(toy_cache / "toy-sft"))
    tok.eos_token = None
    tok.save_pretrained(tmp / "no_eos")
    common.load_model(str(toy_cache / "toy-sft")).save_pretrained(tmp / "no_eos")
    paths["no_eos"] = str(tmp / "no_eos")
    common.load_model(str(toy_cache / "toy-sft")).save_pretrained(tmp / "no_tokenizer")
    paths["no_tokenizer"], paths["policy"] = str(tmp / "no_tokenizer"), str(toy_cache / "toy-sft")
    _, kw = TINY["rebel"]
    rebel.main(rebel.Args(output_dir=str(tmp), run_name="finished", **kw))
    paths["finished"] = str(tmp / "finished")
    with pytest.MonkeyPatch.context() as m:
        stop_at(m, 1)
        with pytest.raises(training.Interrupted):
            rebel.main(rebel.Args(output_dir=str(tmp), run_name="corrupt", **kw))
    policy = tmp / "corrupt" / "checkpoint" / "accelerator_0" / "model.safetensors"
    policy.write_bytes(policy.read_bytes()[:1000])  # a truncated file
    paths["corrupt"] = str(tmp / "corrupt")
    (tmp / "no_ckpt").mkdir()
    (tmp / "no_ckpt" / "args.json").write_text((tmp / "finished" / "args.json").read_text())
    paths["no_ckpt"] = str(tmp / "no_ckpt")
    return paths


@pytest.mark.parametrize("name, module, argv, expected", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_input_mistake_is_one_error_line(name, module, argv, expected, mistakes, monkeypatch, capsys):
    code, lines = cli(module, [a.format(**mistakes) for a in argv], monkeypatch, capsys)
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines


def test_track_without_wandb_is_one_error_line_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    argv = ["--model", "toy-tiny", "--track", "--output-dir", str(tmp_path), "--run-name", "t"]
    assert cli(sft, argv, monkeypatch, capsys) == (2, ["error: --track needs wandb: pip install wandb"])
    assert list(tmp_path.iterdir()) == []


def test_resume_keeps_the_saved_arguments(toy_cache, tmp_path):
    """--resume takes the run's args.json; the few arguments a resumed run may change are taken from the
    command line, and a changed argument equal to its saved value is fine."""
    _, kw = TINY["rebel"]
    with pytest.MonkeyPatch.context() as m:
        stop_at(m, 1)
        with pytest.raises(training.Interrupted):
            rebel.main(rebel.Args(output_dir=str(tmp_path), run_name="r", lr=1e-3, **kw))
    args = training.resume_args(rebel.Args, rebel.Args(resume=str(tmp_path / "r"), save_every=3, lr=1e-3))
    assert (args.lr, args.save_every, args.total_episodes, args.run_name) == (1e-3, 3, kw["total_episodes"], "r")
    assert args.output_dir == str(tmp_path)


def test_prompt_longer_than_the_maximum_keeps_its_end(toy_cache, tmp_path):
    """Truncation policy, stated in the README: a prompt longer than --max-prompt-length keeps BOS and its
    last tokens (the "TL;DR:" cue stays next to the completion); the run goes on."""
    tok = data.load_tokenizer("toy")
    long_prompt = "POST: " + " ".join(["cat dog"] * 40) + " TL;DR:"
    ids = data.tokenize_prompts(tok, [long_prompt], max_prompt=12)[0]
    full = tok(long_prompt)["input_ids"]
    assert len(ids) == 12 and ids[0] == tok.bos_token_id and ids[1:] == full[-11:]
    ds = write_jsonl(tmp_path / "long.jsonl", [{"prompt": long_prompt, "completion": " cat dog"}] * 40)
    sft.main(
        sft.Args(
            model="toy-tiny",
            dataset=ds,
            output_dir=str(tmp_path),
            run_name="long",
            max_steps=2,
            batch_size=8,
            max_prompt_length=12,
            eval_prompts=4,
        )
    )
    assert (tmp_path / "long" / "eval.json").exists()


def test_checkpoint_loads_with_weights_only(toy_cache, tmp_path):
    """A checkpoint is accelerate's save_state (weights as safetensors) plus each process's loop state, which
    loads with weights_only=True."""
    with pytest.MonkeyPatch.context() as m:
        stop_at(m, 1)
        with pytest.raises(training.Interrupted):
            ppo.main(ppo.Args(output_dir=str(tmp_path), run_name="r", **TINY["ppo"][1]))
    ckpt = tmp_path / "r" / "checkpoint"
    assert sorted(p.name for p in ckpt.iterdir()) == ["accelerator_0", "meta.json", "state_0.pt"]
    assert (ckpt / "accelerator_0" / "model.safetensors").exists()  # policy and critic: one module
    torch.load(ckpt / "state_0.pt", weights_only=True)
    assert not training.TRUST_REMOTE_CODE
