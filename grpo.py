"""GRPO, following "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models" (Shao et al.
2024, https://arxiv.org/abs/2402.03300), Eq. (3) with outcome supervision (Sec. 4.1.2).

PPO without a critic: each update samples G completions per prompt, scores each once, and gives every token of
completion i its reward normalized within the group, A_i = (r_i - mean(r)) / std(r); clipped-ratio steps follow, the
KL to the reference a per-token loss (k3 estimator). `--loss-type`: the paper's per-sequence mean, DAPO's token mean
or Dr. GRPO's constant normalizer (with --no-scale-rewards, Dr. GRPO's unbiased variant).

    python grpo.py                                                 # toy task, CPU, ~2 minutes
    python grpo.py --model MODEL --reward-fn checker.py:correct --dataset gsm8k.jsonl --lr 1e-6 --k 64 \
        --batch-size 16 --num-minibatches 1 --micro-batch-size 1 --kl-coef 0.04 --max-new-tokens 1024
    accelerate launch --config_file configs/zero2.yaml grpo.py --model ... --reward-model ...
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
    exp_name: str = "grpo"
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
    """SFT policy to start from; also the frozen reference (Hub id or local dir; `toy-sft`: the cached toy SFT)"""
    reward_model: str = "toy-rm"
    """reward model (`toy-rm` = the cached toy reward model; `toy-gold` = the toy task's gold reward, an oracle)"""
    reward_fn: str | None = None
    """a Python reward function instead of --reward-model: `module:function` or `path/file.py:function`, with TRL's
    signature fn(prompts, completions, **columns) -> list[float] (the dataset's other columns arrive aligned)"""
    lora_r: NonNegative[int] = 0
    """LoRA rank of the policy's adapters (peft; 0: full fine-tuning); the reference is the adapter-disabled policy"""
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
    k: Positive[int] = 4
    """G: completions sampled per prompt, the group its rewards are normalized in (DeepSeekMath: 64)"""
    kl_coef: NonNegative[float] = 0.04
    """beta: coefficient of the per-token k3 KL to the reference in the loss (DeepSeekMath: 0.04; 0: the reference
    is not scored)"""
    temperature: Positive[float] = 0.7
    """sampling temperature tau_s; every log-prob is computed from logits / tau_s (TRL's GRPO: 1.0)"""
    no_eos_score: Finite[float] = -1.0
    """score that replaces the reward-model score of a completion without EOS (N+: -1)"""
    cliprange: Positive[float] = 0.2
    """epsilon: the ratio pi / pi_old is clipped to [1 - epsilon, 1 + epsilon] (DeepSeekMath, TRL: 0.2)"""
    scale_rewards: bool = True
    """divide each group's centred rewards by their std (DeepSeekMath); --no-scale-rewards keeps r_i - mean(r), as
    Dr. GRPO (Liu et al. 2025) argues, since the std weighs easy and hard prompts' groups up"""
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = "grpo"
    """token losses averaged per sequence, then over sequences (grpo: DeepSeekMath Eq. (3)); over all tokens of the
    minibatch (dapo: DAPO Eq. (8)); summed and divided by G x --max-new-tokens (dr_grpo: Dr. GRPO) (TRL: dapo)"""

    # optimization and batch sizes
    lr: NonNegative[float] = 3e-5
    """AdamW learning rate, decayed linearly to 0 (DeepSeekMath: 1e-6)"""
    total_episodes: Positive[int] = 1024
    """prompts used over the whole run, k completions each"""
    batch_size: Positive[int] = 16
    """prompts per rollout (k completions each), over all processes (DeepSeekMath: 1024 completions, 16 x 64)"""
    num_minibatches: Positive[int] = 2
    """optimizer steps per epoch over a rollout (DeepSeekMath: 1, a single update per exploration stage)"""
    update_epochs: Positive[int] = 1
    """epochs over each rollout (DeepSeekMath: 1)"""
    micro_batch_size: Positive[int] = 16
    """prompts (groups: k x this many rows) per forward/backward; gradients accumulate up to a minibatch"""


def group_advantages(rewards: torch.Tensor, k: int, scale_rewards: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """A_i = (r_i - mean(r)) / (std(r) + eps) within each group, rows laid out [k, B] (row j*B + b: completion j of
    prompt b). std is unbiased (over G - 1) with eps 1e-4, as TRL; a group of equal rewards gets A = 0 exactly."""
    grouped = rewards.view(k, -1)
    centred = grouped - grouped.mean(0)  # ALGO LOGIC: DeepSeekMath Sec. 4.1.2, the group mean as the baseline
    if scale_rewards:  # Dr. GRPO (Liu et al. 2025) drops this division: it biases towards too easy/hard prompts
        centred = centred / (grouped.std(0) + eps)  # DeepSeekMath Sec. 4.1.2: r_tilde_i = (r_i - mean) / std
    same = (grouped == grouped[:1]).all(0)  # std 0: no signal (and no rounding residue of the mean)
    return centred.masked_fill(same, 0.0).reshape(-1)


def token_weights(mask: torch.Tensor, loss_type: str, max_new_tokens: int) -> torch.Tensor:
    """The weight of each token's loss in a minibatch's loss [rows, C]: the loss is sum(weights * l_t), so any
    split into micro-batches adds up to the same value. G here is every sequence of the minibatch."""
    mask = mask.float()
    if loss_type == "grpo":  # DeepSeekMath Eq. (3): (1/G) sum_i (1/|o_i|) sum_t
        return mask / mask.sum(1, keepdim=True).clamp(min=1) / len(mask)
    if loss_type == "dapo":  # DAPO Eq. (8) (Yu et al. 2025): sum_i sum_t / sum_i |o_i|
        return mask / mask.sum().clamp(min=1)
    return mask / (len(mask) * max_new_tokens)  # Dr. GRPO (Liu et al. 2025): sum_i sum_t / (G * max_new_tokens)


def grpo_losses(new_logps, part: dict, cliprange: float, kl_coef: float):
    """The clipped surrogate and the k3 KL of DeepSeekMath Eq. (3) per token [rows, C] of a micro-batch (`part`: its
    old_logps, ref_logps, advantages and token_weights' `weights`): its share of the minibatch's loss, statistics."""
    old_logps, ref_logps, weights = part["old_logps"], part["ref_logps"], part["weights"]
    advantages = part["advantages"][:, None]  # outcome supervision: every token of o_i has A_i
    ratio = torch.exp(new_logps - old_logps)  # rho = pi_theta / pi_old, 1 at the first minibatch
    surrogate = ratio * advantages  # DeepSeekMath Eq. (3): rho A
    clipped = torch.clamp(ratio, 1 - cliprange, 1 + cliprange) * advantages  # Eq. (3): clip(rho, 1-e, 1+e) A
    pg_tokens = -torch.min(surrogate, clipped)  # ALGO LOGIC: Eq. (3), negated to be minimized
    log_ref_ratio = ref_logps - new_logps
    kl_tokens = torch.exp(log_ref_ratio) - log_ref_ratio - 1  # DeepSeekMath Eq. (4): pi_ref/pi - log(pi_ref/pi) - 1
    total = lambda x: (weights * x).sum()  # noqa: E731  the aggregation of --loss-type
    pg_loss, kl_loss = total(pg_tokens), total(kl_tokens)
    loss = pg_loss + kl_coef * kl_loss  # ALGO LOGIC: DeepSeekMath Eq. (3): -(clipped surrogate - beta D_KL)
    stats = {
        "loss/policy": pg_loss,
        "loss/kl": kl_loss,
        "policy/clipfrac": total((clipped < surrogate).float()),
        "policy/approxkl": 0.5 * total((new_logps - old_logps) ** 2),
        "policy/ratio": total(ratio),
    }
    return loss, stats


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
    if state is None:
        initial, first, cursor = evaluate(0), 1, 0  # update 0: the SFT policy, pi_theta = pi_ref
    else:  # --resume: the data position and generator where the checkpoint left them
        initial, first, cursor, order = state["initial"], state["step"] + 1, state["cursor"], state["order"]
        generator.set_state(state["generator"])
    times = {}  # the last update's timings (none if a resumed run had no update left)
    for update in range(first, num_updates + 1):
        times = {}
        # ---- DeepSeekMath Algorithm 1, step 1: G outputs {o_i} ~ pi_old(.|q) for each prompt q (no gradients) ----
        with training.timer(times, "time/generation"), torch.no_grad():
            if cursor + per_process > len(order):
                order, cursor = torch.randperm(len(prompts), generator=generator).tolist(), 0
            rows = order[cursor : cursor + per_process] * k  # row j * B + b: completion j of prompt b
            prompt = data.pad([prompts[i] for i in rows], pad_id, "left").to(device)
            cursor += per_process
            unwrapped = accelerator.unwrap_model(policy)
            completion, has_eos = common.generate(unwrapped, prompt, tokenizer, args.max_new_tokens, args.temperature)
        # ---- step 2: rewards r_i, group-normalized advantages A_i, log pi_old, log pi_ref (fixed for the update) ----
        with training.timer(times, "time/scoring"), torch.no_grad():
            mask = completion != pad_id  # completion tokens up to and including the first EOS: |o_i| of them
            unique = prompt[:per_process]  # each prompt once: its forward is shared by its k completions
            old_logps = common.completion_logprobs(unwrapped, unique, completion, pad_id, args.temperature)
            if args.kl_coef > 0:
                ref_logps = common.completion_logprobs(ref_policy, unique, completion, pad_id, args.temperature)
            else:  # beta 0: the KL term is not in the loss, its statistics read 0
                ref_logps = old_logps
            examples = [train_rows[i] for i in rows[:per_process]]  # the dataset's columns, for a reward function
            scores = common.reward_scores(
                reward_model, unique, completion, pad_id, has_eos, args.no_eos_score, examples, tokenizer
            )
            run.check_finite(update, reward=scores)
            advantages = group_advantages(scores, k, args.scale_rewards)  # DeepSeekMath Sec. 4.1.2
            kl = (old_logps - ref_logps).masked_fill(~mask, 0)  # k1 estimate per token, for the statistics
        rollout = dict(old_logps=old_logps, ref_logps=ref_logps, advantages=advantages)

        # ---- step 3: update_epochs x num_minibatches clipped steps of Eq. (3), groups kept whole in micro-batches ----
        groups = lambda idx: torch.cat([idx + j * per_process for j in range(k)])  # noqa: E731  rows of prompts idx
        with training.timer(times, "time/update"):
            stats = []
            for _ in range(args.update_epochs):
                perm = torch.randperm(per_process, generator=generator).to(device)
                for minibatch in perm.split(per_process // args.num_minibatches):
                    mb_rows, totals = groups(minibatch), {}
                    weights = torch.zeros(mask.shape, device=device)  # each token's weight in this minibatch's loss
                    weights[mb_rows] = token_weights(mask[mb_rows], args.loss_type, args.max_new_tokens)
                    micro_batches = minibatch.split(args.micro_batch_size)
                    for i, idx in enumerate(micro_batches):
                        idx_rows = groups(idx)  # the k completions of each prompt, [all first; all second; ...]
                        with common.accumulate(accelerator, policy, last=i == len(micro_batches) - 1):
                            new_logps = common.completion_logprobs(
                                policy, unique[idx], completion[idx_rows], pad_id, args.temperature
                            )
                            part = {name: v[idx_rows] for name, v in {**rollout, "weights": weights}.items()}
                            loss, s = grpo_losses(new_logps, part, args.cliprange, args.kl_coef)  # DeepSeekMath (3)
                            run.check_finite(update, loss=loss)
                            accelerator.backward(loss)
                        totals = {name: totals.get(name, 0.0) + v.item() for name, v in s.items()}  # minibatch means
                    stats.append(totals)
                    optimizer.step()
                    optimizer.zero_grad()
            scheduler.step()

        metrics = {
            "objective/scores": scores.mean(),
            "objective/kl": kl.sum(1).mean(),
            "objective/entropy": -old_logps.sum(1).mean(),
            "objective/eos_rate": has_eos.float().mean(),
            "objective/length": mask.sum(1).float().mean(),
            **{name: sum(s[name] for s in stats) / len(stats) for name in stats[0]},
            "grpo/advantage_abs": advantages.abs().mean(),
            "grpo/reward_std": scores.view(k, -1).std(0).mean() if k > 1 else torch.tensor(0.0),
            "grpo/zero_std_groups": (scores.view(k, -1) == scores.view(k, -1)[:1]).all(0).float().mean(),
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
        run.step_done(update, dict(initial=initial, cursor=cursor, order=order, generator=generator.get_state()))

    final = evaluate(num_updates)
    common.save_model(accelerator, policy, tokenizer, run.dir)
    run.finish(final, initial, times)


if __name__ == "__main__":
    training.run_cli(Args, main, PRESETS)
