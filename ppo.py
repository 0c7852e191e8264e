"""PPO for RLHF, following "The N+ Implementation Details of RLHF with PPO: A Case Study on TL;DR
Summarization" (Huang et al. 2024, https://arxiv.org/abs/2403.17031).

Maximize E_{x, y~pi}[ r(x, y) ] - kl_coef * KL(pi || pi_ref) with token-level clipped PPO and a learned
critic. Each update samples one completion per prompt, scores it with the reward model at the EOS token,
turns the KL to the SFT reference into a per-token penalty, estimates advantages with GAE, and takes a
few epochs of clipped policy and value steps on that fixed batch.

    python ppo.py                                                  # toy task, CPU, ~2 minutes
    python ppo.py --model vwxyzjn/EleutherAI_pythia-1b-deduped__sft__tldr \
        --reward-model vwxyzjn/EleutherAI_pythia-1b-deduped__reward__tldr --dataset trl-lib/tldr \
        --lr 3e-6 --batch-size 512 --num-minibatches 1 --micro-batch-size 8 --total-episodes 1000000 \
        --max-prompt-length 512 --max-new-tokens 53 --kl-coef 0.05
    accelerate launch --config_file configs/zero2.yaml ppo.py --model ... --reward-model ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from accelerate.utils import extract_model_from_parallel

import common
import data
import toy
import training
from training import Finite, Fraction, NonNegative, Positive

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
    exp_name: str = "ppo"
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
    """reward model; the critic starts as a copy of it, head and bias included (`toy-rm`: the cached toy RM;
    `toy-gold`: the toy gold reward, and the critic toy-rm's network with its head at 0)"""
    reward_fn: str | None = None
    """a Python reward function instead of --reward-model: `module:function` or `path/file.py:function`, with TRL's
    signature fn(prompts, completions, **columns) -> list[float] (the dataset's other columns arrive aligned)"""
    critic_model: str | None = None
    """where the critic starts (default: --reward-model, head and bias included; with --reward-fn: --model, its value
    head at 0)"""
    lora_r: NonNegative[int] = 0
    """LoRA rank of the policy's adapters (peft; 0: full fine-tuning); the reference is the adapter-disabled policy"""
    lora_alpha: Positive[float] = 16.0
    """LoRA alpha: the adapters' scale is alpha / r (DR-PO and REBEL TL;DR: r 1024, alpha 2048)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass of trained models: less memory, more compute"""

    # data
    dataset: str = "toy"
    """prompts (a `prompt` column): `toy`, a Hub id (trl-lib/tldr), a save_to_disk dir or a json/jsonl/parquet/csv"""
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
    kl_coef: NonNegative[float] = 0.05
    """beta_KL: per-token KL penalty coefficient (N+: 0.05)"""
    temperature: Positive[float] = 0.7
    """sampling temperature tau_s; every log-prob is computed from logits / tau_s (N+: 0.7)"""
    no_eos_score: Finite[float] = -1.0
    """score that replaces the reward-model score of a completion without EOS (N+: -1)"""
    gamma: Fraction[float] = 1.0
    """GAE discount (N+: 1)"""
    lam: Fraction[float] = 0.95
    """GAE lambda (N+: 0.95)"""
    cliprange: Positive[float] = 0.2
    """policy ratio clip epsilon (N+: 0.2)"""
    cliprange_value: Positive[float] = 0.2
    """value clip around the rollout values (N+: 0.2)"""
    vf_coef: NonNegative[float] = 0.1
    """value loss coefficient (N+: 0.1)"""
    whiten_rewards: bool = False
    """scale the per-token rewards to unit variance over the rollout, mean kept (N+: off; DR-PO's official code: on)"""

    # optimization and batch sizes
    lr: NonNegative[float] = 3e-5
    """AdamW learning rate for policy and critic, decayed linearly to 0 (N+ TL;DR: 3e-6)"""
    total_episodes: Positive[int] = 4096
    """completions sampled over the whole run (N+: 1,000,000)"""
    batch_size: Positive[int] = 64
    """prompts per rollout (one completion each), over all processes (N+: 512)"""
    num_minibatches: Positive[int] = 2
    """optimizer steps per epoch over a rollout (N+: 1)"""
    update_epochs: Positive[int] = 4
    """epochs over each rollout (N+: 4)"""
    micro_batch_size: Positive[int] = 64
    """rows per forward/backward; gradients accumulate up to a minibatch"""


class PolicyAndCritic(torch.nn.Module):
    """Policy and critic as one module (PPO, DR-PO): one accelerator.prepare (DeepSpeed trains one model per
    Accelerator) and one forward (DDP synchronizes what its forward ran), which returns the policy's output with
    `critic_values`, the critic's head at every position."""

    def __init__(self, policy, critic):
        super().__init__()
        self.policy, self.critic = policy, critic

    def forward(self, logits_to_keep=None, **inputs):
        out = self.policy(**inputs, logits_to_keep=logits_to_keep)
        out["critic_values"] = self.critic.score(self.critic.base_model(**inputs).last_hidden_state).squeeze(-1)
        return out


def per_token_rewards(kl: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """r_t = -kl_coef * (log pi_t - log pi_ref) on completion tokens, plus the score at the last one (the
    EOS, or the final token when there is none); 0 after it. The score sits on the EOS itself, as in DR-PO's code;
    N+ adds it one slot later, on the first padding position, and trains the value there too; here the value is
    trained up to the EOS and is 0 past it."""
    rewards = (-kl_coef * kl).masked_fill(~mask, 0)  # N+ per-token KL penalty
    end = mask.sum(1) - 1
    rewards[torch.arange(len(end), device=rewards.device), end] += scores  # the score at the EOS (DR-PO's code)
    return rewards


def whiten_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token rewards divided by their standard deviation over the completion tokens, their mean kept
    (N+'s `whiten_rewards`, shift_mean=False); 0 after the end."""
    return common.masked_whiten(rewards, mask, shift_mean=False).masked_fill(~mask, 0)


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, ...]:
    """GAE over completion tokens ([B, C]; rewards and values already 0 after the end, V = 0 past it):
    delta_t = r_t + gamma V_{t+1} - V_t,  A_t = sum_k (gamma lam)^k delta_{t+k},  returns R_t = A_t + V_t.
    Vectorized as one product with the upper-triangular matrix of discounts."""
    C = rewards.shape[1]
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], 1)
    deltas = rewards + gamma * next_values - values  # the TD residuals delta_t of GAE (Schulman et al. 2016)
    t = torch.arange(C, device=rewards.device, dtype=rewards.dtype)
    discount = (gamma * lam) ** (t[None, :] - t[:, None]).clamp(min=0) * (t[None, :] >= t[:, None])
    advantages = deltas @ discount.T  # GAE Eq. (16) (Schulman et al. 2016): sum_{t>=s} (gamma lam)^(t-s) delta_t
    return advantages, advantages + values


def logprobs_and_values(model, prompt, completion, pad_id, temperature):
    """log pi(y_t | x, y_<t) and V(s_t) for every completion token t, [B, C] each, from one forward of the
    policy-and-critic module: logits / temperature, and the critic's head on the hidden state just before y_t."""
    P, C = prompt.shape[1], completion.shape[1]
    keep = torch.arange(P - 1, P + C - 1, device=completion.device)  # the positions that predict y_1..y_C
    out = common.forward(model, torch.cat([prompt, completion], 1), pad_id, logits_to_keep=keep)
    logps = common.token_logprobs(out.logits, completion, pad_id, temperature)
    # the critic starts as the reward model (N+), so its values take the bias that reward_scores() removes
    bias = getattr(extract_model_from_parallel(model).critic.config, "reward_bias", 0.0)
    return logps, out["critic_values"][:, P - 1 : -1].float() - bias


def ppo_losses(new_logps, new_values, rollout, args, n_tokens):
    """PPO's clipped surrogate and N+'s clipped value loss on a micro-batch of the rollout (its old_logps,
    old_values, advantages, returns and mask), and their statistics: sums over the micro-batch's completion tokens
    divided by `n_tokens`, those of its whole minibatch. The micro-batches add up to the minibatch's token mean
    whatever their size. (N+ takes each micro-batch's own token mean; with its micro-batch of one sequence, that
    is a mean over sequences of each one's token mean, in which a short completion's tokens weigh more.)"""
    old_logps, old_values, mask = rollout["old_logps"], rollout["old_values"], rollout["mask"]
    mean = lambda x: (x * mask).sum() / n_tokens  # noqa: E731  this micro-batch's share of the minibatch token mean
    advantages, returns = rollout["advantages"], rollout["returns"]
    ratio = torch.exp(new_logps - old_logps)
    pg_losses = -advantages * ratio  # PPO Eq. (7) (Schulman et al. 2017), negated to be minimized
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1 - args.cliprange, 1 + args.cliprange)  # PPO Eq. (7)
    pg_loss = mean(torch.max(pg_losses, pg_losses_clipped))  # PPO Eq. (7): the min of the two
    values_clipped = old_values + torch.clamp(new_values - old_values, -args.cliprange_value, args.cliprange_value)
    vf_unclipped, vf_clipped = (new_values - returns) ** 2, (values_clipped - returns) ** 2
    vf_loss = 0.5 * mean(torch.max(vf_unclipped, vf_clipped))  # N+ clipped value loss
    stats = {
        "loss/policy": pg_loss,
        "loss/value": vf_loss,
        "policy/clipfrac": mean((pg_losses_clipped > pg_losses).float()),
        "policy/approxkl": 0.5 * mean((new_logps - old_logps) ** 2),
        "val/clipfrac": mean((vf_unclipped < vf_clipped).float()),
        "val/ratio": mean(ratio),
    }
    return pg_loss, vf_loss, stats


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
    critic_name = args.critic_model or (args.model if args.reward_fn else args.reward_model)  # as --help states
    new_head = "zero" if args.critic_model or args.reward_fn else None  # a fresh head (V = 0) only where asked for
    critic = common.trainable(common.load_model(critic_name, "reward", new_head=new_head), args)
    if getattr(reward_model, "retokenize", None) is not None and critic_name == args.reward_model:
        raise training.UserError(f"--reward-model {args.reward_model}: the critic needs the policy's tokenizer")

    train = data.load_data(args.dataset, "train", ("prompt",))
    test = data.load_data(args.dataset, "test", ("prompt",)).take(args.eval_prompts)  # the first eval_prompts
    prompts = data.tokenize_prompts(tokenizer, list(train["prompt"]), args.max_prompt_length)
    train_rows = train.to_list()

    model = PolicyAndCritic(policy, critic)  # one module: trained by one optimizer, one forward for both
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, eps=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1 - k / num_updates)  # N+: linear to 0
    model, optimizer = common.prepare(accelerator, model, optimizer, micro_batch_size=args.micro_batch_size)
    policy = accelerator.unwrap_model(model).policy  # generation and evaluation run the policy alone
    run = training.Run(args, accelerator, num_updates)
    generator = torch.Generator().manual_seed(args.seed + accelerator.process_index)
    order = torch.randperm(len(prompts), generator=generator).tolist()

    def evaluate(update):  # greedy completions of the test prompts: score, KL, length (toy: gold, win rate)
        return run.log_eval(update, *common.evaluate(policy, tokenizer, test, args, ref_policy, reward_model, judge))

    state = run.resume(scheduler=scheduler)
    if state is None:
        initial, first, cursor = evaluate(0), 1, 0  # update 0: the SFT policy, pi_theta = pi_ref
    else:  # --resume: the data position and generators where the checkpoint left them
        initial, first, cursor, order = state["initial"], state["step"] + 1, state["cursor"], state["order"]
        generator.set_state(state["generator"])
    for update in range(first, num_updates + 1):
        times = {}
        # ---- N+ PPO loop, step 1. rollout: x from the prompts, y ~ pi_theta(.|x) at temperature tau_s ----
        with training.timer(times, "time/generation"), torch.no_grad():
            if cursor + per_process > len(order):
                order, cursor = torch.randperm(len(prompts), generator=generator).tolist(), 0
            rows = order[cursor : cursor + per_process]
            prompt = data.pad([prompts[i] for i in rows], pad_id, "left").to(device)
            cursor += per_process
            completion, has_eos = common.generate(policy, prompt, tokenizer, args.max_new_tokens, args.temperature)
            mask = completion != pad_id  # completion tokens up to and including the first EOS

        # ---- step 2. score: log pi_old and V_old, log pi_ref, the reward model's score r(x, y) ----
        with training.timer(times, "time/scoring"), torch.no_grad():
            unwrapped = accelerator.unwrap_model(model)
            old_logps, old_values = logprobs_and_values(unwrapped, prompt, completion, pad_id, args.temperature)
            old_values = old_values.masked_fill(~mask, 0)
            ref_logps = common.completion_logprobs(ref_policy, prompt, completion, pad_id, args.temperature)
            examples = [train_rows[i] for i in rows]  # the dataset's columns, for a reward function
            scores = common.reward_scores(
                reward_model, prompt, completion, pad_id, has_eos, args.no_eos_score, examples, tokenizer
            )
            run.check_finite(update, reward=scores)

        # ---- step 3. per-token KL penalty and GAE (fixed for the update) ----
        with training.timer(times, "time/scoring"), torch.no_grad():
            kl = (old_logps - ref_logps).masked_fill(~mask, 0)  # k1 estimate per token, 0 after EOS
            rewards = per_token_rewards(kl, scores, mask, args.kl_coef)  # N+ per-token KL penalty
            rewards = whiten_rewards(rewards, mask) if args.whiten_rewards else rewards
            advantages, returns = compute_gae(rewards, old_values, args.gamma, args.lam)  # GAE Eq. (16)
            advantages = common.masked_whiten(advantages, mask).masked_fill(~mask, 0)  # N+: whitened advantages
        rollout = dict(old_logps=old_logps, old_values=old_values, advantages=advantages, returns=returns, mask=mask)

        # ---- step 4. PPO epochs: update_epochs x num_minibatches clipped steps on the fixed rollout ----
        with training.timer(times, "time/update"):
            stats = []
            for _ in range(args.update_epochs):
                perm = torch.randperm(per_process, generator=generator).to(device)
                for minibatch in perm.split(per_process // args.num_minibatches):
                    micro_batches, totals = minibatch.split(args.micro_batch_size), {}
                    n_tokens = mask[minibatch].sum().clamp(min=1)  # each loss is a token mean over the minibatch
                    for i, idx in enumerate(micro_batches):
                        with common.accumulate(accelerator, model, last=i == len(micro_batches) - 1):
                            new_logps, new_values = logprobs_and_values(
                                model, prompt[idx], completion[idx], pad_id, args.temperature
                            )
                            part = {k: v[idx] for k, v in rollout.items()}
                            pg_loss, vf_loss, s = ppo_losses(new_logps, new_values, part, args, n_tokens)  # PPO (7)
                            loss = pg_loss + args.vf_coef * vf_loss  # N+ total loss: policy + vf_coef * value
                            run.check_finite(update, loss=loss)
                            accelerator.backward(loss)
                        totals = {k: totals.get(k, 0.0) + v.item() for k, v in s.items()}  # the minibatch's means
                    stats.append(totals)
                    optimizer.step()
                    optimizer.zero_grad()
            scheduler.step()

        seq_kl = kl.sum(1)
        explained = 1 - common.masked_var(returns - old_values, mask) / common.masked_var(returns, mask).clamp(min=1e-8)
        metrics = {
            "objective/scores": scores.mean(),
            "objective/kl": seq_kl.mean(),
            "objective/rlhf_reward": (scores - args.kl_coef * seq_kl).mean(),
            "objective/entropy": -old_logps.sum(1).mean(),
            "objective/eos_rate": has_eos.float().mean(),
            "objective/length": mask.sum(1).float().mean(),
            "val/explained_variance": explained,
            **{k: sum(s[k] for s in stats) / len(stats) for k in stats[0]},
            "lr": scheduler.get_last_lr()[0],
            "episodes": update * args.batch_size,
            **times,
            "time/samples_per_second": per_process / sum(times.values()),
        }
        if is_toy:  # the gold reward of the training samples: the smoothest learning curve on the toy task
            metrics["objective/gold"] = toy.gold_scores(prompt, completion, args.dataset).mean()
        run.log(metrics, update, show=("objective/scores", "objective/kl"))
        if args.eval_every and update % args.eval_every == 0 and update < num_updates:
            evaluate(update)
        loop = {"initial": initial, "cursor": cursor, "order": order, "generator": generator.get_state()}
        run.step_done(update, loop)  # the loop's position, for a checkpoint

    final = evaluate(num_updates)
    common.save_model(accelerator, model, tokenizer, run.dir, part="policy")
    run.finish(final, initial, times)


if __name__ == "__main__":
    training.run_cli(Args, main, PRESETS)
