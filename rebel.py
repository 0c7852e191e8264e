"""REBEL, following "REBEL: Reinforcement Learning via Regressing Relative Rewards" (Gao et al. 2024,
https://arxiv.org/abs/2404.16767).

Policy optimization reduced to least squares. Each update samples two completions y, y' per prompt from
the current policy pi_t, gives each the reward R = reward-model score at EOS - kl_coef * sum_t log(pi_t /
pi_ref), and regresses the difference of the log-ratios log(pi_theta / pi_t) of the pair onto eta times
the difference of their rewards, for a few epochs over that fixed batch. Solved exactly, the regression
gives pi_{t+1} proportional to pi_t * exp(eta * R): a natural-policy-gradient step with no critic, no
clipping and no GAE, at the cost of one extra completion per prompt.

    python rebel.py                                                # toy task, CPU, ~2 minutes
    python rebel.py --model vwxyzjn/EleutherAI_pythia-1b-deduped__sft__tldr \
        --reward-model vwxyzjn/EleutherAI_pythia-1b-deduped__reward__tldr --dataset trl-lib/tldr \
        --lr 3e-6 --eta 1.0 --batch-size 512 --num-minibatches 1 --micro-batch-size 8 --total-episodes 1000000 \
        --max-prompt-length 512 --max-new-tokens 53 --kl-coef 0.05
    accelerate launch --config_file configs/zero2.yaml rebel.py --model ... --reward-model ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

import common
import data
import toy
import training
from training import Finite, NonNegative, Positive

# The toy tiers' defaults, which any flag given overrides (`--dataset toy-long --help` shows them): the gold reward as
# judge; toy-long's models and lengths
PRESETS = {
    "toy": dict(judge="toy:gold"),
    "toy-long": dict(
        judge="toy:gold", model="toy-long-sft", reward_model="toy-long-rm", max_prompt_length=64, max_new_tokens=48
    ),
}


@dataclass
class Args:
    # common
    exp_name: str = "rebel"
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
    """SFT policy to start from; also the frozen reference (Hub id or local dir; `toy-sft` = the cached toy SFT
    model)"""
    reward_model: str = "toy-rm"
    """reward model (`toy-rm` = the cached toy reward model; `toy-gold` = the toy task's gold reward, an oracle)"""
    reward_fn: str | None = None
    """a Python reward function instead of --reward-model: `module:function` or `path/file.py:function`, with TRL's
    signature fn(prompts, completions, **columns) -> list[float] (the dataset's other columns arrive aligned)"""
    lora_r: NonNegative[int] = 0
    """LoRA rank of the policy's adapters (peft; 0 = full fine-tuning); the reference is then the adapter-disabled
    policy, not a second copy"""
    lora_alpha: Positive[float] = 16.0
    """LoRA alpha: the adapters' scale is alpha / r (DR-PO and REBEL TL;DR: r 1024, alpha 2048)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass of trained models: less memory, more compute"""

    # data
    dataset: str = "toy"
    """prompts (a `prompt` column): `toy`, a Hub id (trl-lib/tldr), a save_to_disk dir or a json/jsonl/parquet/csv
    file"""
    max_prompt_length: Positive[int] = 32
    """prompts longer than this keep their last tokens (TL;DR: 512)"""
    max_new_tokens: Positive[int] = 8
    """completion length in tokens (TL;DR: 53)"""
    eval_prompts: Positive[int] = 500
    """test prompts used at each evaluation (greedy decoding)"""
    eval_every: NonNegative[int] = 16
    """evaluate every this many updates, before the first and after the last (0: only those)"""
    judge: str | None = None
    """the win rate of greedy completions against the test split's references under this judge: `module:function`,
    a local model, or an OpenAI-compatible URL http://HOST:PORT/v1 (the toy tiers' preset: `toy:gold`, gold reward)"""
    judge_model: str | None = None
    """the model name that an endpoint --judge serves"""
    judge_template: Literal["summary", "chat"] = "summary"
    """an LLM judge's prompt: the DPO paper's TL;DR summary comparison, or its dialogue (HH) comparison"""

    # algorithm
    eta: Positive[float] = 1.0
    """eta: REBEL step size; the regression target of a pair is eta * (R(y) - R(y')) (REBEL TL;DR: 1.0)"""
    kl_coef: NonNegative[float] = 0.05
    """beta_KL: R = score - kl_coef * sum_t log(pi_t / pi_ref) over the completion (REBEL TL;DR: 0.05)"""
    temperature: Positive[float] = 0.7
    """sampling temperature tau_s; every log-prob is computed from logits / tau_s (REBEL TL;DR: 0.7)"""
    no_eos_score: Finite[float] = -1.0
    """score that replaces the reward-model score of a completion without EOS (REBEL TL;DR: -1, chat: -4)"""
    reward_scale: Positive[float] = 1.0
    """reward-model scores are multiplied by this before the missing-EOS rule and the KL penalty (REBEL chat: 0.001,
    its official code's scores / 1000); eta cannot stand in for it, since eta scales the KL term too"""

    # optimization and batch sizes
    lr: NonNegative[float] = 3e-5
    """AdamW learning rate, decayed linearly to 0 (REBEL TL;DR: 3e-6)"""
    total_episodes: Positive[int] = 2048
    """prompts used over the whole run, two completions each (REBEL TL;DR: 1,000,000 = 1953 updates of 512)"""
    batch_size: Positive[int] = 32
    """prompts per rollout (two completions each: 2x this many sequences), over all processes (REBEL TL;DR: 512)"""
    num_minibatches: Positive[int] = 2
    """optimizer steps per epoch over a rollout (REBEL TL;DR: 1)"""
    update_epochs: Positive[int] = 4
    """epochs over each rollout: least-squares steps on the same pairs (REBEL TL;DR: 4)"""
    micro_batch_size: Positive[int] = 64
    """prompts (pairs: 2x this many rows) per forward/backward; gradients accumulate up to a minibatch"""


def scaled_scores(raw: torch.Tensor, has_eos: torch.Tensor, reward_scale: float, no_eos_score: float) -> torch.Tensor:
    """s(x, y) = reward_scale * the reward-model score, or no_eos_score (not scaled) for a completion without
    EOS: the scale comes first, as in REBEL's official chat code (score / 1000, then -4 without EOS)."""
    return torch.where(has_eos, reward_scale * raw, torch.full_like(raw, no_eos_score))  # ALGO LOGIC: REBEL chat score


def sequence_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """R(x, y) = s(x, y) - kl_coef * sum_t k_t, with k_t = log pi_t - log pi_ref summed over the completion
    tokens up to and including EOS (sequence-level KL, no per-token placement)."""
    return scores - kl_coef * kl.masked_fill(~mask, 0).sum(1)  # ALGO LOGIC: REBEL reward with the KL penalty


def pair_minibatches(num_pairs: int, num_minibatches: int, micro_pairs: int, generator: torch.Generator) -> list:
    """One epoch over a rollout stored as rows [y_0 .. y_{n-1}, y'_0 .. y'_{n-1}] (row i + n is the second
    completion of prompt i): permute the prompts, cut them into minibatches and micro-batches, and give each
    micro-batch as its rows [y of each pair; y' of each pair]. Both completions of a pair are always in the
    same micro-batch, and every row appears once per epoch."""
    perm = torch.randperm(num_pairs, generator=generator)
    minibatches = perm.split(num_pairs // num_minibatches)
    return [[torch.cat([pairs, pairs + num_pairs]) for pairs in mb.split(micro_pairs)] for mb in minibatches]


def rebel_loss(new_logps: torch.Tensor, old_logps: torch.Tensor, rewards: torch.Tensor, eta: float):
    """Squared regression residual, mean over pairs. Inputs are sequence-level (summed over completion
    tokens), shape [2m]: the first m rows are the completions y, the last m their partners y'."""
    logratio = new_logps - old_logps  # log pi_theta(y|x) - log pi_t(y|x)
    logratio_y, logratio_y2 = logratio.chunk(2)
    rewards_y, rewards_y2 = rewards.chunk(2)
    delta_logratio = logratio_y - logratio_y2
    target = eta * (rewards_y - rewards_y2)
    # REBEL (Gao et al. 2024), the least-squares regression of its Algorithm 1:
    #   ( (log pi_theta(y)/pi_t(y) - log pi_theta(y')/pi_t(y')) - eta * (R(y) - R(y')) )^2
    # The paper writes the residual as (1/eta) * delta_logratio - delta_R; this is eta times it (same
    # minimizer, loss eta^2 larger).
    residual = delta_logratio - target  # ALGO LOGIC
    loss = (residual**2).mean()
    return loss, {"residual": residual.detach(), "delta_logratio": delta_logratio.detach(), "target": target.detach()}


def main(args: Args):
    accelerator = common.setup(args)
    device, is_toy = accelerator.device, args.dataset in toy.TIERS
    per_process = args.batch_size // accelerator.num_processes
    num_updates = args.total_episodes // args.batch_size
    if args.batch_size % (accelerator.num_processes * args.num_minibatches) or num_updates == 0:
        raise training.UserError(
            f"--batch-size {args.batch_size} must be a multiple of {accelerator.num_processes} process(es) x "
            f"--num-minibatches {args.num_minibatches} and at most --total-episodes {args.total_episodes}"
        )
    tokenizer = data.load_tokenizer(args.model)
    judge = common.load_judge(args)  # the evaluations' win rate against the test references
    pad_id = tokenizer.pad_token_id
    policy = common.apply_lora(common.trainable(common.load_model(args.model), args), args.lora_r, args.lora_alpha)
    ref_policy = common.reference_model(args.model, policy, args.lora_r, device)
    reward_model = common.load_reward(args, tokenizer, device)  # a frozen model, or --reward-fn's function

    train = data.load_data(args.dataset, "train", ("prompt",))
    test = data.load_data(args.dataset, "test", ("prompt",))
    test = test.select(range(min(args.eval_prompts, len(test))))
    prompts = data.tokenize_prompts(tokenizer, list(train["prompt"]), args.max_prompt_length)
    train_rows = train.to_list()

    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, eps=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1 - k / num_updates)  # as N+: linear to 0
    policy, optimizer = common.prepare(accelerator, policy, optimizer, micro_batch_size=2 * args.micro_batch_size)
    run = training.Run(args, accelerator, num_updates)
    generator = torch.Generator().manual_seed(args.seed + accelerator.process_index)
    order = torch.randperm(len(prompts), generator=generator).tolist()

    def evaluate(update):
        unwrapped = accelerator.unwrap_model(policy)
        return run.log_eval(update, *common.evaluate(unwrapped, tokenizer, test, args, ref_policy, reward_model, judge))

    state = run.resume(scheduler=scheduler)
    if state is None:
        initial, first, cursor = evaluate(0), 1, 0  # update 0: the SFT policy, pi_theta = pi_ref
    else:  # --resume: the data position and generator where the checkpoint left them
        initial, first, cursor, order = state["initial"], state["step"] + 1, state["cursor"], state["order"]
        generator.set_state(state["generator"])
    times = {}  # the last update's timings (none if a resumed run had no update left)
    for update in range(first, num_updates + 1):
        times = {}
        # ---- REBEL Algorithm 1, step 1: D_t = {(x, y, y')}, x ~ rho, y and y' ~ pi_t(.|x) (no gradients) ----
        with training.timer(times, "time/generation"), torch.no_grad():
            if cursor + per_process > len(order):
                order, cursor = torch.randperm(len(prompts), generator=generator).tolist(), 0
            rows = order[cursor : cursor + per_process] * 2  # row i and row i + per_process: the pair (y, y')
            prompt = data.pad([prompts[i] for i in rows], pad_id, "left").to(device)
            cursor += per_process
            unwrapped = accelerator.unwrap_model(policy)
            completion, has_eos = common.generate(unwrapped, prompt, tokenizer, args.max_new_tokens, args.temperature)
        # ---- step 2: the rewards R(x, y) = s(x, y) - kl_coef * sum_t log(pi_t / pi_ref), fixed for the update ----
        with training.timer(times, "time/scoring"), torch.no_grad():
            mask = completion != pad_id  # completion tokens up to and including the first EOS
            unique = prompt[:per_process]  # each prompt once: its forward is shared by y and y'
            old_logps = common.completion_logprobs(unwrapped, unique, completion, pad_id, args.temperature)
            ref_logps = common.completion_logprobs(ref_policy, unique, completion, pad_id, args.temperature)
            examples = [train_rows[i] for i in rows[:per_process]]  # the dataset's columns, for a reward function
            raw = common.reward_scores(reward_model, unique, completion, pad_id, examples=examples, tok=tokenizer)
            scores = scaled_scores(raw, has_eos, args.reward_scale, args.no_eos_score)
            kl = (old_logps - ref_logps).masked_fill(~mask, 0)  # k1 estimate per token, 0 after EOS
            rewards = sequence_rewards(scores, kl, mask, args.kl_coef)
            run.check_finite(update, reward=rewards)
            old_seq_logps = old_logps.sum(1)  # log pi_t(y|x), fixed for all epochs over this batch

        # ---- step 3: theta_{t+1} = argmin of the regression: update_epochs x num_minibatches least-squares steps ----
        with training.timer(times, "time/update"):
            stats = []
            for _ in range(args.update_epochs):
                epoch = {"delta_logratio": [], "target": []}  # pair statistics: last epoch (each pair once)
                for minibatch in pair_minibatches(per_process, args.num_minibatches, args.micro_batch_size, generator):
                    n_rows, totals = sum(len(idx) for idx in minibatch), {}
                    for i, idx in enumerate(minibatch):
                        idx = idx.to(device)
                        pair_prompt = prompt[idx[: len(idx) // 2]]  # idx = [pairs, pairs + n]: y and y' share it
                        with common.accumulate(accelerator, policy, last=i == len(minibatch) - 1):
                            new_logps = common.completion_logprobs(
                                policy, pair_prompt, completion[idx], pad_id, args.temperature
                            ).sum(1)
                            loss, s = rebel_loss(new_logps, old_seq_logps[idx], rewards[idx], args.eta)  # REBEL Alg. 1
                            run.check_finite(update, loss=loss)
                            accelerator.backward(loss * len(idx) / n_rows)
                        residual, share = s["residual"], len(idx) / n_rows  # statistics: means over the minibatch
                        now = {
                            "loss/policy": loss,
                            "rebel/residual": residual.mean(),
                            "rebel/residual_abs": residual.abs(),
                        }
                        totals = {k: totals.get(k, 0.0) + share * v.mean().item() for k, v in now.items()}
                        epoch["delta_logratio"].append(s["delta_logratio"])
                        epoch["target"].append(s["target"])
                    stats.append(totals)
                    optimizer.step()
                    optimizer.zero_grad()
            scheduler.step()

        delta_logratio, target = torch.cat(epoch["delta_logratio"]), torch.cat(epoch["target"])
        metrics = {
            "objective/scores": scores.mean(),
            "objective/kl": kl.sum(1).mean(),
            "objective/rlhf_reward": rewards.mean(),
            "objective/entropy": -old_seq_logps.mean(),
            "objective/eos_rate": has_eos.float().mean(),
            "objective/length": mask.sum(1).float().mean(),
            **{k: sum(s[k] for s in stats) / len(stats) for k in stats[0]},
            "rebel/delta_logratio": delta_logratio.mean(),
            "rebel/eta_delta_reward": target.mean(),
            "rebel/eta_delta_reward_abs": target.abs().mean(),
            "rebel/correlation": torch.corrcoef(torch.stack([delta_logratio, target]))[0, 1].nan_to_num(),
            "lr": scheduler.get_last_lr()[0],
            "episodes": update * args.batch_size,
            **times,
            "time/samples_per_second": len(completion) / sum(times.values()),
        }
        if is_toy:  # the gold reward of the training samples: the smoothest learning curve on the toy task
            metrics["objective/gold"] = toy.gold_scores(prompt, completion, args.dataset).mean()
        run.log(metrics, update, show=("objective/scores", "objective/kl"))
        if args.eval_every and update % args.eval_every == 0 and update < num_updates:
            evaluate(update)
        run.step_done(
            update, {"initial": initial, "cursor": cursor, "order": order, "generator": generator.get_state()}
        )

    final = evaluate(num_updates)
    common.save_model(accelerator, policy, tokenizer, run.dir)
    run.finish(final, initial, times)


if __name__ == "__main__":
    training.run_cli(Args, main, PRESETS)
