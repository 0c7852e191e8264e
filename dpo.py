"""Direct Preference Optimization (DPO): Rafailov et al. 2023, "Direct Preference Optimization: Your
Language Model is Secretly a Reward Model", https://arxiv.org/abs/2305.18290

DPO skips the reward model and the RL loop of classic RLHF. The KL-regularized reward maximization
problem has a closed-form optimum, so a reward r(x, y) = beta * log pi(y|x) / pi_ref(y|x) is implicit
in every policy, and the Bradley-Terry likelihood of the preferences can be maximized directly over
the policy on offline pairs (x, y_w, y_l):

    L_DPO(theta) = -E log sigmoid(beta * h),   h = l_theta(y_w) - l_theta(y_l),
    l_theta(y)   = log pi_theta(y|x) - log pi_ref(y|x)     (summed over completion tokens, EOS included)

pi_theta starts from the SFT model and pi_ref is a frozen copy of it, so the loss before the first update is ln 2.
Options: conservative DPO label smoothing eps (-(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h))
and IPO (Azar et al. 2023, arXiv 2310.12036: (h - 1/(2 beta))^2). TL;DR settings (N+, DR-PO): beta 0.05,
lr 3e-6, batch 64, 1 epoch; TRL's DPOConfig: beta 0.1.

    python dpo.py                                                  # toy task, CPU, ~1 minute
    python dpo.py --model vwxyzjn/EleutherAI_pythia-1b-deduped__sft__tldr --dataset trl-lib/tldr-preference \
        --reward-model vwxyzjn/EleutherAI_pythia-1b-deduped__reward__tldr --beta 0.05 --lr 3e-6 --epochs 1 \
        --max-prompt-length 512 --max-completion-length 169 --max-new-tokens 53
    accelerate launch --config_file configs/zero2.yaml dpo.py --model ... --dataset ...
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from transformers import get_scheduler

import common
import data
import toy
import training
from training import Finite, NonNegative, Positive, Range, UserError

PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")


# The toy tiers' defaults, which any flag given overrides (`--dataset toy-long --help` shows them): the gold reward as
# judge; toy-long's models and lengths
PRESETS = {
    "toy": dict(judge="toy:gold"),
    "toy-long": dict(
        judge="toy:gold",
        model="toy-long-sft",
        reward_model="toy-long-rm",
        max_prompt_length=64,
        max_completion_length=32,
        max_new_tokens=48,
    ),
}


@dataclass
class Args:
    # common
    exp_name: str = "dpo"
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
    """policy to start from, the SFT model (Hub id or local dir; `toy-sft` = the cached toy SFT model)"""
    ref_model: str | None = None
    """frozen reference pi_ref (default: a separate copy of --model)"""
    reward_model: str | None = "toy-rm"
    """reward model scored at evaluation only (DPO never trains on it; another tokenizer than --model's is
    re-tokenized); `toy-rm` applies to the toy dataset only; None: no RM score"""
    lora_r: NonNegative[int] = 0
    """LoRA rank of the policy's adapters (peft; 0 = full fine-tuning); without --ref-model the reference is then
    the adapter-disabled policy"""
    lora_alpha: Positive[float] = 16.0
    """LoRA alpha: the adapters' scale is alpha / r (DR-PO and REBEL TL;DR: r 1024, alpha 2048)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass of trained models: less memory, more compute"""

    # data
    dataset: str = "toy"
    """preference data with prompt/chosen/rejected columns: `toy`, a Hub id (trl-lib/tldr-preference), a
    save_to_disk dir or a file"""
    max_prompt_length: Positive[int] = 32
    """prompts longer than this keep their last tokens (TL;DR: 512)"""
    max_completion_length: Positive[int] = 16
    """chosen/rejected completions (with EOS) longer than this are cut (TL;DR preferences: 169)"""
    max_new_tokens: Positive[int] = 8
    """tokens generated at evaluation (TL;DR: 53)"""
    eval_prompts: Positive[int] = 500
    """test prompts generated from at each evaluation (toy: the SFT test split, whose reference summaries the
    win rate compares with; else the preference test split)"""
    num_preferences: Positive[int] | None = None
    """use only the first N training pairs (default: all)"""
    eval_pairs: Positive[int] = 1000
    """held-out preference pairs for the implicit-reward accuracy"""
    no_eos_score: Finite[float] = -1.0
    """RM score of an evaluation completion without EOS (N+: -1); training never reads the reward model"""

    # algorithm
    beta: Positive[float] = 0.1
    """beta, the KL strength of the implicit reward beta*log(pi/pi_ref), not PPO's --kl-coef (N+ and DR-PO TL;DR:
    0.05; TRL: 0.1)"""
    label_smoothing: Range(0, 0.5, open_high=True)[float] = 0.0
    """eps, the assumed share of flipped labels (conservative DPO); 0 = plain DPO"""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """`sigmoid` (DPO Eq. 7) or `ipo` (Azar et al. 2023 Eq. 17, on summed log-probs)"""
    precompute_ref_logps: bool = False
    """compute log pi_ref of every training pair once before training (saves a forward per step)"""

    # optimization
    lr: NonNegative[float] = 1e-4
    """AdamW learning rate, decayed linearly to 0 (N+ / DR-PO TL;DR: 3e-6 with cosine decay; TRL: 1e-6)"""
    epochs: Positive[int] = 1
    """passes over the preference data (TL;DR: 1)"""
    batch_size: Positive[int] = 64
    """pairs per optimizer step, over all processes (TL;DR: 64)"""
    micro_batch_size: Positive[int] | None = None
    """pairs per forward/backward on each process; gradients accumulate up to --batch-size (default: all at once)"""
    eval_every: NonNegative[int] = 50
    """evaluate every this many updates (optimizer steps); 0: only before the first and after the last"""
    judge: str | None = None
    """the win rate of greedy completions against the test split's references under this judge: `module:function`,
    a local model, or an OpenAI-compatible URL http://HOST:PORT/v1 (the toy tiers' preset: `toy:gold`, gold reward)"""
    judge_model: str | None = None
    """the model name that an endpoint --judge serves"""
    judge_template: Literal["summary", "chat"] = "summary"
    """an LLM judge's prompt: the DPO paper's TL;DR summary comparison, or its dialogue (HH) comparison"""
    max_steps: Positive[int] | None = None
    """stop after this many updates (optimizer steps; default: --epochs passes over the data)"""


def dpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    beta: float,
    label_smoothing: Range(0, 0.5, open_high=True)[float] = 0.0,
    loss_type: str = "sigmoid",
):
    """Per-pair DPO loss from summed completion log-probs, and the implicit rewards beta*l_theta(y) of the
    chosen and rejected completions (detached: metrics, not part of the graph)."""
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # l_theta(y_w) = log pi_theta/pi_ref (y_w)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # l_theta(y_l)
    h = chosen_logratios - rejected_logratios  # h = l_theta(y_w) - l_theta(y_l)   # ALGO LOGIC
    if loss_type == "sigmoid":
        # DPO Eq. (7): -log sigmoid(beta h); cDPO label smoothing eps (labels flipped with probability eps):
        # -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
        eps = label_smoothing
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)  # ALGO LOGIC
    elif loss_type == "ipo":
        # IPO Eq. (17) of Azar et al. 2023: (h - 1/(2 beta))^2   (TRL's "ipo" uses per-token mean log-probs instead)
        losses = (h - 1 / (2 * beta)) ** 2  # ALGO LOGIC
    else:
        raise ValueError(f"loss_type {loss_type!r} is not one of: sigmoid, ipo")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def collate(rows, pad_id):
    """Each prompt once (left-padded) and its completions [chosen; rejected] (right-padded to one width): the
    prompt runs once for both (common.shared_prompt_forward). The completion mask (completion != pad) of
    each half covers its own completion only."""
    batch = {
        "prompt": data.pad([r["prompt"] for r in rows], pad_id, "left"),
        "completion": data.pad([r["chosen"] for r in rows] + [r["rejected"] for r in rows], pad_id, "right"),
    }
    if "ref_logps" in rows[0]:  # precomputed (chosen, rejected) log pi_ref
        batch["ref_logps"] = torch.tensor([r["ref_logps"] for r in rows]).T.reshape(-1)
    return batch


def micro_batches(batch, size: int):
    """A collated batch cut into micro-batches of `size` pairs, each laid out the same way."""
    n = batch["prompt"].shape[0]
    for i in range(0, n, size):
        pairs = torch.arange(i, min(i + size, n))
        yield {k: v[pairs if k == "prompt" else torch.cat([pairs, pairs + n])] for k, v in batch.items()}


def sequence_logps(model, batch, pad_id):
    """log pi(y|x) of every completion: per-token log-probs at temperature 1 (offline data, no sampling
    temperature to match), summed over completion tokens up to and including EOS. -> (chosen [B], rejected [B])."""
    return common.completion_logprobs(model, batch["prompt"], batch["completion"], pad_id).sum(1).chunk(2)


def pair_metrics(losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, prefix=""):
    """The metric names of TRL's DPOTrainer (rewards are the detached implicit rewards beta*l_theta; as in TRL,
    a tie is not counted as accurate, so rewards/accuracies starts near 0: not exactly, as the policy and a
    separate reference copy can differ by float rounding, which makes a few pairs count)."""
    return {
        f"{prefix}loss": losses.mean().item(),
        f"{prefix}rewards/chosen": chosen_rewards.mean().item(),
        f"{prefix}rewards/rejected": rejected_rewards.mean().item(),
        f"{prefix}rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        f"{prefix}rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        f"{prefix}logps/chosen": chosen_logps.detach().mean().item(),
        f"{prefix}logps/rejected": rejected_logps.detach().mean().item(),
    }


@torch.no_grad()
def held_out_metrics(policy, ref_policy, rows, args, pad_id, device, batch_size=128):
    """DPO loss and implicit-reward accuracy on held-out pairs (DR-PO Table 6 reports this accuracy)."""
    was_training = policy.training
    policy.eval()
    out = [[] for _ in range(5)]
    for i in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate(rows[i : i + batch_size], pad_id).items()}
        chosen, rejected = sequence_logps(policy, batch, pad_id)
        losses, r_c, r_r = dpo_loss(
            chosen,
            rejected,
            *sequence_logps(ref_policy, batch, pad_id),
            args.beta,
            args.label_smoothing,
            args.loss_type,
        )
        for lst, x in zip(out, (losses, r_c, r_r, chosen, rejected)):
            lst.append(x.float())
    policy.train(was_training)
    return pair_metrics(*[torch.cat(x) for x in out], prefix="eval/")


def main(args: Args):
    accelerator = common.setup(args)
    device, is_toy = accelerator.device, args.dataset in toy.TIERS
    tokenizer = data.load_tokenizer(args.model)
    judge = common.load_judge(args)  # the evaluations' win rate against the test references
    pad_id = tokenizer.pad_token_id
    # ---- DPO (Rafailov et al. 2023, Section 4), step 1: pi_theta and pi_ref both start as pi_SFT; pi_ref is a
    # frozen copy (LoRA: the adapter-disabled policy) ----
    policy = common.apply_lora(common.trainable(common.load_model(args.model), args), args.lora_r, args.lora_alpha)
    ref_policy = common.reference_model(
        args.ref_model or args.model, policy, args.lora_r and not args.ref_model, device
    )
    reward_model = None  # evaluation only
    if args.reward_model is not None and (is_toy or args.reward_model != "toy-rm"):
        reward_model = common.load_model(args.reward_model, "reward", tokenizer=tokenizer, frozen=True).to(device)

    # ---- step 2: the offline preference data D = {(x, y_w, y_l)} ----
    train = data.load_data(args.dataset, "train", PREFERENCE_COLUMNS)
    train = train.select(range(min(args.num_preferences or len(train), len(train))))
    test = data.load_data(args.dataset, "test", PREFERENCE_COLUMNS)
    lengths = (args.max_prompt_length, args.max_completion_length)
    train_rows = data.tokenize_pairs(tokenizer, train, *lengths)
    test_rows = data.tokenize_pairs(tokenizer, test.select(range(min(args.eval_pairs, len(test)))), *lengths)
    # prompts generated from at evaluation; toy: the SFT test split, for its reference summaries
    gen = data.load_data(args.dataset, "test", ("prompt", "completion")) if is_toy else test
    gen = gen.select(range(min(args.eval_prompts, len(gen))))
    n_cut = sum(r[k][-1] != tokenizer.eos_token_id for r in train_rows for k in ("chosen", "rejected"))
    if n_cut:
        print(f"[data] {n_cut} completions longer than --max-completion-length {args.max_completion_length} lost EOS")
    if args.precompute_ref_logps:  # log pi_ref never changes: one pass over the training pairs
        with torch.no_grad():
            for i in range(0, len(train_rows), 128):
                batch = {k: v.to(device) for k, v in collate(train_rows[i : i + 128], pad_id).items()}
                chosen, rejected = sequence_logps(ref_policy, batch, pad_id)
                for row, c, r in zip(train_rows[i : i + 128], chosen.tolist(), rejected.tolist()):
                    row["ref_logps"] = (c, r)

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
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, eps=1e-5)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=num_updates)
    micro = args.micro_batch_size or per_process
    policy, optimizer, loader = common.prepare(accelerator, policy, optimizer, loader, micro_batch_size=micro)
    run = training.Run(args, accelerator, num_updates)

    def evaluate(update):  # greedy completions (KL, RM score; toy: win rate) and the held-out pairs' DPO metrics
        unwrapped = accelerator.unwrap_model(policy)
        metrics, samples = common.evaluate(unwrapped, tokenizer, gen, args, ref_policy, reward_model, judge)
        metrics.update(held_out_metrics(unwrapped, ref_policy, test_rows, args, pad_id, device))
        return run.log_eval(update, metrics, samples)

    state = run.resume(scheduler=scheduler)
    initial = evaluate(0) if state is None else state["initial"]  # update 0: the SFT policy, pi_theta = pi_ref
    first = 1 if state is None else state["step"] + 1
    batches = data.epochs(loader, loader_rng, None if state is None else state["position"])
    times, update_times = {}, []
    policy.train()
    for update in range(first, num_updates + 1):
        # ---- step 3: minimize L_DPO over D: a minibatch of pairs, in micro-batches that accumulate gradients ----
        batch, position = next(batches)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = {}
        with training.timer(times, "time/update"):
            n_pairs, parts = batch["prompt"].shape[0], []
            mbs = list(micro_batches(batch, args.micro_batch_size or n_pairs))
            for i, mb in enumerate(mbs):
                with common.accumulate(accelerator, policy, last=i == len(mbs) - 1):
                    # log pi_theta(y|x) and log pi_ref(y|x), summed over each completion's tokens
                    chosen_logps, rejected_logps = sequence_logps(policy, mb, pad_id)
                    if "ref_logps" in mb:
                        ref_chosen, ref_rejected = mb["ref_logps"].chunk(2)
                    else:
                        with torch.no_grad():
                            ref_chosen, ref_rejected = sequence_logps(ref_policy, mb, pad_id)
                    # DPO Eq. (7) (cDPO label smoothing; IPO Eq. (17) of Azar et al. 2023): see dpo_loss
                    losses, chosen_rewards, rejected_rewards = dpo_loss(
                        chosen_logps,
                        rejected_logps,
                        ref_chosen,
                        ref_rejected,
                        args.beta,
                        args.label_smoothing,
                        args.loss_type,
                    )
                    loss = losses.mean()
                    run.check_finite(update, loss=loss)  # lower --lr; use fp32/bf16, never fp16
                    accelerator.backward(loss * len(losses) / n_pairs)  # the batch mean, accumulated
                parts.append(
                    (losses.detach(), chosen_rewards, rejected_rewards, chosen_logps.detach(), rejected_logps.detach())
                )
            # AdamW step, learning rate decayed linearly to 0
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        update_times.append(times["time/update"])
        if update % 10 == 0 or update == num_updates:
            metrics = pair_metrics(*(torch.cat(x) for x in zip(*parts)))
            run.log({**metrics, "lr": scheduler.get_last_lr()[0], **times}, update, show=("loss", "rewards/accuracies"))
        if args.eval_every and update % args.eval_every == 0 and update < num_updates:
            evaluate(update)
        run.step_done(update, {"initial": initial, "position": position})

    final = evaluate(num_updates)
    common.save_model(accelerator, policy, tokenizer, run.dir)
    # this process's updates (fewer after --resume); the median leaves out two warm-up updates where it can
    final["time/update_mean"] = sum(update_times) / max(1, len(update_times))
    final["time/update_median"] = statistics.median(update_times[2:] or update_times or [0.0])
    run.finish(final, initial, times)


if __name__ == "__main__":
    training.run_cli(Args, main, PRESETS)
