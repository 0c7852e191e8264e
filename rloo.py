"""RLOO and REINFORCE, following "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
Feedback in LLMs" (Ahmadian et al. 2024, https://arxiv.org/abs/2402.14740), the critic-free baselines of REBEL's TL;DR
table (Gao et al. 2024, https://arxiv.org/abs/2404.16767).

The whole completion is one action (a bandit: no per-token rewards, no critic, no GAE). Each update samples k
completions per prompt from the current policy, gives each the reward R = reward-model score at EOS - kl_coef *
sum_t log(pi / pi_ref), and takes a REINFORCE step with the leave-one-out baseline: the advantage of completion i is
R_i minus the mean reward of the other k - 1 completions of its prompt (RLOO paper, Sec. "REINFORCE Leave-One-Out").
`--k 1` is REINFORCE with the paper's other baseline, a moving average of the rewards of the whole run (RLOO paper,
Sec. "REINFORCE" with b_MA); here an exponential one (`--baseline-decay`). The REBEL paper does not state which
baseline its REINFORCE row used; this is the RLOO paper's.

    python rloo.py                                                 # toy task, CPU, ~2 minutes
    python rloo.py --k 4 --model vwxyzjn/EleutherAI_pythia-1b-deduped__sft__tldr \
        --reward-model vwxyzjn/EleutherAI_pythia-1b-deduped__reward__tldr --dataset trl-lib/tldr \
        --lr 3e-6 --batch-size 512 --micro-batch-size 8 --total-episodes 1000000 \
        --max-prompt-length 512 --max-new-tokens 53 --kl-coef 0.05
    accelerate launch --config_file configs/zero2.yaml rloo.py --model ... --reward-model ...
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
    exp_name: str = "rloo"
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
    k: Positive[int] = 2
    """completions per prompt; k >= 2: RLOO's leave-one-out baseline; 1: REINFORCE with --baseline-decay's moving
    average (REBEL TL;DR table: RLOO k = 2 and k = 4, REINFORCE)"""
    baseline_decay: NonNegative[float] = 0.9
    """k = 1 only: b <- decay * b + (1 - decay) * mean reward of a rollout, after its update (0: the last rollout's
    mean)"""
    kl_coef: NonNegative[float] = 0.05
    """beta_KL: R = score - kl_coef * sum_t log(pi / pi_ref) over the completion (REBEL TL;DR: 0.05)"""
    temperature: Positive[float] = 0.7
    """sampling temperature tau_s; every log-prob is computed from logits / tau_s (REBEL TL;DR: 0.7)"""
    no_eos_score: Finite[float] = -1.0
    """score that replaces the reward-model score of a completion without EOS (REBEL TL;DR: -1)"""
    cliprange: NonNegative[float] = 0.0
    """0: the paper's loss -A * log pi(y|x), on-policy; > 0: TRL's clipped ratio min(rho A, clip(rho, 1 -+ eps) A),
    rho = pi / pi_old, for off-policy steps (--update-epochs > 1, --num-minibatches > 1); same gradient on-policy"""

    # optimization and batch sizes
    lr: NonNegative[float] = 1e-4
    """AdamW learning rate, decayed linearly to 0 (REBEL TL;DR: 3e-6)"""
    total_episodes: Positive[int] = 2048
    """prompts used over the whole run, k completions each (REBEL TL;DR: 1,000,000 = 1953 updates of 512)"""
    batch_size: Positive[int] = 32
    """prompts per rollout (k completions each: k x this many sequences), over all processes (REBEL TL;DR: 512)"""
    num_minibatches: Positive[int] = 1
    """optimizer steps per epoch over a rollout (1: the paper's one on-policy step per rollout)"""
    update_epochs: Positive[int] = 1
    """epochs over each rollout (1: on-policy; more reuse samples of an older policy: see --cliprange)"""
    micro_batch_size: Positive[int] = 64
    """prompts (k x this many rows) per forward/backward; gradients accumulate up to a minibatch"""


def sequence_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """R(x, y) = r(x, y) - kl_coef * sum_t log(pi(y_t) / pi_ref(y_t)) over the completion incl. EOS (in the reward)."""
    return scores - kl_coef * kl.masked_fill(~mask, 0).sum(1)  # ALGO LOGIC: RLOO/REBEL R(x, y), KL in the reward


def rloo_advantages(rewards: torch.Tensor, k: int, baseline: float = 0.0) -> torch.Tensor:
    """Rewards [k*B], row j*B + i: completion j of prompt i. k >= 2: A_i = R_i - 1/(k-1) sum_{j != i} R_j within
    each prompt's group; k = 1: A = R - baseline."""
    if k == 1:
        return rewards - baseline  # ALGO LOGIC: RLOO Sec. "REINFORCE": (R(y, x) - b_MA)
    groups = rewards.view(k, -1)  # column i: the k rewards of prompt i
    loo_mean = (groups.sum(0, keepdim=True) - groups) / (k - 1)  # mean of the other k - 1
    return (groups - loo_mean).reshape(-1)  # ALGO LOGIC: RLOO Sec. "REINFORCE Leave-One-Out": R(y_i) - mean_{j!=i}


def rloo_loss(new_logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, cliprange: float = 0.0):
    """Mean over n completions of sequence log-probs log pi(y|x) (sum over tokens incl. EOS) [n]. cliprange 0:
    -A log pi_theta(y|x), the paper's estimator; > 0: TRL's clipped ratio (-A at rho = 1, same gradient there)."""
    ratio = torch.exp(new_logps - old_logps)
    if cliprange == 0:
        loss = -(advantages * new_logps).mean()  # ALGO LOGIC: RLOO Sec. "REINFORCE Leave-One-Out": -1/k sum A_i log pi
    else:  # TRL RLOOTrainer._compute_loss: -min(rho A, clip(rho, 1 - eps, 1 + eps) A)
        clipped = torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
        loss = -torch.min(ratio * advantages, clipped * advantages).mean()  # ALGO LOGIC: PPO-style clipped surrogate
    clipfrac = ((ratio - 1).abs() > cliprange).float() if cliprange else torch.zeros_like(ratio)
    return loss, {"ratio": ratio.detach(), "clipfrac": clipfrac}


def group_minibatches(num_prompts: int, k: int, num_minibatches: int, micro_prompts: int, generator) -> list:
    """One epoch over rows [y_1 of each prompt; y_2 of each; ...]: shuffled prompts cut into minibatches and
    micro-batches, each as its rows in that layout (a prompt's k completions together; every row once)."""
    perm = torch.randperm(num_prompts, generator=generator)
    minibatches = perm.split(num_prompts // num_minibatches)
    return [[torch.cat([p + j * num_prompts for j in range(k)]) for p in mb.split(micro_prompts)] for mb in minibatches]


def main(args: Args):
    accelerator = common.setup(args)
    device, is_toy, k = accelerator.device, args.dataset in toy.TIERS, args.k
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
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda n: 1 - n / num_updates)  # as N+: linear to 0
    policy, optimizer = common.prepare(accelerator, policy, optimizer, micro_batch_size=k * args.micro_batch_size)
    run = training.Run(args, accelerator, num_updates)
    generator = torch.Generator().manual_seed(args.seed + accelerator.process_index)
    order = torch.randperm(len(prompts), generator=generator).tolist()

    def evaluate(update):
        unwrapped = accelerator.unwrap_model(policy)
        return run.log_eval(update, *common.evaluate(unwrapped, tokenizer, test, args, ref_policy, reward_model, judge))

    state = run.resume(scheduler=scheduler)
    if state is None:  # update 0: the SFT policy, pi_theta = pi_ref; no reward seen yet (b_MA: None)
        initial, first, cursor, baseline = evaluate(0), 1, 0, None
    else:  # --resume: the data position, generator and moving-average baseline where the checkpoint left them
        initial, cursor, order, baseline = (state[key] for key in ("initial", "cursor", "order", "baseline"))
        first = state["step"] + 1
        generator.set_state(state["generator"])
    times = {}  # the last update's timings (none if a resumed run had no update left)
    for update in range(first, num_updates + 1):
        times = {}
        # ---- step 1: x ~ D, y_1 .. y_k ~ pi_theta(.|x) (no gradients) ----
        with training.timer(times, "time/generation"), torch.no_grad():
            if cursor + per_process > len(order):
                order, cursor = torch.randperm(len(prompts), generator=generator).tolist(), 0
            rows = order[cursor : cursor + per_process] * k  # row j * B + i: completion j of prompt i
            prompt = data.pad([prompts[i] for i in rows], pad_id, "left").to(device)
            cursor += per_process
            unwrapped = accelerator.unwrap_model(policy)
            completion, has_eos = common.generate(unwrapped, prompt, tokenizer, args.max_new_tokens, args.temperature)
        # ---- step 2: R(x, y_i) = r(x, y_i) - kl_coef * sum_t log(pi / pi_ref), and the advantages A_i ----
        with training.timer(times, "time/scoring"), torch.no_grad():
            mask = completion != pad_id  # completion tokens up to and including the first EOS
            unique = prompt[:per_process]  # each prompt once: its forward is shared by its k completions
            old_logps = common.completion_logprobs(unwrapped, unique, completion, pad_id, args.temperature)
            ref_logps = common.completion_logprobs(ref_policy, unique, completion, pad_id, args.temperature)
            examples = [train_rows[i] for i in rows[:per_process]]  # the dataset's columns, for a reward function
            scores = common.reward_scores(
                reward_model, unique, completion, pad_id, has_eos, args.no_eos_score, examples, tokenizer
            )
            kl = (old_logps - ref_logps).masked_fill(~mask, 0)  # k1 estimate per token, 0 after EOS
            rewards = sequence_rewards(scores, kl, mask, args.kl_coef)
            run.check_finite(update, reward=rewards)
            batch_mean = accelerator.gather(rewards).mean().item()  # over all processes: one b_MA for the run
            if k == 1 and baseline is None:  # REINFORCE's first rollout: no earlier reward, its own mean stands in
                baseline = batch_mean
            advantages = rloo_advantages(rewards, k, baseline or 0.0)
            old_seq_logps = old_logps.sum(1)  # log pi_old(y|x): the rollout policy, for --cliprange's ratio

        # ---- step 3: theta <- theta + lr * 1/(kB) sum_i A_i grad log pi_theta(y_i|x) (one step per minibatch) ----
        with training.timer(times, "time/update"):
            stats = []
            for _ in range(args.update_epochs):
                minibatches = group_minibatches(per_process, k, args.num_minibatches, args.micro_batch_size, generator)
                for minibatch in minibatches:
                    n_rows, totals = sum(len(idx) for idx in minibatch), {}
                    for i, idx in enumerate(minibatch):
                        idx = idx.to(device)
                        group_prompt = prompt[idx[: len(idx) // k]]  # the first k-th of idx: each prompt once
                        with common.accumulate(accelerator, policy, last=i == len(minibatch) - 1):
                            new_logps = common.completion_logprobs(
                                policy, group_prompt, completion[idx], pad_id, args.temperature
                            ).sum(1)
                            loss, s = rloo_loss(new_logps, old_seq_logps[idx], advantages[idx], args.cliprange)
                            run.check_finite(update, loss=loss)
                            accelerator.backward(loss * len(idx) / n_rows)  # the minibatch's mean over its rows
                        share = len(idx) / n_rows  # statistics: means over the minibatch
                        now = {"loss/policy": loss, "policy/ratio": s["ratio"], "policy/clipfrac": s["clipfrac"]}
                        totals = {key: totals.get(key, 0.0) + share * v.mean().item() for key, v in now.items()}
                    stats.append(totals)
                    optimizer.step()
                    optimizer.zero_grad()
            scheduler.step()
        if k == 1:  # b_MA after the update: the next rollout's baseline, independent of its samples
            baseline = args.baseline_decay * baseline + (1 - args.baseline_decay) * batch_mean

        metrics = {
            "objective/scores": scores.mean(),
            "objective/kl": kl.sum(1).mean(),
            "objective/rlhf_reward": rewards.mean(),
            "objective/entropy": -old_seq_logps.mean(),
            "objective/eos_rate": has_eos.float().mean(),
            "objective/length": mask.sum(1).float().mean(),
            **{key: sum(s[key] for s in stats) / len(stats) for key in stats[0]},
            "rloo/advantage": advantages.mean(),  # 0 for k >= 2: the leave-one-out advantages of a group sum to 0
            "rloo/advantage_abs": advantages.abs().mean(),
            "lr": scheduler.get_last_lr()[0],
            "episodes": update * args.batch_size,
            **times,
            "time/samples_per_second": len(completion) / sum(times.values()),
        }
        metrics |= {"rloo/baseline": baseline} if k == 1 else {}
        if is_toy:  # the gold reward of the training samples: the smoothest learning curve on the toy task
            metrics["objective/gold"] = toy.gold_scores(prompt, completion, args.dataset).mean()
        run.log(metrics, update, show=("objective/scores", "objective/kl"))
        if args.eval_every and update % args.eval_every == 0 and update < num_updates:
            evaluate(update)
        state = {"initial": initial, "cursor": cursor, "order": order, "generator": generator.get_state()}
        run.step_done(update, {**state, "baseline": baseline})

    final = evaluate(num_updates)
    common.save_model(accelerator, policy, tokenizer, run.dir)
    run.finish(final, initial, times)


if __name__ == "__main__":
    training.run_cli(Args, main, PRESETS)
