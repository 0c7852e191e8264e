"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2` (gloo, CPU), by tests/test_deepspeed.py
under `accelerate launch` with a DeepSpeed config, or as one process.

Runs the scripts named on the command line one after the other (same processes), each for two updates on
the tiny toy models, and records on every rank into <out>/<script>.rank<k>.pt: a hash of the optimizer's
parameters after every optimizer step, the parameters themselves after the first step, and after every
update the whole trained models (gathered under ZeRO-3) and the number of optimizer steps the update took."""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)

import aihf  # noqa: E402
import aihf_explicit  # noqa: E402
import dpo  # noqa: E402
import drpo  # noqa: E402
import grpo  # noqa: E402
import ppo  # noqa: E402
import rebel  # noqa: E402
import reward  # noqa: E402
import rloo  # noqa: E402
import sft  # noqa: E402
import training  # noqa: E402
import xpo  # noqa: E402

# two updates each; batch sizes divide by 2 processes (and by the minibatch counts per process); two micro-batches
# per minibatch where a script accumulates gradients
RUNS = {
    "sft": (sft, dict(model="toy-tiny", max_steps=2, batch_size=8, micro_batch_size=2, eval_prompts=4)),
    "reward": (reward, dict(max_steps=2, batch_size=8, micro_batch_size=2, eval_pairs=8)),
    "dpo": (dpo, dict(max_steps=2, batch_size=8, micro_batch_size=2, eval_prompts=4, eval_pairs=8)),
    "ppo": (ppo, dict(total_episodes=16, batch_size=8, num_minibatches=2, micro_batch_size=1, eval_prompts=4)),
    "drpo": (drpo, dict(total_episodes=16, batch_size=8, num_minibatches=2, micro_batch_size=1, eval_prompts=4)),
    "rebel": (rebel, dict(total_episodes=16, batch_size=8, num_minibatches=2, micro_batch_size=1, eval_prompts=4)),
    "xpo": (xpo, dict(total_episodes=16, batch_size=8, num_minibatches=2, micro_batch_size=1, eval_prompts=4)),
    "rloo": (rloo, dict(total_episodes=16, batch_size=8, num_minibatches=2, micro_batch_size=1, eval_prompts=4)),
    "grpo": (grpo, dict(k=2, total_episodes=16, batch_size=8, num_minibatches=2, micro_batch_size=1, eval_prompts=4)),
    "aihf": (
        aihf,
        dict(max_steps=2, batch_size=4, demo_batch_size=4, num_demonstrations=32, num_preferences=32, eval_prompts=4),
    ),
    "aihf-explicit": (
        aihf_explicit,
        dict(
            max_steps=2,
            policy_steps=1,
            rollout_prompts=4,
            batch_size=4,
            demo_batch_size=4,
            center_demos=8,
            num_demonstrations=32,
            num_preferences=32,
            eval_prompts=4,
        ),
    ),
}


def interrupt_and_resume(name: str, run_dir: Path):
    """A script's two updates again, stopped after the first as Ctrl-C would stop it (every rank saves its
    own random and data state) and resumed from the checkpoint."""
    script, kw = RUNS[name]
    real_step_done = training.Run.step_done

    def step_done(self, step, state):
        if step == 1:
            self.stop_signal = "SIGINT"
        return real_step_done(self, step, state)

    training.Run.step_done = step_done
    try:
        script.main(script.Args(output_dir=str(run_dir.parent), run_name=run_dir.name, **kw))
    except training.Interrupted:
        pass
    finally:
        training.Run.step_done = real_step_done
    script.main(training.resume_args(script.Args, script.Args(resume=str(run_dir))))


def main(out: Path, names: list[str]):
    rank = int(os.environ.get("RANK", 0))
    record = {"hashes": [], "first_step": None, "updates": [], "steps": []}
    real_step, real_step_done = torch.optim.AdamW.step, training.Run.step_done

    def step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        params = [p.detach() for group in self.param_groups for p in group["params"]]
        digest = hashlib.sha256(b"".join(p.cpu().numpy().tobytes() for p in params)).hexdigest()
        record["hashes"].append(digest)
        if record["first_step"] is None:
            record["first_step"] = torch.cat([p.flatten().cpu() for p in params])
        return result

    def step_done(self, step, state):
        models = [acc.get_state_dict(m) for acc in self.accelerators for m in acc._models]  # collective under ZeRO-3
        values = [v.flatten().float().cpu() for sd in models for v in (sd or {}).values()]  # ZeRO-3: rank 0 only
        record["updates"].append(torch.cat(values) if values else torch.empty(0))
        record["steps"].append(len(record["hashes"]) - sum(record["steps"]))
        return real_step_done(self, step, state)

    torch.optim.AdamW.step = step
    training.Run.step_done = step_done
    # end_training() destroys the process group, which a second init in the same process cannot rebuild
    # under torchrun's store: the scripts here run one after the other in the same two processes
    Accelerator.end_training = lambda self: None
    try:
        for name in names:
            record.update(hashes=[], first_step=None, updates=[], steps=[])
            if name.endswith("-resume"):
                interrupt_and_resume(name.removesuffix("-resume"), out / f"{name}-{os.environ.get('WORLD_SIZE', 1)}")
            else:
                module, kw = RUNS[name]
                module.main(
                    module.Args(output_dir=str(out), run_name=f"{name}-{os.environ.get('WORLD_SIZE', 1)}", **kw)
                )
            torch.save(record, out / f"{name}.rank{rank}.pt")
    finally:
        torch.optim.AdamW.step, training.Run.step_done = real_step, real_step_done
    (out / f"done.rank{rank}").write_text(json.dumps(names))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
