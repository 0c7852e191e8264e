"""DR-PO: "Dataset Reset Policy Optimization for RLHF" (Chang et al. 2024, https://arxiv.org/abs/2404.08495).

PPO exactly as in ppo.py (N+ implementation details), except where episodes start. With probability
`reset_prob` a rollout is *reset* to a state of the offline data: the prompt plus the first h tokens of
the dataset's reference completion (the SFT demonstrations), h ~ Uniform{1, ..., L-1} with L the
reference length including EOS; the policy continues from there. The forced prefix stays inside the
completion window: it counts for the reward model, the KL penalty and the critic, and is masked only
in the policy-gradient loss (the policy did not choose those tokens). Evaluation starts from the bare
prompt. `diff ppo.py drpo.py` shows the reset and nothing else.

The official DR-PO code (github.com/Cornell-RL/drpo, src/tldr/ppo.py and drpo.py, which produced the paper's
PPO and DR-PO numbers) forks an earlier N+ version and departs from the N+ details followed here in two
ways: it whitens the per-token rewards (whiten_rewards=True, shift_mean=False; `--whiten-rewards` does the
same here, over the completion tokens), and it does not mask after EOS (the KL penalty, the values, the
whitening and both losses run over all 53 generated tokens; here a completion ends at its EOS, so no flag).

    python drpo.py                                                 # toy task, CPU, ~2 minutes
    python drpo.py --model vwxyzjn/EleutherAI_pythia-1b-deduped__sft__tldr \
        --reward-model vwxyzjn/EleutherAI_pythia-1b-deduped__reward__tldr --dataset trl-lib/tldr \
        --lr 3e-6 --batch-size 512 --num-minibatches 1 --micro-batch-size 8 --total-episodes 1000000 \
        --max-prompt-length 512 --max-new-tokens 53 --kl-coef 0.05 --reset-prob 1.0
    accelerate launch --config_file configs/zero2.yaml drpo.py --model ... --reward-model ...
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from accelerate.utils import extract_model_from_parallel
from transformers import LogitsProcessor

import common
import toy


@dataclass
class Args:
    # common
    exp_name: str = "drpo"
    """name of the experiment (prefix of the run directory)"""
    seed: int = 1
    """random seed"""
    output_dir: str = "runs"
    """parent directory of the run directory"""
    run_name: str | None = None
    """run directory name (default: {exp_name}__{seed}__{unix time})"""
    track: bool = False
    """log to Weights & Biases"""
    wandb_project: str = "rlhf"
    """wandb project name"""
    save_every: int = 0
    """write a checkpoint to <run>/checkpoint every this many updates (0: only on Ctrl-C / SIGTERM)"""
    resume: str | None = None
    """continue the run in this directory (runs/<run>) from its checkpoint, with its saved arguments"""
    trust_remote_code: bool = False
    """allow Hub models that ship their own Python code (it runs on this machine: trusted models only)"""

    # model
    model: str = "toy-sft"
    """SFT policy to start from; also the frozen reference (Hub id or local dir; `toy-sft` = the cached toy SFT model)"""
    reward_model: str = "toy-rm"
    """reward model; the critic starts as a copy of it, head and bias included (`toy-rm`: the cached toy RM)"""
    lora_r: int = 0
    """LoRA rank of the policy's adapters (peft; 0 = full fine-tuning); the reference is then the adapter-disabled policy, not a second copy"""
    lora_alpha: float = 16.0
    """LoRA alpha: the adapters' scale is alpha / r (DR-PO and REBEL TL;DR: r 1024, alpha 2048)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass of trained models: less memory, more compute"""

    # data
    dataset: str = "toy"
    """prompts with reference completions (`prompt`, `completion`: the SFT data): `toy`, a Hub id (trl-lib/tldr), a save_to_disk dir or a file"""
    max_prompt_length: int = 32
    """prompts longer than this keep their last tokens (TL;DR: 512)"""
    max_new_tokens: int = 8
    """completion length in tokens (TL;DR: 53)"""
    eval_prompts: int = 500
    """test prompts used at each evaluation (greedy decoding)"""
    eval_every: int = 16
    """evaluate every this many updates (and before the first and after the last)"""

    # algorithm
    reset_prob: float = 1.0
    """fraction of rollouts reset to a prefix of the reference completion (the paper's beta; paper: 1.0)"""
    kl_coef: float = 0.05
    """beta_KL: per-token KL penalty coefficient (N+: 0.05)"""
    temperature: float = 0.7
    """sampling temperature tau_s; every log-prob is computed from logits / tau_s (N+: 0.7)"""
    no_eos_score: float = -1.0
    """score that replaces the reward-model score of a completion without EOS (N+: -1)"""
    gamma: float = 1.0
    """GAE discount (N+: 1)"""
    lam: float = 0.95
    """GAE lambda (N+: 0.95)"""
    cliprange: float = 0.2
    """policy ratio clip epsilon (N+: 0.2)"""
    cliprange_value: float = 0.2
    """value clip around the rollout values (N+: 0.2)"""
    vf_coef: float = 0.1
    """value loss coefficient (N+: 0.1)"""
    whiten_rewards: bool = False
    """scale the per-token rewards to unit variance over the rollout, mean kept (N+: off; DR-PO's official code: on)"""

    # optimization and batch sizes
    lr: float = 3e-5
    """AdamW learning rate for policy and critic, decayed linearly to 0 (N+ TL;DR: 3e-6)"""
    total_episodes: int = 4096
    """completions sampled over the whole run (N+: 1,000,000)"""
    batch_size: int = 64
    """prompts per rollout (one completion each), over all processes (N+: 512)"""
    num_minibatches: int = 2
    """optimizer steps per epoch over a rollout (N+: 1)"""
    ppo_epochs: int = 4
    """epochs over each rollout (N+: 4)"""
    micro_batch_size: int = 64
    """rows per forward/backward; gradients accumulate up to a minibatch"""


def per_token_rewards(kl: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """r_t = -kl_coef * (log pi_t - log pi_ref) on completion tokens, plus the score at the last one (the
    EOS, or the final token when there is none); 0 after it."""
    rewards = (-kl_coef * kl).masked_fill(~mask, 0)  # ALGO LOGIC: N+ per-token KL penalty
    end = mask.sum(1) - 1
    rewards[torch.arange(len(end), device=rewards.device), end] += scores  # ALGO LOGIC: the score at the EOS index
    return rewards


def whiten_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token rewards divided by their standard deviation over the completion tokens, their mean kept
    (N+'s `whiten_rewards`, shift_mean=False); 0 after the end."""
    return common.masked_whiten(rewards, mask, shift_mean=False).masked_fill(~mask, 0)


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over completion tokens ([B, C]; rewards and values already 0 after the end, V = 0 past it):
    delta_t = r_t + gamma V_{t+1} - V_t,  A_t = sum_k (gamma lam)^k delta_{t+k},  returns R_t = A_t + V_t.
    Vectorized as one product with the upper-triangular matrix of discounts."""
    C = rewards.shape[1]
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], 1)
    deltas = rewards + gamma * next_values - values  # ALGO LOGIC: N+ / GAE Eq. (16) of Schulman et al. 2016
    t = torch.arange(C, device=rewards.device, dtype=rewards.dtype)
    discount = (gamma * lam) ** (t[None, :] - t[:, None]).clamp(min=0) * (t[None, :] >= t[:, None])
    advantages = deltas @ discount.T  # A[:, s] = sum_{t>=s} (gamma lam)^(t-s) delta[:, t]
    return advantages, advantages + values


def logprobs_and_values(model, prompt, completion, pad_id, temperature):
    """log pi(y_t | x, y_<t) and V(s_t) for every completion token t, [B, C] each, from one forward of the
    policy-and-critic module: logits / temperature, and the critic's head on the hidden state just before y_t."""
    P, C = prompt.shape[1], completion.shape[1]
    keep = torch.arange(P - 1, P + C - 1, device=completion.device)  # the positions that predict y_1..y_C
    out = common.forward(model, torch.cat([prompt, completion], 1), pad_id, logits_to_keep=keep)
    logps = common.token_logprobs(out.logits, completion, pad_id, temperature)
    # N+: the critic subtracts the normalization bias it inherits from the reward model, so that at the start
    # the value of the state after EOS is the reward score
    bias = getattr(extract_model_from_parallel(model).critic.config, "reward_bias", 0.0)
    return logps, out["critic_values"][:, P - 1 : -1].float() - bias


class ForcePrefix(LogitsProcessor):
    """Dataset reset during generation: at completion step t < h[b], row b emits reference[b, t]."""

    def __init__(self, reference: torch.Tensor, h: torch.Tensor, prompt_len: int):
        self.reference, self.h, self.prompt_len = reference, h, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1] - self.prompt_len
        forced = t < self.h
        if not forced.any():
            return scores
        target = self.reference[:, min(t, self.reference.shape[1] - 1)].masked_fill(
            ~forced, 0
        )  # pad may lie outside the vocabulary
        one_hot = torch.full_like(scores, float("-inf")).scatter(1, target[:, None], 0.0)
        return torch.where(forced[:, None], one_hot, scores)


def sample_resets(lengths: torch.Tensor, reset_prob: float, generator: torch.Generator) -> torch.Tensor:
    """Prefix length h per row: Uniform{1, ..., L-1} with probability reset_prob (L = reference length incl.
    EOS), else 0 (a plain rollout). A reference shorter than 2 tokens is never used."""
    use = (torch.rand(len(lengths), generator=generator) < reset_prob) & (lengths >= 2)
    h = (
        1 + (torch.rand(len(lengths), generator=generator) * (lengths - 1).clamp(min=1)).long()
    )  # ALGO LOGIC: DR-PO reset state s_h, h ~ U{1..L-1}
    return torch.where(use, h, torch.zeros_like(h))


def ppo_losses(new_logps, old_logps, advantages, new_values, old_values, returns, mask, args, free):
    """Clipped surrogate (over `free` tokens: not forced by a reset) and clipped value loss (over all valid
    tokens), masked means."""
    ratio = torch.exp(new_logps - old_logps)
    pg_losses = -advantages * ratio  # ALGO LOGIC: PPO Eq. (7) (Schulman et al. 2017), negated to minimize
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1 - args.cliprange, 1 + args.cliprange)
    pg_loss = common.masked_mean(
        torch.max(pg_losses, pg_losses_clipped), free
    )  # ALGO LOGIC: DR-PO masks forced tokens here only
    values_clipped = old_values + torch.clamp(new_values - old_values, -args.cliprange_value, args.cliprange_value)
    vf_loss = 0.5 * common.masked_mean(
        torch.max((new_values - returns) ** 2, (values_clipped - returns) ** 2), mask
    )  # ALGO LOGIC: N+ clipped value loss
    stats = {
        "policy/clipfrac": common.masked_mean((pg_losses_clipped > pg_losses).float(), free),
        "policy/approxkl": 0.5 * common.masked_mean((new_logps - old_logps) ** 2, free),
        "val/clipfrac": common.masked_mean(
            ((new_values - returns) ** 2 < (values_clipped - returns) ** 2).float(), mask
        ),
        "val/ratio": common.masked_mean(ratio, mask),
    }
    return pg_loss, vf_loss, stats


def main(args: Args):
    accelerator = common.setup(args)
    device = accelerator.device
    per_process = args.batch_size // accelerator.num_processes
    num_updates = args.total_episodes // args.batch_size
    common.check_ranges(
        args,
        positive=(
            "temperature",
            "max_new_tokens",
            "max_prompt_length",
            "ppo_epochs",
            "micro_batch_size",
            "cliprange",
            "cliprange_value",
        ),
        non_negative=("lr", "kl_coef", "vf_coef", "save_every"),
        unit=("gamma", "lam"),
    )
    if per_process == 0 or per_process % args.num_minibatches or num_updates == 0:
        raise common.UserError(
            f"--batch-size {args.batch_size} must be a multiple of --num-minibatches {args.num_minibatches} (per process) and at most --total-episodes {args.total_episodes}"
        )
    tokenizer = common.load_tokenizer(args.model)
    pad_id = tokenizer.pad_token_id
    policy = common.apply_lora(common.trainable(common.load_model(args.model), args), args.lora_r, args.lora_alpha)
    ref_policy = common.reference_model(args.model, policy, args.lora_r, device)
    reward_model = common.load_model(args.reward_model, "reward", tokenizer=tokenizer, frozen=True).to(device)
    critic = common.trainable(common.load_model(args.reward_model, "reward"), args)  # the reward model, head included
    if getattr(reward_model, "retokenize", None) is not None:  # the critic reads the policy's tokens
        raise common.UserError(
            f"--reward-model {args.reward_model} has its own tokenizer, but the critic starts from it and reads the policy's tokens: use a reward model with the policy's tokenizer"
        )
    is_toy = args.dataset == "toy"

    if not 0.0 <= args.reset_prob <= 1.0:
        raise common.UserError(f"--reset-prob {args.reset_prob} must lie in [0, 1]")
    train = common.load_data(args.dataset, "train", ("prompt", "completion"))
    test = common.load_data(args.dataset, "test", ("prompt",))
    test = test.select(range(min(args.eval_prompts, len(test))))
    references = test["completion"] if is_toy else None
    train_texts = list(train["prompt"])
    pairs = [
        common.tokenize_pair(tokenizer, p, c, args.max_prompt_length, args.max_new_tokens)
        for p, c in zip(train_texts, train["completion"])
    ]
    prompts, reference_ids = [p for p, _ in pairs], [c for _, c in pairs]

    model = common.PolicyAndCritic(policy, critic)  # one module: trained by one optimizer, one forward for both
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, eps=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1 - k / num_updates)  # N+: linear to 0
    model, optimizer = common.prepare(accelerator, model, optimizer, micro_batch_size=args.micro_batch_size)
    policy = accelerator.unwrap_model(model).policy  # generation and evaluation run the policy alone
    run = common.Run(args, accelerator, num_updates)
    generator = torch.Generator().manual_seed(args.seed + accelerator.process_index)
    order = torch.randperm(len(prompts), generator=generator).tolist()
    reset_generator = torch.Generator().manual_seed(
        args.seed + 7919 * (1 + accelerator.process_index)
    )  # keeps the main stream unchanged

    def run_eval(update):
        metrics, samples = common.evaluate(
            policy,
            tokenizer,
            test["prompt"],
            references,
            is_toy=is_toy,
            max_prompt=args.max_prompt_length,
            max_new_tokens=args.max_new_tokens,
            ref_model=ref_policy,
            reward_model=reward_model,
            no_eos_score=args.no_eos_score,
        )
        run.write_samples(samples, update)
        return run.log(metrics, update, show=("eval/win_rate", "eval/kl") if is_toy else ("eval/score", "eval/kl"))

    state = run.resume(scheduler=scheduler)
    if state is None:
        initial, first, cursor = run_eval(0), 1, 0  # step 0: the SFT policy, pi_theta = pi_ref
    else:  # --resume: the data position and generators where the checkpoint left them
        initial, first, cursor, order = state["initial"], state["step"] + 1, state["cursor"], state["order"]
        generator.set_state(state["generator"])
        reset_generator.set_state(state["reset_generator"])
    start, times = time.time(), {}
    for update in range(first, num_updates + 1):
        times = {}
        # ---- rollout: sample, score, per-token KL penalty, GAE (no gradients) ----
        with common.timer(times, "time/generation"), torch.no_grad():
            if cursor + per_process > len(order):
                order, cursor = torch.randperm(len(prompts), generator=generator).tolist(), 0
            rows = order[cursor : cursor + per_process]
            prompt = common.pad([prompts[i] for i in rows], pad_id, "left").to(device)
            cursor += per_process
            reference = common.pad([reference_ids[i] for i in rows], pad_id, "right").to(device)
            h = sample_resets((reference != pad_id).sum(1).cpu(), args.reset_prob, reset_generator).to(device)
            completion, has_eos = common.generate(
                policy,
                prompt,
                tokenizer,
                args.max_new_tokens,
                args.temperature,
                logits_processor=[ForcePrefix(reference, h, prompt.shape[1])],
            )
            forced = torch.arange(completion.shape[1], device=device)[None] < h[:, None]  # the reset prefix
        with common.timer(times, "time/scoring"), torch.no_grad():
            mask = completion != pad_id  # completion tokens up to and including the first EOS
            old_logps, old_values = logprobs_and_values(
                accelerator.unwrap_model(model), prompt, completion, pad_id, args.temperature
            )
            ref_logps = common.completion_logprobs(ref_policy, prompt, completion, pad_id, args.temperature)
            old_values = old_values.masked_fill(~mask, 0)
            scores = common.reward_scores(reward_model, prompt, completion, pad_id, has_eos, args.no_eos_score)
            kl = (old_logps - ref_logps).masked_fill(~mask, 0)  # k1 estimate per token, 0 after EOS
            rewards = per_token_rewards(kl, scores, mask, args.kl_coef)
            if args.whiten_rewards:
                rewards = whiten_rewards(rewards, mask)
            run.check_finite(update, reward=scores)
            advantages, returns = compute_gae(rewards, old_values, args.gamma, args.lam)
            advantages = common.masked_whiten(advantages, mask).masked_fill(~mask, 0)

        # ---- update: ppo_epochs x num_minibatches clipped steps on the fixed rollout ----
        with common.timer(times, "time/update"):
            stats = []
            minibatch = per_process // args.num_minibatches
            for _ in range(args.ppo_epochs):
                perm = torch.randperm(per_process, generator=generator).to(device)
                for mb in perm.split(minibatch):
                    micro_batches = mb.split(args.micro_batch_size)
                    for i, idx in enumerate(micro_batches):
                        with common.accumulate(accelerator, model, last=i == len(micro_batches) - 1):
                            new_logps, new_values = logprobs_and_values(
                                model, prompt[idx], completion[idx], pad_id, args.temperature
                            )
                            pg_loss, vf_loss, s = ppo_losses(
                                new_logps,
                                old_logps[idx],
                                advantages[idx],
                                new_values,
                                old_values[idx],
                                returns[idx],
                                mask[idx],
                                args,
                                mask[idx] & ~forced[idx],
                            )
                            loss = pg_loss + args.vf_coef * vf_loss  # ALGO LOGIC: N+ total loss
                            run.check_finite(update, loss=loss)
                            accelerator.backward(loss * len(idx) / len(mb))
                        stats.append(
                            {
                                "loss/policy": pg_loss.item(),
                                "loss/value": vf_loss.item(),
                                **{k: v.item() for k, v in s.items()},
                            }
                        )
                    optimizer.step()
                    optimizer.zero_grad()
            scheduler.step()

        seq_kl = kl.sum(1)
        returns_var = common.masked_var(returns, mask)
        metrics = {
            "objective/scores": scores.mean(),
            "objective/kl": seq_kl.mean(),
            "objective/rlhf_reward": (scores - args.kl_coef * seq_kl).mean(),
            "objective/entropy": -old_logps.sum(1).mean(),
            "objective/eos_rate": has_eos.float().mean(),
            "objective/length": mask.sum(1).float().mean(),
            "val/explained_variance": 1 - common.masked_var(returns - old_values, mask) / returns_var.clamp(min=1e-8),
            **{k: sum(s[k] for s in stats) / len(stats) for k in stats[0]},
            "lr": scheduler.get_last_lr()[0],
            "episodes": update * args.batch_size,
            **times,
            "time/samples_per_second": per_process / sum(times.values()),
            "reset/fraction": (h > 0).float().mean(),
            "reset/mean_h": h[h > 0].float().mean() if (h > 0).any() else 0.0,
            "reset/scores_reset": scores[h > 0].mean() if (h > 0).any() else 0.0,
            "reset/scores_plain": scores[h == 0].mean() if (h == 0).any() else 0.0,
        }
        if is_toy:  # the gold reward of the training samples: the smoothest learning curve on the toy task
            texts = tokenizer.batch_decode(completion, skip_special_tokens=True)
            golds = [toy.gold_reward(train_texts[i], t, bool(e)) for i, t, e in zip(rows, texts, has_eos)]
            metrics["objective/gold"] = sum(golds) / len(golds)
        run.log(metrics, update, show=("objective/scores", "objective/kl"))
        run.advance()
        if update % args.eval_every == 0 and update < num_updates:
            run_eval(update)
        run.step_done(
            update,
            lambda: {
                "initial": initial,
                "cursor": cursor,
                "order": order,
                "generator": generator.get_state(),
                "reset_generator": reset_generator.get_state(),
            },
        )

    final = run_eval(num_updates)
    common.save_model(accelerator, model, tokenizer, run.dir, part="policy")
    print(
        f"[drpo] last update: {sum(times.values()):.3f} s ({', '.join(f'{k[5:]} {v:.3f}' for k, v in times.items())}), peak memory {common.peak_memory_mb():.0f} MiB"
    )
    initial = {f"initial/{k.removeprefix('eval/')}": v for k, v in initial.items()}
    run.finish(
        {
            **initial,
            **final,
            "time/total": time.time() - start,
            "time/update_last": sum(times.values()),
            "memory/peak_mb": common.peak_memory_mb(),
        }
    )


if __name__ == "__main__":
    common.run_cli(Args, main)
