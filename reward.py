"""Reward modelling: the second stage of the RLHF pipeline.

A Bradley-Terry reward model r_phi(x, y), a causal LM backbone with a scalar head read at the EOS token,
trained on preference pairs (x, y_w, y_l):

    L_RM(phi) = -E log sigmoid(r_phi(x, y_w) - r_phi(x, y_l))

Initialized from the SFT model with a fresh head of std 1/sqrt(H+1), as N+ (Huang et al. 2024,
arXiv 2403.17031); TL;DR: 1 epoch, batch 64, lr 3e-6. Bradley-Terry leaves the offset free, so after
training the mean score of the reference completions (N+: the SFT train split) is stored as
`config.reward_bias` and subtracted by every script that scores with this model: reference summaries
score ~0, and RL scores read as better or worse than the human reference.

    python reward.py                                               # toy task, CPU, < 1 minute
    python reward.py --model vwxyzjn/EleutherAI_pythia-1b-deduped__sft__tldr \
        --dataset trl-lib/tldr-preference --reference-dataset trl-lib/tldr --lr 3e-6 \
        --max-prompt-length 512 --max-completion-length 169
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import get_scheduler

import common
import data
import toy
import training
from training import NonNegative, Positive, UserError

# The long toy tier's defaults, which any flag given overrides (`--dataset toy-long --help` shows them): its models
# and lengths
PRESETS = {
    "toy-long": dict(
        model="toy-long-sft",
        reference_dataset="toy-long",
        max_prompt_length=64,
        max_completion_length=32,
        eval_every=100,
    )
}


@dataclass
class Args:
    # common
    exp_name: str = "reward"
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
    model: str = "toy-sft"
    """backbone to start from, usually the SFT model (Hub id or local dir; `toy-sft` = the cached toy SFT model)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass of trained models: less memory, more compute"""

    # data
    dataset: str = "toy"
    """preference data with prompt/chosen/rejected columns: `toy`, a Hub id, a save_to_disk dir or a file"""
    reference_dataset: str | None = "toy"
    """prompt/completion data whose completions score 0 on average after training (N+: the SFT train split);
    None: the chosen completions"""
    max_prompt_length: Positive[int] = 32
    """prompts longer than this keep their last tokens (TL;DR: 512)"""
    max_completion_length: Positive[int] = 16
    """completions (with EOS) longer than this are cut (TL;DR preferences: 169)"""
    num_preferences: Positive[int] | None = None
    """use only the first N training pairs (default: all)"""
    eval_pairs: Positive[int] = 1000
    """number of test pairs used for held-out accuracy"""

    # optimization
    lr: NonNegative[float] = 5e-4
    """AdamW learning rate, decayed linearly to 0 (TL;DR Pythia: 3e-6)"""
    epochs: Positive[int] = 1
    """passes over the preference data"""
    batch_size: Positive[int] = 64
    """pairs per optimizer step, over all processes (TL;DR: 64)"""
    micro_batch_size: Positive[int] | None = None
    """pairs per forward/backward on each process; gradients accumulate up to --batch-size (default: all at once)"""
    eval_every: NonNegative[int] = 50
    """evaluate every this many updates (optimizer steps); 0: only at the end"""
    max_steps: Positive[int] | None = None
    """stop after this many updates (optimizer steps; default: --epochs passes over the data)"""


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(r_w - r_l), batch mean, computed as logsigmoid in fp32."""
    return -F.logsigmoid(chosen_scores.float() - rejected_scores.float()).mean()  # Bradley-Terry NLL


def collate(rows, pad_id):
    """[chosen; rejected] sharing left-padded prompts, completions right-padded to one width."""
    prompt = data.pad([r["prompt"] for r in rows] * 2, pad_id, "left")
    completion = data.pad([r["chosen"] for r in rows] + [r["rejected"] for r in rows], pad_id, "right")
    return prompt, completion


def micro_batches(prompt, completion, size: int):
    """A collated [chosen; rejected] batch cut into micro-batches of `size` pairs, each laid out the same way."""
    n = prompt.shape[0] // 2
    for i in range(0, n, size):
        pairs = torch.arange(i, min(i + size, n))
        rows = torch.cat([pairs, pairs + n])
        yield prompt[rows], completion[rows]


def pair_scores(model, prompt, completion, pad_id):
    scores = common.reward_scores(model, prompt, completion, pad_id)
    return scores.chunk(2)


@torch.no_grad()
def accuracy(model, rows, pad_id, device, batch_size=128):
    """Share of pairs where the chosen completion scores higher (ties count 1/2)."""
    model.eval()
    wins = []
    for i in range(0, len(rows), batch_size):
        prompt, completion = collate(rows[i : i + batch_size], pad_id)
        chosen, rejected = pair_scores(model, prompt.to(device), completion.to(device), pad_id)
        wins += ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).tolist()
    model.train()
    return sum(wins) / len(wins)


@torch.no_grad()
def mean_score(model, tokenizer, dataset, args, device, batch_size=128):
    """Mean raw score of (prompt, completion) over `dataset` (the normalization bias)."""
    model.eval()
    total = 0.0
    for i in range(0, len(dataset), batch_size):
        chunk = dataset[i : i + batch_size]
        pairs = [
            data.tokenize_pair(tokenizer, p, c, args.max_prompt_length, args.max_completion_length)
            for p, c in zip(chunk["prompt"], chunk["completion"])
        ]
        prompt = data.pad([p for p, _ in pairs], tokenizer.pad_token_id, "left").to(device)
        completion = data.pad([c for _, c in pairs], tokenizer.pad_token_id, "right").to(device)
        total += common.reward_scores(model, prompt, completion, tokenizer.pad_token_id).sum().item()
    return total / len(dataset)


def gold_accuracy(dataset) -> float:
    """Toy task: accuracy of the gold reward itself on the noisy labels (the ceiling for any reward model)."""
    golds = [
        (toy.gold_reward(p, c), toy.gold_reward(p, r))
        for p, c, r in zip(dataset["prompt"], dataset["chosen"], dataset["rejected"])
    ]
    return sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in golds) / len(golds)


@torch.no_grad()
def sft_sample_pairs(tokenizer, policy_name, prompts, args, device):
    """Toy task: two SFT samples (T=1) per test prompt with their gold rewards, for the check that the
    reward model orders the policy's own samples like the gold reward (what RL will ask of it)."""
    policy = common.load_model(policy_name, frozen=True).to(device)
    prompt = data.pad(data.tokenize_prompts(tokenizer, prompts, args.max_prompt_length), tokenizer.pad_token_id, "left")
    prompt, pairs = prompt.to(device), []
    for _ in range(2):
        new_tokens = toy.LONG_MAX_NEW_TOKENS if args.dataset == "toy-long" else toy.MAX_NEW_TOKENS
        completion, has_eos = common.generate(policy, prompt, tokenizer, new_tokens, temperature=1.0)
        texts = tokenizer.batch_decode(completion, skip_special_tokens=True)
        golds = [toy.gold_reward(p, t, bool(e)) for p, t, e in zip(prompts, texts, has_eos)]
        pairs.append((completion, has_eos, golds))
    (ca, ea, ga), (cb, eb, gb) = pairs
    keep = [i for i in range(len(prompts)) if ga[i] != gb[i]]  # pairs the gold reward can order
    return prompt[keep], ca[keep], cb[keep], ea[keep], eb[keep], [ga[i] > gb[i] for i in keep]


@torch.no_grad()
def sft_sample_agreement(model, pairs, pad_id, no_eos_score=-1.0):
    prompt, ca, cb, ea, eb, a_better = pairs
    model.eval()
    sa = common.reward_scores(model, prompt, ca, pad_id, ea, no_eos_score)
    sb = common.reward_scores(model, prompt, cb, pad_id, eb, no_eos_score)
    model.train()
    return sum(float((x > y) == g) for x, y, g in zip(sa.tolist(), sb.tolist(), a_better)) / max(1, len(a_better))


def main(args: Args):
    accelerator = common.setup(args)
    tokenizer = data.load_tokenizer(args.model)
    pad_id, device, is_toy = tokenizer.pad_token_id, accelerator.device, args.dataset in toy.TIERS
    # ---- Bradley-Terry reward model (N+), step 1: r_phi = the SFT backbone with a fresh scalar head,
    # std 1/sqrt(H+1), read at the EOS token ----
    reward_model = common.trainable(common.load_model(args.model, kind="reward", new_head="normal"), args)

    # ---- step 2: preference pairs (x, y_w, y_l) -> token ids, one prompt for both completions ----
    train = data.load_data(args.dataset, "train", ("prompt", "chosen", "rejected"))
    train = train.select(range(min(args.num_preferences or len(train), len(train))))
    test = data.load_data(args.dataset, "test", ("prompt", "chosen", "rejected"))
    test = test.select(range(min(args.eval_pairs, len(test))))
    lengths = (args.max_prompt_length, args.max_completion_length)
    train_rows = data.tokenize_pairs(tokenizer, train, *lengths)
    test_rows = data.tokenize_pairs(tokenizer, test, *lengths)
    sft_pairs = None
    if is_toy and args.model not in ("toy", "toy-long"):
        sft_pairs = sft_sample_pairs(tokenizer, args.model, test["prompt"][:500], args, device)
    skill_rows = []  # toy-long: pairs that differ only in the hard skill
    if args.dataset == "toy-long":
        skill_rows = data.tokenize_pairs(tokenizer, toy.skill_pairs().select(range(500)), *lengths)

    per_process = args.batch_size // accelerator.num_processes
    loader_rng = torch.Generator().manual_seed(args.seed)  # the shuffle; its state is the data position of a checkpoint
    loader = torch.utils.data.DataLoader(
        train_rows,
        batch_size=per_process,
        shuffle=True,
        drop_last=True,
        collate_fn=lambda b: collate(b, pad_id),
        generator=loader_rng,
    )
    if len(loader) == 0:
        raise UserError(f"--batch-size {args.batch_size} is larger than the training set ({len(train_rows)})")
    num_updates = min(args.max_steps or 10**12, args.epochs * len(loader))  # one optimizer step per update
    optimizer = torch.optim.AdamW(reward_model.parameters(), lr=args.lr, eps=1e-5)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=num_updates)
    micro = 2 * (args.micro_batch_size or per_process)  # rows: chosen and rejected
    reward_model, optimizer, loader = common.prepare(
        accelerator, reward_model, optimizer, loader, micro_batch_size=micro
    )
    run = training.Run(args, accelerator, num_updates)

    def evaluate(update):  # held-out accuracy; toy: agreement with the gold reward on SFT samples
        unwrapped = accelerator.unwrap_model(reward_model)
        metrics = {"eval/accuracy": accuracy(unwrapped, test_rows, pad_id, device)}
        if sft_pairs is not None:
            metrics["eval/gold_agreement_sft_samples"] = sft_sample_agreement(unwrapped, sft_pairs, pad_id)
        if skill_rows:  # toy-long: pairs that differ only in the hard skill (the title copied exactly or with a slip)
            metrics["eval/gold_agreement_skill_pairs"] = accuracy(unwrapped, skill_rows, pad_id, device)
        return run.log(metrics, update, show=("eval/accuracy",))

    state = run.resume(scheduler=scheduler)
    first = 1 if state is None else state["step"] + 1
    batches = data.epochs(loader, loader_rng, None if state is None else state["position"])
    times = {}
    reward_model.train()
    for update in range(first, num_updates + 1):
        # ---- step 3: a minibatch of pairs, split into micro-batches that accumulate gradients ----
        (prompt, completion), position = next(batches)
        times = {}
        with training.timer(times, "time/update"):
            n_pairs, parts = prompt.shape[0] // 2, []
            mbs = list(micro_batches(prompt, completion, args.micro_batch_size or n_pairs))
            for i, (mb_prompt, mb_completion) in enumerate(mbs):
                with common.accumulate(accelerator, reward_model, last=i == len(mbs) - 1):
                    chosen, rejected = pair_scores(reward_model, mb_prompt, mb_completion, pad_id)
                    # ---- step 4: L_RM = -E log sigmoid(r_phi(x, y_w) - r_phi(x, y_l)) (Bradley-Terry) ----
                    loss = bradley_terry_loss(chosen, rejected)
                    run.check_finite(update, loss=loss)
                    accelerator.backward(loss * len(chosen) / n_pairs)  # the batch mean, accumulated
                parts.append((chosen.detach(), rejected.detach()))
            # ---- step 5: AdamW step, learning rate decayed linearly to 0 ----
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        chosen, rejected = (torch.cat(x) for x in zip(*parts))
        if update % 10 == 0 or update == num_updates:
            metrics = {
                "loss": bradley_terry_loss(chosen, rejected).item(),
                "accuracy": (chosen > rejected).float().mean().item(),
                "scores/chosen": chosen.mean().item(),
                "scores/rejected": rejected.mean().item(),
                "scores/margin": (chosen - rejected).mean().item(),
                "lr": scheduler.get_last_lr()[0],
                **times,
            }
            run.log(metrics, update, show=("loss", "accuracy"))
        if args.eval_every and update % args.eval_every == 0 and update < num_updates:
            evaluate(update)
        run.step_done(update, {"position": position})

    final = evaluate(num_updates)
    # ---- step 6: normalization (N+): Bradley-Terry leaves the offset free; the mean score of the reference
    # completions is stored as config.reward_bias and subtracted wherever the model scores, so references score 0 ----
    unwrapped = accelerator.unwrap_model(reward_model)
    if args.reference_dataset is not None:
        refs = data.load_data(args.reference_dataset, "train", ("prompt", "completion"))
    else:
        refs = train.rename_column("chosen", "completion")
    refs = refs.shuffle(seed=args.seed).select(range(min(2000, len(refs))))
    unwrapped.config.reward_bias = 0.0
    unwrapped.config.reward_bias = final["reward_bias"] = mean_score(unwrapped, tokenizer, refs, args, device)
    final["eval/reference_score"] = mean_score(unwrapped, tokenizer, refs, args, device)  # ~0 after the shift
    if is_toy:
        final["eval/gold_accuracy_ceiling"] = gold_accuracy(test)
    common.save_model(accelerator, reward_model, tokenizer, run.dir)
    run.finish(final, times=times)


if __name__ == "__main__":
    training.run_cli(Args, main, PRESETS)
