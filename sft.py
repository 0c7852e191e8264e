"""Supervised fine-tuning (SFT): the first stage of the RLHF pipeline.

Maximize the likelihood of demonstration completions given their prompts, with the loss on completion
tokens only (EOS included, prompt and padding excluded):

    L_SFT(theta) = -(1/N) sum_batch sum_t log pi_theta(y_t | x, y_<t),   N = number of completion tokens

as in the TL;DR setups of Stiennon et al. 2020 and N+ (Huang et al. 2024, arXiv 2403.17031), where SFT
trains Pythia on reference summaries for 1 epoch, batch 64, lr 3e-6.

    python sft.py                                                   # toy task, CPU, < 1 minute
    python sft.py --model EleutherAI/pythia-1b-deduped --dataset trl-lib/tldr \
        --lr 3e-6 --max-prompt-length 512 --max-completion-length 53 --max-new-tokens 53
    accelerate launch --config_file configs/zero2.yaml sft.py --model ... --dataset ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from transformers import get_scheduler

import common
import data
import training
from training import NonNegative, Positive, UserError

# The toy tiers' defaults, which any flag given overrides (`--dataset toy-long --help` shows them): the gold reward as
# judge; toy-long's model, lengths and schedule (its title copy forms within a few hundred updates of 32 at 3e-3)
PRESETS = {
    "toy": dict(judge="toy:gold"),
    "toy-long": dict(
        judge="toy:gold",
        model="toy-long",
        max_prompt_length=64,
        max_completion_length=32,
        max_new_tokens=48,
        lr=3e-3,
        lr_schedule="wsd",
        batch_size=32,
        eval_every=400,
    ),
}


@dataclass
class Args:
    # common
    exp_name: str = "sft"
    """name of the experiment (prefix of the run directory)"""
    seed: NonNegative[int] = 1
    """random seed"""
    output_dir: str = "runs"
    """parent directory of the run directory"""
    run_name: str | None = None
    """run directory name (default: {exp_name}__{seed}__{unix time})"""
    track: bool = False
    """log to Weights & Biases"""
    wandb_project: str = "rlhf"
    """wandb project name"""
    save_every: NonNegative[int] = 0
    """write a checkpoint to <run>/checkpoint every this many updates (0: only on Ctrl-C / SIGTERM)"""
    resume: str | None = None
    """continue the run in this directory (runs/<run>) from its checkpoint, with its saved arguments"""
    trust_remote_code: bool = False
    """allow Hub models that ship their own Python code (it runs on this machine: trusted models only)"""

    # model
    model: str = "toy"
    """model to fine-tune: Hub id or local directory; `toy` / `toy-tiny` = a fresh ~1M / ~0.1M-parameter Llama"""
    lora_r: NonNegative[int] = 0
    """LoRA rank of the policy's adapters (peft; 0 = full fine-tuning); the saved model is merged"""
    lora_alpha: Positive[float] = 16.0
    """LoRA alpha: the adapters' scale is alpha / r (DR-PO and REBEL TL;DR: r 1024, alpha 2048)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass of trained models: less memory, more compute"""

    # data
    dataset: str = "toy"
    """prompt/completion data: `toy`, a Hub id (trl-lib/tldr), a save_to_disk directory or a json/jsonl/parquet/csv"""
    max_prompt_length: Positive[int] = 32
    """prompts longer than this keep their last tokens (TL;DR: 512)"""
    max_completion_length: Positive[int] = 16
    """completions (with EOS) longer than this are cut (TL;DR: 53)"""
    max_new_tokens: Positive[int] = 8
    """tokens generated at evaluation (TL;DR: 53)"""
    eval_prompts: Positive[int] = 500
    """number of test prompts used at each evaluation"""

    # optimization
    lr: NonNegative[float] = 1e-3
    """AdamW learning rate (TL;DR Pythia: 3e-6)"""
    lr_schedule: Literal["linear", "wsd"] = "linear"
    """linear: decayed to 0 (TL;DR); wsd: a 50-update warm-up (a tenth of a shorter run), constant, then linear decay
    to 0 over the last fifth (toy-long: the title copy forms while the rate is high, the decay settles the rest)"""
    epochs: Positive[int] = 1
    """passes over the training data"""
    batch_size: Positive[int] = 64
    """examples per optimizer step, over all processes (TL;DR: 64; toy-long: 32, where the title copy forms sooner)"""
    micro_batch_size: Positive[int] | None = None
    """examples per forward/backward on each process; gradients accumulate up to --batch-size (default: all at once)"""
    eval_every: NonNegative[int] = 100
    """evaluate every this many updates (optimizer steps); 0: only at the end"""
    judge: str | None = None
    """the win rate of greedy completions against the test split's references under this judge: `module:function`,
    a local model, or an OpenAI-compatible URL http://HOST:PORT/v1 (the toy tiers' preset: `toy:gold`, gold reward)"""
    judge_model: str | None = None
    """the model name that an endpoint --judge serves"""
    judge_template: Literal["summary", "chat"] = "summary"
    """an LLM judge's prompt: the DPO paper's TL;DR summary comparison, or its dialogue (HH) comparison"""
    max_steps: Positive[int] | None = None
    """stop after this many updates (optimizer steps; default: --epochs passes over the data)"""


def collate(examples, pad_id):
    prompt = data.pad([e["prompt_ids"] for e in examples], pad_id, "left")
    completion = data.pad([e["completion_ids"] for e in examples], pad_id, "right")
    return prompt, completion


def main(args: Args):
    accelerator = common.setup(args)
    tokenizer = data.load_tokenizer(args.model)
    judge = common.load_judge(args)  # the evaluations' win rate against the test references
    pad_id = tokenizer.pad_token_id
    # ---- SFT (Stiennon et al. 2020, N+), step 1: pi_theta starts from the pretrained LM (LoRA optional) ----
    policy = common.apply_lora(common.trainable(common.load_model(args.model), args), args.lora_r, args.lora_alpha)

    # ---- step 2: demonstrations (x, y) -> token ids of x (left-truncated) and y + EOS ----
    train = data.load_data(args.dataset, "train", ("prompt", "completion"))
    test = data.load_data(args.dataset, "test", ("prompt", "completion"))
    test = test.select(range(min(args.eval_prompts, len(test))))
    pairs = [
        data.tokenize_pair(tokenizer, p, c, args.max_prompt_length, args.max_completion_length)
        for p, c in zip(train["prompt"], train["completion"])
    ]
    examples = [{"prompt_ids": p, "completion_ids": c} for p, c in pairs]
    n_cut = sum(c[-1] != tokenizer.eos_token_id for _, c in pairs)
    if n_cut:
        print(f"[data] {n_cut} completions longer than --max-completion-length {args.max_completion_length} lost EOS")

    per_process = args.batch_size // accelerator.num_processes
    loader_rng = torch.Generator().manual_seed(args.seed)  # the shuffle; its state is the data position of a checkpoint
    loader = torch.utils.data.DataLoader(
        examples,
        batch_size=per_process,
        shuffle=True,
        drop_last=True,
        collate_fn=lambda b: collate(b, pad_id),
        generator=loader_rng,
    )
    if len(loader) == 0:
        raise UserError(f"--batch-size {args.batch_size} is larger than the training set ({len(examples)})")
    num_updates = min(args.max_steps or 10**12, args.epochs * len(loader))  # one optimizer step per update
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, eps=1e-5)
    if args.lr_schedule == "linear":
        scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=num_updates)
    else:
        warmup, decay = min(50, num_updates // 10), {"num_decay_steps": num_updates // 5, "decay_type": "linear"}
        scheduler = get_scheduler(
            "warmup_stable_decay", optimizer, warmup, num_training_steps=num_updates, scheduler_specific_kwargs=decay
        )
    micro = args.micro_batch_size or per_process
    policy, optimizer, loader = common.prepare(accelerator, policy, optimizer, loader, micro_batch_size=micro)
    run = training.Run(args, accelerator, num_updates)

    def evaluate(update):  # greedy completions of the test prompts; toy: gold reward and win rate
        return run.log_eval(
            update, *common.evaluate(accelerator.unwrap_model(policy), tokenizer, test, args, judge=judge)
        )

    state = run.resume(scheduler=scheduler)
    first = 1 if state is None else state["step"] + 1
    batches = data.epochs(loader, loader_rng, None if state is None else state["position"])
    times = {}
    policy.train()
    for update in range(first, num_updates + 1):
        # ---- step 3: a minibatch of demonstrations, split into micro-batches that accumulate gradients ----
        (prompt, completion), position = next(batches)
        times = {}
        with training.timer(times, "time/update"):
            mask = completion != pad_id
            size, n_tokens, loss = args.micro_batch_size or len(prompt), mask.sum().clamp(min=1), 0.0
            mbs = list(zip(prompt.split(size), completion.split(size), mask.split(size)))
            for i, (p, c, m) in enumerate(mbs):
                # ---- step 4: the SFT loss, -(1/N) sum_t log pi_theta(y_t | x, y_<t) over the N completion tokens
                # of the whole batch (EOS included): a micro-batch adds its token sum over N, not its own mean ----
                with common.accumulate(accelerator, policy, last=i == len(mbs) - 1):
                    logps = common.completion_logprobs(policy, p, c, pad_id)
                    micro_loss = -(logps * m).sum() / n_tokens
                    run.check_finite(update, loss=micro_loss)
                    accelerator.backward(micro_loss)
                loss += micro_loss.detach()
            # ---- step 5: AdamW step, learning rate decayed linearly to 0 (wsd: over the last fifth) ----
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        if update % 10 == 0 or update == num_updates:
            run.log({"loss": loss.item(), "lr": scheduler.get_last_lr()[0], **times}, update, show=("loss",))
        if args.eval_every and update % args.eval_every == 0 and update < num_updates:
            evaluate(update)
        run.step_done(update, {"position": position})

    final = evaluate(num_updates)
    common.save_model(accelerator, policy, tokenizer, run.dir)  # merged when LoRA
    run.finish(final, times=times)


if __name__ == "__main__":
    training.run_cli(Args, main, PRESETS)
